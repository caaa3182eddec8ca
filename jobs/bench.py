"""Benchmark training and eval speed/memory at a named Whisper size with random weights.

    python -m jobs.bench                                   # large-v2, every recipe, batch 8
    python -m jobs.bench arch=tiny recipes=bf16,int8-ckpt steps=6   # quick look on any machine
    make bench ARGS="arch=large-v3 batch_size=16"

Random weights need no Hub: the model is built from the architecture's published config,
the inputs are 30 s clips with 40-token labels (the walkthrough's shapes). Each recipe runs
the real train job (`python -m jobs.train`: Trainer, collator, log-mel, LoRA, quantization)
in a fresh process for `steps` optimizer steps; the first `warmup` are not timed.
Prints a table (samples/s, tokens/s, peak GPU memory, adapter size, fraction of the GPU's
measured bf16 peak), writes DATA_DIR/bench/ARCH/results.json, and appends the rows to the
benchmarks table in README.md (between the bench markers) when `readme=` names it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lib.benchmark import ARCHS, flops_per_sample, save_random_whisper, whisper_config
from lib.cli import run_job
from lib.env import Env
from lib.errors import UserError

log = logging.getLogger("whisper_ft")
ROOT = Path(__file__).resolve().parent.parent
TOKENIZER = ROOT / "tests" / "fixtures" / "whisper_tokenizer"

# Recipe name -> train job overrides. Same LoRA placement for all (r=32 on q_proj/v_proj).
RECIPES: dict[str, list[str]] = {
    "int8-ckpt": ["model.quantization=int8", "model.precision=fp16", "model.gradient_checkpointing=true"],
    "int8": ["model.quantization=int8", "model.precision=fp16", "model.gradient_checkpointing=false"],
    "nf4-ckpt": ["model.quantization=nf4", "model.precision=bf16", "model.gradient_checkpointing=true"],
    "bf16-ckpt": ["model.quantization=none", "model.precision=bf16", "model.gradient_checkpointing=true"],
    "bf16": ["model.quantization=none", "model.precision=bf16", "model.gradient_checkpointing=false"],
    "fp16": ["model.quantization=none", "model.precision=fp16", "model.gradient_checkpointing=false"],
    # frozen base stored in bf16 (model.base_dtype=compute): half the weight memory
    "bf16-ckpt-half": ["model.quantization=none", "model.precision=bf16", "model.gradient_checkpointing=true",
                       "model.base_dtype=compute"],
    "bf16-half": ["model.quantization=none", "model.precision=bf16", "model.gradient_checkpointing=false",
                  "model.base_dtype=compute"],
    "bf16-b32": ["model.quantization=none", "model.precision=bf16", "model.gradient_checkpointing=false",
                 "train.batch_size=32"],
    "bf16-compile-b32": ["model.quantization=none", "model.precision=bf16", "model.gradient_checkpointing=false",
                         "train.batch_size=32", "train.torch_compile=true"],
    # the one a machine without a GPU can run
    "fp32": ["model.quantization=none", "model.precision=fp32", "model.gradient_checkpointing=false"],
}
GPU_RECIPES = ["int8-ckpt", "nf4-ckpt", "bf16-ckpt", "bf16", "fp16"]


@dataclass
class BenchConfig:
    arch: str = "large-v2"
    """Whisper architecture to build with random weights: tiny, base, small, medium, large-v2, large-v3, large-v3-turbo"""
    recipes: list[str] = field(default_factory=list)
    """recipes to run, in order (see RECIPES in jobs/bench.py); default: every GPU recipe, or fp32 on a CPU"""
    batch_size: int = 8
    """clips per step"""
    steps: int = 12
    """optimizer steps per recipe, warm-up included"""
    warmup: int = 3
    """first steps not timed (allocation, autotuning)"""
    label_tokens: int = 40
    """decoder positions per sample (the walkthrough's Hindi labels are ~40 tokens)"""
    lora_r: int = 32
    """LoRA rank for every recipe"""
    eval_clips: int = 64
    """clips for the generation timing; 0 skips it"""
    eval_new_tokens: int = 40
    """tokens generated per clip, forced (min = max), so random weights do the same work"""
    eval_batch_size: int = 32
    """batch for our eval setting (the walkthrough's loop uses 8)"""
    readme: str = ""
    """README.md to append the rows to (between <!-- bench:rows --> markers); empty: don't"""
    extra: list[str] = field(default_factory=list)
    """extra train-job overrides for every recipe, e.g. extra=train.num_workers=4"""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise UserError(f"arch={self.arch}: choose one of {', '.join(ARCHS)}")
        unknown = [r for r in self.recipes if r not in RECIPES]
        if unknown:
            raise UserError(f"recipes: unknown {unknown}; choose from {', '.join(RECIPES)}")
        if self.steps <= self.warmup:
            raise UserError(f"steps={self.steps} must exceed warmup={self.warmup}")


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


def build_data(env: Env, name: str, n: int, label_tokens: int, eval_clips: int) -> str:
    """n train clips of 30 s (quiet noise) with label_tokens-long labels, plus a test split."""
    from datasets import Dataset
    from datasets.arrow_writer import ArrowWriter

    from lib.prepared import features, write_manifest

    out = env.prepared_dir(name)
    if (out / "manifest.json").is_file():
        return name
    rng = np.random.default_rng(0)
    prefix = [50258, 50276, 50359, 50363]  # <|startoftranscript|><|hi|><|transcribe|><|notimestamps|>
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    # validation: a few clips so that `make train` can show WER-while-training on the bench model
    for split, count in (("train", n), ("validation", 8), ("test", max(eval_clips, 1))):
        # Rows are streamed to an Arrow file and memory-mapped, not held in memory: n clips x 30 s
        # is 1.9 MB a clip, and an in-memory table is re-pickled whole to fingerprint it.
        tmp = out / f"{split}.arrow.tmp"
        with ArrowWriter(features=features(), path=str(tmp)) as writer:
            for i in range(count):
                writer.write({
                    "id": f"{split}-{i}",
                    "audio": (0.05 * rng.standard_normal(30 * 16_000)).astype(np.float32),
                    "text": "x",
                    "labels": prefix + rng.integers(0, 50_000, label_tokens - len(prefix) - 1).tolist() + [50257],
                    "language": "hi",
                    "duration": 30.0,
                })
            writer.finalize()
        Dataset.from_file(str(tmp)).save_to_disk(str(out / split))
        tmp.unlink()
        splits[split] = {"rows": count, "hours": count * 30 / 3600}
    write_manifest(out, {"name": name, "source": {"kind": "bench-random"}, "language": "hi",
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


def run_recipe(cfg: BenchConfig, env: Env, recipe: str, model_dir: Path, data: str) -> dict:
    run = f"bench-{cfg.arch}-{recipe}"
    shutil.rmtree(env.run_dir(run), ignore_errors=True)
    cmd = [
        sys.executable, "-m", "jobs.train", f"run={run}", f"data={data}", f"model.base={model_dir}",
        f"lora.r={cfg.lora_r}", f"lora.alpha={2 * cfg.lora_r}",
        f"train.batch_size={cfg.batch_size}", f"train.max_steps={cfg.steps}", "train.warmup_steps=0",
        f"train.timing_warmup={cfg.warmup}", "train.logging_steps=1",
        f"train.save_steps={10 * cfg.steps}", f"train.eval_steps={10 * cfg.steps}",
        *RECIPES[recipe], *cfg.extra,  # later flags win: a recipe may set its own batch
    ]
    log.info("bench %s: %s", recipe, " ".join(cmd[2:]))
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "DATA_DIR": str(env.data_dir)},
                          capture_output=True, text=True)
    logf = env.data_dir / "bench" / cfg.arch / f"{recipe}.log"
    logf.write_text(proc.stdout + proc.stderr)
    batch = next((int(f.split("=")[1]) for f in [*RECIPES[recipe], *cfg.extra] if f.startswith("train.batch_size=")),
                 cfg.batch_size)
    row = {"recipe": recipe, "batch": batch, "wall_s": round(time.time() - t0, 1)}
    mfile = env.run_dir(run) / "metrics.json"
    if proc.returncode != 0 or not mfile.is_file():
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines()
                 if ln.strip() and "it/s]" not in ln and "s/it]" not in ln]
        errors = [ln for ln in lines if ln.startswith(("error:", "preempted:")) or "Error" in ln]
        row["error"] = f"exit {proc.returncode}: {(errors or lines or ['?'])[-1][:200]} (log: {logf})"
        return row
    m = json.loads(mfile.read_text())
    row.update({k: m.get(k) for k in ("steady_samples_per_second", "steady_step_seconds",
                                      "peak_gpu_memory_bytes", "adapter_size_bytes", "trainable_params")})
    return row


def eval_speed(cfg: BenchConfig, model_dir: Path, data_dir: Path) -> list[dict]:
    """Generation clips/s: the walkthrough's loop (8-bit, batch 8, fp16 autocast) vs ours."""
    import torch
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    from lib.model import quantization_config
    from lib.prepared import load_split

    if not torch.cuda.is_available() or cfg.eval_clips <= 0:
        return []
    ds = load_split(data_dir, "test")
    audios = [np.asarray(a, dtype=np.float32) for a in ds["audio"][: cfg.eval_clips]]
    proc = WhisperProcessor.from_pretrained(model_dir)
    rows = []
    settings = [
        ("walkthrough: int8, batch 8, autocast", dict(quantization_config=quantization_config("int8", torch.float16),
                                                       device_map={"": 0}, dtype=torch.float16), 8, True),
        (f"ours: bf16, sdpa, batch {cfg.eval_batch_size}", dict(dtype=torch.bfloat16, attn_implementation="sdpa"),
         cfg.eval_batch_size, False),
    ]
    outputs = {}
    for name, kwargs, bs, autocast in settings:
        model = WhisperForConditionalGeneration.from_pretrained(model_dir, **kwargs)
        if "device_map" not in kwargs:
            model = model.cuda()
        model.eval()
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        n = cfg.eval_new_tokens

        def gen(batch, model=model, dtype=dtype, autocast=autocast, n=n):
            feats = proc.feature_extractor(batch, sampling_rate=16_000, return_tensors="pt",
                                           device="cuda").input_features.to("cuda", dtype)
            with torch.inference_mode(), torch.autocast("cuda", torch.float16, enabled=autocast):
                return model.generate(feats, language="hi", task="transcribe", max_new_tokens=n,
                                      min_new_tokens=n)

        gen(audios[:bs])
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ids = [gen(audios[i:i + bs]) for i in range(0, len(audios), bs)]
        torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        outputs[name] = [proc.tokenizer.decode(x, skip_special_tokens=True) for b in ids for x in b]
        rows.append({"setting": name, "clips": len(audios), "seconds": round(sec, 2),
                     "clips_per_s": len(audios) / sec, "new_tokens": n})
        del model
        torch.cuda.empty_cache()
    a, b = outputs.values()
    same = sum(x == y for x, y in zip(a, b, strict=True)) / len(a)
    rows[-1]["speedup"] = rows[-1]["clips_per_s"] / rows[0]["clips_per_s"]
    rows[-1]["same_transcripts"] = same
    return rows


def table(rows: list[dict], peak: float | None, flops) -> list[str]:
    lines = ["| recipe | batch | samples/s | tokens/s | peak GiB | adapter MB | % of bf16 peak |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['recipe']} | {r['batch']} | failed: {r['error']} | | | | |")
            continue
        sps = r["steady_samples_per_second"] or 0
        ckpt = "ckpt" in r["recipe"]
        frac = f"{100 * sps * flops.train(ckpt) / (peak * 1e12):.1f}" if peak and sps else "n/a"
        mem = f"{r['peak_gpu_memory_bytes'] / 2**30:.2f}" if r.get("peak_gpu_memory_bytes") else "n/a"
        lines.append(f"| {r['recipe']} | {r['batch']} | {sps:.2f} | {sps * flops_tokens(r):.0f} | {mem} | "
                     f"{(r['adapter_size_bytes'] or 0) / 1e6:.1f} | {frac} |")
    return lines


def flops_tokens(row: dict) -> int:
    return row.get("label_tokens", 40)


def main(cfg: BenchConfig, env: Env) -> list[dict]:
    import torch
    import transformers

    # 1. The machine and the arithmetic: measured bf16 peak, FLOP per training sample.
    peak = gpu_peak_tflops()
    flops = flops_per_sample(cfg.arch, cfg.label_tokens)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    log.info("bench: %s, %s; forward %.2f TFLOP/sample, train %.2f (%.2f with checkpointing); bf16 peak %s TFLOP/s",
             cfg.arch, gpu, flops.forward / 1e12, flops.train(False) / 1e12, flops.train(True) / 1e12,
             f"{peak:.0f}" if peak else "n/a")
    if peak:
        log.info("limit: %.0f samples/s (%.0f with checkpointing)", peak * 1e12 / flops.train(False),
                 peak * 1e12 / flops.train(True))

    if not cfg.recipes:
        cfg.recipes = GPU_RECIPES if torch.cuda.is_available() else ["fp32"]

    # 2. Inputs: random model at the architecture, 30 s clips with fixed-length labels.
    root = env.data_dir / "bench" / cfg.arch
    root.mkdir(parents=True, exist_ok=True)
    model_dir = build_model(cfg.arch, root / "model")
    data = build_data(env, f"bench-{cfg.arch}", max(cfg.batch_size * cfg.steps, 16), cfg.label_tokens,
                      cfg.eval_clips)

    # 3. Train recipes, each a fresh train-job process.
    rows = []
    for recipe in cfg.recipes:
        row = run_recipe(cfg, env, recipe, model_dir, data)
        row["label_tokens"] = cfg.label_tokens
        rows.append(row)
        log.info("bench %s: %s", recipe, row)

    # 4. Eval (generation) speed, ours vs the walkthrough's loop.
    evals = eval_speed(cfg, model_dir, env.prepared_dir(data))

    # 5. Report: table, JSON, README rows.
    versions = {"torch": torch.__version__, "transformers": transformers.__version__,
                "peft": _version("peft"), "bitsandbytes": _version("bitsandbytes")}
    lines = table(rows, peak, flops)
    header = (f"{cfg.arch}, {gpu}, bf16 peak {peak:.0f} TFLOP/s measured, " if peak else f"{cfg.arch}, {gpu}, ") + \
        ", ".join(f"{k} {v}" for k, v in versions.items())
    (root / "results.json").write_text(json.dumps(
        {"arch": cfg.arch, "gpu": gpu, "bf16_peak_tflops": peak, "versions": versions,
         "flop_per_sample": {"forward": flops.forward, "train": flops.train(False),
                             "train_checkpointing": flops.train(True)},
         "train": rows, "eval": evals}, indent=2))
    print("\n" + header)
    print("\n".join(lines))
    for e in evals:
        print(f"eval {e['setting']}: {e['clips_per_s']:.2f} clips/s ({e['clips']} clips, {e['new_tokens']} tokens)"
              + (f", {e['speedup']:.1f}x, same transcripts {100 * e['same_transcripts']:.0f}%" if "speedup" in e else ""))
    if cfg.readme:
        _append_readme(Path(cfg.readme), header, lines[2:], evals)
    return rows


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "not installed"


def _append_readme(path: Path, header: str, rows: list[str], evals: list[dict]) -> None:
    marker = "<!-- bench:rows -->"
    text = path.read_text()
    if marker not in text:
        raise UserError(f"readme={path}: no '{marker}' line to append under; add it below the benchmarks table")
    stamp = time.strftime("%Y-%m-%d")
    add = [f"| {stamp} {header} | | | | | | |"] + rows
    add += [f"| eval: {e['setting']} | | {e['clips_per_s']:.2f} clips/s | | | | |" for e in evals]
    path.write_text(text.replace(marker, "\n".join(add) + "\n" + marker))


if __name__ == "__main__":
    raise SystemExit(run_job("bench", __doc__, BenchConfig, main))
