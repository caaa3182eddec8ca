"""`lib.tools.bench_quality_table`: which rows it runs, one real train + eval row on the CPU, the table."""

from __future__ import annotations

import json

import pytest

from lib.env import Env
from lib.errors import UserError
from lib.tools import bench_quality_table as qt
from lib.train.auto import WALKTHROUGH, pickable
from tests.helpers import tone, write_prepared

WORDS = ["नमस्ते", "पानी", "घर", "किताब"]


def test_rows_cover_every_mode_auto_can_pick_plus_the_seed_noise():
    cfg = qt.QualityTableConfig(data="d", model="m", seeds=3)
    auto_here = pickable()[0].flags()  # what an H200 picks
    rows = qt.rows(cfg, auto_here)
    labels = [r[0] for r in rows]
    assert labels.count("walkthrough int8") == 3 and labels.count("auto") == 3
    assert [r[2] for r in rows if r[0] == "auto"] == [42, 43, 44]
    picked = {tuple(r[1]) for r in rows if r[0].startswith("pick:")}
    # every other pickable mode once; auto's own pick is the auto rows, int8's the walkthrough rows
    walk = [c for c in pickable() if c.mode is WALKTHROUGH]
    assert len(walk) == 1
    assert picked == {tuple(c.flags()) for c in pickable()} - {tuple(auto_here), tuple(walk[0].flags())}
    assert [r[0] for r in rows if r[0].startswith("excluded:")] == [
        "excluded:nf4/bf16/checkpointing", "excluded:nf4/fp16/checkpointing"]
    assert sum(r[0].startswith("diag:") for r in rows) == len(qt.DIAGNOSE)
    # repeat= runs the named pick rows over repeat_seeds seeds
    rows = qt.rows(qt.QualityTableConfig(data="d", model="m", repeat="nf4/bf16", repeat_seeds=2), auto_here)
    assert [(r[0], r[2]) for r in rows if "nf4" in r[0]] == [
        ("excluded:nf4/bf16/checkpointing", 42), ("excluded:nf4/bf16/checkpointing", 43),
        ("excluded:nf4/fp16/checkpointing", 42)]


def test_the_pack_group_runs_auto_unpacked_and_packed_in_fewer_steps_over_the_same_seeds():
    rows = qt.rows(qt.QualityTableConfig(data="d", model="m", modes="pack", seeds=3, steps=60), [])
    assert [(r[0], r[2]) for r in rows] == [("unpacked", 42), ("unpacked", 43), ("unpacked", 44),
                                            ("packed", 42), ("packed", 43), ("packed", 44)]
    assert rows[0][1] == ["auto", "train.pack=false"]
    # 60 x 0.28 steps, at the lr --recipe auto gives a packed run (2 x 1e-3)
    assert rows[3][1] == ["auto", "train.pack=true", "train.max_steps=17", "train.warmup_steps=2", "train.lr=0.002"]
    rows = qt.rows(qt.QualityTableConfig(data="d", model="m", modes="pack", seeds=1, pack_steps=20), [])
    assert rows[1][1][2:] == ["train.max_steps=20", "train.warmup_steps=2", "train.lr=0.002"]
    rows = qt.rows(qt.QualityTableConfig(data="d", model="m", modes="packmix", seeds=2, steps=60), [])
    assert [(r[0], r[2]) for r in rows] == [("packed 20 % single", 42), ("packed 20 % single", 43),
                                            ("packed 5 % single", 42), ("packed 5 % single", 43)]
    assert rows[0][1] == ["auto", "train.pack=true", "train.max_steps=17", "train.warmup_steps=2", "train.lr=0.002",
                          "train.pack_plain_fraction=0", "train.pack_single_fraction=0.2"]
    assert rows[2][1][-1] == "train.pack_single_fraction=0.05"
    rows = qt.rows(qt.QualityTableConfig(data="d", model="m", modes="pack", seeds=1, steps=60, pack_batch=2), [])
    assert rows[1][1] == ["auto", "train.pack=true", "train.max_steps=67", "train.warmup_steps=7",
                          "train.batch_size=2", "train.lr=0.002"]  # the same windows (60 x 0.28 x 8 / 2) in more, smaller steps
    rows = qt.rows(qt.QualityTableConfig(data="d", model="m", modes="pack", seeds=1, pack_batch=2, pack_lr=5e-4), [])
    assert rows[0][1] == ["auto", "train.pack=false"] and rows[1][1][-1] == "train.lr=0.0005"  # the packed rows only
    with pytest.raises(UserError, match="pack_lr=-1"):
        qt.QualityTableConfig(data="d", model="m", pack_lr=-1)
    with pytest.raises(UserError, match="longer_minutes=9"):
        qt.QualityTableConfig(data="d", model="m", longer_minutes=9)


def test_unknown_groups_and_missing_paths_are_errors():
    with pytest.raises(UserError, match="modes=walk"):
        qt.QualityTableConfig(data="d", model="m", modes="walk")
    with pytest.raises(UserError, match="set data=NAME"):
        qt.QualityTableConfig(model="m")


def test_main_prints_the_table_and_the_walkthrough_range(tmp_path, monkeypatch, capsys, tiny_model_dir):
    write_prepared(tmp_path / "prepared" / "d", tiny_model_dir, {"train": [("घर", tone(1.0))]})

    def fake(cfg, env, label, flags, seed):
        w = 0.04 + 0.01 * (seed - 42)
        return {"label": label, "seed": seed, "run": f"r{seed}", "flags": flags, "last_loss": 0.07,
                "eval": {"bf16": {"wer": w, "cer": w / 3, "normalized_wer": w, "normalized_cer": w / 3,
                                  "empty": 0, "repetition": 0, "too_long": 0,
                                  **({"longform_wer": 0.5, "longform_valid": 1.0, "longform_segments": 9,
                                      "no_speech_with_text": "1/16"} if seed == 43 else {})}},
                "steps": 60, "train_s": 99.6}

    monkeypatch.setattr(qt, "run_one", fake)
    cfg = qt.QualityTableConfig(data="d", model="m", modes="walkthrough", seeds=3, eval_precisions="bf16")
    summary = qt.main(cfg, Env(data_dir=tmp_path))
    out = capsys.readouterr().out
    assert "| walkthrough int8 | 44 | 60 | 100 | 0.0700 | 6.00 / 6.00 / 2.00 / 2.00 (0, 0) |" in out
    assert "| walkthrough int8 | 43 | 60 | 100 | 0.0700 | 5.00 / 5.00 / 1.67 / 1.67 (0, 0); 50.00, 100 % of 9, 1/16 |" in out
    assert "walkthrough bf16 normalized_wer: 4.00 .. 6.00 % over 3 seeds" in out
    assert ("walkthrough int8 (bf16, 3 seeds): norm. WER 5.00 (4.00..6.00), norm. CER 1.67 (1.33..2.00), "
            "long-form WER 50.00 (50.00..50.00), longer -, train s 99.60 (99.60..99.60)") in out
    assert summary["walkthrough_range"]["bf16 normalized_wer"] == pytest.approx((0.04, 0.06))
    assert json.loads((tmp_path / "bench" / "quality_table.json").read_text())["results"][0]["seed"] == 42


def test_one_row_trains_and_evaluates_through_the_real_jobs(tmp_path, tiny_model_dir):
    clips = [(w, tone(1.0, 200 + 150 * i)) for i, w in enumerate(WORDS)]
    write_prepared(tmp_path / "prepared" / "d", tiny_model_dir,
                   {"train": clips, "validation": clips[:2], "test": clips[:2]})
    cfg = qt.QualityTableConfig(data="d", model=str(tiny_model_dir), steps=2, batch_size=2, warmup=0,
                                eval_precisions="fp32", max_new_tokens=4, longer_minutes=0.5)
    flags = ["model.quantization=none", "model.precision=fp32", "model.gradient_checkpointing=false",
             "lora.r=4", "lora.alpha=8", "train.num_workers=0"]
    r = qt.run_one(cfg, Env(data_dir=tmp_path), "diag:tiny", flags, 42)
    assert "error" not in r and "longer" not in r, r  # the longer recording is for the pack rows
    packed = qt.run_one(cfg, Env(data_dir=tmp_path), "packed tiny", [*flags, "train.pack=true"], 42)
    assert set(packed["longer"]["fp32"]) == {"minutes", "longform_wer", "longform_valid", "longform_segments"}, packed
    report = json.loads((tmp_path / "runs" / "qt-packed-tiny-s42" / "eval-fp32-long0.5" / "report.json").read_text())
    assert len(report["longform"]["items"]["adapter"]) == 1 and "hallucination" not in report
    assert set(r["eval"]["fp32"]) == {"wer", "cer", "normalized_wer", "normalized_cer", "empty", "repetition",
                                      "too_long", "longform_wer", "longform_valid", "longform_segments",
                                      "no_speech_with_text"}
    assert r["steps"] == 2 and r["train_s"] > 0
    assert (tmp_path / "runs" / "qt-diag-tiny-s42" / "eval-fp32" / "predictions.tsv").is_file()
    # a second call reuses the adapter and the report (resume after a device time limit)
    logs = sorted((tmp_path / "bench" / "quality_table").iterdir())
    assert qt.run_one(cfg, Env(data_dir=tmp_path), "diag:tiny", flags, 42)["eval"] == r["eval"]
    assert sorted((tmp_path / "bench" / "quality_table").iterdir()) == logs
