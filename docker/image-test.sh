#!/usr/bin/env bash
# `make image-test`: build the image and run the jobs in it through the Make targets
# (RUNNER=docker), on a machine without a GPU and without an image registry. CI runs it.
#
#   make image-test                       # engine set-up (root + apt-get), build, every check
#   make image-test IMAGE_TEST_STEPS="build demo"   # only some steps (see STEPS below)
#
# What it does, in order (each check prints PASS or FAIL; the exit code is the number of FAILs):
#   engine  podman (+ buildah, runc) from Debian's packages when missing, with the settings a
#           root machine without systemd needs (/etc/containers/containers.conf);
#   base    a Debian bookworm base image bootstrapped from the Debian archive (mmdebstrap), and a
#           uv image made from PyPI's uv wheel: the registries the user build pulls from are not
#           reachable here. Both are reused when present;
#   build   `make build` on that base with the CPU build of torch (its hash is in the lock), the
#           host's CA bundle as a build secret; prints the build time and the size of each layer;
#   inside  checks in the image (tini is PID 1, the user, a C++ compiler for torch.compile);
#   demo    `make demo` as a non-root user, data volume from the host, an env file with a fake token;
#   stop    `make train`, stopped with `docker stop`: checkpoint, exit 3; the rerun resumes to the
#           adapter of an uninterrupted run;
#   serve   `make serve` answers an HTTP request on the published port;
#   token   the fake token is nowhere: outputs, logs, image inspect and history, every layer;
#   docker  the same Make targets through the `docker` command when it is podman (podman-docker)
#           or Docker (a dockerd answering), when one is there.
# The user's image (`make build` with no build arguments: the pinned CUDA base, uv's Python 3.11,
# torch with CUDA) needs a registry and a GPU host; docs/running.md says how to check it there.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

# The container engine and the work folder (data volume, logs, env file).
ENGINE=${ENGINE:-podman}
WORK=${IMAGE_TEST_DIR:-/tmp/whisper-ft-image-test}
STEPS=${IMAGE_TEST_STEPS:-engine base build inside demo stop serve token docker}
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
check() { # check NAME COMMAND...: PASS when the command succeeds
  local name=$1
  shift
  if "$@"; then log "PASS $name"; else log "FAIL $name"; fails=$((fails + 1)); fi
}
want() { [[ " $STEPS " == *" $1 "* ]]; }
die() { log "FAIL $*"; exit 1; }
# make with the test image and a plain root-free user; extra VAR=value arguments follow.
mk() { make --no-print-directory RUNNER=docker DOCKER="$ENGINE" IMAGE_NAME="$IMAGE_NAME" \
  DOCKER_USER="$TEST_UID:$TEST_UID" DATA_DIR="$WORK/data" ENV_FILE="$WORK/test.env" SHM_SIZE=1g "$@"; }

# A fresh data volume owned by the test user, the env file with a fake token.
fresh_data() {
  rm -rf "$WORK/data" && mkdir -p "$WORK/data"
  if [ "$(id -u)" = 0 ]; then chown "$TEST_UID:$TEST_UID" "$WORK/data"; fi
  printf 'HF_TOKEN=%s\nMDC_API_KEY=%s\n' "$TOKEN" "$TOKEN" >"$WORK/test.env"
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
    podman import --change 'CMD ["bash"]' "$WORK/rootfs.tar" "$BASE_IMAGE" >/dev/null || die "base: podman import failed"
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
    podman import "$d/uv.tar" "$UV_IMAGE" >/dev/null || die "base: podman import of uv failed"
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
  nice -n 10 make --no-print-directory build DOCKER="$ENGINE" IMAGE_NAME="$IMAGE_NAME" BUILD_FLAGS="$build_flags" \
    2>&1 | tee "$WORK/build.log" | grep -E '^(STEP|COMMIT|build:|Error|error)' || true
  IMAGE=$(sed -n 's/^build: //p' "$WORK/build.log" | tail -1)
  if [ -z "$IMAGE" ] || ! podman image exists "$IMAGE"; then die "build: no image (log: $WORK/build.log)"; fi
  log "build: $IMAGE in $((SECONDS - t0)) s, $(podman image inspect --format '{{.Size}}' "$IMAGE" | numfmt --to=si)B"
  log "build: layers (podman history):"
  podman history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | cut -c1-150 | sed 's/^/    /'
}

# ---- checks -------------------------------------------------------------------------------
# A command in the image as the test user, the data volume mounted (called through check).
# shellcheck disable=SC2329
in_image() { "$ENGINE" run --rm --user "$TEST_UID:$TEST_UID" -v "$WORK/data:/data" "$IMAGE" "$@"; }

inside() {
  check "tini is PID 1" bash -c "[ \"\$($ENGINE run --rm $IMAGE cat /proc/1/comm)\" = tini ]"
  check "the image's user is 1000 (non-root)" bash -c "[ \"\$($ENGINE run --rm $IMAGE id -u)\" = 1000 ]"
  check "torch.compile builds and runs a CPU kernel (g++) as UID $TEST_UID" \
    in_image python -c 'import torch
f = torch.compile(lambda x: (x.sin() + 1).sum())
x = torch.randn(64)
assert torch.allclose(f(x), (x.sin() + 1).sum()), "compiled result differs"
print("torch.compile ok", torch.__version__)'
  check "the locked packages import, pip check passes" \
    in_image bash -c 'python -c "import torch, transformers, peft, gradio, ctranslate2, pywhispercpp" && uv pip check -q'
  check "ffmpeg decodes for librosa (audioread)" in_image bash -c 'ffmpeg -version >/dev/null'
}

demo() {
  fresh_data
  local t0=$SECONDS
  nice -n 10 make --no-print-directory -n demo RUNNER=docker DOCKER="$ENGINE" >/dev/null
  mk demo IMAGE="$IMAGE" >"$WORK/demo.log" 2>&1
  local rc=$?
  log "demo: exit $rc in $((SECONDS - t0)) s (log: $WORK/demo.log)"
  check "make demo (prepare, train, eval, export) exits 0" [ "$rc" = 0 ]
  check "demo wrote the adapter, the eval report and the merged model" \
    test -s "$WORK/data/runs/demo/adapter/adapter_model.safetensors" -a -s "$WORK/data/runs/demo/eval/report.md" \
    -a -d "$WORK/data/runs/demo/merged"
  mk transcribe IMAGE="$IMAGE" GPUS=0 RUN=demo LANG=hi \
    ARGS="audio=/app/tests/fixtures/cv_release/clips/common_voice_hi_09000005.mp3 max_new_tokens=8" \
    >"$WORK/transcribe.log" 2>&1
  check "make transcribe with the demo's run exits 0" [ $? = 0 ]
  local others
  others=$(find "$WORK/data" ! -uid "$TEST_UID" | head -3)
  check "every output on the host belongs to UID $TEST_UID ($others)" [ -z "$others" ]
}

# One training run of STEPS steps on the demo's data, name RUN, in the background; echoes the PID.
train_args() { echo "GPUS=0 RUN=$1 DATA=demo-hi LANG=hi RECIPE=jobs/recipes/whisper-base_lora_cpu.yaml \
ARGS=model.base=/data/demo/tiny-whisper train.max_steps=$2 train.warmup_steps=1 train.eval_steps=1000 \
train.save_steps=1000 train.logging_steps=1 train.batch_size=2 train.seed=7 train.max_eval_samples=2"; }

stop() {
  # shellcheck disable=SC2046
  mk train IMAGE="$IMAGE" $(train_args whole 60) >"$WORK/train-whole.log" 2>&1
  check "uninterrupted training (60 steps) exits 0" [ $? = 0 ]
  rm -rf "$WORK/data/runs/stopped"
  # shellcheck disable=SC2046
  mk train IMAGE="$IMAGE" $(train_args stopped 60) >"$WORK/train-stop.log" 2>&1 &
  local pid=$! cid=""
  for _ in $(seq 300); do
    grep -qE "\b(1[0-9]|[2-5][0-9])/60\b" "$WORK/train-stop.log" && break
    sleep 1
  done
  cid=$("$ENGINE" ps -q --filter "ancestor=$IMAGE" | head -1)
  log "stop: $ENGINE stop $cid during training ($(grep -oE '\b[0-9]+/60\b' "$WORK/train-stop.log" | tail -1))"
  "$ENGINE" stop -t 120 "$cid" >/dev/null
  wait "$pid"
  check "make train stopped with $ENGINE stop exits with the job's 3" grep -q "Error 3" "$WORK/train-stop.log"
  check "the stopped run left a checkpoint" compgen -G "$WORK/data/runs/stopped/checkpoints/checkpoint-*"
  # shellcheck disable=SC2046
  mk train IMAGE="$IMAGE" $(train_args stopped 60) >"$WORK/train-resume.log" 2>&1
  check "the rerun exits 0" [ $? = 0 ]
  check "the rerun resumed from the checkpoint" grep -qi "resum" "$WORK/train-resume.log"
  check "the resumed adapter equals the uninterrupted one" in_image python -c '
import sys
from safetensors.torch import load_file
a = load_file("/data/runs/whole/adapter/adapter_model.safetensors")
b = load_file("/data/runs/stopped/adapter/adapter_model.safetensors")
diff = max((a[k] - b[k]).abs().max().item() for k in a)
print("max |whole - resumed| =", diff)
sys.exit(0 if a.keys() == b.keys() and diff < 1e-6 else 1)'
}

serve() {
  mk serve IMAGE="$IMAGE" GPUS=0 RUN=demo PORT="$PORT" >"$WORK/serve.log" 2>&1 &
  local pid=$! code=000 cid
  for _ in $(seq 240); do
    code=$(curl -s -o "$WORK/serve.html" -w '%{http_code}' "http://127.0.0.1:$PORT/") && [ "$code" = 200 ] && break
    sleep 1
  done
  check "make serve answers GET http://127.0.0.1:$PORT/ from the host (HTTP $code)" [ "$code" = 200 ]
  cid=$("$ENGINE" ps -q --filter "ancestor=$IMAGE" | head -1)
  [ -n "$cid" ] && "$ENGINE" inspect "$cid" >"$WORK/serve-inspect.json" 2>&1
  [ -n "$cid" ] && "$ENGINE" stop -t 20 "$cid" >/dev/null
  wait "$pid"
}

token() {
  local found=""
  grep -rlqF "$TOKEN" "$WORK/data" && found+=" outputs"
  grep -lqF "$TOKEN" "$WORK"/*.log && found+=" logs"
  "$ENGINE" image inspect "$IMAGE" | grep -qF "$TOKEN" && found+=" image-inspect"
  "$ENGINE" history --no-trunc "$IMAGE" | grep -qF "$TOKEN" && found+=" history"
  [ -s "$WORK/serve-inspect.json" ] && grep -qF "$TOKEN" "$WORK/serve-inspect.json" && found+=" container-inspect"
  rm -rf "$WORK/save" && mkdir -p "$WORK/save"
  "$ENGINE" save --format docker-dir -o "$WORK/save/img" "$IMAGE" >/dev/null \
    && for layer in "$WORK"/save/img/*; do
      if tar -tf "$layer" >/dev/null 2>&1; then tar -xOf "$layer" 2>/dev/null | grep -aqF "$TOKEN" && found+=" layer:${layer##*/}"
      else grep -aqF "$TOKEN" "$layer" && found+=" ${layer##*/}"; fi
    done
  rm -rf "$WORK/save"
  check "the env file's token is in no output, log, inspect, history or layer${found:+ (found in:$found)}" [ -z "$found" ]
}

docker_cli() {
  # RUNNER=docker with the `docker` command itself: podman behind it (podman-docker) or Docker.
  if ! command -v docker >/dev/null 2>&1; then log "docker: no docker command here: skipped"; return; fi
  if docker info 2>/dev/null | grep -qi podman || docker --version | grep -qi podman; then
    make --no-print-directory RUNNER=docker IMAGE="$IMAGE" DOCKER_USER="$TEST_UID:$TEST_UID" DATA_DIR="$WORK/data" \
      ENV_FILE="$WORK/test.env" GPUS=0 RUN=demo LANG=hi transcribe \
      ARGS="audio=/app/tests/fixtures/cv_release/clips/common_voice_hi_09000005.mp3 max_new_tokens=8" >"$WORK/docker.log" 2>&1
    check "make transcribe with docker = podman (podman-docker)" [ $? = 0 ]
  elif docker info >/dev/null 2>&1; then
    log "docker: a Docker engine answers: loading $IMAGE into it"
    podman save "$IMAGE" | docker load >/dev/null
    make --no-print-directory RUNNER=docker IMAGE="$IMAGE" DOCKER_USER="$TEST_UID:$TEST_UID" DATA_DIR="$WORK/data" \
      ENV_FILE="$WORK/test.env" GPUS=0 RUN=demo LANG=hi transcribe \
      ARGS="audio=/app/tests/fixtures/cv_release/clips/common_voice_hi_09000005.mp3 max_new_tokens=8" >"$WORK/docker.log" 2>&1
    check "make transcribe with docker = Docker" [ $? = 0 ]
  else
    log "docker: the docker command here is Docker's, and no Docker engine answers: skipped"
  fi
}

# All in one function, read whole before it runs: editing this file meanwhile changes nothing.
main() {
  t_start=$SECONDS
  mkdir -p "$WORK" && fresh_data
  want engine && setup_engine
  want base && setup_base
  if want build; then build; else # the newest image of IMAGE_NAME, or IMAGE
    IMAGE=${IMAGE:-$(podman images --format '{{.Repository}}:{{.Tag}}' "$IMAGE_NAME" | head -1)}
  fi
  want inside && inside
  want demo && demo
  want stop && stop
  want serve && serve
  want token && token
  want docker && docker_cli
  log "done in $((SECONDS - t_start)) s: $fails check(s) failed (logs: $WORK)"
  return "$fails"
}
main "$@"; exit $?
