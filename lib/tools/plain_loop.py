"""The walkthrough's recipe as a plain training loop: the reference that the project's int8 path is
measured against (issue 14, target 4: at least 1.5x this).

    python -m lib.tools.plain_loop model=DATA_DIR/bench/large-v2/model        # on a GPU
    python -m lib.tools.plain_loop model=... batch_size=8 steps=10 warmup=3 out=result.json

What the "Whisper + LoRA + 8-bit" walkthrough trains, without the Trainer, the data pipeline or
anything of ours: the base loaded in 8 bits (BitsAndBytesConfig(load_in_8bit=True)), PEFT's
prepare_model_for_kbit_training (frozen base, fp32 layer norms, gradient checkpointing), the
walkthrough's input-grad hook on conv1, LoRA r=32 / alpha 64 / dropout 0.05 on q_proj and v_proj,
AdamW at lr 1e-3, fp16 autocast with a GradScaler. The inputs are random log-mel features and
labels already on the device (30 s, `label_tokens` tokens): no loading, no log-mel, so the loop
is an upper bound of the walkthrough's speed. Times `steps - warmup` steps after `warmup`
untimed ones; prints and writes {samples_per_s, step_s, peak_gpu_memory_bytes, ...}.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from lib.cli import run_job
from lib.env import Env
from lib.errors import UserError
from lib.whisper import MEL_FRAMES

log = logging.getLogger("whisper_ft")


@dataclass
class PlainLoopConfig:
    model: str = ""
    """Whisper weights: a local folder (the bench's random large-v2) or a Hub id"""
    batch_size: int = 8
    """clips per step (the walkthrough's 8)"""
    steps: int = 10
    """steps run; the first `warmup` are not timed"""
    warmup: int = 3
    label_tokens: int = 40
    """decoder positions per sample"""
    lr: float = 1e-3
    out: str = ""
    """JSON file to write the result to (empty: print only)"""

    def __post_init__(self):
        if not self.model:
            raise UserError("set model=PATH_OR_HUB_ID (the Whisper weights to train)")
        if self.steps <= self.warmup or self.warmup < 1:
            raise UserError(f"steps={self.steps}, warmup={self.warmup}: need 1 <= warmup < steps")


def main(cfg: PlainLoopConfig, env: Env) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, WhisperForConditionalGeneration

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"  # on a CPU the same loop runs (slowly): what the tests check
    model = WhisperForConditionalGeneration.from_pretrained(
        cfg.model, quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": device})
    # the walkthrough's PEFT default then: reentrant checkpointing (named, as torch now asks)
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": True})
    # the walkthrough's hook: make the encoder's conv1 output require grad (checkpointing needs it)
    model.model.encoder.conv1.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    model = get_peft_model(model, LoraConfig(r=32, lora_alpha=64, target_modules=["q_proj", "v_proj"],
                                             lora_dropout=0.05, bias="none"))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    scaler = torch.amp.GradScaler(device)
    g = torch.Generator(device=device).manual_seed(0)
    mels = model.config.num_mel_bins
    features = torch.randn(cfg.batch_size, mels, MEL_FRAMES, device=device, generator=g)
    labels = torch.randint(0, 50_000, (cfg.batch_size, cfg.label_tokens), device=device, generator=g)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        with torch.autocast(device, dtype=torch.float16):
            loss = model(input_features=features, labels=labels).loss
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # a sync, as the walkthrough's logging does each step
        times.append(time.perf_counter() - t0)
        log.info("plain loop: step %d/%d loss %.4f %.3f s", step + 1, cfg.steps, losses[-1], times[-1])
    timed = times[cfg.warmup:]
    step_s = sum(timed) / len(timed)
    result = {
        "samples_per_s": round(cfg.batch_size / step_s, 3), "step_s": round(step_s, 4), "batch_size": cfg.batch_size,
        "timed_steps": len(timed), "losses": losses, "device": torch.cuda.get_device_name() if cuda else "cpu",
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "losses"}))
    if cfg.out:
        Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    raise SystemExit(run_job("plain_loop", __doc__, PlainLoopConfig, main))
