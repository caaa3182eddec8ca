# Whisper LoRA fine-tuning: every job is a make target. `make` alone prints help.
.DEFAULT_GOAL := help
SHELL := /bin/bash

# Where the virtual environment for RUNNER=local lives.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch build for `make setup`: auto (cuda when nvidia-smi answers), cpu or cuda.
TORCH_BUILD ?= auto
# Where a CPU machine finds the small torch build (the lock holds its hash too).
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
# Every install is exact and hash-checked: the lock already lists every dependency.
PIP_INSTALL = $(PY) -m pip install -q --no-deps --require-hashes

.PHONY: help
help: ## list the targets and the variables they read
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  \033[36m%-11s\033[0m %s\n", $$1, $$2}' $(MAKEFILE_LIST)

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
	@echo "setup: done. Next: make test"

.PHONY: test
test: ## run the offline CPU test suite
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

.PHONY: lock
lock: ## re-pin requirements.lock from pyproject.toml (needs PyPI)
	docker/lock.sh
