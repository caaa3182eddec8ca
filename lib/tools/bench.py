"""Benchmark training and eval speed/memory at a named Whisper size with random weights.

    python -m lib.tools.bench                                   # large-v2, the default run below
    python -m lib.tools.bench arch=tiny modes=fp32,auto steps=6   # quick look on any machine
    make bench ARGS="extra=train.num_workers=8"                 # the default run (docs/results.md)
    make bench ARGS="train_clips=320 extra=train.num_workers=8 quality_data=synth-hi quality_model=..."  # + quality

Random weights need no Hub: the model is built from the architecture's published config,
the inputs are 30 s clips with 40-token labels (the walkthrough's shapes). Each mode runs
the real train job (`python -m jobs.train`: Trainer, collator, log-mel, LoRA, quantization,
compilation) in a fresh process for `steps` optimizer steps: the first `warmup` are not
timed, the last `profile_steps` are profiled (not timed) to show where the GPU time goes.
The default run on a GPU (the six goals of `targets()`): the walkthrough's 8-bit recipe,
the low-memory recipe (<= 8 GiB), the fastest recipe (batch 32), and what `--recipe auto` picks on
this machine at 32 clips per optimizer step (`auto-e32`: its row's batch is the split it chose);
the walkthrough as a plain training loop (lib/tools/plain_loop.py, target 4's reference); eval
(generation) clips/s, ours vs the walkthrough's loop; with quality_data= and quality_model=, the
quality table on real weights (lib/tools/bench_quality_table.py, target 6). `legs=` picks what
runs and `resume=true` keeps what results.json already holds, so one run can span several
commands (each prints the report of all of it). Prints a table (samples/s, speed over the 8-bit
mode, tokens/s, peak GPU memory, adapter size, fraction of the GPU's measured bf16 peak,
GPU busy, GPU time by kind), writes DATA_DIR/bench/ARCH/results.json after every mode and
targets.md at the end, and ends by naming both. It edits no other file: copy what you want to
keep into docs/results.md yourself, with the date, the machine and the command.

Beside results.json it writes measured.json: the train rows as the figures `--recipe auto`
chooses by (lib/train/measured.py's format, the shipped table's: per mode and per-device batch,
samples/s and peak GiB, each naming the GPU, its memory, the date and this command). The
default arch's, DATA_DIR/bench/large-v2/measured.json, is what `make train RECIPE=auto` reads:
on the GPU it was measured on, its modes replace the shipped ones. Nobody copies a number.
"""

from __future__ import annotations

import json
import logging
import platform
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import yaml

from lib import summary
from lib.cli import run_job
from lib.env import Env
from lib.errors import UserError
from lib.tools.models import ARCHS, flops_per_sample, save_random_whisper, whisper_config
from lib.tools.runner import ROOT, last_error, run_job_process
from lib.train import measured
from lib.whisper import EOT_ID, SAMPLING_RATE, SOT_ID, WINDOW_SECONDS

log = logging.getLogger("whisper_ft")
TOKENIZER = ROOT / "tests" / "fixtures" / "whisper_tokenizer"
CV_SECONDS = (1.0, 20.0)
"""with clips=cv: the shortest and longest train clip"""


def cv_text_tokens(seconds, per_second: float):
    """with clips=cv: a clip's text tokens (at least 1) from its duration (a float or an array)."""
    return np.maximum(1, np.round(np.asarray(seconds) * per_second)).astype(np.int64)

# Mode name -> train job overrides. Same LoRA placement for all (r=32 on q_proj/v_proj).
_INT8 = ["model.quantization=int8", "model.precision=fp16"]
_NF4 = ["model.quantization=nf4", "model.precision=bf16"]
_BF16 = ["model.quantization=none", "model.precision=bf16"]
_HALF = [*_BF16, "model.base_dtype=compute"]  # frozen base stored in bf16: half the weight memory
_CKPT, _NOCKPT = ["model.gradient_checkpointing=true"], ["model.gradient_checkpointing=false"]
_COMPILE = ["train.compile=layers"]
MODES: dict[str, list[str]] = {
    "int8-ckpt": [*_INT8, *_CKPT],  # the walkthrough's
    "int8-ckpt-fp32in": [*_INT8, *_CKPT, "model.int8_half_inputs=false"],  # before the fp16 input cast
    "int8": [*_INT8, *_NOCKPT],
    "nf4-ckpt": [*_NF4, *_CKPT],
    "bf16-ckpt": [*_BF16, *_CKPT],
    "bf16": [*_BF16, *_NOCKPT],
    "fp16": ["model.quantization=none", "model.precision=fp16", *_NOCKPT],
    "bf16-ckpt-half": [*_HALF, *_CKPT],
    "bf16-half": [*_HALF, *_NOCKPT],
    "bf16-b32": [*_BF16, *_NOCKPT, "train.batch_size=32"],
    "bf16-half-b32": [*_HALF, *_NOCKPT, "train.batch_size=32"],
    "bf16-ckpt-half-compile": [*_HALF, *_CKPT, *_COMPILE],
    # the low-memory recipe at 16 clips a step: every layer checkpointed, so a clip adds little
    # (~0.28 GiB at batch 8), and the step's fixed host time is spread over twice the clips
    "bf16-ckpt-half-compile-b16": [*_HALF, *_CKPT, *_COMPILE, "train.batch_size=16"],
    "bf16-ckpt-half-compile-b24": [*_HALF, *_CKPT, *_COMPILE, "train.batch_size=24"],
    "bf16-ckpt90-half-compile": [*_HALF, *_CKPT, "model.checkpoint_fraction=0.9", *_COMPILE],
    "bf16-ckpt85-half-compile": [*_HALF, *_CKPT, "model.checkpoint_fraction=0.85", *_COMPILE],
    "bf16-ckpt75-half-compile": [*_HALF, *_CKPT, "model.checkpoint_fraction=0.75", *_COMPILE],
    "bf16-half-compile": [*_HALF, *_NOCKPT, *_COMPILE],
    "bf16-half-compile-b16": [*_HALF, *_NOCKPT, *_COMPILE, "train.batch_size=16"],
    # the fastest recipe where labels are long (packed windows: ~5 clips' text, 250-300 tokens)
    "bf16-half-compile-b24": [*_HALF, *_NOCKPT, *_COMPILE, "train.batch_size=24"],
    "bf16-half-compile-b32": [*_HALF, *_NOCKPT, *_COMPILE, "train.batch_size=32"],
    "bf16-compile-model-b32": [*_BF16, *_NOCKPT, "train.batch_size=32", "train.compile=model"],
    # what `make train RECIPE=auto` picks on this machine (the walkthrough recipe + lib/train/auto.py's
    # choice, the batch split included): with the bench's train.batch_size alone, auto keeps that
    # many clips per optimizer step and may split them (never above it: 8 x 1 at batch 8)
    "auto": [],
    # auto with 32 clips per optimizer step: the walkthrough recipe's batch (RECIPE_BATCH, 8) x 4,
    # train.batch_size not named, so auto re-splits the 32 (32 x 1 where it fits, as
    # bf16-half-compile-b32 runs): auto against the fastest recipe at the same effective batch
    "auto-e32": ["train.grad_accum=4"],
    # the one a machine without a GPU can run
    "fp32": ["model.quantization=none", "model.precision=fp32", *_NOCKPT],
}
# The default run, issue 14's targets (see `targets`): the walkthrough's 8-bit recipe as we run it
# (target 4, against the plain loop, below), the low-memory recipe (<= 8 GiB, target 3), the
# fastest (32 clips a step, target 1), and what RECIPE=auto picks here for 32 clips a step
# (target 2: against the fastest at the same effective batch).
PACK = "-pack"
"""a mode's name + PACK: the same mode on packed windows (train.pack=true, lib/train/packing.py)"""


def mode_flags(mode: str) -> list[str]:
    """The train-job flags of a mode: MODES' own, and train.pack=true for a name ending in -pack."""
    if mode.endswith(PACK) and mode[: -len(PACK)] in MODES:
        return [*MODES[mode[: -len(PACK)]], "train.pack=true"]
    return MODES[mode]


GPU_MODES = ["int8-ckpt", "bf16-ckpt-half-compile-b24", "bf16-half-compile-b32", "auto-e32"]
LEGS = ("train", "plain", "eval", "quality")
AUTO_MODES = ("auto", "auto-e32")
RECIPE_BATCH = 8
"""train.batch_size of jobs/recipes/whisper-large-v2_lora-int8_1gpu.yaml, what --recipe auto starts
from (lib/ does not import jobs/; a test checks the two agree)"""
SETTING_KEYS = ("quantization", "precision", "gradient_checkpointing", "checkpoint_fraction", "base_dtype",
                "int8_half_inputs")
"""model.* keys a row records from its run's config.yaml (with train.compile and the batch split)"""


@dataclass
class BenchConfig:
    arch: str = "large-v2"
    """Whisper architecture to build with random weights: tiny, base, small, medium, large-v2, large-v3, large-v3-turbo"""
    modes: list[str] = field(default_factory=list)
    """modes to run, in order (see MODES in lib/tools/bench.py); default: every GPU mode, or fp32 on a CPU"""
    batch_size: int = 8
    """clips per step"""
    steps: int = 10
    """optimizer steps per mode: warm-up (compilation included), timed, then profiled"""
    warmup: int = 3
    """first steps not timed (allocation, autotuning)"""
    label_tokens: int = 40
    """decoder positions per sample (the walkthrough's Hindi labels are ~40 tokens), with clips=30s"""
    clips: Literal["30s", "cv"] = "30s"
    """the random train clips: 30s = every clip 30 s with label_tokens-long labels (the walkthrough's
    shapes: what one padded window costs); cv = Common Voice-like lengths, log-normal around
    clip_median seconds, labels of label_tokens_per_second tokens a second (what packing is for)"""
    clip_median: float = 5.0
    """with clips=cv: the median clip, seconds (Common Voice clips last about 3-8 s)"""
    clip_spread: float = 0.4
    """with clips=cv: sigma of log(duration); 0.4 puts 90 % of clips within 0.5x-1.9x the median"""
    label_tokens_per_second: float = 10.0
    """with clips=cv: text tokens per second of speech (Hindi in Whisper's tokenizer: five 5-s clips
    ~ 256 tokens with their timestamps)"""
    lora_r: int = 32
    """LoRA rank for every mode"""
    eval_clips: int = 512
    """clips for the generation timing (at least twice the largest eval batch); 0 skips it"""
    eval_new_tokens: int = 40
    """tokens generated per clip, forced (min = max), so random weights do the same work"""
    eval_batch_size: int = 32
    """batch for our eval setting (the walkthrough's loop uses 8)"""
    eval_variants: list[str] = field(default_factory=lambda: ["b128-static", "b256-static"])
    """more eval settings timed on the same model: bN = batch N, -static = static key/value cache
    (generate compiles the decoder step); each row gets its speedup over the walkthrough loop"""
    eval_walkthrough_clips: int = 32
    """clips the walkthrough loop is timed on (it is the slow leg: ~1 clip/s on large-v2)"""
    extra: list[str] = field(default_factory=list)
    """extra train-job overrides for every mode, e.g. extra=train.num_workers=4"""
    profile_steps: int = 2
    """profile the last N steps of each mode (not timed): where GPU time goes, in RUN/profile.txt"""
    mode_timeout: int = 0
    """seconds a mode may take (compiling included) before it is stopped and reported; 0 = no limit"""
    legs: list[str] = field(default_factory=lambda: list(LEGS))
    """what to run: train (the modes), plain (the walkthrough as a plain loop, GPU only), eval
    (generation speed), quality (the quality table on real weights: needs quality_data/_model)"""
    resume: bool = False
    """keep what DATA_DIR/bench/ARCH/results.json already holds (modes without an error, the
    plain loop, eval, quality) and run only the rest: one run spread over several commands
    (a machine that stops commands after 10 minutes, say); the report covers all of it"""
    train_clips: int = 0
    """train clips of the random dataset; 0 = enough that no mode of this command starts a second
    epoch (name it when commands of one resumed run time different modes: the dataset is shared)"""
    quality_data: str = ""
    """prepared dataset with real speech for the quality leg (target 6); empty: the leg is skipped"""
    quality_model: str = ""
    """real Whisper weights for the quality leg (a local folder or a Hub id)"""
    quality_seeds: int = 3
    """seeds of the walkthrough (int8) and auto rows: int8's spread over them is the noise"""
    quality_parallel: int = 11
    """quality runs at a time (one GPU holds many whisper-base runs)"""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise UserError(f"arch={self.arch}: choose one of {', '.join(ARCHS)}")
        unknown = [r for r in self.modes if r.removesuffix(PACK) not in MODES]
        if unknown:
            raise UserError(f"modes: unknown {unknown}; choose from {', '.join(MODES)} (each also as NAME{PACK})")
        if not (0.5 <= self.clip_median <= 25 and 0 <= self.clip_spread <= 1.5 and 0 < self.label_tokens_per_second <= 40):
            raise UserError(f"clip_median={self.clip_median} (0.5..25 s), clip_spread={self.clip_spread} (0..1.5), "
                            f"label_tokens_per_second={self.label_tokens_per_second} (0..40): out of range")
        for v in self.eval_variants:
            parse_eval_variant(v)
        bad = [leg for leg in self.legs if leg not in LEGS]
        if bad:
            raise UserError(f"legs: unknown {bad}; choose from {', '.join(LEGS)}")
        if "quality" in self.legs and bool(self.quality_data) != bool(self.quality_model):
            raise UserError("the quality leg needs both quality_data=NAME (a prepared dataset of real speech) "
                            "and quality_model=PATH_OR_HUB_ID (real weights); or neither, to skip it")
        if self.steps <= self.warmup + self.profile_steps:
            raise UserError(f"steps={self.steps} must exceed warmup={self.warmup} + profile_steps={self.profile_steps}")


def parse_eval_variant(text: str) -> tuple[int, str]:
    """"b64" -> (64, "dynamic"), "b32-static" -> (32, "static")."""
    head, _, cache = text.partition("-")
    if not (head.startswith("b") and head[1:].isdigit() and int(head[1:]) >= 1) or cache not in ("", "static"):
        raise UserError(f"eval_variants: {text!r} is not bN or bN-static (e.g. b64, b32-static)")
    return int(head[1:]), cache or "dynamic"


def build_model(arch: str, out: Path) -> Path:
    """Random weights at `arch` in fp16, with the real multilingual tokenizer; reused if present."""
    import torch

    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_random_whisper(whisper_config(arch), tmp, TOKENIZER, seed=0,
                        device="cuda" if torch.cuda.is_available() else "cpu", dtype=torch.float16)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)  # written aside, then renamed: a killed build is never taken as a model
    return out


def build_data(env: Env, name: str, n: int, label_tokens: int, eval_clips: int, cfg: BenchConfig | None = None) -> str:
    """n train clips (quiet noise) with random labels, plus a test split, in the prepared format
    (lib/dataset/shards.py: FLAC in Parquet shards, written row by row, never all in memory): 30 s
    with label_tokens-long labels, or with cfg.clips=cv train clips of Common Voice-like lengths
    (BenchConfig.clips) whose labels grow with them."""
    from lib.dataset import shards
    from lib.dataset.prepared import write_manifest, write_rows

    out = env.prepared_dir(name)
    if (out / "manifest.json").is_file():
        return name
    rng = np.random.default_rng(0)
    prefix = [SOT_ID, 50276, 50359, 50363]  # <|startoftranscript|><|hi|><|transcribe|><|notimestamps|>
    out.mkdir(parents=True, exist_ok=True)

    cv = cfg is not None and cfg.clips == "cv"

    def rows(split: str, count: int):
        for i in range(count):
            seconds, tokens = float(WINDOW_SECONDS), label_tokens - len(prefix) - 1
            if cv and split == "train":  # log-normal around the median, within 1..20 s
                seconds = float(np.clip(cfg.clip_median * np.exp(cfg.clip_spread * rng.standard_normal()), *CV_SECONDS))
                tokens = int(cv_text_tokens(seconds, cfg.label_tokens_per_second))
            yield {"id": f"{split}-{i}", "text": "x", "language": "hi",
                   "audio": (0.05 * rng.standard_normal(round(seconds * SAMPLING_RATE))).astype(np.float32),
                   "labels": prefix + rng.integers(0, 50_000, tokens).tolist() + [EOT_ID]}

    # validation: a few clips so that `make train` can show WER-while-training on the bench model
    splits = {split: write_rows(out, split, rows(split, count), shard_rows=256)
              for split, count in (("train", n), ("validation", 8), ("test", max(eval_clips, 1)))}
    write_manifest(out, {"format": shards.FORMAT, "name": name, "source": {"kind": "bench-random"}, "language": "hi",
                         "task": "transcribe", "splits": splits, "skipped": []})
    return name


def gpu_peak_tflops() -> float | None:
    """Measured dense bf16 matmul rate (8192^3, random data, median of 20)."""
    import torch

    if not torch.cuda.is_available():
        return None
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * 8192**3 / sorted(times)[len(times) // 2] / 1e12


def run_mode(cfg: BenchConfig, env: Env, mode: str, model_dir: Path, data: str) -> dict:
    run = f"bench-{cfg.arch}-{mode}"
    shutil.rmtree(env.run_dir(run), ignore_errors=True)
    args = [
        *(["--recipe", "auto"] if mode in AUTO_MODES else []),
        f"run={run}", f"data={data}", f"model.base={model_dir}",
        f"lora.r={cfg.lora_r}", f"lora.alpha={2 * cfg.lora_r}",
        # a mode that names train.grad_accum runs the recipe's batch (see auto-e32)
        *([] if _names(mode, "train.grad_accum") else [f"train.batch_size={cfg.batch_size}"]),
        f"train.max_steps={cfg.steps}", "train.warmup_steps=0",
        f"train.timing_warmup={cfg.warmup}", "train.logging_steps=1", f"train.profile_steps={cfg.profile_steps}",
        f"train.save_steps={10 * cfg.steps}", f"train.eval_steps={10 * cfg.steps}",
        # Trainer evaluates (generates) once after the last step: 27-55 s a mode on the H100 with
        # 8 clips x 225 tokens of random-weight output; 2 clips x 8 tokens keep the check, not the wait
        "train.max_eval_samples=2", "train.generation_max_length=8",
        *mode_flags(mode), *cfg.extra,  # later flags win: a mode may set its own batch
    ]
    log.info("bench %s: jobs.train %s", mode, " ".join(args))
    t0 = time.time()
    logf = env.data_dir / "bench" / cfg.arch / f"{mode}.log"
    code, output = run_job_process("train", args, env, logf, timeout=cfg.mode_timeout or None)
    batch, accum = _split(mode, cfg)
    mfile = env.run_dir(run) / "metrics.json"
    written = mfile.is_file() and mfile.stat().st_mtime >= t0
    if code is None and not written:
        return {"mode": mode, "batch": _batch_text(batch, accum), "wall_s": round(time.time() - t0, 1),
                "error": f"stopped after mode_timeout={cfg.mode_timeout} s (log: {logf})"}
    row = {"mode": mode, "batch": _batch_text(batch, accum),
           "checkpointing": _flag(mode, cfg, "model.gradient_checkpointing", "false", str) == "true"
           and _flag(mode, cfg, "model.checkpoint_fraction", 1.0, float),
           "wall_s": round(time.time() - t0, 1)}
    if code is None:  # it trained and wrote its metrics, then did not exit: keep the figures, say so
        row["note"] = (f"metrics.json written {mfile.stat().st_mtime - t0:.0f} s after the start, but the job had "
                       f"not exited at mode_timeout={cfg.mode_timeout} s (log: {logf})")
        log.warning("bench %s: %s", mode, row["note"])
    elif code != 0 or not mfile.is_file():
        row["error"] = f"exit {code}: {last_error(output)} (log: {logf})"
        return row
    m = json.loads(mfile.read_text())
    row.update({k: m.get(k) for k in ("steady_samples_per_second", "steady_step_seconds",
                                      "peak_gpu_memory_bytes", "adapter_size_bytes", "trainable_params", "profile",
                                      "steady_clips_per_second", "steady_label_tokens_per_second",
                                      "steady_audio_seconds_per_second", "audio_hours_per_gpu_hour",
                                      "steady_clips_per_sample")})
    # what the run used (config.yaml): auto's choice, and every mode's settings for auto's figures
    used = yaml.safe_load((env.run_dir(run) / "config.yaml").read_text()) or {}
    model, train = used.get("model", {}), used.get("train", {})
    row["settings"] = {**{k: model.get(k) for k in SETTING_KEYS}, "compile": train.get("compile"),
                       "batch_size": train.get("batch_size", batch), "grad_accum": train.get("grad_accum", accum),
                       "pack": bool(train.get("pack"))}
    if mode not in AUTO_MODES:
        row["predicted_peak_gib"], row["predicted_label_tokens"] = predicted_peak(args, env)
    if mode in AUTO_MODES:  # what it chose (metrics.json) and the split the run then used
        choice = (m.get("recipe") or {}).get("choice") or {}
        flags = " ".join(f"{k}={str(v).lower() if isinstance(v, bool) else v}"
                         for k, v in (choice.get("settings") or {}).items())
        row["chosen"] = f"{flags} because {choice.get('why', '?')}"
        row["predicted"] = choice.get("predicted")
        row["checkpointing"] = bool(model.get("gradient_checkpointing")) and float(model.get("checkpoint_fraction", 1))
        row["batch"] = f"{train.get('batch_size', batch)} x {train.get('grad_accum', accum)}"  # auto's split
    return row


def predicted_peak(args: list[str], env: Env) -> tuple[float | None, int | None]:
    """(GiB, label tokens): what `--recipe auto`'s memory rule predicts for a mode's own settings
    and batch on this GPU, with the longest label auto would assume for this data (the packed
    windows' with train.pack): target 5 holds a run's measured peak against it. (None, None)
    without a GPU or a measured mode with those settings' figures."""
    from lib.config import load_config
    from lib.train import auto
    from lib.train.config import TrainConfig

    gpu = auto.detect()
    if gpu is None:
        return None, None
    try:
        cfg = load_config(TrainConfig, None, [a for a in args if "=" in a])
        columns = auto.train_columns(cfg, env)
        tokens, _ = auto.train_label_tokens(cfg, env, columns)
        if cfg.train.pack:
            tokens = max(tokens, auto.decide_pack(cfg, env, columns).label_tokens)
        fixed = auto.config_settings(cfg, auto.MODE_KEYS)
        choice = auto.choose(gpu, cfg.train.batch_size, cfg.train.grad_accum, tokens, keep_split=True, fixed=fixed,
                             figures=auto.table(measured.for_gpu(gpu.name, env.data_dir)))
    except Exception as e:  # a prediction for the report, never a reason to lose the measured row
        log.warning("bench: no memory prediction for %s: %s", " ".join(args), e)
        return None, None
    return (round(choice.peak_gib, 2) if choice.peak_gib else None), tokens


def _names(mode: str, key: str) -> bool:
    """Whether a mode's own flags set `key`."""
    return any(f.startswith(key + "=") for f in mode_flags(mode))


def _split(mode: str, cfg: BenchConfig) -> tuple[int, int]:
    """(train.batch_size, train.grad_accum) a mode asks for (auto may re-split them, keeping the product)."""
    default = RECIPE_BATCH if _names(mode, "train.grad_accum") else cfg.batch_size
    return _flag(mode, cfg, "train.batch_size", default, int), _flag(mode, cfg, "train.grad_accum", 1, int)


def _batch_text(batch: int, accum: int) -> int | str:
    """The table's batch cell: the per-device batch, x the accumulation steps when there are several."""
    return batch if accum == 1 else f"{batch} x {accum}"


def _flag(mode: str, cfg: BenchConfig, key: str, default, cast):
    """The value a mode's flags (then extra=) give `key`; the last one wins, as in the job."""
    vals = [f.split("=", 1)[1] for f in [*mode_flags(mode), *cfg.extra] if f.startswith(key + "=")]
    return cast(vals[-1]) if vals else default


def eval_speed(cfg: BenchConfig, model_dir: Path, data_dir: Path) -> list[dict]:
    """Generation clips/s: the walkthrough's loop (8-bit, batch 8, fp16 autocast) vs ours, through
    the same comparison as `make eval speed_compare=true` (lib.inference.speed_compare), every
    clip forced to eval_new_tokens tokens so that random weights do the same work."""
    import torch

    from lib.dataset.prepared import load_split
    from lib.inference import speed_compare
    from lib.model import ModelSource

    if not torch.cuda.is_available() or cfg.eval_clips <= 0:
        return []
    from lib.dataset.prepared import audio_arrays

    audios = audio_arrays(load_split(data_dir, "test"), 0, cfg.eval_clips)
    n = cfg.eval_new_tokens
    r = speed_compare(ModelSource(base=str(model_dir)), audios, "hi", "transcribe", cfg.eval_batch_size, "bf16",
                      max_new_tokens=n, min_new_tokens=n,
                      variants=[parse_eval_variant(v) for v in cfg.eval_variants],
                      walkthrough_clips=cfg.eval_walkthrough_clips)
    w = r["walkthrough"]
    rows = [{"setting": "walkthrough: int8, batch 8, autocast", "clips": w["clips"], "seconds": round(w["seconds"], 2),
             "clips_per_s": w["clips_per_s"], "new_tokens": n}]
    ours = {**r["ours"], "speedup": r["speedup"], "same_transcripts": r["same_transcripts"]}
    for m in [ours, *r.get("variants", [])]:
        name = f"ours: bf16, sdpa, batch {m['batch_size']}" + (", static cache" if m.get("cache") == "static" else "")
        if "error" in m:
            rows.append({"setting": name, "clips": 0, "seconds": 0, "clips_per_s": 0.0, "new_tokens": n,
                         "error": m["error"]})
            continue
        rows.append({"setting": name, "clips": m["clips"], "seconds": round(m["seconds"], 2),
                     "clips_per_s": m["clips_per_s"], "new_tokens": n, "speedup": m["speedup"],
                     "same_transcripts": m["same_transcripts"]})
    return rows


COLUMNS = ["mode", "batch", "samples/s", "x int8-ckpt", "tokens/s", "peak GiB", "adapter MB",
           "% of bf16 peak", "GPU busy %", "GPU time: matmul / attention / other %", "clips/s",
           "audio h per GPU-h"]


def logmel_speed(model_dir: Path, data_dir: Path, clips: int = 16) -> float:
    """Clips/s of the collator's CPU log-mel in one process (one dataloader worker's rate)."""
    from transformers import WhisperFeatureExtractor

    from lib.dataset.prepared import audio_arrays, load_split

    fe = WhisperFeatureExtractor.from_pretrained(model_dir)
    audio = audio_arrays(load_split(data_dir, "train"), 0, clips)
    fe(audio[:2], sampling_rate=SAMPLING_RATE, return_tensors="pt")
    t0 = time.perf_counter()
    fe(audio, sampling_rate=SAMPLING_RATE, return_tensors="pt")
    return len(audio) / (time.perf_counter() - t0)


def table(rows: list[dict], peak: float | None, flops) -> list[str]:
    """Markdown rows; 'x int8-ckpt' is the speed over the walkthrough's recipe in the same run,
    '% of bf16 peak' counts checkpointing's recomputed forward as work, the last two columns
    come from the profiled steps (GPU busy = kernel time per step over the steady step time)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    ref = next((r["steady_samples_per_second"] for r in rows
                if r["mode"] == "int8-ckpt" and r.get("steady_samples_per_second")), None)
    for r in rows:
        name = r["mode"] + (f" ({r['chosen'].split(' because ')[0]})" if r.get("chosen") else "")
        if "error" in r:
            lines.append(f"| {name} | {r['batch']} | failed: {r['error']} |" + " |" * (len(COLUMNS) - 3))
            continue
        sps = r["steady_samples_per_second"] or 0
        frac = f"{100 * sps * flops.train(r['checkpointing']) / (peak * 1e12):.1f}" if peak and sps else "n/a"
        mem = f"{r['peak_gpu_memory_bytes'] / 2**30:.2f}" if r.get("peak_gpu_memory_bytes") else "n/a"
        busy, split = _gpu_shares(r)
        tokens = r.get("steady_label_tokens_per_second") or sps * flops_tokens(r)
        clips = f"{r['steady_clips_per_second']:.2f}" if r.get("steady_clips_per_second") else "n/a"
        hours = f"{r['audio_hours_per_gpu_hour']:.0f}" if r.get("audio_hours_per_gpu_hour") else "n/a"
        lines.append(f"| {name} | {r['batch']} | {sps:.2f} | {f'{sps / ref:.2f}' if ref and sps else 'n/a'} | "
                     f"{tokens:.0f} | {mem} | {(r['adapter_size_bytes'] or 0) / 1e6:.1f} | {frac} | "
                     f"{busy} | {split} | {clips} | {hours} |")
    return lines


def flops_tokens(row: dict) -> int:
    return row.get("label_tokens", 40)


def plain_loop(cfg: BenchConfig, env: Env, model_dir: Path) -> dict:
    """The walkthrough as a plain training loop (lib/tools/plain_loop.py), in its own process, at the
    bench's batch: target 4's reference. A row shaped like run_mode's."""
    from lib.tools.runner import run_module_process

    root = env.data_dir / "bench" / cfg.arch
    out = root / "plain_loop.json"
    out.unlink(missing_ok=True)
    t0 = time.time()
    code, output = run_module_process("lib.tools.plain_loop", [
        f"model={model_dir}", f"batch_size={cfg.batch_size}", f"steps={cfg.steps}", f"warmup={cfg.warmup}",
        f"label_tokens={cfg.label_tokens}", f"out={out}"], env, root / "plain_loop.log",
        timeout=cfg.mode_timeout or None)
    row = {"mode": PLAIN, "batch": cfg.batch_size, "checkpointing": 1.0, "wall_s": round(time.time() - t0, 1),
           "label_tokens": cfg.label_tokens}
    if code != 0 or not out.is_file():
        row["error"] = f"exit {code}: {last_error(output)} (log: {root / 'plain_loop.log'})"
        return row
    m = json.loads(out.read_text())
    row.update({"steady_samples_per_second": m["samples_per_s"], "steady_step_seconds": m["step_s"],
                "peak_gpu_memory_bytes": m["peak_gpu_memory_bytes"], "adapter_size_bytes": None,
                "trainable_params": m["trainable_params"], "profile": None})
    return row


PLAIN = "plain loop: the walkthrough (int8, fp16, checkpointing)"


def quality(cfg: BenchConfig, env: Env) -> dict:
    """Target 6: lib/tools/bench_quality_table on real weights: the walkthrough (int8) and auto over
    quality_seeds seeds, every other mode auto can pick once; eval in bf16 (what make eval uses)."""
    from lib.tools import bench_quality_table as Q

    return Q.main(Q.QualityTableConfig(data=cfg.quality_data, model=cfg.quality_model, seeds=cfg.quality_seeds,
                                       modes="walkthrough,auto,pick", eval_precisions="bf16",
                                       parallel=cfg.quality_parallel), env)


def main(cfg: BenchConfig, env: Env) -> dict:
    import torch
    import transformers

    # 1. The machine and the arithmetic: measured bf16 peak, FLOP per training sample.
    command = command_line(cfg)  # before the defaults below fill cfg in
    peak = gpu_peak_tflops()
    flops = flops_per_sample(cfg.arch, cfg.label_tokens)
    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name() if cuda else platform.processor() or "cpu"
    gpu_memory = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory if cuda else None
    log.info("bench: %s, %s; forward %.2f TFLOP/sample, train %.2f (%.2f with checkpointing); bf16 peak %s TFLOP/s",
             cfg.arch, gpu, flops.forward / 1e12, flops.train(False) / 1e12, flops.train(True) / 1e12,
             f"{peak:.0f}" if peak else "n/a")
    if peak:
        log.info("limit: %.0f samples/s (%.0f with checkpointing)", peak * 1e12 / flops.train(False),
                 peak * 1e12 / flops.train(True))

    if not cfg.modes:
        cfg.modes = GPU_MODES if cuda else ["fp32"]

    # 2. Inputs: random model at the architecture, 30 s clips with fixed-length labels.
    root = env.data_dir / "bench" / cfg.arch
    root.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(cfg.arch, root / "model")
    # enough clips that no mode starts a second epoch (a restart of the loader workers) while timed
    n = cfg.train_clips or max(16, cfg.steps * max(b * a for b, a in (_split(r, cfg) for r in cfg.modes)))
    kind = "" if cfg.clips == "30s" else f"-cv{cfg.clip_median:g}-{cfg.clip_spread:g}-{cfg.label_tokens_per_second:g}"
    data = build_data(env, f"bench-{cfg.arch}-{n}{kind}", n, cfg.label_tokens, cfg.eval_clips, cfg)

    # What an earlier command of this run measured (resume=true), kept unless it failed.
    results_file = root / "results.json"
    before = json.loads(results_file.read_text()) if cfg.resume and results_file.is_file() else {}
    kept = {r["mode"]: r for r in before.get("train", []) if "error" not in r}
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": _version("peft"), "bitsandbytes": _version("bitsandbytes")}
    logmel = before.get("logmel_clips_per_s_per_worker") or logmel_speed(model_dir, env.prepared_dir(data))
    log.info("log-mel on the CPU: %.1f clips/s per dataloader worker", logmel)
    res = {"arch": cfg.arch, "gpu": gpu, "gpu_memory_bytes": gpu_memory, "bf16_peak_tflops": peak, "versions": versions,
           "flop_per_sample": {"forward": flops.forward, "train": flops.train(False),
                               "train_checkpointing": flops.train(True)},
           "logmel_clips_per_s_per_worker": logmel,
           "train": list(kept.values()), "plain": None, "eval": [], "quality": None,
           **{k: before[k] for k in ("plain", "eval", "quality", "commands") if before.get(k)}}
    if res.get("plain") and "error" in res["plain"]:
        res["plain"] = None
    res["commands"] = [*res.get("commands", []), {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "legs": cfg.legs}]

    def save():  # after every leg and mode: a stopped bench keeps what it measured
        results_file.write_text(json.dumps(res, indent=2, ensure_ascii=False))
        write_figures(res, cfg, root / "measured.json", say=False)

    # 3. Train modes, each a fresh train-job process.
    if "train" in cfg.legs:
        for mode in cfg.modes:
            if mode in kept:
                log.info("bench %s: kept from %s (resume=true)", mode, results_file)
                continue
            row = run_mode(cfg, env, mode, model_dir, data)
            row["label_tokens"] = cfg.label_tokens
            # what measured it, for auto's figures (a resumed run's rows may come from several machines)
            row["measured"] = {"at": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command, "gpu": gpu,
                               "gpu_memory_bytes": gpu_memory, "versions": versions}
            res["train"] = [r for r in res["train"] if r["mode"] != mode] + [row]
            log.info("bench %s: %s", mode, {k: v for k, v in row.items() if k != "profile"})
            save()

    # 4. The walkthrough as a plain loop (target 4's reference).
    if "plain" in cfg.legs and cuda and not res["plain"]:
        res["plain"] = plain_loop(cfg, env, model_dir)
        log.info("bench plain loop: %s", res["plain"])
        save()

    # 5. Eval (generation) speed, ours vs the walkthrough's loop.
    if "eval" in cfg.legs and not res["eval"]:
        res["eval"] = eval_speed(cfg, model_dir, env.prepared_dir(data))
        save()

    # 6. Quality on real weights (target 6).
    if "quality" in cfg.legs and cfg.quality_data and not res["quality"]:
        res["quality"] = quality(cfg, env)
        save()

    # 7. Report: the table and the targets, then where the results are.
    rows = res["train"] + ([res["plain"]] if res["plain"] else [])
    lines = table(rows, peak, flops)
    header = (f"{cfg.arch}, {gpu}, bf16 peak {peak:.0f} TFLOP/s measured, " if peak else f"{cfg.arch}, {gpu}, ") + \
        ", ".join(f"{k} {v}" for k, v in versions.items()) + f", log-mel {logmel:.0f} clips/s per CPU worker"
    print("\n" + header)
    print("\n".join(lines))
    for e in res["eval"]:
        print(f"eval {e['setting']}: " + (f"failed: {e['error']}" if "error" in e else
              f"{e['clips_per_s']:.2f} clips/s ({e['clips']} clips, {e['new_tokens']} tokens)"
              + (f", {e['speedup']:.1f}x, same transcripts {100 * e['same_transcripts']:.0f}%" if "speedup" in e else "")))
    goals = targets(res, flops)
    print("\n" + "\n".join(goals))
    (root / "targets.md").write_text("\n".join(goals) + "\n")
    write_figures(res, cfg, root / "measured.json", say=True)
    summary.done("bench", {"results": results_file, "targets": root / "targets.md",
                           "modes": ", ".join(r["mode"] for r in res["train"]) or "none"})
    return res


def command_line(cfg: BenchConfig) -> str:
    """The command that runs `cfg`: the bench with the keys that differ from their defaults."""
    import shlex
    from dataclasses import MISSING, fields

    parts = []
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if value != (f.default_factory() if f.default_factory is not MISSING else f.default):
            text = ",".join(map(str, value)) if isinstance(value, list) else str(value).lower() \
                if isinstance(value, bool) else str(value)
            parts.append(shlex.quote(f"{f.name}={text}"))
    return " ".join(["python -m lib.tools.bench", *parts])


def figures(res: dict, cfg: BenchConfig, path: Path) -> tuple[measured.Measured | None, list[str]]:
    """The train rows of a results.json as --recipe auto's figures (lib/train/measured.py): one
    point per mode (the settings the run used) and per-device batch, each naming the machine,
    date and command that measured it; and what was left out, and why."""
    runs: dict[tuple, str] = {}
    versions: dict[tuple, dict] = {}
    modes: dict[tuple, dict] = {}
    left = []
    for r in res.get("train", []):
        s, prov, sps = r.get("settings"), r.get("measured") or {}, r.get("steady_samples_per_second")
        if "error" in r or not sps:
            continue
        if not s or not prov:
            left.append(f"{r['mode']}: its settings or machine were not recorded (measured by an older bench)")
            continue
        if s.get("pack") or cfg.clips != "30s":
            left.append(f"{r['mode']}: packed windows or clips={cfg.clips}: auto's figures are 30-s samples "
                        f"with {cfg.label_tokens}-token labels")
            continue
        if r.get("label_tokens", cfg.label_tokens) != cfg.label_tokens:
            left.append(f"{r['mode']}: measured at {r['label_tokens']}-token labels, not {cfg.label_tokens}")
            continue
        if s["precision"] not in ("fp32", "fp16", "bf16"):
            left.append(f"{r['mode']}: model.precision={s['precision']}, not resolved to one auto sets")
            continue
        if s["quantization"] == "int8" and s.get("int8_half_inputs") is False:
            left.append(f"{r['mode']}: model.int8_half_inputs=false, a setting auto does not choose")
            continue
        mem = prov.get("gpu_memory_bytes")
        run = (prov["at"][:10], prov["command"], prov["gpu"], mem)
        runs.setdefault(run, f"bench-{len(runs) + 1}")
        versions.setdefault(run, dict(prov.get("versions") or {}))
        setting = {"quantization": s["quantization"] or "none", "precision": s["precision"],
                   "gradient_checkpointing": bool(s["gradient_checkpointing"]),
                   "checkpoint_fraction": float(s["checkpoint_fraction"]), "base_dtype": s["base_dtype"],
                   "compile": s["compile"] or "none"}
        key = tuple(setting.values())
        entry = modes.setdefault(key, {**setting, "points": {}})
        peak = r.get("peak_gpu_memory_bytes")
        point = {"batch": s["batch_size"], "samples_per_s": round(sps, 3),
                 "peak_gib": round(peak / 2**30, 3) if peak else None, "run": runs[run], "bench_mode": r["mode"]}
        if point["batch"] in entry["points"]:  # e.g. auto-e32 running bf16-half-compile-b32's settings
            kept = entry["points"][point["batch"]]
            kept["notes"] = (kept.get("notes", "") + f"; {r['mode']} ran the same settings and batch: "
                             f"{sps:.2f} samples/s" + (f" at {peak / 2**30:.2f} GiB" if peak else "")).lstrip("; ")
            continue
        entry["points"][point["batch"]] = point
    if not modes:
        return None, left
    run_objs = {}
    for key, name in runs.items():
        date, command, gpu, mem = key
        run_objs[name] = measured.Run(gpu=gpu, gpu_memory_gib=round(mem / 2**30, 2) if mem else None, date=date,
                                      command=command, versions=versions[key])
    settings = tuple(measured.Setting(**{**{k: v for k, v in e.items() if k != "points"},
                                         "points": tuple(measured.Point(**p) for p in e["points"].values())})
                     for e in modes.values())
    gpus = ", ".join(dict.fromkeys(r.gpu for r in run_objs.values()))
    about = (f"Written by lib/tools/bench.py from results.json beside it: whisper-{cfg.arch} with random weights "
             f"through the real train job (each mode a fresh `python -m jobs.train`), 30 s clips, "
             f"{cfg.label_tokens}-token labels, LoRA r={cfg.lora_r} on q_proj and v_proj; samples_per_s = steady "
             f"samples/s, peak_gib = torch.cuda.max_memory_allocated (null without a GPU). --recipe auto uses "
             f"DATA_DIR/bench/{measured.MODEL}/measured.json on the GPU it was measured on (lib/train/measured.py).")
    return measured.Measured(path=path, model=cfg.arch, label_tokens=cfg.label_tokens,
                             summary=f"{gpus}, whisper-{cfg.arch}, {cfg.label_tokens}-token labels (make bench)",
                             about=about, runs=run_objs, modes=settings), left


def write_figures(res: dict, cfg: BenchConfig, path: Path, say: bool) -> None:
    """measured.json beside results.json (see `figures`), none when no row can be used; `say`: log
    what was left out and where auto looks for it."""
    table, left = figures(res, cfg, path)
    if table is None:
        path.unlink(missing_ok=True)
    else:
        measured.write(table)
    if say:
        for why in left:
            log.info("bench: not in %s: %s", path.name, why)
        if table is not None:
            log.info("bench: auto's figures in %s (%s)", path, "--recipe auto uses them on this GPU"
                     if cfg.arch == measured.MODEL else
                     f"--recipe auto reads bench/{measured.MODEL}/measured.json: its figures are arch={measured.MODEL}'s")


def _sps(r: dict | None) -> float:
    return (r or {}).get("steady_samples_per_second") or 0.0


def _gib(r: dict) -> float:
    return (r.get("peak_gpu_memory_bytes") or 0) / 2**30


def _gpu_shares(r: dict) -> tuple[str, str]:
    """("89", "42 / 23 / 35") from a row's profile: GPU busy %, and matmul / attention / other % of
    kernel time; "n/a" where not profiled. Busy = kernel time per profiled step over the steady
    (unprofiled) step time: the profiler's own overhead slows the profiled steps' wall clock, not
    the kernels."""
    prof, step = r.get("profile") or {}, r.get("steady_step_seconds")
    busy = f"{min(100.0, 100 * prof['busy_s'] / prof['steps'] / step):.0f}" if prof.get("busy_s") and step else "n/a"
    kinds = prof.get("seconds_by_kind") or {}
    split = " / ".join(f"{100 * kinds.get(k, 0) / prof['busy_s']:.0f}" for k in ("matmul", "attention", "other")) \
        if kinds and prof.get("busy_s") else "n/a"
    return busy, split


def _busy(r: dict) -> str:
    """'0.590 s a step, GPU busy 88 %, matmul / attention / other 42 / 24 / 34 % of GPU time'."""
    busy, split = _gpu_shares(r)
    if busy == "n/a":
        return "no profile"
    return (f"{r['steady_step_seconds']:.3f} s a step, GPU busy {busy} %, "
            f"matmul / attention / other {split} % of GPU time")


def _verdict(value: float, goal: float) -> str:
    return "**met**" if value >= goal else f"missed: {100 * (1 - value / goal):.0f} % short"


def targets(res: dict, flops) -> list[str]:
    """Issue 14's six targets as a Markdown table, from one results.json (see the module docstring)."""
    peak = res.get("bf16_peak_tflops")
    ok = [r for r in res.get("train", []) if "error" not in r and _sps(r)]
    recipes = [r for r in ok if r["mode"] not in AUTO_MODES]
    by_mode = {r["mode"]: r for r in ok}
    out = ["| target | asked | measured | |", "|---|---|---|---|"]

    def add(name: str, asked: str, measured: str, verdict: str) -> None:
        out.append(f"| {name} | {asked} | {measured} | {verdict} |")

    # 1. the fastest recipe
    if recipes:
        f = max(recipes, key=_sps)
        frac = f", {100 * _sps(f) * flops.train(f['checkpointing']) / (peak * 1e12):.1f} % of the bf16 peak" if peak else ""
        add("1. fastest recipe", ">= 100 samples/s", f"**{_sps(f):.2f}** (`{f['mode']}`, batch {f['batch']}, "
            f"{_gib(f):.1f} GiB{frac}; {_busy(f)})", _verdict(_sps(f), 100))
    else:
        add("1. fastest recipe", ">= 100 samples/s", "not run", "")
    # 2. auto at 32 clips a step against the fastest recipe of the same run
    a = by_mode.get("auto-e32")
    if a and recipes:
        f = max(recipes, key=_sps)
        ratio = _sps(a) / _sps(f)
        add("2. `--recipe auto` fills the card", "within 10 % of the fastest recipe, same run",
            f"auto-e32 (8 x grad_accum 4 asked) chose `{a.get('chosen', '?').split(' because ')[0]}`: "
            f"**{_sps(a):.2f}** samples/s at {_gib(a):.1f} GiB (predicted "
            f"{((a.get('predicted') or {}).get('peak_gib') or 0):.1f}) = {100 * ratio:.0f} % of `{f['mode']}`",
            "**met**" if ratio >= 0.9 else f"missed: {100 * (0.9 - ratio):.0f} points short")
    else:
        add("2. `--recipe auto` fills the card", "within 10 % of the fastest", "auto-e32 not run", "")
    # 3. the low-memory recipe: the fastest non-8-bit row within 8 GiB, against int8
    int8 = by_mode.get("int8-ckpt")
    small = [r for r in recipes if _gib(r) <= 8 and not r["mode"].startswith(("int8", "nf4"))]
    if small and int8:
        s = max(small, key=_sps)
        add("3. low-memory recipe", "<= 8 GiB at >= 4x int8", f"**{_sps(s):.2f}** samples/s at {_gib(s):.2f} GiB "
            f"(`{s['mode']}`, batch {s['batch']}) = **{_sps(s) / _sps(int8):.2f}x** int8-ckpt's {_sps(int8):.2f} "
            f"({_busy(s)})", _verdict(_sps(s) / _sps(int8), 4))
    else:
        add("3. low-memory recipe", "<= 8 GiB at >= 4x int8", "no such row, or no int8-ckpt row", "")
    # 4. int8 against the plain loop
    plain = res.get("plain")
    if int8 and _sps(plain):
        add("4. int8", ">= 1.5x the plain-loop walkthrough", f"`int8-ckpt` **{_sps(int8):.2f}** samples/s at "
            f"{_gib(int8):.2f} GiB vs the plain loop's {_sps(plain):.2f} at {_gib(plain):.2f} GiB = "
            f"**{_sps(int8) / _sps(plain):.2f}x** ({_busy(int8)})", _verdict(_sps(int8) / _sps(plain), 1.5))
    else:
        add("4. int8", ">= 1.5x the plain-loop walkthrough", "int8-ckpt or the plain loop not run", "")
    # 5. eval
    evals = [e for e in res.get("eval", []) if "speedup" in e]
    same = [e for e in evals if e.get("same_transcripts") == 1]
    if evals:
        walk = next((e for e in res["eval"] if e["setting"].startswith("walkthrough")), {})
        best = max(same or evals, key=lambda e: e["speedup"])
        add("5. eval", ">= 50x the walkthrough loop, identical transcripts",
            f"{best['setting']}: **{best['clips_per_s']:.2f}** clips/s vs the walkthrough loop's "
            f"{walk.get('clips_per_s', 0):.2f} = **{best['speedup']:.1f}x**, transcripts identical "
            f"{100 * best.get('same_transcripts', 0):.0f} %", _verdict(best["speedup"], 50) if same else "missed: transcripts differ")
    else:
        add("5. eval", ">= 50x the walkthrough loop", "not run", "")
    # 6. quality on real weights
    q = res.get("quality")
    if q:
        out.append(quality_line(q))
    else:
        add("6. quality on real weights", "every mode auto can pick within int8's seed noise", "not run", "")
    return out


def quality_line(q: dict) -> str:
    """Target 6's row: int8's mean and spread (max - min) over its seeds, WER and CER in bf16 eval;
    a row is within noise when both are at most int8's mean + its spread."""
    def metric(r, k):
        return (r.get("eval", {}).get("bf16") or {}).get(k)

    done = [r for r in q["results"] if "error" not in r and metric(r, "wer") is not None]
    walk = [r for r in done if r["label"] == "walkthrough int8"]
    others = [r for r in done if r["label"] != "walkthrough int8"]
    failed = [f"{r['label']} s{r['seed']}" for r in q["results"] if r not in done]
    if len(walk) < 2:
        return "| 6. quality on real weights | within int8's noise | fewer than 2 int8 seeds finished | |"
    stats = {}
    for k in ("wer", "cer"):
        v = [metric(r, k) for r in walk]
        stats[k] = (sum(v) / len(v), max(v) - min(v), min(v), max(v))
    outside = [r for r in others if any(metric(r, k) > stats[k][0] + stats[k][1] + 1e-9 for k in ("wer", "cer"))]
    rng = {k: (min(metric(r, k) for r in others), max(metric(r, k) for r in others)) if others else (0, 0)
           for k in ("wer", "cer")}
    measured = (f"int8 over {len(walk)} seeds: WER {100 * stats['wer'][2]:.2f}-{100 * stats['wer'][3]:.2f} % "
                f"(mean {100 * stats['wer'][0]:.2f}, spread {100 * stats['wer'][1]:.2f}), CER "
                f"{100 * stats['cer'][2]:.2f}-{100 * stats['cer'][3]:.2f} % (mean {100 * stats['cer'][0]:.2f}); "
                f"{len(others)} runs of the modes auto can pick (auto over the same seeds, the rest seed 42): "
                f"WER {100 * rng['wer'][0]:.2f}-{100 * rng['wer'][1]:.2f} %, CER {100 * rng['cer'][0]:.2f}-"
                f"{100 * rng['cer'][1]:.2f} %; above int8's mean + spread: "
                + (", ".join(f"{r['label']} s{r['seed']} ({100 * metric(r, 'wer'):.2f} / {100 * metric(r, 'cer'):.2f})"
                             for r in outside) or "none")
                + (f"; failed: {', '.join(failed)}" if failed else ""))
    verdict = "**met**" if not outside and not failed else "missed" if outside else "incomplete"
    return f"| 6. quality on real weights | every mode auto can pick within int8's seed noise | {measured} | {verdict} |"


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "not installed"


if __name__ == "__main__":
    raise SystemExit(run_job("bench", __doc__, BenchConfig, main))
