"""lib/summary.py: the block every job ends with, and its `next` commands (train and eval print it in
tests/train/test_tracking.py, every job of the demo in tests/house/test_makefile.py::test_demo_runs_end_to_end)."""

from __future__ import annotations

import io
from pathlib import Path

from lib import summary


def test_block_names_outputs_and_numbers_and_skips_empty_lines():
    summary.mark_start()
    out = io.StringIO()
    text = summary.done("eval", {"report": Path("/d/runs/r/eval/report.md"), "adapter": "WER 12.50 %",
                                 "tracking": None}, stream=out)
    lines = text.splitlines()
    assert lines[0].startswith("== eval done in ") and lines[0].endswith(" s")
    assert lines[1:] == ["   report   /d/runs/r/eval/report.md", "   adapter  WER 12.50 %"]
    assert out.getvalue() == "\n" + text + "\n"


def test_durations_and_percents():
    assert [summary.elapsed(s) for s in (12.34, 133, 3840)] == ["12.3 s", "2 min 13 s", "1 h 04 min"]
    assert summary.percent(0.125, 100) == "12.50 %" and summary.percent(None) == "n/a"


def test_prepare_and_export_lines():
    manifest = {"name": "cv_hi", "splits": {"train": {"rows": 12, "hours": 0.0071, "rows_read": 17, "skipped": 5}},
                "skipped_by_reason": {"does not decode": 1, "too long": 4}}
    lines = summary.prepare_summary(Path("/d/prepared/cv_hi"), manifest)
    assert lines["train"] == "12 rows, 0.007 h (17 read, 5 skipped)"
    assert lines["skipped"] == "1 does not decode, 4 too long" and lines["next"] == "make train DATA=cv_hi RUN=<name>"
    assert "storage" not in lines  # a manifest without a storage section (older, or a tool's)
    manifest["storage"] = {"bytes_per_audio_hour": 12_480_000, "pcm_storage": "Ogg/Opus 32 kbit/s (lossy)"}
    assert summary.prepare_summary(Path("/d/prepared/cv_hi"), manifest)["storage"] == (
        "12.5 MB per audio hour, PCM sources as Ogg/Opus 32 kbit/s (lossy)")
    ex = summary.export_summary(Path("/d/runs/r/merged"), {"dtype": "fp16", "verify": {
        "clips": 8, "identical": 7, "wer_vs_reference": 0.02}})
    assert ex["check"] == "7 of 8 transcripts identical to base + adapter, WER between them 2.00 %"
    assert summary.export_summary(Path("m"), {"dtype": "fp32"})["check"].startswith("not checked")


def test_next_commands_say_runner_local_when_the_job_ran_locally(tmp_path, monkeypatch):
    """A hint copied from a job of `make ... RUNNER=local` must run there again, not in Docker."""
    from lib.env import Env, load_env

    manifest = {"name": "cv_hi", "splits": {}}
    in_image = Env(data_dir=Path("/data"))  # RUNNER=docker: make runs on the host with its defaults
    assert summary.prepare_summary(Path("/data/prepared/cv_hi"), manifest, in_image)["next"] == (
        "make train DATA=cv_hi RUN=<name>")
    local = Env(data_dir=Path("data").resolve(), runner="local")  # the Makefile's DATA_DIR
    assert summary.prepare_summary(Path("p"), manifest, local)["next"] == "make train DATA=cv_hi RUN=<name> RUNNER=local"
    elsewhere = Env(data_dir=tmp_path / "my data", runner="local")
    assert summary.make_hint("eval", "RUN=r", env=elsewhere) == f"make eval RUN=r RUNNER=local DATA_DIR='{tmp_path}/my data'"
    assert summary.export_summary(Path("/d/m"), {"dtype": "fp32"}, local)["next"] == (
        'make transcribe ARGS="model=/d/m audio=FILE" RUNNER=local')
    # the Makefile's LOCAL_ENV says it (tests/house/test_makefile.py); lib/env.py reads it
    monkeypatch.setenv("WHISPER_FT_RUNNER", "local")
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    assert load_env().make_flags() == ["RUNNER=local", f"DATA_DIR={tmp_path}"]
    monkeypatch.delenv("WHISPER_FT_RUNNER")
    assert load_env().make_flags() == []
