#!/usr/bin/env bash
# `make image-test`: build the image and run the jobs in it through the Make targets
# (RUNNER=docker), on a machine without a GPU and without an image registry. CI runs it.
#
#   make image-test                       # engine set-up (root + apt-get), build, every check
#   make image-test IMAGE_TEST_STEPS="build demo"   # only some steps (see STEPS below)
#
# What it does, in order (each check prints PASS or FAIL; the exit code is the number of FAILs):
#   engine  podman (+ buildah, runc, mmdebstrap) from Debian's packages when missing (root), with
#           the settings a root machine without systemd needs (/etc/containers/containers.conf);
#   base    a Debian bookworm base image bootstrapped from the Debian archive (mmdebstrap), and a
#           uv image made from PyPI's uv wheel: the registries the user build pulls from are not
#           reachable here. Both are reused when present;
#   build   `make build` on that base (PYTHON=base, TORCH=cpu: the lock's CPU torch, no CUDA
#           wheels), the host's CA bundle as a build secret; prints the build time and the size of
#           each layer. A .env with the fake token lies in the work tree meanwhile (when there is none);
#   inside  tini is PID 1, the image's user, torch.compile (g++), imports, audio formats;
#   demo    `make demo` and `make transcribe` as a non-root UID, data volume from the host, an env
#           file with a fake token; every output belongs to that UID;
#   stop    `make train`, stopped with `docker stop`: checkpoint, exit 3; the rerun resumes to the
#           adapter of an uninterrupted run;
#   serve   `make serve` answers an HTTP request from the host on the published port;
#   docker  `make transcribe` through the `docker` command itself: podman behind it, or Docker's
#           engine (Debian's docker.io, started here when none answers and this is root);
#   token   the fake token is nowhere: outputs, logs, image and container inspect, history, layers.
# The user's image (`make build` with no build arguments: the pinned CUDA base, uv's Python 3.11,
# torch with CUDA) needs a registry; on a GPU host check it with
#   make build && make image-test IMAGE_TEST_ENGINE=docker IMAGE_TEST_STEPS="inside demo stop serve token"
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

# The container engine and the work folder (data volume, logs, env file).
ENGINE=${IMAGE_TEST_ENGINE:-podman}
WORK=${IMAGE_TEST_DIR:-/tmp/whisper-ft-image-test}
STEPS=${IMAGE_TEST_STEPS:-engine base build inside demo stop serve docker token}
# The user the jobs run as (DOCKER_USER): the one running this, or, for root, a non-root UID
# that is not the image's own 1000, as on a host where the user running make has another UID.
if [ "$(id -u)" = 0 ]; then TEST_UID=${IMAGE_TEST_UID:-1234}; else TEST_UID=$(id -u); fi
# The base and uv images made here (reused when present).
BASE_IMAGE=${IMAGE_TEST_BASE:-localhost/whisper-ft-base:bookworm}
UV_VERSION=0.13.0
UV_IMAGE=localhost/uv:$UV_VERSION
IMAGE_NAME=${IMAGE_TEST_NAME:-localhost/whisper-finetune-cputest}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PORT=${IMAGE_TEST_PORT:-17860}
TOKEN="hf_imagetest$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')"

fails=0
log() { printf '[image-test %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
results=()
check() { # check NAME COMMAND...: PASS when the command succeeds
  local name=$1
  shift
  if "$@"; then log "PASS $name"; results+=("PASS $name"); else
    log "FAIL $name"; results+=("FAIL $name"); fails=$((fails + 1)); fi
}
want() { [[ " $STEPS " == *" $1 "* ]]; }
die() { log "FAIL $*"; exit 1; }
# make with RUNNER=docker, the test user, data volume and env file (niced: podman's containers inherit it).
mk() { nice -n 10 make --no-print-directory RUNNER=docker DOCKER="$ENGINE" IMAGE_NAME="$IMAGE_NAME" \
  DOCKER_USER="$TEST_UID:$TEST_UID" DATA_DIR="$WORK/data" ENV_FILE="$WORK/test.env" SHM_SIZE=1g "$@"; }

# A fresh data volume owned by the test user.
fresh_data() {
  rm -rf "$WORK/data" && mkdir -p "$WORK/data"
  if [ "$(id -u)" = 0 ]; then chown "$TEST_UID:$TEST_UID" "$WORK/data"; fi
}

# ---- engine -------------------------------------------------------------------------------
setup_engine() {
  if ! command -v podman >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
      die "engine: no podman, and installing it needs root and apt-get (apt-get install podman buildah runc)"
    fi
    log "engine: apt-get install podman buildah runc mmdebstrap"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      podman buildah runc mmdebstrap >/dev/null; }; then die "engine: apt-get install failed"; fi
  fi
  # As root without systemd: cgroupfs (no systemd to ask), runc (crun refuses hybrid cgroups),
  # and ulimits the container may keep (the default asks for more open files than we may set).
  local conf=/etc/containers/containers.conf
  if [ "$(id -u)" = 0 ] && ! grep -qs 'whisper-finetune image-test' "$conf"; then
    if [ -s "$conf" ]; then
      log "engine: $conf exists and is not ours: left as it is"
    else
      mkdir -p /etc/containers
      cat >"$conf" <<'CONF'
# written by whisper-finetune image-test (docker/image-test.sh): root, no systemd
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
CONF
      log "engine: wrote $conf"
    fi
  fi
  podman info >/dev/null 2>&1 || die "engine: podman info fails: $(podman info 2>&1 | tail -3)"
  log "engine: $(podman --version)"
}

# ---- base and uv images -------------------------------------------------------------------
setup_base() {
  if podman image exists "$BASE_IMAGE"; then
    log "base: $BASE_IMAGE present, reused"
  else
    command -v mmdebstrap >/dev/null 2>&1 || die "base: no mmdebstrap (apt-get install mmdebstrap)"
    log "base: mmdebstrap bookworm (minbase + python3, its headers) -> $BASE_IMAGE"
    local t0=$SECONDS
    # Python 3.11.2, the lock's 3.11; the headers for the C code torch.compile and Triton build.
    nice -n 10 mmdebstrap --quiet --variant=minbase --include=python3,libpython3.11-dev,ca-certificates \
      bookworm "$WORK/rootfs.tar" http://deb.debian.org/debian || die "base: mmdebstrap failed"
    podman import -q --change 'CMD ["bash"]' "$WORK/rootfs.tar" "$BASE_IMAGE" >/dev/null || die "base: podman import failed"
    rm -f "$WORK/rootfs.tar"
    log "base: built in $((SECONDS - t0)) s"
  fi
  if podman image exists "$UV_IMAGE"; then
    log "base: $UV_IMAGE present, reused"
  else
    log "base: uv $UV_VERSION from PyPI's wheel -> $UV_IMAGE"
    local d="$WORK/uv"
    rm -rf "$d" && mkdir -p "$d/root"
    python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux_2_17_x86_64 \
      -d "$d" "uv==$UV_VERSION" || die "base: pip download uv==$UV_VERSION failed"
    python3 -m zipfile -e "$d"/uv-*.whl "$d/whl" || die "base: cannot unpack the uv wheel"
    install -m 755 "$d"/whl/uv-*.data/scripts/uv "$d/root/uv"
    tar -C "$d/root" -cf "$d/uv.tar" uv
    podman import -q "$d/uv.tar" "$UV_IMAGE" >/dev/null || die "base: podman import of uv failed"
    rm -rf "$d"
  fi
}

# ---- build --------------------------------------------------------------------------------
# The CPU build of torch: a local wheel (the lock holds its hash) found where pip finds links.
cpu_wheels() {
  local version dir
  version=$(sed -n 's/^torch==\([0-9.]*\) .*/\1/p' requirements.lock)
  for dir in ${PIP_FIND_LINKS:-} /opt/wheels "$WORK/wheels"; do
    if compgen -G "$dir/torch-$version+cpu-*.whl" >/dev/null; then echo "$dir"; return; fi
  done
  mkdir -p "$WORK/wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$WORK/wheels" \
    --index-url https://download.pytorch.org/whl/cpu "torch==$version+cpu" >/dev/null 2>&1 \
    && echo "$WORK/wheels"
}

build() {
  local wheels build_flags t0
  wheels=$(cpu_wheels) || true
  build_flags="--format docker --build-arg BASE_IMAGE=$BASE_IMAGE --build-arg UV_IMAGE=$UV_IMAGE"
  build_flags+=" --build-arg PYTHON=base --secret id=ca_bundle,src=$CA_BUNDLE"
  if [ -n "$wheels" ]; then
    build_flags+=" --build-arg TORCH=cpu --build-arg WHEELS=/wheels --volume $wheels:/wheels:ro"
    log "build: torch CPU build from $wheels"
  else
    log "build: no CPU wheel of torch here: the CUDA build (several GB more)"
  fi
  t0=$SECONDS
  # IMAGE from the environment (`make image-test` passes the users' image name) would win over
  # IMAGE_NAME: the CPU copy gets a name of its own.
  env -u IMAGE nice -n 10 make --no-print-directory build DOCKER="$ENGINE" IMAGE_NAME="$IMAGE_NAME" BUILD_FLAGS="$build_flags" \
    2>&1 | tee "$WORK/build.log" | grep -E '^(\[[0-9]+/[0-9]+] )?(STEP|COMMIT)|^build:|Error|error' | cut -c1-160 || true
  IMAGE=$(sed -n 's/^build: //p' "$WORK/build.log" | tail -1)
  if [ -z "$IMAGE" ] || ! podman image exists "$IMAGE"; then die "build: no image (log: $WORK/build.log)"; fi
  build_summary="built in $((SECONDS - t0)) s, $(podman image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=si)B"
  log "build: $IMAGE $build_summary"
  log "build: layers (podman history):"
  podman history --no-trunc --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | grep -v '^0 B' \
    | sed -e 's|/bin/sh -c #(nop) ||' -e 's/--mount=type=secret,id=ca_bundle *//' | cut -c1-140 | sed 's/^/    /'
}

# ---- checks -------------------------------------------------------------------------------
# A command in the image as the test user, the data volume mounted (called through check).
# shellcheck disable=SC2329
in_image() { "$ENGINE" run --rm --user "$TEST_UID:$TEST_UID" -v "$WORK/data:/data" "$IMAGE" "$@"; }

inside() {
  check "tini is PID 1" bash -c "[ \"\$($ENGINE run --rm $IMAGE cat /proc/1/comm)\" = tini ]"
  check "the image's own user is 1000, not root" bash -c "[ \"\$($ENGINE run --rm $IMAGE id -u)\" = 1000 ]"
  # g++: torch.compile builds its CPU kernels (and Triton's launcher on a GPU) with it.
  check "torch.compile builds and runs a CPU kernel (g++) as UID $TEST_UID, its cache on /data" \
    in_image bash -c 'python -c "
import torch
f = torch.compile(lambda x: (x.sin() + 1).sum())
x = torch.randn(64)
assert torch.allclose(f(x), (x.sin() + 1).sum()), \"the compiled result differs\"
print(\"torch.compile:\", torch.__version__)
" && test -d /data/.cache/torchinductor'
  # shellcheck disable=SC2016
  check "every job module imports; uv pip check finds no missing dependency; no dev tool is installed" \
    in_image bash -c 'for m in prepare train eval export transcribe serve; do python -c "import jobs.$m" || exit 1; done \
      && python -c "import lib.tools.bench, lib.tools.bench_data, ctranslate2, pywhispercpp" && uv pip check -q \
      && ! python -c "import pytest" 2>/dev/null && ! python -c "import playwright" 2>/dev/null'
  check "the formats the jobs promise (wav, flac, ogg, mp3) decode without ffmpeg" in_image python -c '
import io, numpy as np, soundfile as sf
from lib.audio import decode
tone = np.sin(np.arange(16000) / 16000 * 2 * np.pi * 440).astype("float32")
for fmt in ("WAV", "FLAC", "OGG"):
    buf = io.BytesIO(); sf.write(buf, tone, 16000, format=fmt); assert decode(buf.getvalue()).size > 15000, fmt
assert decode("tests/fixtures/cv_release/clips/common_voice_hi_09000005.mp3").size > 16000 * 30
print("wav flac ogg mp3: decoded")'
}

demo() {
  fresh_data
  local t0=$SECONDS rc
  mk demo IMAGE="$IMAGE" >"$WORK/demo.log" 2>&1
  rc=$?
  log "demo: exit $rc in $((SECONDS - t0)) s (log: $WORK/demo.log)"
  check "make demo (prepare, train, eval, export) exits 0" [ "$rc" = 0 ]
  check "the jobs read the env file (their logs say HF_TOKEN: set)" grep -q "'HF_TOKEN': 'set'" "$WORK/demo.log"
  check "demo wrote the adapter, the eval report and the merged model on the host" \
    test -s "$WORK/data/runs/demo/adapter/adapter_model.safetensors" -a -s "$WORK/data/runs/demo/eval/report.md" \
    -a -d "$WORK/data/runs/demo/merged"
  mk transcribe IMAGE="$IMAGE" GPUS=0 RUN=demo LANG=hi \
    ARGS="audio=tests/fixtures/cv_release/clips/common_voice_hi_09000005.mp3 max_new_tokens=8 out=/data/demo/transcript.txt" \
    >"$WORK/transcribe.log" 2>&1
  check "make transcribe with the demo's run writes a transcript" test -s "$WORK/data/demo/transcript.txt"
  local others
  others=$(find "$WORK/data" ! -uid "$TEST_UID" | head -3)
  check "every output on the host belongs to UID $TEST_UID${others:+ (not: $others)}" [ -z "$others" ]
}

# make train on the demo's data and tiny model, run RUN, STEPS steps (the demo's settings, more steps).
train() { # train RUN STEPS
  mk train IMAGE="$IMAGE" GPUS=0 RUN="$1" DATA=demo-hi LANG=hi RECIPE=jobs/recipes/whisper-base_lora_cpu.yaml \
    ARGS="model.base=/data/demo/tiny-whisper train.max_steps=$2 train.warmup_steps=1 train.eval_steps=$2 \
train.save_steps=$2 train.logging_steps=1 train.batch_size=2 train.generation_max_length=16 train.max_eval_samples=2"
}

# The ID of a running container of the image (by image ID: a short name may not match as given).
running() { "$ENGINE" ps -q --filter "ancestor=$("$ENGINE" image inspect --format '{{.Id}}' "$IMAGE")"; }

# Entries in a run's log_history.json (one a logged step).
logged() { python3 -c 'import json, sys; print(len(json.load(open(sys.argv[1]))))' "$1" 2>/dev/null || echo 0; }

stop() {
  local steps=12 pid cid="" n=0 rc
  train whole "$steps" >"$WORK/train-whole.log" 2>&1
  check "uninterrupted make train ($steps steps) exits 0" [ $? = 0 ]
  rm -rf "$WORK/data/runs/stopped"
  train stopped "$steps" >"$WORK/train-stop.log" 2>&1 &
  pid=$!
  for _ in $(seq 600); do # a few steps in, well before the last
    n=$(logged "$WORK/data/runs/stopped/log_history.json")
    [ "$n" -ge 3 ] && break
    sleep 0.5
  done
  cid=$(running | head -1)
  log "stop: $ENGINE stop ${cid:-(no container)} after $n logged steps of $steps"
  [ -n "$cid" ] && "$ENGINE" stop -t 120 "$cid" >/dev/null
  wait "$pid"
  rc=$?
  log "stop: make train exited $rc: $(grep -m1 -oE 'Error [0-9]+' "$WORK/train-stop.log")"
  check "make train, stopped with $ENGINE stop, exits 2 with the job's code 3 (make: Error 3)" \
    grep -q "Error 3" "$WORK/train-stop.log"
  check "the stopped run saved a checkpoint and no adapter" bash -c "compgen -G '$WORK/data/runs/stopped/checkpoints/checkpoint-*/COMPLETE' >/dev/null \
    && [ ! -e '$WORK/data/runs/stopped/adapter' ]"
  train stopped "$steps" >"$WORK/train-resume.log" 2>&1
  check "the rerun exits 0" [ $? = 0 ]
  check "the rerun resumed from the stop's checkpoint (before the last step) and ran to step $steps" python3 -c '
import json, sys
m = json.load(open(sys.argv[1]))
print("resumed_from", m.get("resumed_from"), "global_step", m.get("global_step"))
step = int(m.get("resumed_from", "checkpoint-0").split("-")[1])
sys.exit(0 if 0 < step < int(sys.argv[2]) and m.get("global_step") == int(sys.argv[2]) else 1)' \
    "$WORK/data/runs/stopped/metrics.json" "$steps"
  check "the resumed adapter equals the uninterrupted run's" in_image python -c '
import sys
from safetensors.torch import load_file
a = load_file("/data/runs/whole/adapter/adapter_model.safetensors")
b = load_file("/data/runs/stopped/adapter/adapter_model.safetensors")
diff = max((a[k] - b[k]).abs().max().item() for k in a)
print(f"max |uninterrupted - resumed| = {diff:.3e}")
sys.exit(0 if a.keys() == b.keys() and diff < 1e-5 else 1)'
}

serve() {
  mk serve IMAGE="$IMAGE" GPUS=0 RUN=demo PORT="$PORT" >"$WORK/serve.log" 2>&1 &
  local pid=$! code=000 cid
  for _ in $(seq 300); do
    code=$(curl -s --noproxy '*' -o "$WORK/serve.html" -w '%{http_code}' "http://127.0.0.1:$PORT/")
    [ "$code" = 200 ] && break
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  check "make serve answers GET http://127.0.0.1:$PORT/ from the host (HTTP $code)" \
    bash -c "[ '$code' = 200 ] && grep -q 'whisper-finetune: demo' '$WORK/serve.html'"
  cid=$(running | head -1)
  if [ -n "$cid" ]; then
    "$ENGINE" inspect "$cid" >"$WORK/serve-inspect.json" 2>&1
    "$ENGINE" stop -t 20 "$cid" >/dev/null
  fi
  wait "$pid"
}

token() {
  local found=""
  grep -rlqF "$TOKEN" "$WORK/data" && found+=" outputs"
  grep -lqF "$TOKEN" "$WORK"/*.log && found+=" logs"
  "$ENGINE" image inspect "$IMAGE" | grep -qF "$TOKEN" && found+=" image-inspect"
  "$ENGINE" history --no-trunc "$IMAGE" | grep -qF "$TOKEN" && found+=" history"
  [ -s "$WORK/serve-inspect.json" ] && grep -qF "$TOKEN" "$WORK/serve-inspect.json" && found+=" container-inspect"
  # Every layer and the config, as uncompressed files: a file's bytes are in its layer's tar as they are.
  # (`save` writes each layer as an uncompressed tar inside the archive.)
  rm -f "$WORK/image.tar"
  if "$ENGINE" save -o "$WORK/image.tar" "$IMAGE" >/dev/null 2>&1; then
    grep -qaF "$TOKEN" "$WORK/image.tar" && found+=" a-layer"
    log "token: searched the saved image, every layer ($(du -h "$WORK/image.tar" | cut -f1))"
  else
    found+=" (save failed: not searched)"
  fi
  rm -f "$WORK/image.tar"
  check "the env file's token is in no output, log, inspect, history or layer${found:+ (found in:$found)}" [ -z "$found" ]
}

# RUNNER=docker with the `docker` command itself (DOCKER unset): podman behind it (podman-docker),
# or Docker's engine: one that answers, or Debian's docker.io started here for the check (root).
docker_cli() {
  local dockerd_pid="" rc
  if ! command -v docker >/dev/null 2>&1; then
    log "docker: no docker command here: skipped (DOCKER=$ENGINE ran every check above)"
    return
  fi
  if docker --version 2>/dev/null | grep -qi podman; then
    log "docker: the docker command is podman: the same image store"
  else
    if ! docker info >/dev/null 2>&1; then
      if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
        log "docker: no Docker engine answers, and starting one needs root: skipped"
        return
      fi
      if ! command -v dockerd >/dev/null 2>&1; then
        log "docker: apt-get install docker.io (Debian's Docker engine)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >/dev/null 2>&1 \
          || { check "Docker engine installed" false; return; }
      fi
      dockerd >"$WORK/dockerd.log" 2>&1 &
      dockerd_pid=$!
      for _ in $(seq 60); do docker info >/dev/null 2>&1 && break; sleep 1; done
    fi
    log "docker: $(docker version --format 'client {{.Client.Version}}, engine {{.Server.Version}}' 2>&1)"
    local t0=$SECONDS
    if [[ "$IMAGE" != *-dirty ]] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
      log "docker: $IMAGE is in Docker's engine already"
    else
      "$ENGINE" save "$IMAGE" | docker load -q >/dev/null
      # podman saves a short name as localhost/NAME: Docker gets the name make uses too
      docker image inspect "$IMAGE" >/dev/null 2>&1 || docker tag "localhost/$IMAGE" "$IMAGE"
      log "docker: $IMAGE loaded into Docker's engine in $((SECONDS - t0)) s"
    fi
  fi
  make --no-print-directory RUNNER=docker IMAGE="$IMAGE" DOCKER_USER="$TEST_UID:$TEST_UID" DATA_DIR="$WORK/data" \
    ENV_FILE="$WORK/test.env" GPUS=0 RUN=demo LANG=hi SHM_SIZE=1g transcribe \
    ARGS="audio=tests/fixtures/cv_release/clips/common_voice_hi_09000005.mp3 max_new_tokens=8 out=/data/demo/docker.txt" \
    >"$WORK/docker.log" 2>&1
  rc=$?
  check "make transcribe RUNNER=docker through the docker command ($(docker --version | cut -d, -f1)) exits 0" \
    bash -c "[ $rc = 0 ] && cmp -s '$WORK/data/demo/docker.txt' '$WORK/data/demo/transcript.txt'"
  # (The image stays in Docker's store: removing it takes minutes.)
  if [ -n "$dockerd_pid" ]; then kill "$dockerd_pid" && wait "$dockerd_pid" 2>/dev/null; fi
}

# All in one function, read whole before it runs: editing this file meanwhile changes nothing.
main() {
  t_start=$SECONDS
  mkdir -p "$WORK"
  [ -d "$WORK/data" ] || fresh_data # (the steps after demo use its outputs)
  # The env file every job gets, with a fake token that must show up nowhere.
  printf 'HF_TOKEN=%s\nMDC_API_KEY=%s\n' "$TOKEN" "$TOKEN" >"$WORK/test.env"
  # The same token in the repository's .env while the image builds (when there is none): what
  # `make build` sends must leave it out (.dockerignore); the token check looks for it in every layer.
  if [ ! -e .env ] && want build; then
    cp "$WORK/test.env" .env && trap 'rm -f .env' EXIT
  fi
  want engine && setup_engine
  want base && setup_base
  if want build; then build; else # the newest image of IMAGE_NAME, or IMAGE
    IMAGE=${IMAGE:-$("$ENGINE" images --format '{{.Repository}}:{{.Tag}}' "$IMAGE_NAME" | head -1)}
  fi
  want inside && inside
  want demo && demo
  want stop && stop
  want serve && serve
  want docker && docker_cli
  want token && token
  log "summary: image $IMAGE"
  [ -n "${build_summary:-}" ] && log "summary: $build_summary"
  printf '    %s\n' "${results[@]}"
  log "done in $((SECONDS - t_start)) s: ${#results[@]} checks, $fails failed (logs: $WORK)"
  return "$fails"
}
main "$@"; exit $?
