#!/usr/bin/env bash
# `make TARGET` with RUNNER=docker (the default) runs the job in the image. Without a Docker engine
# that answers, stop before `docker run`, saying how to go on, instead of docker's own
# "Cannot connect to the Docker daemon" (exit 125). The Makefile runs it before every target that
# runs a job:
#
#   docker/runner-check.sh TARGET     # exit 0: docker answers; exit 2: the message below
#
# DOCKER (the Makefile's variable) names the command: docker by default, or podman.
# Only shell builtins and docker itself: it must speak on a machine with nothing else on PATH.
set -u
goal=${1:-demo}
docker=${DOCKER:-docker}
if ! command -v "$docker" >/dev/null 2>&1; then
  why="there is no $docker command on this machine"
elif ! "$docker" info >/dev/null 2>&1; then
  why="no Docker engine answers ($docker info failed)"
else
  exit 0
fi
printf '%s\n' "make $goal: RUNNER=docker (the default) runs each job in the image, but $why." \
  "  Run it in .venv instead (once: make setup): make $goal RUNNER=local" \
  "  or start the Docker engine, or install podman-docker (podman behind the docker command)." >&2
exit 2
