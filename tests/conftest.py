import os

import pytest

# The suite never touches the network: every model and dataset is built or committed here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
