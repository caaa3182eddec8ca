"""Memory of one training step under each checkpointing kind, on the CPU (no GPU needed).

    python -m lib.tools.bench_checkpointing                 # whisper-base size, batch 4, 30 s inputs
    python -m lib.tools.bench_checkpointing arch=small batch_size=2

Each (quantization, checkpointing) case runs in a fresh process: random weights at `arch`,
LoRA r=8 on q_proj/v_proj, one forward+backward; it prints the extra resident memory
during that step (sampled every 5 ms) and the sum of the encoder LoRA gradients, which
must be equal across cases (checkpointing must not change what is learned). This is how
the int8 + non-reentrant checkpointing problem was found (see lib/train/lora.py).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lib.cli import run_job
from lib.env import Env
from lib.tools.runner import ROOT
from lib.whisper import MEL_FRAMES

CASES = [("int8", "none"), ("int8", "non-reentrant"), ("int8", "reentrant"),
         ("none", "none"), ("none", "non-reentrant"), ("none", "reentrant")]


@dataclass
class Config:
    arch: str = "base"
    """Whisper size with random weights (see lib/tools/models.ARCHS)"""
    batch_size: int = 4
    """clips of 30 s per step"""


def step(arch: str, batch: int, quant: str, ckpt: str, model_dir: Path) -> str:
    """One forward+backward in this process; returns the result line."""
    import threading
    import time

    import psutil
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import WhisperForConditionalGeneration

    from lib.model import load_base
    from lib.tools.models import whisper_config
    from lib.train import lora as L
    from lib.train.config import LoraSection

    if not (model_dir / "config.json").is_file():
        torch.manual_seed(0)
        WhisperForConditionalGeneration(whisper_config(arch)).save_pretrained(model_dir)
    base = load_base(str(model_dir), quant, "fp32")
    kwargs = {"use_reentrant": ckpt == "reentrant"}
    if quant != "none":
        base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=ckpt != "none",
                                               gradient_checkpointing_kwargs=kwargs)
    else:
        for p in base.parameters():
            p.requires_grad_(False)
        if ckpt != "none":
            L.enable_checkpointing(base, kwargs)
    L.add_encoder_input_grad_hook(base)
    base.config.use_cache = False
    torch.manual_seed(0)
    model = L.apply_lora(base, LoraSection(r=8, alpha=16, dropout=0.0))
    model.train()
    x, labels = torch.randn(batch, whisper_config(arch).num_mel_bins, MEL_FRAMES), torch.randint(0, 50_000, (batch, 40))
    proc, peak, done = psutil.Process(), [0], [False]

    def sample():
        while not done[0]:
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    before = proc.memory_info().rss
    t = threading.Thread(target=sample)
    t.start()
    model(input_features=x, labels=labels).loss.backward()
    done[0] = True
    t.join()
    grad = sum(p.grad.abs().sum().item() for n, p in model.named_parameters() if "lora_B" in n and "encoder" in n)
    return f"| {quant} | {ckpt} | {(peak[0] - before) / 2**20:.0f} | {grad:.4g} |"


def main(cfg: Config, env: Env) -> None:
    # 1. A random model at the size, shared by the cases.
    model_dir = env.data_dir / "bench" / f"{cfg.arch}-ckpt-probe"
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    # 2. Each case in a fresh process, so that one case's allocations do not hide another's.
    print(f"\n{cfg.arch}, batch {cfg.batch_size} x 30 s, one forward+backward on the CPU")
    print("| quantization | checkpointing | extra MiB | encoder lora_B grad sum |\n|---|---|---|---|")
    for quant, ckpt in CASES:
        code = (f"from lib.tools.bench_checkpointing import step; from pathlib import Path; "
                f"print(step({cfg.arch!r}, {cfg.batch_size}, {quant!r}, {ckpt!r}, Path({str(model_dir)!r})))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=ROOT)
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("|")]
        print(lines[-1] if lines else f"| {quant} | {ckpt} | failed: {out.stderr.strip().splitlines()[-1:]} | |")


if __name__ == "__main__":
    raise SystemExit(run_job("bench_checkpointing", __doc__, Config, main))
