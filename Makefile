# Whisper LoRA fine-tuning: every job is a make target. `make` alone prints help.
#
#   make build                                   # the image (once per lock or source change)
#   make prepare LANG=hi DATA=cv_hi ARGS="source.kind=cv source.path=/data/raw/cv-corpus-hi"
#   make train   LANG=hi DATA=cv_hi RUN=hi-1  # GPUS=2 runs torchrun on 2 GPUs
#   make eval    LANG=hi DATA=cv_hi RUN=hi-1
#   make export  RUN=hi-1
#
# RUNNER=docker (default) runs each job in the image; RUNNER=local runs it in .venv.
.DEFAULT_GOAL := help
SHELL := /bin/bash

# LANG is two things here. On make's command line (`make train LANG=hi`) it is the target
# language and reaches the job as `language=hi`. From the environment it is the shell's
# locale (often C.UTF-8) and means nothing to the jobs: the recipe's language stands.
# A command-line LANG would also be exported to every process make starts and break their
# locale, so once read it is replaced by LOCALE for the children.

# The locale that processes started by make get when LANG was given as a language.
LOCALE ?= C.UTF-8
ifeq ($(origin LANG),command line)
JOB_LANGUAGE := $(LANG)
override LANG := $(LOCALE)
export LANG
else
JOB_LANGUAGE :=
endif

# How jobs run: docker (in the image) or local (in $(VENV)).
RUNNER ?= docker
# The container command of RUNNER=docker and `make build`: docker (Docker, or podman behind it) or podman.
DOCKER ?= docker
# More `make build` flags, e.g. --build-arg or --secret (docker/image-test.sh passes the test image's).
BUILD_FLAGS ?=
# Where the virtual environment for RUNNER=local lives.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch build for `make setup`: auto (cuda when nvidia-smi answers), cpu or cuda.
TORCH_BUILD ?= auto
# Where a CPU machine finds the small torch build (the lock holds its hash too).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Every install is exact and hash-checked: the lock already lists every dependency.
PIP_INSTALL = $(PY) -m pip install -q --no-deps --require-hashes
# Processes `make test` spreads the test files over (pytest-xdist); 2 = the cores of the CI machine.
TEST_WORKERS ?= 2

# The data volume: prepared datasets, runs, exports and the Hub cache (mounted as /data).
DATA_DIR ?= data
# The env file (HF_TOKEN, MDC_API_KEY; see env.example), skipped when absent.
# The jobs get the file, never its values on a command line (in the image: mounted as /app/.env).
ENV_FILE ?= .env
# GPUs per job: 0 (CPU), a count, or all. More than one makes `train` use torchrun.
GPUS ?= 1
# Recipe YAML passed as --recipe (train defaults to the 1-GPU int8 LoRA recipe).
RECIPE ?=
# Run name: train writes DATA_DIR/runs/RUN; eval, export and transcribe read it.
RUN ?=
# Prepared dataset name: prepare writes DATA_DIR/prepared/DATA; train and eval read it.
DATA ?=
# Extra job overrides, e.g. ARGS="lora.r=16 train.max_steps=2000".
ARGS ?=
# Port of the page `make serve` starts (RUNNER=docker publishes it on the host, same number).
PORT ?= 7860
# Address the page is reached on: 127.0.0.1 (this machine only) or 0.0.0.0 (anyone on the network).
BIND ?= 127.0.0.1
# Image repository; set to your registry path (ghcr.io/you/whisper-finetune) before push.
IMAGE_NAME ?= whisper-finetune
# /dev/shm for the container: dataloader workers pass batches through it.
SHM_SIZE ?= 16g
# Container user: your UID/GID, so that files on DATA_DIR belong to you.
DOCKER_USER ?= $(shell id -u):$(shell id -g)

# The tag names what is inside: the lock's content and the source revision (-dirty when the
# work tree has uncommitted changes; `make push` refuses those).
LOCK_HASH := $(shell sha256sum requirements.lock 2>/dev/null | cut -c1-12)
GIT_REV := $(shell git rev-parse --short=12 HEAD 2>/dev/null || echo nogit)$(shell git diff --quiet HEAD -- 2>/dev/null || echo -dirty)
# The image every job runs in.
IMAGE ?= $(IMAGE_NAME):$(LOCK_HASH)-$(GIT_REV)

TRAIN_RECIPE := jobs/recipes/whisper-large-v2_lora-int8_1gpu.yaml
DATA_ABS = $(abspath $(DATA_DIR))
HAVE_ENV_FILE = $(wildcard $(ENV_FILE))
MULTI_GPU = $(filter-out 0 1,$(GPUS))
NPROC = $(if $(filter all,$(GPUS)),gpu,$(GPUS))

# docker run for a job. DATA_DIR and HF_HOME are the container's paths whatever the env
# file says (the environment wins over the file); the image's tini forwards SIGTERM to the job.
# The env file is mounted read-only where every job reads it, the working directory's .env
# (lib/cli.py), not passed as `docker run --env-file`: that would copy the tokens into the
# container's configuration, which `docker inspect` shows.
DOCKER_RUN = $(DOCKER) run --rm $(DOCKER_TTY)$(DOCKER_PORTS)--user $(DOCKER_USER) --shm-size $(SHM_SIZE) \
  $(if $(filter-out 0,$(GPUS)),--gpus $(GPUS)) -v $(DATA_ABS):/data \
  $(if $(HAVE_ENV_FILE),-v $(abspath $(ENV_FILE)):/app/.env:ro) -e DATA_DIR=/data -e HF_HOME=/data/hf-cache \
  $(IMAGE)
DOCKER_TTY =
DOCKER_PORTS =
# The same facts for a job in .venv: the environment wins over the env file (lib/env.py).
# WHISPER_FT_RUNNER=local: the commands a job suggests next then say RUNNER=local too.
LOCAL_ENV = DATA_DIR=$(DATA_ABS) HF_HOME=$(DATA_ABS)/hf-cache WHISPER_FT_RUNNER=local PATH=$(abspath $(VENV))/bin:$$PATH
LOCAL_ENV_FILE = $(if $(HAVE_ENV_FILE),--env-file $(ENV_FILE))

# The Python module behind each target: jobs.NAME for the user's jobs, lib.tools.NAME for the
# developer tools (the image's entrypoint maps the same names).
MODULE_bench := lib.tools.bench
MODULE_bench_data := lib.tools.bench_data
module = $(or $(MODULE_$(1)),jobs.$(1))

# $(call job,NAME,ARGS): the command line that runs job (or tool) NAME with ARGS on $(RUNNER).
# job_torchrun: torchrun through lib/launch.py (SIGTERM: 270 s to checkpoint, exit 3; exit 2 kept).
ifeq ($(RUNNER),docker)
job = $(strip $(DOCKER_RUN) $(1) $(2))
job_torchrun = $(strip $(DOCKER_RUN) python -m lib.launch --standalone --nproc_per_node=$(NPROC) -m jobs.$(1) $(2))
else ifeq ($(RUNNER),local)
job = $(strip $(LOCAL_ENV) python -m $(call module,$(1)) $(LOCAL_ENV_FILE) $(2))
job_torchrun = $(strip $(LOCAL_ENV) python -m lib.launch --standalone --nproc_per_node=$(NPROC) -m jobs.$(1) $(LOCAL_ENV_FILE) $(2))
else
$(error RUNNER=$(RUNNER): use RUNNER=docker or RUNNER=local)
endif

recipe_arg = $(if $(RECIPE),--recipe $(RECIPE))
language_arg = $(if $(JOB_LANGUAGE),language=$(JOB_LANGUAGE))
# `make prepare LANG=hi` then `make train LANG=hi` need no names: the dataset defaults to
# cv_LANG (the Common Voice recipe's naming) and the run to whisper-large-v2-lora-LANG.
DATA_NAME = $(or $(DATA),$(if $(JOB_LANGUAGE),cv_$(JOB_LANGUAGE)))
RUN_NAME = $(or $(RUN),$(if $(JOB_LANGUAGE),whisper-large-v2-lora-$(JOB_LANGUAGE)))
run_arg = $(if $(RUN_NAME),run=$(RUN_NAME))
data_arg = $(if $(DATA_NAME),data=$(DATA_NAME))

.PHONY: help
# Each variable: its name, its value in this make (after the command line and the environment),
# and the first line of the comment above its `VAR ?=`. Colour only on a terminal.
help: ## list the targets and the variables they read, with their values now
	@if [ -t 1 ]; then on=$$'\033[36m' off=$$'\033[0m'; else on= off=; fi; \
	echo "usage: make TARGET [VAR=value ...]   e.g. make train LANG=hi RUN=hi-1 GPUS=2"; \
	echo "targets:"; \
	awk -v on="$$on" -v off="$$off" 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %s%-12s%s %s\n", on, $$1, off, $$2}' $(MAKEFILE_LIST); \
	echo "variables (name, value now, what it sets):"; \
	$(HELP_VALUES) awk '/^# / {if (c == "") c = substr($$0, 3); next} \
	  /^[A-Z_]+ \?=/ {v = ENVIRON["HELP_" $$1]; if (v == "") v = "(empty)"; \
	    if (length(v) > 16) printf "  %-15s %s\n  %-15s %-16s %s\n", $$1, v, "", "", c; \
	    else printf "  %-15s %-16s %s\n", $$1, v, c} {c = ""}' $(MAKEFILE_LIST); \
	printf "  %-15s %-16s %s\n" LANG "$(or $(JOB_LANGUAGE),(not given))" \
	  "the target language (language=LANG), on the command line only; from the environment it is the locale"
# HELP_x='value' for each `VAR ?=` of this Makefile, single quotes inside a value escaped.
HELP_VARS = $(shell awk '/^[A-Z_]+ \?=/ {print $$1}' $(MAKEFILE_LIST))
HELP_VALUES = $(foreach v,$(HELP_VARS),HELP_$(v)='$(subst ','\'',$($(v)))')

# RUNNER=docker needs a Docker engine that answers (or podman behind the docker command). Without
# one, the targets that run jobs stop here (docker/runner-check.sh), saying what to do, instead of
# in docker's own "Cannot connect to the Docker daemon" (exit 125).
RUNNER_TARGETS := prepare train eval export transcribe serve bench bench-data demo shell
$(RUNNER_TARGETS): runner-check
GOAL = $(or $(firstword $(filter-out runner-check,$(MAKECMDGOALS))),demo)

.PHONY: runner-check
runner-check: ## check that RUNNER can run jobs here (docker: an engine answers `docker info`)
	$(if $(filter docker,$(RUNNER)),@DOCKER='$(DOCKER)' $(SHELL) docker/runner-check.sh $(GOAL))

.PHONY: setup
setup: ## create .venv with the exact versions of requirements.lock (hash-checked)
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=25"
	@build=$(TORCH_BUILD); if [ "$$build" = auto ]; then \
	  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then build=cuda; else build=cpu; fi; fi; \
	echo "setup: torch build $$build"; \
	awk '/^[a-z]/ { keep = ($$0 ~ /^torch==/) } keep' requirements.lock > $(VENV)/requirements.torch; \
	if [ "$$build" = cpu ]; then \
	  awk '/^[a-z]/ { skip = ($$0 ~ /^(torch|triton|nvidia-.*|cuda-.*)==/) } !skip' requirements.lock > $(VENV)/requirements.rest; \
	  sed -i 's/^torch==\([0-9.]*\) /torch==\1+cpu /' $(VENV)/requirements.torch; \
	  $(PIP_INSTALL) -r $(VENV)/requirements.torch 2>/dev/null \
	    || $(PIP_INSTALL) --extra-index-url $(TORCH_CPU_INDEX) -r $(VENV)/requirements.torch; \
	else \
	  awk '/^[a-z]/ { skip = ($$0 ~ /^torch==/) } !skip' requirements.lock > $(VENV)/requirements.rest; \
	  $(PIP_INSTALL) -r $(VENV)/requirements.torch; \
	fi
	$(PIP_INSTALL) -r $(VENV)/requirements.rest
	$(PY) -m pip check
	@$(MAKE) --no-print-directory browser
	@echo "setup: done. Next: make test"

# The browser test (tests/serve/test_serve.py) drives Debian's chromium through Playwright, never a
# browser Playwright downloads. Installed here when missing and this is root with apt-get (a CI
# machine); elsewhere the test skips and says why.
.PHONY: browser
browser: ## install Debian's chromium for the browser test when it is missing (root + apt-get)
	@if command -v chromium >/dev/null 2>&1; then \
	  echo "setup: browser for tests/serve/test_serve.py: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "setup: installing Debian's chromium for tests/serve/test_serve.py (apt-get install chromium, about 300 MB)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	    chromium fonts-liberation >/dev/null \
	    || { echo "setup: apt-get could not install chromium: tests/serve/test_serve.py fails until it is there" >&2; exit 1; }; \
	  echo "setup: browser for tests/serve/test_serve.py: $$(command -v chromium)"; \
	else \
	  echo "setup: no chromium, and installing it needs root and apt-get: tests/serve/test_serve.py will skip;" \
	    "install it with: sudo apt-get install chromium"; \
	fi

.PHONY: test
test: ## run the offline CPU test suite (TEST_WORKERS processes)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

.PHONY: test-slow
test-slow: ## run the slow CPU tests (minutes each; some need ../shared/models/whisper-base-hf)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "slow and not gpu"

# `make image-test`: the container command it uses (podman: it sets podman up when missing), and
# its steps: all, or some, e.g. "inside demo stop serve token" to check an image made by `make build`.
IMAGE_TEST_ENGINE ?= podman
IMAGE_TEST_STEPS ?= engine base build inside demo stop serve docker token

.PHONY: image-test
image-test: ## build a CPU copy of the image and run the jobs in it with RUNNER=docker: PASS/FAIL per check
	IMAGE_TEST_ENGINE='$(IMAGE_TEST_ENGINE)' IMAGE_TEST_STEPS='$(IMAGE_TEST_STEPS)' IMAGE='$(IMAGE)' docker/image-test.sh

.PHONY: lock
lock: ## re-pin requirements.lock from pyproject.toml (needs PyPI)
	docker/lock.sh

# Kubernetes versions the manifests are checked against: the oldest with podFailurePolicy
# GA (1.31) and the newest kubernetes-validate knows.
K8S_VERSIONS := 1.31 1.37
YAML_FILES = $(shell git ls-files '*.yaml' '*.yml')
K8S_FILES = $(shell git ls-files 'docker/k8s/*.yaml' | grep -v kustomization)

.PHONY: lint
lint: ## ruff, hadolint, shellcheck, yamllint and kubernetes-validate over the repository
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint docker/Dockerfile
	$(VENV)/bin/shellcheck $(shell git ls-files '*.sh') .ci/run
	$(VENV)/bin/yamllint -c docker/yamllint.yaml --strict $(YAML_FILES)
	@for v in $(K8S_VERSIONS); do \
	  echo "$(VENV)/bin/kubernetes-validate --strict -k $$v $(K8S_FILES)"; \
	  $(VENV)/bin/kubernetes-validate --strict --quiet -k $$v $(K8S_FILES) || exit 1; done

.PHONY: build
build: ## build the image (tag: lock hash + git revision) from docker/Dockerfile
	$(DOCKER) build -f docker/Dockerfile -t $(IMAGE) $(BUILD_FLAGS) \
	  --label org.opencontainers.image.revision=$(GIT_REV) \
	  --label org.opencontainers.image.version=$(LOCK_HASH)-$(GIT_REV) .
	@echo "build: $(IMAGE)"

.PHONY: push
push: ## push the image to its registry (set IMAGE_NAME=registry/path first)
	@case "$(IMAGE)" in *-dirty) \
	  echo "push: $(IMAGE) has uncommitted changes in it; commit, then make build push" >&2; exit 2;; esac
	$(DOCKER) push $(IMAGE)
	@echo "push: use image $(IMAGE) in docker/k8s/kustomization.yaml (newName/newTag)"

.PHONY: prepare
prepare: ## prepare a dataset into DATA_DIR/prepared/DATA (LANG, DATA, RECIPE, ARGS)
	mkdir -p $(DATA_ABS)
	$(call job,prepare,$(recipe_arg) $(data_arg) $(language_arg) $(ARGS))

.PHONY: train
train: recipe_arg = --recipe $(or $(RECIPE),$(TRAIN_RECIPE))
train: ## fine-tune into DATA_DIR/runs/RUN; GPUS>1 runs torchrun (LANG, DATA, RUN, RECIPE, ARGS)
	mkdir -p $(DATA_ABS)
	$(if $(MULTI_GPU),$(call job_torchrun,train,$(TRAIN_ARGS)),$(call job,train,$(TRAIN_ARGS)))
TRAIN_ARGS = $(recipe_arg) $(run_arg) $(data_arg) $(language_arg) $(ARGS)

.PHONY: eval
eval: ## word error rate of run RUN on DATA (LANG, DATA, RUN, ARGS e.g. split=test)
	mkdir -p $(DATA_ABS)
	$(call job,eval,$(recipe_arg) $(run_arg) $(data_arg) $(language_arg) $(ARGS))

.PHONY: export
export: ## merge run RUN's adapter into a standalone model (RUN, ARGS e.g. dtype=bf16 ggml=q8_0)
	mkdir -p $(DATA_ABS)
	$(call job,export,$(recipe_arg) $(run_arg) $(ARGS))

.PHONY: transcribe
transcribe: ## transcribe audio with run RUN or a model (ARGS="audio=/data/x.wav", LANG, RUN)
	mkdir -p $(DATA_ABS)
	$(call job,transcribe,$(recipe_arg) $(run_arg) $(language_arg) $(ARGS))

.PHONY: serve
# In the container the page listens on every interface (the only way out of a container); docker
# publishes it on the host's BIND address only.
serve: DOCKER_PORTS = -p $(BIND):$(PORT):$(PORT) 
serve: ## a page to try run RUN: base vs fine-tune on a clip, eval table, curves (RUN, PORT, BIND, LANG)
	mkdir -p $(DATA_ABS)
	$(call job,serve,$(recipe_arg) $(run_arg) host=$(if $(filter docker,$(RUNNER)),0.0.0.0,$(BIND)) port=$(PORT) $(language_arg) $(ARGS))

.PHONY: bench
bench: ## time and size the training recipes on this GPU (ARGS e.g. arch=large-v3 batch_size=16)
	mkdir -p $(DATA_ABS)
	$(call job,bench,$(recipe_arg) $(ARGS))

.PHONY: bench-data
bench-data: GPUS = 0
bench-data: ## the data benchmark: prepare and loader speed, bytes per hour, RAM (ARGS e.g. sizes=1000,10000)
	mkdir -p $(DATA_ABS)
	$(call job,bench_data,$(ARGS))

.PHONY: demo
demo: GPUS = 0
demo: ## offline CPU demo: prepare the fixture, train a tiny model a few steps, eval, export
	mkdir -p $(DATA_ABS)
ifeq ($(RUNNER),docker)
	$(DOCKER_RUN) bash docker/demo.sh
else
	$(LOCAL_ENV) bash docker/demo.sh
endif

.PHONY: shell
shell: DOCKER_TTY = -it 
shell: ## an interactive shell where the jobs run (in the image, or with .venv on PATH)
ifeq ($(RUNNER),docker)
	$(DOCKER_RUN) bash
else
	$(LOCAL_ENV) bash
endif
