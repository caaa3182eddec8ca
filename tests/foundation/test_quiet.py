"""lib/quiet.py: each silenced warning is triggered through the real library call (so its wording
is still the library's) and is gone with the filters installed; other warnings still show."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

from lib import quiet


def _future_warnings(fn) -> list[str]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # put ahead of every installed filter: what the library emits
        fn()
        plain = [str(w.message) for w in seen if w.category is FutureWarning]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.install()
        fn()
        quieted = [str(w.message) for w in seen if w.category is FutureWarning]
    return plain, quieted


def test_peft_reading_is_gradient_checkpointing_is_silenced(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import WhisperForConditionalGeneration

    def wrap():
        model = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir)
        get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))

    plain, quieted = _future_warnings(wrap)
    assert any("is_gradient_checkpointing" in m for m in plain)  # the library still says it
    assert not any("is_gradient_checkpointing" in m for m in quieted)


def _generate_records(model_dir: Path, caplog) -> list[str]:
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration.from_pretrained(model_dir).eval()
    feats = torch.zeros(2, model.config.num_mel_bins, 3000)
    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers").propagate = True  # let caplog see transformers' records
    caplog.clear()
    try:
        with caplog.at_level(logging.WARNING):
            model.generate(feats, language="hi", task="transcribe", max_new_tokens=2)
    finally:
        hf_logging.get_logger("transformers").propagate = False
    return [r.getMessage() for r in caplog.records]


def test_whisper_generate_deprecation_and_mask_notes_are_silenced(tiny_model_dir, caplog, monkeypatch):
    from transformers.generation import utils as gen_utils

    logger = logging.getLogger("transformers.generation.utils")
    monkeypatch.setattr(logger, "filters", [])  # as if lib/quiet.py were not installed
    gen_utils.logger.warning_once.cache_clear()
    plain = _generate_records(tiny_model_dir, caplog)
    assert any(m.startswith("Passing `generation_config` together with generation-related") for m in plain)
    assert any(m.startswith("The attention mask is not set with a batched input") for m in plain)
    quiet.install()
    gen_utils.logger.warning_once.cache_clear()
    quieted = _generate_records(tiny_model_dir, caplog)
    assert not any("generation_config` together" in m or "attention mask is not set" in m for m in quieted)


def test_bitsandbytes_kernels_community_note_is_dropped_but_other_records_pass(caplog):
    import bitsandbytes.backends.cpu.ops as cpu_ops

    name, prefix, _ = next(e for e in quiet.LOG_RECORDS if e[0] == "bitsandbytes.backends.cpu.ops")
    # The message fires at import on AVX512-BF16 CPUs only; its text must still be the library's.
    assert prefix in Path(cpu_ops.__file__).read_text()
    quiet.install()
    with caplog.at_level(logging.WARNING, logger=name):
        logging.getLogger(name).warning(prefix + ": %s. Please make sure ...", "No module named 'kernels'")
        logging.getLogger(name).warning("something else")
    assert [r.getMessage() for r in caplog.records] == ["something else"]


def test_every_entry_says_why():
    for entry in [*quiet.WARNINGS, *quiet.LOG_RECORDS]:
        assert len(entry[-1]) > 40, entry
