"""Training-quality guard: the fast settings' loss curve against the walkthrough recipe's, on real weights.

    python -m lib.tools.bench_quality data=synth-hi model=openai/whisper-base   # or a local copy
    python -m lib.tools.bench_quality data=cv_hi model=openai/whisper-large-v2 fast=auto steps=50   # on a GPU

Speed knobs must not change what is learnt. Three runs of the real train job on the same
prepared data, each a fresh process, `steps` optimizer steps, training loss logged every step:

  reference   the walkthrough recipe (int8 base, checkpointing), seed 42
  noise       the same with seed 43: another LoRA init, dropout and data order
  fast        the fast settings (default: bf16/half-precision base, compiled layers, 90 %
              checkpointing; `fast=auto` uses what --recipe auto picks), seed 42

The fast curve passes when its mean distance to the reference curve is within the
distance the seed alone makes (noise), times `tolerance`. Without a GPU every run is fp32
(the half-precision base then stays fp32) unless cpu_bf16=true runs the fast settings in
bf16 through CPU autocast (slow, but it checks the bf16 numerics on real weights).
Writes DATA_DIR/bench/quality.json.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass

from lib.cli import run_job
from lib.env import Env
from lib.errors import UserError
from lib.tools.runner import last_error, run_job_process

log = logging.getLogger("whisper_ft")

REFERENCE = ["model.quantization=int8", "model.gradient_checkpointing=true"]
FAST = ["model.quantization=none", "model.base_dtype=compute", "train.compile=layers",
        "model.gradient_checkpointing=true", "model.checkpoint_fraction=0.9"]


@dataclass
class QualityConfig:
    data: str = ""
    """prepared dataset (DATA_DIR/prepared/NAME) with real speech"""
    model: str = ""
    """real Whisper weights: a local folder or a Hub id"""
    fast: str = "knobs"
    """knobs: the fast settings above; auto: what `--recipe auto` picks on this machine"""
    steps: int = 16
    """optimizer steps per run"""
    batch_size: int = 4
    lr: float = 1e-3
    tolerance: float = 1.5
    """pass when distance(fast, reference) <= tolerance x distance(noise, reference)"""
    cpu_bf16: bool = False
    """no GPU: run the fast settings in bf16 anyway (CPU autocast, slow), base stored in bf16"""

    def __post_init__(self):
        if not self.data or not self.model:
            raise UserError("set data=NAME (a prepared dataset) and model=PATH_OR_HUB_ID (real weights)")
        if self.fast not in ("knobs", "auto"):
            raise UserError(f"fast={self.fast}: use knobs or auto")
        if self.steps < 4:
            raise UserError(f"steps={self.steps}: at least 4, to have a curve")


def train_losses(cfg: QualityConfig, env: Env, run: str, flags: list[str], seed: int,
                 precision: str = "auto") -> list[float]:
    """The per-step training loss of one train-job run; flags == ["auto"] means `--recipe auto`
    (which picks the precision too)."""
    shutil.rmtree(env.run_dir(run), ignore_errors=True)
    auto = flags == ["auto"]
    args = [*(["--recipe", "auto"] if auto else []),
            f"run={run}", f"data={cfg.data}", f"model.base={cfg.model}",
            *([] if auto else [f"model.precision={precision}"]),
            f"train.batch_size={cfg.batch_size}", f"train.max_steps={cfg.steps}", f"train.lr={cfg.lr}",
            "train.warmup_steps=2", "train.logging_steps=1", f"train.seed={seed}",
            f"train.eval_steps={10 * cfg.steps}", f"train.save_steps={10 * cfg.steps}",
            # Trainer still evaluates (generates) once at the end: keep that short, it is not the point
            "train.max_eval_samples=8", "train.generation_max_length=48",
            *([] if auto else flags)]
    log.info("quality %s: jobs.train %s", run, " ".join(args))
    logf = env.data_dir / "bench" / f"{run}.log"
    code, output = run_job_process("train", args, env, logf)
    if code != 0:
        raise UserError(f"{run}: the train job failed (exit {code}): {last_error(output)}; log: {logf}")
    hist = json.loads((env.run_dir(run) / "log_history.json").read_text())
    return [h["loss"] for h in hist if "loss" in h and "eval_loss" not in h]


def distance(a: list[float], b: list[float]) -> float:
    """Mean absolute difference of two loss curves, step by step."""
    return sum(abs(x - y) for x, y in zip(a, b, strict=True)) / len(a)


def main(cfg: QualityConfig, env: Env) -> dict:
    import torch

    if not (env.prepared_dir(cfg.data) / "manifest.json").is_file():
        raise UserError(f"data={cfg.data}: no prepared dataset at {env.prepared_dir(cfg.data)}; run `make prepare`")
    gpu = torch.cuda.is_available()
    fast_precision = "auto" if gpu else ("bf16" if cfg.cpu_bf16 else "fp32")
    if not gpu:
        log.warning("no GPU: the reference runs in fp32 (int8 through bitsandbytes' CPU backend); the fast "
                    "settings in %s%s", fast_precision,
                    " (CPU autocast, base stored in bf16)" if cfg.cpu_bf16 else
                    ", so their base stays fp32 (cpu_bf16=true checks bf16 numerics, slowly)")
    fast = ["auto"] if cfg.fast == "auto" else FAST
    ref_precision = "fp16" if gpu else "fp32"  # the walkthrough's int8 runs in fp16
    curves = {
        "reference": train_losses(cfg, env, "quality-reference", REFERENCE, 42, ref_precision),
        "noise": train_losses(cfg, env, "quality-noise", REFERENCE, 43, ref_precision),
        "fast": train_losses(cfg, env, "quality-fast", fast, 42, fast_precision),
    }
    noise = distance(curves["noise"], curves["reference"])
    gap = distance(curves["fast"], curves["reference"])
    passed = gap <= cfg.tolerance * noise
    tail = max(1, cfg.steps // 4)
    result = {
        "model": cfg.model, "data": cfg.data, "steps": cfg.steps, "batch_size": cfg.batch_size,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "fast": fast, "fast_precision": fast_precision, "reference": REFERENCE, "curves": curves,
        "distance_fast_reference": gap, "distance_noise_reference": noise,
        "last_quarter_mean": {k: sum(v[-tail:]) / tail for k, v in curves.items()},
        "passed": passed,
    }
    out = env.data_dir / "bench" / "quality.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print("\n| run | first loss | mean of last quarter | mean distance to the reference curve |")
    print("|---|---|---|---|")
    for k, v in curves.items():
        d = "" if k == "reference" else f"{distance(v, curves['reference']):.4f}"
        print(f"| {k} | {v[0]:.4f} | {result['last_quarter_mean'][k]:.4f} | {d} |")
    print(f"\nfast vs reference {gap:.4f}, seed noise {noise:.4f}: "
          f"{'within' if passed else 'NOT within'} {cfg.tolerance} x noise ({out})")
    if not passed:
        raise UserError(f"the fast settings' loss curve is {gap:.4f} from the reference's, more than "
                        f"{cfg.tolerance} x the seed noise {noise:.4f}: see {out}")
    return result


if __name__ == "__main__":
    raise SystemExit(run_job("bench_quality", __doc__, QualityConfig, main))
