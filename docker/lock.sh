#!/usr/bin/env bash
# Re-pin requirements.lock from pyproject.toml's dependencies and its `dev` extra (tests,
# linters), with hashes, for the Linux x86-64 CUDA image (Python 3.11). Run by `make lock`;
# needs network to PyPI.
#
# The torch line also carries the hash of the CPU build of the same version
# (torch-2.13.0+cpu from download.pytorch.org), so `make setup` on a machine without
# a GPU can install the small CPU wheel and still check every hash.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q "uv==0.13.8"
# uv keeps the versions already in the output file unless pyproject.toml needs others, so adding
# a package pins it and what it needs without moving every other pin. The CPU hash is put back below.
cpu_hash=6746dbcbeb526eb61330b76b41ff1b4eb848951103a892eeb080dfa2b264667b
grep -v "sha256:$cpu_hash" requirements.lock > requirements.lock.tmp || true
python3 -m uv pip compile pyproject.toml --extra dev --generate-hashes --python-version 3.11 \
  --python-platform x86_64-manylinux_2_28 --no-header -o requirements.lock.tmp
awk -v h="$cpu_hash" '{print} /^torch==/{print "    --hash=sha256:" h " \\"}' \
  requirements.lock.tmp > requirements.lock
rm requirements.lock.tmp
echo "requirements.lock: $(grep -c '^[a-z]' requirements.lock) packages pinned"
