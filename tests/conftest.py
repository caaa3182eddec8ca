import os
import sys

import pytest

# The suite never touches the network: every model and dataset is built or committed here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# `make test` runs TEST_WORKERS pytest processes (pytest-xdist sets PYTEST_XDIST_WORKER_COUNT in
# each): each gets its share of the cores for torch, and so do the jobs it starts (they inherit the
# variable). Without it, 2 workers x 2 torch threads on 2 cores fight over them: slower than serial.
# A value you set stands; a serial run keeps torch's default (every core).
if "OMP_NUM_THREADS" not in os.environ and "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(_threads)
    if "torch" in sys.modules:  # imported before this file (a plugin): it has read the variable already
        sys.modules["torch"].set_num_threads(_threads)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Whisper saved to disk (see tests/helpers.py); shared, treat as read-only."""
    from tests.helpers import build_tiny_whisper

    return build_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper"))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory, tiny_model_dir):
    """DATA_DIR with prepared/toy: 6 train clips (1 s tones), 2 validation clips (the train tests'
    data; a test module may define its own data_dir instead)."""
    from tests.helpers import WORDS, tone, write_prepared

    root = tmp_path_factory.mktemp("data")
    train = [(w, tone(1.0, 200 + 150 * i)) for i, w in enumerate(WORDS)]
    write_prepared(root / "prepared" / "toy", tiny_model_dir, {"train": train, "validation": train[:2]}, language="hi")
    return root


@pytest.fixture(scope="module")
def even_data_dir(tmp_path_factory, tiny_model_dir):
    """DATA_DIR with prepared/toy from tests.helpers.write_even: 4 train clips whose labels have the
    same token count, no validation split. For runs compared by their training alone: one batch
    shape (compiled layers compile once) and no generation at the eval steps."""
    from tests.helpers import write_even

    return write_even(tmp_path_factory.mktemp("even-data"), tiny_model_dir)
