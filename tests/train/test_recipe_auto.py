"""`--recipe auto`: the choice per GPU (lib.train.auto.choose), the layering (walkthrough < choice <
your flags) and the real train job on the CPU picking fp32 / no quantization and saying why."""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
from pathlib import Path

import pytest
import yaml

from jobs.train import DEFAULT_RECIPE, cli
from lib.cli import Recipe, build_config
from lib.config import load_config
from lib.errors import UserError
from lib.train import auto, measured
from lib.train.auto import MEASURED, USABLE_FRACTION, GpuInfo, apply_auto, choose, logits_gib
from lib.train.config import TrainConfig
from tests.helpers import tone, write_prepared

ROOT = Path(__file__).resolve().parents[2]

# total_memory as torch.cuda.get_device_properties reports it on these cards.
H200 = GpuInfo("NVIDIA H200", int(139.8 * 2**30), True, (9, 0))
H100 = GpuInfo("NVIDIA H100 80GB HBM3", 85_520_809_984, True, (9, 0))
A100_40 = GpuInfo("NVIDIA A100-SXM4-40GB", 42_505_273_344, True, (8, 0))
A10 = GpuInfo("NVIDIA A10", 23_836_098_560, True, (8, 6))
L4 = GpuInfo("NVIDIA L4", 23_034_167_296, True, (8, 9))
T4 = GpuInfo("Tesla T4", 15_828_320_256, False, (7, 5))
GB8 = GpuInfo("NVIDIA GeForce RTX 3070", 8_361_738_240, True, (8, 6))
GB4 = GpuInfo("NVIDIA T1000", 4_294_967_296, False, (7, 5))
CARDS = {"H200": H200, "H100-80GB": H100, "A100-40GB": A100_40, "A10-24GB": A10, "L4-24GB": L4, "T4-16GB": T4,
         "8GB": GB8, "4GB": GB4}
FASTEST = MEASURED[-1]  # bf16 base, compiled layers, no checkpointing: measured at batch 8 and 32


@pytest.mark.parametrize("gpu, expected, cited", [
    # 79.6 GiB x 0.85 = 67.7 usable: the fastest mode (bf16 base, compiled layers, no checkpointing, 19.5 GiB) fits.
    (H100, ("none", "bf16", False), ["79.6 GiB", "67.7 GiB usable", "28.6 samples/s (measured at batch 8)",
                                     "~19.5 GiB", "5.0 samples/s", "capped by the effective batch (8 clips"]),
    # 39.6 x 0.85 = 33.6 >= 19.5: still no checkpointing.
    (A100_40, ("none", "bf16", False), ["39.6 GiB", "33.6 GiB usable", "28.6 samples/s", "~19.5 GiB"]),
    # 22.2 x 0.85 = 18.9 < 19.5: 90 % of the layers checkpointed, 6.4 GiB; no checkpointing would
    # fit at batch 4 (11.3 GiB), predicted 28.6 x 4/8 = 14.3 samples/s < 23.2.
    (A10, ("none", "bf16", True), ["18.9 GiB usable", "23.2 samples/s", "~6.4 GiB", "checkpointing 90%",
                                   "no checkpointing at batch 8: 28.6 samples/s, ~19.5 GiB"]),
    # no bf16 on a T4: the same mode in fp16; 14.7 x 0.85 = 12.5 >= 6.4.
    (T4, ("none", "fp16", True), ["no bf16", "12.5 GiB usable", "23.2 samples/s", "measured in bf16, run in fp16"]),
    # 7.8 x 0.85 = 6.6 >= 6.4: still fits.
    (GB8, ("none", "bf16", True), ["6.6 GiB usable", "23.2 samples/s", "~6.4 GiB", "~19.5 GiB"]),
    (None, ("none", "fp32", False), ["no CUDA GPU"]),
], ids=["H100-80GB", "A100-40GB", "A10-24GB", "T4-16GB", "8GB", "CPU"])
def test_choice_per_gpu_at_batch_8(gpu, expected, cited):
    c = choose(gpu, 8)
    assert (c.quantization, c.precision, c.gradient_checkpointing) == expected, c.why
    assert (c.batch_size, c.grad_accum) == (8, 1)
    for text in cited:
        assert text in c.why, (text, c.why)
    if gpu is not None:
        assert gpu.name in c.why and "H100 80GB, whisper-large-v2, batch 8" in c.why
        assert "labels up to 40 tokens; 8 clips per optimizer step (8 x 1 asked)" in c.why


def test_the_memory_model_reproduces_the_measured_peaks_and_grows_with_the_labels():
    # at batch 8 and 40-token labels every mode's prediction is its measured peak
    for m in MEASURED:
        assert m.peak_at(8) == pytest.approx(m.peak_gib, abs=1e-9)
        assert m.peak_at(8, 20) == m.peak_at(8)  # nothing measured below 40 tokens: the 40-token figure
    # the fastest mode at batch 32, measured 67.71 GiB: predicted 3.1 + 32 x 16.4 / 8 = 68.7 (1.5 % over)
    assert FASTEST.measured_at == ((32, 49.7, 67.71),)
    assert FASTEST.peak_at(32) == pytest.approx(68.7) and 67.71 <= FASTEST.peak_at(32) <= 67.71 * 1.02
    # the loss: 12 bytes x 400 tokens x 51,865 = 0.232 GiB a clip (0.023 at 40)
    assert logits_gib(400) == pytest.approx(0.2319, abs=1e-4) and logits_gib(40) == pytest.approx(0.02319, abs=1e-5)
    # 400 tokens, fastest mode: (2.05 - 0.023) x (1 + 0.000673 x 360) + 0.232 = 2.750 GiB a clip (2.05 at 40)
    assert FASTEST.clip_gib(400) == pytest.approx(2.750, abs=2e-3)
    assert FASTEST.peak_at(8, 400) == pytest.approx(25.1, abs=0.05)
    for m in MEASURED:
        assert m.peak_at(8, 40) < m.peak_at(8, 200) < m.peak_at(8, 400) < m.peak_at(8, 448)
        assert m.peak_at(1, 400) < m.peak_at(2, 400)


def test_the_speed_model_interpolates_the_step_time_and_never_extrapolates_a_gain():
    assert FASTEST.speed_at(8) == (28.6, "measured at batch 8")
    assert FASTEST.speed_at(32) == (49.7, "measured at batch 32")
    # batch 16: 0.280 + (0.644 - 0.280) x 8/24 = 0.401 s a step -> 39.9 samples/s
    speed, basis = FASTEST.speed_at(16)
    assert speed == pytest.approx(39.89, abs=0.01) and basis.startswith("estimate: step time between batch 8 and 32")
    assert FASTEST.speed_at(4) == (pytest.approx(14.3), "estimate: a step as long as at batch 8")
    assert FASTEST.speed_at(64) == (49.7, "estimate: no faster than at batch 32")
    ckpt90 = next(m for m in MEASURED if m.checkpoint_fraction == 0.9)
    assert [ckpt90.speed_at(b)[0] for b in (2, 8, 16, 64)] == [pytest.approx(5.8), 23.2, 23.2, 23.2]
    for m in MEASURED:  # never slower with a bigger batch
        speeds = [m.speed_at(b)[0] for b in range(1, 65)]
        assert speeds == sorted(speeds)


# card -> (label tokens, effective batch) -> (mode, batch x accum, predicted GiB): the table in docs/speed.md.
BF16, FP16 = "none/bf16/half-precision base/compiled layers", "none/fp16/half-precision base/compiled layers"
NOCKPT, CKPT90 = "/no checkpointing", "/checkpointing 90%"
EXPECTED = {
    "H200": {(40, 8): (BF16 + NOCKPT, 8, 1, 19.5), (40, 16): (BF16 + NOCKPT, 16, 1, 35.9),
             (40, 64): (BF16 + NOCKPT, 32, 2, 68.7), (400, 8): (BF16 + NOCKPT, 8, 1, 25.1),
             (400, 16): (BF16 + NOCKPT, 16, 1, 47.1), (400, 64): (BF16 + NOCKPT, 32, 2, 91.1)},
    "H100-80GB": {(40, 8): (BF16 + NOCKPT, 8, 1, 19.5), (40, 16): (BF16 + NOCKPT, 16, 1, 35.9),
                  (40, 64): (BF16 + NOCKPT, 16, 4, 35.9), (400, 8): (BF16 + NOCKPT, 8, 1, 25.1),
                  (400, 16): (BF16 + NOCKPT, 16, 1, 47.1), (400, 64): (BF16 + NOCKPT, 16, 4, 47.1)},
    "A10-24GB": {(40, 8): (BF16 + CKPT90, 8, 1, 6.4), (40, 16): (BF16 + CKPT90, 8, 2, 6.4),
                 (40, 64): (BF16 + CKPT90, 8, 8, 6.4), (400, 8): (BF16 + CKPT90, 8, 1, 8.8),
                 (400, 16): (BF16 + CKPT90, 8, 2, 8.8), (400, 64): (BF16 + CKPT90, 8, 8, 8.8)},
    "L4-24GB": {(40, 8): (BF16 + CKPT90, 8, 1, 6.4), (400, 64): (BF16 + CKPT90, 8, 8, 8.8)},
    "T4-16GB": {(40, 8): (FP16 + CKPT90, 8, 1, 6.4), (40, 16): (FP16 + CKPT90, 8, 2, 6.4),
                (40, 64): (FP16 + CKPT90, 8, 8, 6.4), (400, 8): (FP16 + CKPT90, 8, 1, 8.8),
                (400, 16): (FP16 + CKPT90, 8, 2, 8.8), (400, 64): (FP16 + CKPT90, 8, 8, 8.8)},
    "8GB": {(40, 8): (BF16 + CKPT90, 8, 1, 6.4), (40, 16): (BF16 + CKPT90, 8, 2, 6.4),
            # 400 tokens: every layer checkpointed keeps batch 8 (the loss, not a recompute, is its peak)
            (40, 64): (BF16 + CKPT90, 8, 8, 6.4), (400, 8): (BF16 + "/checkpointing", 8, 1, 6.4),
            (400, 16): (BF16 + "/checkpointing", 8, 2, 6.4), (400, 64): (BF16 + "/checkpointing", 8, 8, 6.4)},
    "4GB": {(40, 8): (FP16 + "/checkpointing", 1, 8, 3.4), (400, 8): ("int8/fp16/checkpointing", 2, 4, 3.1)},
}


@pytest.mark.parametrize("card", list(EXPECTED))
def test_what_each_card_picks(card):
    for (tokens, effective), (label, batch, accum, gib) in EXPECTED[card].items():
        c = choose(CARDS[card], 8 if effective >= 8 else effective, effective // 8, tokens)
        assert (c.mode.label(c.precision), c.batch_size, c.grad_accum) == (label, batch, accum), (tokens, effective, c.why)
        assert round(c.peak_gib, 1) == gib and c.label_tokens == tokens


def test_the_effective_batch_is_kept_the_peak_fits_and_longer_labels_never_take_a_bigger_batch():
    splits = [(8, 1), (4, 2), (16, 1), (2, 8), (8, 2), (8, 8), (64, 1), (1, 64), (12, 1), (3, 4)]
    for name, gpu in CARDS.items():
        budget = gpu.total_memory / 2**30 * USABLE_FRACTION
        for asked in splits:
            effective = asked[0] * asked[1]
            picked = {}
            for tokens in (40, 100, 200, 400, 448):
                c = choose(gpu, *asked, tokens)
                assert c.batch_size * c.grad_accum == effective and effective % c.batch_size == 0, (name, asked)
                assert c.peak_gib == pytest.approx(c.mode.peak_at(c.batch_size, tokens))
                assert c.samples_per_s == c.mode.speed_at(c.batch_size)[0]
                if any(m.peak_at(1, tokens) <= budget for m in MEASURED if m.auto):
                    assert c.peak_gib <= budget, (name, asked, tokens)
                    # nothing that fits is predicted faster (the search is over every mode x divisor)
                    for m, _ in auto._candidates(gpu.bf16):
                        for b in auto.divisors(effective):
                            if m.peak_at(b, tokens) <= budget:
                                assert m.speed_at(b)[0] <= c.samples_per_s, (name, asked, tokens, m.label(), b)
                picked[tokens] = (c.batch_size, c.mode.key())
            batches = [picked[t][0] for t in sorted(picked)]
            if name != "4GB":
                assert batches == sorted(batches, reverse=True), (name, asked, picked)
            # 4 GB: at 100 tokens the fp16 base no longer fits batch 1 and int8, whose fixed part is
            # 1.2 GiB smaller, fits 2; within one mode a longer label never takes a bigger batch
            for t1, (b1, mode1) in picked.items():
                for t2, (b2, mode2) in picked.items():
                    if t1 < t2 and mode1 == mode2:
                        assert b2 <= b1, (name, asked, picked)


def test_the_h200_raises_the_per_device_batch_and_says_when_the_effective_batch_caps_it():
    c = choose(H200, 8, 8)  # 64 clips per optimizer step
    assert (c.batch_size, c.grad_accum, c.samples_per_s) == (32, 2, 49.7)
    assert "train.batch_size=32 train.grad_accum=2" in c.why and "49.7 samples/s (measured at batch 32)" in c.why
    assert "capped" not in c.why  # 64 would not be faster (no gain assumed above 32)
    c = choose(H200, 8, 4)
    assert (c.batch_size, c.grad_accum) == (32, 1)  # bench mode auto-e32
    c = choose(H200, 8)
    assert (c.batch_size, c.grad_accum) == (8, 1)
    assert ("the per-device batch is capped by the effective batch (8 clips per optimizer step): a larger one "
            "would change the optimization") in c.why
    # the batch is split when it does not fit: A100 40 GB, 16 clips: no checkpointing at 8 x 2
    # (19.5 GiB, 28.6 samples/s) beats 90 % checkpointing at 16 x 1 (9.7 GiB, 23.2)
    c = choose(A100_40, 16)
    assert (c.gradient_checkpointing, c.batch_size, c.grad_accum) == (False, 8, 2)
    assert "no checkpointing at batch 16: 39.9 samples/s, ~35.9 GiB" in c.why  # faster but too big


def test_a_split_you_named_is_kept():
    # A100 40 GB, 16 x 1 kept: no checkpointing needs 3.1 + 16.4 x 2 = 35.9 GiB > 33.6 -> checkpointing
    c = choose(A100_40, 16, 1, keep_split=True)
    assert (c.gradient_checkpointing, c.batch_size, c.grad_accum) == (True, 16, 1)
    assert "(16 x 1 asked: both named, kept)" in c.why and "~9.7 GiB" in c.why
    # kept and too big: the advice names the split that fits, or naming only one
    c = choose(GB4, 8, 1, keep_split=True)
    assert "no measured mode fits at batch 8" in c.why and (c.batch_size, c.grad_accum) == (8, 1)
    assert "use train.batch_size=1 train.grad_accum=8" in c.why and "name only one of the two" in c.why


def test_a_card_too_small_gets_the_smallest_mode_at_batch_1():
    # 4 GiB: 3.4 usable; bf16-base + compiled + checkpointing is 3.1 + 0.275 = 3.4 GiB at batch 1
    c = choose(GB4, 8)
    assert (c.quantization, c.precision, c.gradient_checkpointing) == ("none", "fp16", True)
    assert (c.batch_size, c.grad_accum) == (1, 8) and "train.batch_size=1 train.grad_accum=8" in c.why
    # 2 GiB: nothing fits even at batch 1; nf4 (smaller, learnt worse) is named, never picked
    c = choose(GpuInfo("2 GiB", 2 * 2**30, True, (8, 6)), 8)
    assert c.quantization == "int8" and (c.batch_size, c.grad_accum) == (1, 8)
    assert "no measured mode fits at batch 1" in c.why and "use a bigger GPU" in c.why
    assert "model.quantization=nf4 (~1.6 GiB, learnt worse" in c.why


def test_nf4_is_never_picked_int8_only_where_it_is_predicted_fastest():
    """docs/results.md "Quality of every mode auto can pick": nf4 lost quality on the H200 (whisper-base),
    so choose() never returns it; int8 (the walkthrough's) only where the unquantized modes fit a
    batch so small that int8 at a larger one is predicted faster (tiny cards, long labels)."""
    assert [m for m in MEASURED if not m.auto] == [m for m in MEASURED if m.quantization == "nf4"]
    for gib in (2, 3, 4, 6, 8, 12, 16, 20, 24, 32, 40, 48, 80, 141):
        for batch in (1, 2, 4, 8, 16, 32):
            for bf16 in (True, False):
                for tokens in (40, 400):
                    gpu = GpuInfo("x", gib * 2**30, bf16, (8, 0) if bf16 else (7, 5))
                    c = choose(gpu, batch, 1, tokens)
                    assert c.quantization != "nf4"
                    if c.quantization == "int8":
                        assert c.precision == "fp16" and gib <= 4  # the walkthrough's own, tiny cards only
                    else:
                        assert c.precision == ("bf16" if bf16 else "fp16")
                    assert c.mode in MEASURED and c.mode.auto


def test_pickable_lists_what_choose_returns():
    labels = [c.mode.label(c.precision) for c in auto.pickable()]
    assert labels[0] == "none/bf16/half-precision base/compiled layers/no checkpointing"  # the H200's pick
    assert not any(lb.startswith("nf4") for lb in labels)
    assert "int8/fp16/checkpointing" in labels  # tiny cards at batch 1
    assert len(labels) == len(set(labels)) == 7
    assert choose(A10, 8).mode.label("bf16") in labels and choose(T4, 8).mode.label("fp16") in labels
    assert all(c.batch_size is None and "train.batch_size" not in c.settings() for c in auto.pickable())


def test_the_label_share_per_token_is_what_the_fake_tensor_count_gives_on_a_tiny_model():
    """lib.tools.activation_memory, the count behind DECODER_SHARE_PER_TOKEN and LOGIT_BYTES, on a
    tiny size (seconds): activations grow with the label, the loss peak is 12 bytes a logit."""
    from lib.tools.activation_memory import step_memory

    short, long = step_memory("tiny", 1, 16), step_memory("tiny", 1, 64)
    assert long["activations"] > short["activations"] > 0
    assert long["log_softmax"] == 4 * 63 * 51865
    assert long["peak"] - long["activations"] == pytest.approx(auto.LOGIT_BYTES * 63 * 51865, rel=0.05)
    # checkpointed: each layer keeps its input only (a tenth here); with a long label the peak is
    # still the loss's 12 bytes a logit above them, with a short one a layer's recompute
    ckpt_short, ckpt_long = (step_memory("tiny", 1, t, checkpointing=True) for t in (16, 200))
    assert ckpt_long["activations"] < long["activations"] / 5
    assert ckpt_long["peak"] - ckpt_long["activations"] == pytest.approx(auto.LOGIT_BYTES * 199 * 51865, rel=0.05)
    assert ckpt_short["peak"] - ckpt_short["activations"] > 2 * auto.LOGIT_BYTES * 15 * 51865


@pytest.mark.slow
def test_the_large_v2_count_matches_the_constants():
    """The large-v2 count itself (about 30 s on 2 CPU cores): 0.0673 % a token, 12 bytes a logit."""
    from lib.tools.activation_memory import step_memory

    a, b = step_memory("large-v2", 1, 40), step_memory("large-v2", 1, 400)
    share = (b["activations"] - a["activations"]) / 360 / a["activations"]
    assert share == pytest.approx(auto.DECODER_SHARE_PER_TOKEN, rel=0.01)
    assert (b["peak"] - b["activations"]) / (399 * 51865) == pytest.approx(auto.LOGIT_BYTES, rel=0.02)


# ---- the figures: data, checked --------------------------------------------------------------------


def test_every_shipped_measured_file_loads_and_names_where_each_figure_came_from():
    files = sorted((ROOT / "lib").rglob("measured.json"))
    assert files == [ROOT / "lib" / "train" / "measured.json"]
    for path in files:
        m = measured.load(path)
        assert m.modes and all(p.run in m.runs for s in m.modes for p in s.points)
        for run in m.runs.values():
            assert run.gpu and run.date and run.command and run.notes  # the machine, the date, the command, the source
    # the table choose() uses is the file's, each mode citing its run
    assert len(MEASURED) == len(measured.shipped().modes) == 11
    assert FASTEST.source == ("figures: lib/train/measured.json, batch 8 on NVIDIA H100 80GB HBM3 2026-11-25 "
                              "(h100-2026-11-25-run2), batch 32 on NVIDIA H100 80GB HBM3 2026-11-25 (h100-2026-11-25-run3)")
    assert "figures: lib/train/measured.json, batch 8 on NVIDIA H100 80GB HBM3" in choose(H100, 8).why


def test_a_measured_file_auto_cannot_trust_is_refused_naming_the_file_and_entry(tmp_path):
    good = json.loads(measured.SHIPPED.read_text())
    path = tmp_path / "measured.json"

    def refused(change, match):
        data = json.loads(json.dumps(good))
        change(data)
        path.write_text(json.dumps(data))
        with pytest.raises(UserError, match=match):
            measured.load(path)

    refused(lambda d: d.update(format=2), rf"{path}: format: expected 1, got 2")
    refused(lambda d: d["modes"][0].update(quantisation="int8"), r"modes\[0\]: unknown key\(s\) quantisation")
    refused(lambda d: d["modes"][1].update(precision="bf17"), r"modes\[1\]\.precision: 'bf17': choose one of fp16, bf16, fp32")
    refused(lambda d: d["modes"][2]["points"][0].update(run="h100-2099"), r"modes\[2\]\.points\[0\]\.run: 'h100-2099' is not in runs")
    refused(lambda d: d["modes"][2]["points"][0].update(samples_per_s="10.3"), r"samples_per_s: '10.3' is not a number")
    refused(lambda d: d["modes"][2]["points"].append(d["modes"][2]["points"][0]), r"a second point at batch 8")
    refused(lambda d: d["modes"].append(d["modes"][0]), r"modes\[11\]: the same mode as modes\[0\]")
    refused(lambda d: d["runs"]["h100-2026-11-24"].update(date="24.11.2026"), r"date: '24.11.2026' is not YYYY-MM-DD")
    refused(lambda d: d["runs"]["h100-2026-11-24"].pop("gpu"), r"runs\['h100-2026-11-24'\]: missing gpu")


def test_auto_reads_label_lengths_through_the_dataset_wing_not_the_trainer():
    import ast

    tree = ast.parse((ROOT / "lib" / "train" / "auto.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "lib.train.trainer" not in imported and "lib.dataset.prepared" in imported  # data= itself: the config's corpora()


# ---- layering: walkthrough recipe < auto choice < your flags --------------------------------------


def auto_cfg(flags: list[str], gpu: GpuInfo | None, label_tokens: int = 40) -> TrainConfig:
    """What run_job builds for `--recipe auto` (lib.cli.build_config), on a made-up GPU."""
    computed = {"auto": (DEFAULT_RECIPE, lambda cfg, flags, env: apply_auto(cfg, flags, env, probe=lambda: gpu,
                                                                            label_tokens=label_tokens))}
    cfg, recipe = build_config(TrainConfig, "auto", ["run=r", "data=d", *flags], computed)
    assert recipe.path == DEFAULT_RECIPE and recipe.choice["settings"]["model.quantization"]
    assert recipe.choice["settings"]["train.batch_size"] == cfg.train.batch_size
    assert recipe.choice["settings"]["train.grad_accum"] == cfg.train.grad_accum
    return cfg


def test_auto_starts_from_the_walkthrough_recipe(caplog):
    with caplog.at_level(logging.INFO, logger="whisper_ft"):
        cfg = auto_cfg([], H100)
    walk = load_config(TrainConfig, DEFAULT_RECIPE, ["run=r", "data=d"])
    assert (cfg.model.quantization, cfg.model.precision, cfg.model.gradient_checkpointing) == ("none", "bf16", False)
    assert (cfg.model.base_dtype, cfg.train.compile) == ("compute", "layers")
    assert cfg.model.base == walk.model.base and cfg.lora == walk.lora
    assert cfg.train == dataclasses.replace(walk.train, compile="layers")  # 8 x 1: the recipe's split
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("recipe auto: ")]
    assert len(lines) == 1
    assert lines[0].startswith(
        "recipe auto: model.quantization=none model.precision=bf16 model.gradient_checkpointing=false "
        "model.checkpoint_fraction=1.0 model.base_dtype=compute train.compile=layers train.batch_size=8 "
        "train.grad_accum=1 because "
    )


def test_explicit_flags_win_over_the_choice_and_narrow_it(caplog):
    with caplog.at_level(logging.INFO, logger="whisper_ft"):
        cfg = auto_cfg(["model.quantization=int8", "lora.r=16"], H100)
    # int8 named: the fastest int8 mode that fits (no checkpointing, 6.9 samples/s, 36.1 GiB at 8)
    assert (cfg.model.quantization, cfg.model.precision, cfg.model.gradient_checkpointing) == ("int8", "fp16", False)
    assert cfg.lora.r == 16
    assert "your flags win: model.quantization=int8" in caplog.text and "lora.r" not in caplog.text
    # checkpointing forced on, 64 clips on an A10: the split is for a checkpointed mode (90 %, 8 x 8)
    cfg = auto_cfg(["model.gradient_checkpointing=true", "train.grad_accum=8"], A10)
    assert (cfg.model.gradient_checkpointing, cfg.model.checkpoint_fraction) == (True, 0.9)
    assert (cfg.train.batch_size, cfg.train.grad_accum) == (8, 8)
    # a setting no measured mode has is left out of the narrowing, and said
    with caplog.at_level(logging.INFO, logger="whisper_ft"):
        cfg = auto_cfg(["model.quantization=int8", "model.precision=bf16"], H100)
    assert "no measured mode has model.precision=bf16: predicted without it" in caplog.text
    assert (cfg.model.quantization, cfg.model.precision) == ("int8", "bf16")


def test_the_batch_flags_set_the_effective_batch_and_naming_both_keeps_the_split(caplog):
    # batch_size alone: 16 clips per optimizer step, re-split 8 x 2 without checkpointing (A100 40 GB)
    with caplog.at_level(logging.INFO, logger="whisper_ft"):
        cfg = auto_cfg(["train.batch_size=16"], A100_40)
    assert (cfg.model.gradient_checkpointing, cfg.train.batch_size, cfg.train.grad_accum) == (False, 8, 2)
    assert "16 x 1 clips per optimizer step run as 8 x 2 (the same 16" in caplog.text
    # both named: 16 x 1 kept, checkpointing 90 % makes it fit
    cfg = auto_cfg(["train.batch_size=16", "train.grad_accum=1"], A100_40)
    assert (cfg.model.gradient_checkpointing, cfg.train.batch_size, cfg.train.grad_accum) == (True, 16, 1)
    # grad_accum alone on the H200: the recipe's 8 x 8 = 64 clips run as 32 x 2
    cfg = auto_cfg(["train.grad_accum=8"], H200)
    assert (cfg.train.batch_size, cfg.train.grad_accum) == (32, 2)
    # longer labels, the same card and 64 clips: never a bigger per-device batch (8 GB: 8 x 8 at 40 and
    # at 400 tokens, the latter with every layer checkpointed)
    assert (auto_cfg(["train.grad_accum=8"], GB8, 400).train.batch_size, auto_cfg(["train.grad_accum=8"], GB8).train.batch_size) == (8, 8)


def test_the_train_job_reads_the_longest_label_of_the_train_shards(tmp_path, caplog):
    """apply_auto with the job's env: label_tokens from the labels column of every corpus's train
    shards (lib.dataset.prepared.label_lengths), plus what train.* options add, and it reaches the choice."""
    from lib.dataset.prepared import label_lengths, write_manifest, write_rows
    from lib.dataset.shards import FORMAT
    from lib.env import Env

    env = Env(data_dir=tmp_path)
    for name, lengths in (("a", [10, 57, 30]), ("b", [12, 380])):
        out = env.prepared_dir(name)
        rows = [{"id": f"r{i}", "audio": tone(0.1), "text": "x", "labels": [50258] * n} for i, n in enumerate(lengths)]
        splits = {"train": write_rows(out, "train", iter(rows), shard_rows=2),
                  "validation": write_rows(out, "validation", iter(rows[:1]))}
        write_manifest(out, {"format": FORMAT, "name": name, "language": "hi", "task": "transcribe", "splits": splits})
    root, manifest = env.prepared_dir("a"), json_manifest(env.prepared_dir("a"))
    assert label_lengths(root, manifest, "train").tolist() == [10, 57, 30]  # two shards, in source order
    cfg = load_config(TrainConfig, DEFAULT_RECIPE, ["run=r", "data=a"])
    assert auto.train_label_tokens(cfg, env)[0] == 57
    cfg = load_config(TrainConfig, DEFAULT_RECIPE, ["run=r", "data=a", "train.timestamp_probability=0.5"])
    tokens, source = auto.train_label_tokens(cfg, env)
    assert tokens == 58 and "the longest train label of data=a, 57 tokens over 3 clips" in source
    assert "+1 for train.timestamp_probability" in source
    cfg = load_config(TrainConfig, DEFAULT_RECIPE, ["run=r", "data=a", "train.prompt_probability=0.5"])
    assert auto.train_label_tokens(cfg, env)[0] == 57 + 1 + 223
    # several corpora: the longest of all, capped at Whisper's 448 positions with prompts
    cfg = load_config(TrainConfig, DEFAULT_RECIPE, ["run=r", "data=a:0.5,b:0.5", "train.prompt_probability=0.5"])
    assert auto.train_label_tokens(cfg, env)[0] == 448
    # through the job's path (build_config hands apply_auto the env): 380 tokens on the 8 GB card
    computed = {"auto": (DEFAULT_RECIPE, lambda cfg, flags, env: apply_auto(cfg, flags, env, probe=lambda: GB8))}
    with caplog.at_level(logging.INFO, logger="whisper_ft"):
        cfg, recipe = build_config(TrainConfig, "auto", ["run=r", "data=a:0.5,b:0.5", "train.pack=false"], computed, env)
    assert recipe.choice["label_tokens"] == 380 and "labels up to 380 tokens" in recipe.choice["why"]
    assert "labels: the longest train label of data=a:0.5,b:0.5, 380 tokens over 5 clips" in caplog.text
    assert (cfg.train.batch_size, cfg.train.grad_accum) == (8, 1)  # 8 clips, every layer checkpointed: 6.3 of 6.6 GiB
    assert cfg.model.gradient_checkpointing and cfg.model.checkpoint_fraction == 1
    assert recipe.choice["predicted"]["peak_gib"] <= 7.8 * USABLE_FRACTION


def _corpus(env, name: str, seconds: float, n: int, label_tokens: int) -> None:
    from lib.dataset.prepared import write_manifest, write_rows
    from lib.dataset.shards import FORMAT

    out = env.prepared_dir(name)
    label = [50258, 50276, 50359, 50363] + [400] * (label_tokens - 5) + [50257]  # sot hi transcribe notimestamps .. eot
    rows = [{"id": f"{name}{i}", "audio": tone(seconds), "text": "x", "labels": label} for i in range(n)]
    splits = {"train": write_rows(out, "train", iter(rows), shard_rows=16),
              "validation": write_rows(out, "validation", iter(rows[:1]))}
    write_manifest(out, {"format": FORMAT, "name": name, "language": "hi", "task": "transcribe", "splits": splits})


def test_auto_packs_when_the_median_clip_is_short_and_counts_the_longer_labels(tmp_path, caplog):
    """decide_pack: median clip < 15 s -> train.pack=true, the estimate's labels = the longest packed
    window (planned as lib.train.packing plans); long clips, train.timestamp_probability or your
    train.pack flag -> not packed by auto."""
    from lib.env import Env
    from lib.train.auto import PACK_BELOW_SECONDS, decide_pack

    env = Env(data_dir=tmp_path)
    _corpus(env, "short", 2.0, 40, 20)   # 2-s clips, 17 segment tokens each
    _corpus(env, "long", PACK_BELOW_SECONDS + 1, 4, 20)
    cfg = load_config(TrainConfig, DEFAULT_RECIPE, ["run=r", "data=short"])
    got = decide_pack(cfg, env)
    # a clip costs 2 s + 1 ms + the longest pause (0.8 s) + a 20-ms grid step in the worst case: 10 fit in
    # 30 s (+ the last one's pause); 3 prefix tokens + 10 x 17 = 173 tokens -> 192, a multiple of 64
    assert got.pack and got.label_tokens == 192 and "median train clip is 2.0 s" in got.why
    assert not decide_pack(load_config(TrainConfig, DEFAULT_RECIPE, ["run=r", "data=long"]), env).pack
    ts = decide_pack(load_config(TrainConfig, DEFAULT_RECIPE, ["run=r", "data=short", "train.timestamp_probability=0.5"]), env)
    assert not ts.pack and "train.timestamp_probability=0.5" in ts.why
    # the median of the corpora together: 40 short clips and 4 long ones pack
    assert decide_pack(load_config(TrainConfig, DEFAULT_RECIPE, ["run=r", "data=short:0.5,long:0.5"]), env).pack
    computed = {"auto": (DEFAULT_RECIPE, lambda cfg, flags, env: apply_auto(cfg, flags, env, probe=lambda: GB8))}
    with caplog.at_level(logging.INFO, logger="whisper_ft"):
        cfg, recipe = build_config(TrainConfig, "auto", ["run=r", "data=short"], computed, env)
    assert cfg.train.pack and recipe.choice["pack"]["pack"] and recipe.choice["label_tokens"] == 192
    assert "recipe auto: train.pack=true because the median train clip is 2.0 s" in caplog.text
    # packed: the recipe's lr x PACK_LR_FACTOR, unless train.lr is named
    recipe_lr = load_config(TrainConfig, DEFAULT_RECIPE, ["run=r", "data=short"]).train.lr
    assert cfg.train.lr == recipe.choice["lr"] == pytest.approx(2 * recipe_lr)
    assert f"recipe auto: train.lr={2 * recipe_lr:g} (2 x the recipe's {recipe_lr:g})" in caplog.text
    cfg, recipe = build_config(TrainConfig, "auto", ["run=r", "data=short", "train.lr=3e-4"], computed, env)
    assert cfg.train.pack and cfg.train.lr == 3e-4 and recipe.choice["lr"] is None
    cfg, _ = build_config(TrainConfig, "auto", ["run=r", "data=long"], computed, env)  # not packed: the recipe's
    assert not cfg.train.pack and cfg.train.lr == recipe_lr
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="whisper_ft"):
        cfg, recipe = build_config(TrainConfig, "auto", ["run=r", "data=short", "train.pack=false"], computed, env)
    assert not cfg.train.pack and recipe.choice["pack"] is None and "train.pack=" not in caplog.text
    assert cfg.train.lr == recipe_lr and "train.lr=" not in caplog.text
    cfg, _ = build_config(TrainConfig, "auto", ["run=r", "data=short", "train.pack=true"], computed, env)
    assert cfg.train.pack and cfg.train.lr == pytest.approx(2 * recipe_lr)  # packed by your flag: the same lr
    assert recipe.choice["label_tokens"] == 20 - 1 + 1  # the prepared labels' longest, as without packing


def json_manifest(root: Path) -> dict:
    import json

    return json.loads((root / "manifest.json").read_text())


def test_unknown_keys_stay_errors_and_other_recipes_pass_through():
    with pytest.raises(UserError, match="unknown key 'quantisation'"):
        auto_cfg(["model.quantisation=nf4"], H100)
    computed = {"auto": (DEFAULT_RECIPE, lambda cfg, flags, env: apply_auto(cfg, flags, env, probe=lambda: H100,
                                                                            label_tokens=40))}
    other = build_config(TrainConfig, str(DEFAULT_RECIPE), ["run=r", "data=d"], computed)
    assert other == (load_config(TrainConfig, DEFAULT_RECIPE, ["run=r", "data=d"]), Recipe(str(DEFAULT_RECIPE), DEFAULT_RECIPE))
    none = build_config(TrainConfig, None, ["run=r", "data=d"], computed)
    assert none == (load_config(TrainConfig, None, ["run=r", "data=d"]), Recipe(None, None))


def test_make_train_recipe_auto_reaches_the_job():
    proc = subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), "-n", "train", "RUNNER=local",
                           "RECIPE=auto", "RUN=r", "DATA=d"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "python -m jobs.train" in proc.stdout and "--recipe auto " in proc.stdout
    # the Makefile's default recipe is the one auto starts from
    assert "--recipe jobs/recipes/whisper-large-v2_lora-int8_1gpu.yaml" in subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "-n", "train", "RUNNER=local"],
        capture_output=True, text=True, timeout=60).stdout
    assert DEFAULT_RECIPE == ROOT / "jobs/recipes/whisper-large-v2_lora-int8_1gpu.yaml"


# ---- the real job on the CPU ------------------------------------------------------------------------


def test_train_job_with_recipe_auto_on_the_cpu(tiny_model_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    clips = [(w, tone(1.0, 200 + 150 * i)) for i, w in enumerate(["नमस्ते", "धन्यवाद", "पानी", "घर"])]
    write_prepared(data / "prepared" / "toy", tiny_model_dir, {"train": clips, "validation": clips[:1]})
    envfile = tmp_path / "env"
    envfile.write_text(f"DATA_DIR={data}\n")
    monkeypatch.setenv("DATA_DIR", str(data))
    monkeypatch.setattr(auto, "detect", lambda: None)  # the CPU even on a GPU machine
    code = cli([
        "--recipe", "auto", "--env-file", str(envfile), "run=auto", "data=toy", f"model.base={tiny_model_dir}",
        "model.gradient_checkpointing=true", "train.batch_size=2", "train.max_steps=2", "train.eval_steps=2",
        "train.save_steps=2", "train.num_workers=0", "train.generation_max_length=8", "train.max_eval_samples=1",
    ])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    line = next(ln for ln in err.splitlines() if "recipe auto: model." in ln)
    assert "recipe auto: train.pack=true because the median train clip is 1.0 s" in err  # 1-s clips: packed
    assert " INFO recipe auto: model.quantization=none model.precision=fp32 model.gradient_checkpointing=false " \
           "model.checkpoint_fraction=1.0 model.base_dtype=fp32 train.compile=none train.batch_size=2 " \
           "train.grad_accum=1 because no CUDA GPU is visible" in line
    assert line.endswith("your flags win: model.gradient_checkpointing=true")
    saved = yaml.safe_load((data / "runs" / "auto" / "config.yaml").read_text())
    assert saved["model"] == {"base": str(tiny_model_dir), "quantization": "none", "precision": "fp32",
                              "base_dtype": "fp32", "gradient_checkpointing": True, "checkpoint_fraction": 1.0,
                              "int8_half_inputs": True}
    # everything else is the walkthrough's, but packed at 2 x its lr (auto.PACK_LR_FACTOR)
    assert (saved["lora"]["r"], saved["lora"]["alpha"], saved["train"]["lr"], saved["train"]["warmup_steps"]) \
        == (32, 64, 2e-3, 50)
    assert saved["train"]["pack"] is True and "recipe auto: train.lr=0.002 (2 x the recipe's 0.001)" in err
    assert (data / "runs" / "auto" / "adapter" / "adapter_model.safetensors").is_file()
