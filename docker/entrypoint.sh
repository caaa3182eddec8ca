#!/usr/bin/env bash
# The image's command line: the first word picks the job, the rest goes to it unchanged.
#
#   IMAGE train --recipe jobs/recipes/X.yaml language=hi  ->  python -m jobs.train --recipe ... language=hi
#   IMAGE serve run=hi-1 host=0.0.0.0                     ->  python -m jobs.serve run=hi-1 host=0.0.0.0 (docker run -p 7860:7860)
#   IMAGE bench arch=large-v2                             ->  python -m lib.tools.bench arch=large-v2
#   IMAGE bench_data sizes=1000,10000                     ->  python -m lib.tools.bench_data sizes=...
#   IMAGE torchrun --nproc_per_node=2 -m jobs.train ...   ->  runs as given (multi-GPU)
#   IMAGE bash | python ... | nvidia-smi                  ->  runs as given (make shell)
#
# `exec` replaces this shell, so tini (PID 1) forwards SIGTERM straight to the job, which
# checkpoints and exits 3 (see lib/errors.py).
set -euo pipefail

jobs="prepare train eval export transcribe serve"
tools="bench bench_data"

usage() {
  cat <<USAGE
usage: IMAGE JOB [--recipe FILE] [--env-file FILE] [key=value ...]
  JOB is one of: ${jobs} (python -m jobs.JOB --help lists its options)
  or a developer tool: ${tools} (python -m lib.tools.TOOL --help)
or:    IMAGE python -m lib.launch --nproc_per_node=N -m jobs.train ...   multi-GPU training (torchrun, exit codes kept)
or:    IMAGE COMMAND ...                      any command, e.g. bash
USAGE
}

if [ "$#" -eq 0 ]; then
  usage
  exit 2
fi

case "$1" in
  help | -h | --help)
    usage
    ;;
  prepare | train | eval | export | transcribe | serve)
    job="$1"
    shift
    exec python -m "jobs.${job}" "$@"
    ;;
  bench | bench_data)
    tool="$1"
    shift
    exec python -m "lib.tools.${tool}" "$@"
    ;;
  *)
    exec "$@"
    ;;
esac
