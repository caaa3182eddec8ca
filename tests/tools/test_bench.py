"""`make bench` and `lib.tools.bench_quality` end to end on the CPU, at the smallest sizes."""

import json
import logging
import time

import pytest
import yaml

from lib.env import Env
from lib.errors import UserError
from lib.tools import bench, bench_quality
from lib.tools.runner import ROOT
from lib.train import auto, measured
from tests.helpers import SHARED_WHISPER_BASE


@pytest.fixture
def tiny_arch(monkeypatch):
    """arch=tiny at the tests' tiny-model size (d_model 64, 2 + 2 layers, 4 heads, ffn 128) instead of
    whisper-tiny's (d_model 384, 4 + 4 layers): each bench mode is a fresh train-job process on 30-s
    clips, and what these tests check (rows, files, resume, timeouts) does not depend on the size."""
    from lib.tools import models

    monkeypatch.setitem(models.ARCHS, "tiny", dict(d_model=64, encoder_layers=2, decoder_layers=2, heads=4, ffn=128,
                                                   mels=80, vocab=51865))


def test_bench_runs_modes_through_the_train_job_and_names_its_results_file(tmp_path, capsys, tiny_arch):
    cfg = bench.BenchConfig(arch="tiny", modes=["fp32", "auto"], batch_size=2, steps=4, warmup=1,
                            profile_steps=1, eval_clips=0)
    rows = bench.main(cfg, Env(data_dir=tmp_path / "data"))["train"]
    assert [r["mode"] for r in rows] == ["fp32", "auto"]
    for r in rows:
        assert "error" not in r, r
        assert r["steady_samples_per_second"] > 0 and r["trainable_params"] > 0
        assert r["profile"]["steps"] == 1 and r["profile"]["seconds_by_kind"]["matmul"] > 0
    # no GPU: auto chooses fp32 and says so; its row's batch is the split the run used
    assert rows[1]["chosen"].startswith("model.quantization=none model.precision=fp32 ") and "because" in rows[1]["chosen"]
    assert "train.batch_size=2 train.grad_accum=1" in rows[1]["chosen"] and rows[1]["batch"] == "2 x 1"
    results = tmp_path / "data" / "bench" / "tiny" / "results.json"
    saved = json.loads(results.read_text())
    assert [r["mode"] for r in saved["train"]] == ["fp32", "auto"] and saved["logmel_clips_per_s_per_worker"] > 0
    # the run ends by naming where its results are (it edits no documentation)
    err = capsys.readouterr().err
    assert "== bench done" in err
    tail = err.rsplit("== bench done", 1)[-1]
    assert str(results) in tail and str(results.with_name("targets.md")) in tail
    # measured.json beside results.json: the rows as auto's figures, in the shipped table's format
    figures = measured.load(tmp_path / "data" / "bench" / "tiny" / "measured.json")
    assert (figures.model, figures.label_tokens) == ("tiny", 40)
    [run] = figures.runs.values()
    assert run.gpu == saved["gpu"] and run.gpu_memory_gib is None and run.date == time.strftime("%Y-%m-%d")
    assert run.command == ("python -m lib.tools.bench arch=tiny modes=fp32,auto batch_size=2 steps=4 warmup=1 "
                           "eval_clips=0 profile_steps=1")
    assert run.versions == saved["versions"]
    # auto chose fp32 here too: one mode, one point (the CPU has no GPU peak: auto cannot use it)
    [mode] = figures.modes
    assert mode.identity() == ("none", "fp32", False, 1.0, "fp32", "none")
    [point] = mode.points
    assert (point.batch, point.bench_mode, point.peak_gib) == (2, "fp32", None)
    assert point.samples_per_s == round(rows[0]["steady_samples_per_second"], 3)
    assert point.notes.startswith("auto ran the same settings and batch: ")
    # a tiny bench is not what auto reads (its figures are large-v2's)
    assert measured.for_gpu(saved["gpu"], tmp_path / "data").files == (measured.shipped(),)


def test_auto_e32_asks_for_32_clips_a_step_without_naming_the_batch(tmp_path, monkeypatch):
    """auto-e32: the recipe's batch x train.grad_accum=4, train.batch_size not named, so that auto
    may run the 32 clips as 32 x 1 (it keeps a split only when both are named)."""
    recipe = yaml.safe_load((ROOT / "jobs" / "recipes" / "whisper-large-v2_lora-int8_1gpu.yaml").read_text())
    assert bench.RECIPE_BATCH == recipe["train"]["batch_size"] == 8
    cfg = bench.BenchConfig(arch="tiny", modes=["auto-e32", "auto", "bf16-half-compile-b32"])
    assert [bench._split(m, cfg) for m in cfg.modes] == [(8, 4), (8, 1), (32, 1)]
    seen = {}

    def fake(job, args, env, logf, timeout=None):
        seen[args[args.index("--recipe") + 1] if "--recipe" in args else "-"] = args
        return 1, "boom"

    monkeypatch.setattr(bench, "run_job_process", fake)
    row = bench.run_mode(cfg, Env(data_dir=tmp_path), "auto-e32", tmp_path / "model", "d")
    assert row["batch"] == "8 x 4" and "exit 1" in row["error"]
    args = seen["auto"]
    assert "train.grad_accum=4" in args and not any(a.startswith("train.batch_size=") for a in args)


def test_bench_refuses_unknown_modes_and_too_few_steps():
    with pytest.raises(UserError, match="unknown"):
        bench.BenchConfig(modes=["bf17"])
    with pytest.raises(UserError, match="steps=5 must exceed"):
        bench.BenchConfig(steps=5, warmup=3, profile_steps=2)


def test_eval_variants_are_parsed_and_timed_on_the_same_model(tiny_model_dir):
    """bN / bN-static settings: a bad one is refused with the flag's name; each good one is timed
    on the model ours was (the walkthrough leg needs a GPU and is skipped here)."""
    from lib.inference import speed_compare
    from lib.model import ModelSource
    from tests.helpers import tone

    assert bench.parse_eval_variant("b64") == (64, "dynamic")
    assert bench.parse_eval_variant("b32-static") == (32, "static")
    for bad in ("64", "b0", "b8-paged"):
        with pytest.raises(UserError, match="eval_variants"):
            bench.BenchConfig(eval_variants=[bad])
    r = speed_compare(ModelSource(base=str(tiny_model_dir)), [tone(0.3), tone(0.4)], "en", "transcribe", 2, "fp32",
                      4, 4, variants=[(1, "dynamic")])
    assert r["walkthrough"].startswith("skipped") and "texts" not in r["ours"]
    [v] = r["variants"]
    assert v["batch_size"] == 1 and v["cache"] == "dynamic" and v["clips"] == 2 and v["clips_per_s"] > 0


def test_bench_reports_a_mode_that_overruns_its_time(tmp_path, monkeypatch, tiny_arch):
    monkeypatch.setitem(bench.MODES, "slow", ["train.max_steps=100000"])
    cfg = bench.BenchConfig(arch="tiny", modes=["slow"], batch_size=1, steps=4, warmup=1, profile_steps=1,
                            eval_clips=0, mode_timeout=5)
    rows = bench.main(cfg, Env(data_dir=tmp_path))["train"]
    assert "stopped after mode_timeout=5 s" in rows[0]["error"]


@pytest.fixture
def quality_data(tmp_path, tiny_model_dir):
    """DATA_DIR with prepared/even (tests.helpers.write_even): 4 train clips whose labels have the
    same token count, and no validation split. The guard compares training losses only. The fast
    run compiles its layers: with one batch shape it compiles once, not again when a batch has longer
    labels and again for the Trainer's closing evaluation (generation), minutes each on a CPU."""
    from tests.helpers import write_even

    return write_even(tmp_path, tiny_model_dir, "even")


def test_quality_guard_compares_the_fast_curve_with_the_seed_noise(quality_data, tiny_model_dir):
    cfg = bench_quality.QualityConfig(data="even", model=str(tiny_model_dir), steps=4, batch_size=2, tolerance=1e9)
    result = bench_quality.main(cfg, Env(data_dir=quality_data))
    assert {k: len(v) for k, v in result["curves"].items()} == {"reference": 4, "noise": 4, "fast": 4}
    assert result["passed"] and result["distance_noise_reference"] > 0
    assert json.loads((quality_data / "bench" / "quality.json").read_text())["passed"] is True


def test_quality_guard_fails_loudly_when_the_fast_curve_drifts(data_dir, tiny_model_dir, monkeypatch):
    curves = {"quality-reference": [2.0, 1.5, 1.0, 0.8], "quality-noise": [2.0, 1.6, 1.1, 0.8],
              "quality-fast": [2.0, 1.9, 1.8, 1.7]}  # seed noise 0.05, fast 0.525 away
    monkeypatch.setattr(bench_quality, "train_losses", lambda cfg, env, run, *a: curves[run])
    cfg = bench_quality.QualityConfig(data="toy", model=str(tiny_model_dir), steps=4)
    with pytest.raises(UserError, match=r"loss curve is 0.5250 from the reference's, more than 1.5 x the seed noise 0.0500"):
        bench_quality.main(cfg, Env(data_dir=data_dir))


def test_distance_is_the_mean_absolute_step_difference():
    assert bench_quality.distance([1.0, 2.0], [1.5, 1.0]) == pytest.approx(0.75)


@pytest.mark.slow
def test_quality_guard_on_real_whisper_base(tmp_path):
    """The guard itself, on real weights: the fast settings learn like the walkthrough recipe.
    ~10 min on 2 CPU cores: -m slow."""
    from tests.helpers import tone, write_prepared

    base = SHARED_WHISPER_BASE
    if not (base / "model.safetensors").is_file():
        pytest.skip(f"{base} not present")
    words = ["नमस्ते दोस्त", "धन्यवाद जी", "पानी लाओ", "घर चलो", "हमने उसका जन्मदिन मनाया", "आज बारिश होगी"]
    clips = [(w, tone(1.5, 220 + 150 * i)) for i, w in enumerate(words)]
    write_prepared(tmp_path / "prepared" / "tones", base, {"train": clips, "validation": clips[:2]}, language="hi")
    cfg = bench_quality.QualityConfig(data="tones", model=str(base), steps=10, batch_size=3)
    result = bench_quality.main(cfg, Env(data_dir=tmp_path))  # raises when not within 1.5 x seed noise
    assert result["passed"]


def test_bench_resume_keeps_what_an_earlier_command_measured(tmp_path, monkeypatch, tiny_arch):
    """One run over several commands (a machine that stops commands after 10 minutes): resume=true
    keeps the modes results.json holds without an error and runs only the rest."""
    env = Env(data_dir=tmp_path / "data")
    common = dict(arch="tiny", batch_size=2, steps=4, warmup=1, profile_steps=1, eval_clips=0, train_clips=16)
    calls = []
    real = bench.run_mode

    def counting(cfg, env, mode, model_dir, data):
        calls.append(mode)
        if mode == "bf16":  # no bf16 autocast worth timing here: stand in a failed mode
            return {"mode": mode, "batch": 2, "error": "exit 1: boom"}
        return real(cfg, env, mode, model_dir, data)

    monkeypatch.setattr(bench, "run_mode", counting)
    bench.main(bench.BenchConfig(modes=["fp32", "bf16"], legs=["train"], **common), env)
    res = bench.main(bench.BenchConfig(modes=["fp32", "bf16"], legs=["train", "eval"], resume=True, **common), env)
    assert calls == ["fp32", "bf16", "bf16"]  # fp32 kept, the failed mode run again
    assert [r["mode"] for r in res["train"]] == ["fp32", "bf16"] and res["train"][0]["steady_samples_per_second"] > 0
    assert [c["legs"] for c in res["commands"]] == [["train"], ["train", "eval"]]
    # a later command may time other modes: the earlier rows stay in the report
    res = bench.main(bench.BenchConfig(modes=["bf16"], legs=["train"], resume=True, **common), env)
    assert [r["mode"] for r in res["train"]] == ["fp32", "bf16"] and calls[-1] == "bf16"
    saved = json.loads((tmp_path / "data" / "bench" / "tiny" / "results.json").read_text())
    assert saved["train"] == res["train"]
    # without resume the run starts over
    calls.clear()
    bench.main(bench.BenchConfig(modes=["fp32"], legs=["train"], **common), env)
    assert calls == ["fp32"]


H200 = "NVIDIA H200"


def _gpu_row(mode, settings, batch, sps, gib, at="2026-12-02 10:00:00", half_inputs=True):
    """A train row as a GPU bench saves it (run_mode's, then main's provenance)."""
    q, prec, ckpt, frac, base, comp = settings
    return {"mode": mode, "batch": batch, "steady_samples_per_second": sps, "peak_gpu_memory_bytes": gib * 2**30,
            "label_tokens": 40,
            "settings": {"quantization": q, "precision": prec, "gradient_checkpointing": ckpt,
                         "checkpoint_fraction": frac, "base_dtype": base, "int8_half_inputs": half_inputs,
                         "compile": comp, "batch_size": batch, "grad_accum": 1},
            "measured": {"at": at, "command": "python -m lib.tools.bench legs=train", "gpu": H200,
                         "gpu_memory_bytes": int(139.8 * 2**30), "versions": {"torch": "2.11.0+cu130"}}}


def test_the_bench_writes_the_figures_auto_then_chooses_by_on_that_gpu(tmp_path, caplog):
    """A GPU run's rows (README's H200 run, 2026-12-02) -> DATA_DIR/bench/large-v2/measured.json ->
    `--recipe auto` on the H200 picks by them and says which file each figure came from; another
    GPU keeps the shipped figures."""
    from jobs.train import DEFAULT_RECIPE
    from lib.config import load_config
    from lib.train.config import TrainConfig

    env = Env(data_dir=tmp_path)
    fastest = ("none", "bf16", False, 1.0, "compute", "layers")
    res = {"versions": {"torch": "2.11.0+cu130"}, "train": [
        _gpu_row("int8-ckpt", ("int8", "fp16", True, 1.0, "fp32", "none"), 8, 8.01, 4.92),
        _gpu_row("int8-ckpt-fp32in", ("int8", "fp16", True, 1.0, "fp32", "none"), 8, 6.0, 5.36, half_inputs=False),
        _gpu_row("bf16-ckpt-half-compile-b24", ("none", "bf16", True, 1.0, "compute", "layers"), 24, 35.14, 7.91,
                 at="2026-12-03 09:00:00"),
        _gpu_row("bf16-half-compile-b32", fastest, 32, 54.25, 67.69),
        _gpu_row("auto-e32", fastest, 32, 50.34, 67.69),
        {"mode": "bf16", "batch": 8, "error": "exit 1: boom"}]}
    cfg = bench.BenchConfig()  # arch large-v2: the file auto reads
    path = env.data_dir / "bench" / "large-v2" / "measured.json"
    with caplog.at_level(logging.INFO, logger="whisper_ft"):
        bench.write_figures(res, cfg, path, say=True)
    assert path == measured.user_file(env.data_dir)
    own = measured.load(path)
    assert [r.date for r in own.runs.values()] == ["2026-12-02", "2026-12-03"]  # one run per command and day
    assert {r.gpu for r in own.runs.values()} == {H200} and own.runs["bench-1"].gpu_memory_gib == 139.8
    assert [m.points[0].bench_mode for m in own.modes] == ["int8-ckpt", "bf16-ckpt-half-compile-b24",
                                                            "bf16-half-compile-b32"]
    assert "auto-e32 ran the same settings and batch: 50.34 samples/s at 67.69 GiB" in own.modes[2].points[0].notes
    assert "int8-ckpt-fp32in: model.int8_half_inputs=false" in caplog.text

    # --recipe auto on the H200, 32 clips a step (the recipe's 8 x train.grad_accum=4): the fastest
    # mode's figures are now the H200's own (54.25 samples/s at batch 32), not the H100's 49.7
    gpu = auto.GpuInfo(H200, int(139.8 * 2**30), True, (9, 0))
    train_cfg = load_config(TrainConfig, DEFAULT_RECIPE, ["run=r", "data=d", "train.grad_accum=4"])
    with caplog.at_level(logging.INFO, logger="whisper_ft"):
        _, choice = auto.apply_auto(train_cfg, ["train.grad_accum=4", "train.pack=false"], env, probe=lambda: gpu, label_tokens=40)
    assert choice["settings"]["train.batch_size"] == 32 and choice["predicted"]["samples_per_s"] == 54.25
    assert f"figures: {path}, batch 32 on {H200} 2026-12-02 (bench-1)" in choice["why"]
    assert f"measured on {H200}, whisper-large-v2, 40-token labels (make bench) for 3 mode(s) ({path})" in caplog.text
    assert "the walkthrough's int8/fp16/checkpointing does 8.01 samples/s at 4.92 GiB" in choice["why"]
    # a smaller card of the same name: the all-checkpointed mode the H200 timed at batch 24 (7.91 GiB)
    # beats the shipped 90 % mode (23.2 at batch 8) for 24 clips in 8.5 GiB
    small = auto.GpuInfo(H200, 10 * 2**30, True, (9, 0))
    c = auto.choose(small, 8, 3, figures=auto.table(measured.for_gpu(H200, env.data_dir)))
    assert (c.mode.checkpoint_fraction, c.gradient_checkpointing, c.batch_size, c.samples_per_s) == (1.0, True, 24, 35.14)
    assert auto.choose(small, 8, 3).mode.checkpoint_fraction == 0.9  # the shipped figures alone
    # another GPU: the file is not its figures
    h100 = auto.GpuInfo("NVIDIA H100 80GB HBM3", 85_520_809_984, True, (9, 0))
    with caplog.at_level(logging.INFO, logger="whisper_ft"):
        _, choice = auto.apply_auto(train_cfg, ["train.grad_accum=4", "train.pack=false"], env, probe=lambda: h100, label_tokens=40)
    assert "lib/train/measured.json" in choice["why"] and str(path) not in choice["why"]
    assert f"{path} holds figures of {H200}, none with a peak on {h100.name}: the shipped figures stand" in caplog.text
    assert (choice["settings"]["train.batch_size"], choice["predicted"]["samples_per_s"]) == (16, pytest.approx(39.89, abs=0.01))


def test_bench_refuses_unknown_legs_and_half_a_quality_leg():
    with pytest.raises(UserError, match="legs: unknown"):
        bench.BenchConfig(legs=["train", "speed"])
    with pytest.raises(UserError, match="quality_model"):
        bench.BenchConfig(quality_data="synth-hi")


def _row(mode, sps, gib, batch=8, busy=0.5, step=None, **kw):
    step = step or batch / sps
    return {"mode": mode, "batch": batch, "checkpointing": False, "steady_samples_per_second": sps,
            "steady_step_seconds": step, "peak_gpu_memory_bytes": gib * 2**30,
            "profile": {"steps": 2, "busy_s": 2 * busy * step, "seconds_by_kind": {"matmul": busy * step, "attention": 0,
                                                                                 "other": busy * step}}, **kw}


def _quality_result(label, seed, wer, cer):
    return {"label": label, "seed": seed, "eval": {"bf16": {"wer": wer, "cer": cer}}}


def test_targets_table_judges_each_target_from_one_results_file():
    """Issue 14's six targets, each read from the rows of one run, with the verdict and how far off."""
    from lib.tools.models import flops_per_sample

    q = {"results": [_quality_result("walkthrough int8", 42, 0.040, 0.015),
                     _quality_result("walkthrough int8", 43, 0.050, 0.020),
                     _quality_result("walkthrough int8", 44, 0.045, 0.016),
                     _quality_result("auto", 42, 0.047, 0.017),
                     _quality_result("pick:slow", 42, 0.070, 0.018)]}
    res = {"bf16_peak_tflops": 780.0,
           "train": [_row("int8-ckpt", 6.0, 4.9), _row("int8-ckpt-fp32in", 4.8, 5.4),
                     _row("bf16-ckpt-half-compile-b16", 30.0, 7.5, batch=16),
                     _row("bf16-half-compile-b32", 54.4, 67.7, batch=32, busy=0.89),
                     _row("auto-e32", 53.1, 67.7, batch="32 x 1", step=32 / 53.1, chosen="train.batch_size=32 because x",
                          predicted={"peak_gib": 68.7}),
                     {"mode": "bf16-half-compile-b16", "batch": 16, "error": "exit 1"}],
           "plain": _row(bench.PLAIN, 5.0, 5.4),
           "eval": [{"setting": "walkthrough: int8, batch 8, autocast", "clips_per_s": 1.4},
                    {"setting": "ours: bf16, sdpa, batch 256, static cache", "clips_per_s": 71.4, "clips": 512,
                     "speedup": 51.0, "same_transcripts": 1.0}],
           "quality": q}
    rows = bench.targets(res, flops_per_sample("large-v2", 40))
    assert len(rows) == 8 and rows[0].startswith("| target ")
    t1, t2, t3, t4, t5, t6 = rows[2:]
    assert "**54.40**" in t1 and "bf16-half-compile-b32" in t1 and "missed: 46 % short" in t1 and "GPU busy 89 %" in t1
    assert "98 % of `bf16-half-compile-b32`" in t2 and t2.endswith("**met** |")
    assert "bf16-ckpt-half-compile-b16" in t3 and "**5.00x**" in t3 and t3.endswith("**met** |")
    assert "**1.20x**" in t4 and "missed: 20 % short" in t4 and "int8-ckpt-fp32in" not in t4
    assert "**51.0x**" in t5 and t5.endswith("**met** |")
    # int8: WER mean 4.5, spread 1.0 -> 5.5 the bar; pick:slow's 7.0 is above it, auto's 4.7 is not
    assert "pick:slow s42 (7.00 / 1.80)" in t6 and "auto s42" not in t6 and t6.endswith("missed |")
    # a low-memory row above 8 GiB does not count, nor does an 8-bit one
    res["train"][2]["peak_gpu_memory_bytes"] = 9 * 2**30
    assert "no such row" in bench.targets(res, flops_per_sample("large-v2", 40))[4]
    # transcripts that differ fail target 5 whatever the speed
    res["eval"][1]["same_transcripts"] = 0.97
    assert bench.targets(res, flops_per_sample("large-v2", 40))[6].endswith("missed: transcripts differ |")


def test_plain_loop_trains_the_walkthrough_recipe(tiny_model_dir, tmp_path):
    """The reference loop of target 4 runs (8-bit base, PEFT, LoRA on q/v, fp16 autocast), its
    LoRA learns, and it writes what the bench reads."""
    from lib.tools import plain_loop

    out = tmp_path / "plain.json"
    r = plain_loop.main(plain_loop.PlainLoopConfig(model=str(tiny_model_dir), batch_size=2, steps=4, warmup=1,
                                                   label_tokens=6, lr=1e-2, out=str(out)), Env(data_dir=tmp_path))
    assert r["samples_per_s"] > 0 and r["timed_steps"] == 3 and r["trainable_params"] > 0
    assert all(x == x for x in r["losses"]) and r["losses"][-1] < r["losses"][0]
    assert json.loads(out.read_text())["samples_per_s"] == r["samples_per_s"]
    with pytest.raises(UserError, match="warmup"):
        plain_loop.PlainLoopConfig(model="m", steps=3, warmup=3)


def test_bench_keeps_the_figures_of_a_job_that_wrote_them_but_did_not_exit(tmp_path, monkeypatch, tiny_arch):
    """A job that trained and wrote metrics.json, then was still running at mode_timeout (seen on
    the H100 with a packed compiled mode): its figures are kept, with a note, not thrown away."""
    env = Env(data_dir=tmp_path)

    def stuck(job, args, env_, log_file, timeout=None):
        run = next(a.split("=", 1)[1] for a in args if a.startswith("run="))
        d = env_.run_dir(run)
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.yaml").write_text("model: {quantization: none}\ntrain: {batch_size: 1}\n")
        (d / "metrics.json").write_text(json.dumps({"steady_samples_per_second": 7.5, "audio_hours_per_gpu_hour": 30}))
        return None, "step 4/4\n"

    monkeypatch.setattr(bench, "run_job_process", stuck)
    row = bench.run_mode(bench.BenchConfig(arch="tiny", modes=["fp32"], mode_timeout=5), env, "fp32",
                         tmp_path / "model", "data")
    assert "error" not in row and row["steady_samples_per_second"] == 7.5 and row["audio_hours_per_gpu_hour"] == 30
    assert "had not exited at mode_timeout=5 s" in row["note"]
