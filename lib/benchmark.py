"""Speed and memory measurement shared by `make bench` and `make train`.

The figures follow the device method: count the work first, then time only steady state.
A training sample of Whisper at 30 s costs, per forward, 2 x (matmul weights touched) x
(positions): the encoder runs every weight over 1,500 positions, the decoder over the label
length, and cross-attention's K/V projections over 1,500 positions per decoder layer. With a
frozen base, backward computes input gradients only (~1 forward); LoRA's own weight
gradients are negligible. Activation checkpointing adds one more forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from transformers import TrainerCallback

# The Whisper architectures `make bench arch=...` builds with random weights (from the
# published configs): d_model, encoder/decoder layers, heads, ffn, mel bins, vocab.
ARCHS: dict[str, dict] = {
    "tiny": dict(d_model=384, encoder_layers=4, decoder_layers=4, heads=6, ffn=1536, mels=80, vocab=51865),
    "base": dict(d_model=512, encoder_layers=6, decoder_layers=6, heads=8, ffn=2048, mels=80, vocab=51865),
    "small": dict(d_model=768, encoder_layers=12, decoder_layers=12, heads=12, ffn=3072, mels=80, vocab=51865),
    "medium": dict(d_model=1024, encoder_layers=24, decoder_layers=24, heads=16, ffn=4096, mels=80, vocab=51865),
    "large-v2": dict(d_model=1280, encoder_layers=32, decoder_layers=32, heads=20, ffn=5120, mels=80, vocab=51865),
    "large-v3": dict(d_model=1280, encoder_layers=32, decoder_layers=32, heads=20, ffn=5120, mels=128, vocab=51866),
    "large-v3-turbo": dict(d_model=1280, encoder_layers=32, decoder_layers=4, heads=20, ffn=5120, mels=128,
                           vocab=51866),
}


def whisper_config(arch: str):
    from transformers import WhisperConfig

    a = ARCHS[arch]
    return WhisperConfig(
        vocab_size=a["vocab"], num_mel_bins=a["mels"], d_model=a["d_model"],
        encoder_layers=a["encoder_layers"], decoder_layers=a["decoder_layers"],
        encoder_attention_heads=a["heads"], decoder_attention_heads=a["heads"],
        encoder_ffn_dim=a["ffn"], decoder_ffn_dim=a["ffn"],
        max_source_positions=1500, max_target_positions=448,
        pad_token_id=50257, bos_token_id=50257, eos_token_id=50257, decoder_start_token_id=50258,
    )


def save_random_whisper(config, out, tokenizer_dir, seed: int = 0, device: str = "cpu", dtype=None):
    """A Whisper with random weights at `config`, saved with save_pretrained together with the
    real multilingual tokenizer and generation config from `tokenizer_dir`, so that it loads
    through the real from_pretrained path (tests' tiny model, `make bench`'s large ones)."""
    import json
    from pathlib import Path

    import torch
    from transformers import (
        GenerationConfig,
        WhisperFeatureExtractor,
        WhisperForConditionalGeneration,
        WhisperProcessor,
        WhisperTokenizer,
    )

    tokenizer_dir, out = Path(tokenizer_dir), Path(out)
    torch.manual_seed(seed)
    with torch.device(device):  # 1.5 B parameters initialise in seconds on a GPU, minutes on a CPU
        model = WhisperForConditionalGeneration(config)
    if dtype is not None:
        model = model.to(dtype)
    gen = json.loads((tokenizer_dir / "generation_config.json").read_text())
    for k in ("transformers_version", "alignment_heads"):
        gen.pop(k, None)
    model.generation_config = GenerationConfig(**gen)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    WhisperProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=config.num_mel_bins),
        tokenizer=WhisperTokenizer.from_pretrained(tokenizer_dir),
    ).save_pretrained(out)
    return out


@dataclass
class FlopCount:
    forward: float
    """FLOP of one forward pass of one 30 s sample"""
    encoder: float
    cross_kv: float

    def train(self, checkpointing: bool | float) -> float:
        """FLOP of one training sample with a frozen base: forward + input-grad backward
        (~1 forward) + one recompute forward under activation checkpointing (a share of one
        for model.checkpoint_fraction < 1)."""
        return self.forward * (2 + float(checkpointing))


def flops_per_sample(arch: str, label_tokens: int = 40) -> FlopCount:
    """Matmul FLOP (2 per multiply-add) of one 30 s sample with `label_tokens` decoder positions."""
    a = ARCHS[arch]
    d, f, enc_pos = a["d_model"], a["ffn"], 1500
    # encoder layer: q,k,v,o (4 d^2) + ffn (2 d f) per position, attention scores+mix 2 x pos x d per position
    enc_layer = enc_pos * (2 * (4 * d * d + 2 * d * f) + 2 * 2 * enc_pos * d)
    # conv stem: conv1 (mels -> d, k=3) over 3000 frames, conv2 (d -> d, k=3, stride 2) over 1500
    conv = 2 * (3000 * a["mels"] * d * 3 + 1500 * d * d * 3)
    encoder = a["encoder_layers"] * enc_layer + conv
    t = label_tokens
    # decoder layer: self-attn 4 d^2, cross q/o 2 d^2, ffn 2 d f per token; cross K/V 2 d^2 per encoder position
    dec_layer = t * 2 * (6 * d * d + 2 * d * f) + t * 2 * 2 * (t + enc_pos) * d
    cross_kv = a["decoder_layers"] * enc_pos * 2 * 2 * d * d
    decoder = a["decoder_layers"] * dec_layer + cross_kv + t * 2 * d * a["vocab"]
    return FlopCount(forward=encoder + decoder, encoder=encoder, cross_kv=cross_kv)


class StepTimer(TrainerCallback):
    """Steady-state training speed: skips the first `warmup` optimizer steps (allocation,
    autotuning, compilation), then sums step-to-step times with the GPU synchronized at each
    step end. Time spent in evaluation and checkpoint saves is left out."""

    def __init__(self, warmup: int = 3, until: int | None = None):
        self.warmup = warmup
        self.until = until
        """last step timed (the profiled steps after it are slower and left out)"""
        self.last: float | None = None
        self.steps = 0
        self.seconds = 0.0

    @staticmethod
    def _now() -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.until is not None and state.global_step > self.until:
            return
        now = self._now()
        if state.global_step > self.warmup and self.last is not None:
            self.steps += 1
            self.seconds += now - self.last
        self.last = now if state.global_step >= self.warmup else None

    def _restart(self, args, state, control, **kwargs):
        if self.last is not None:
            self.last = self._now()

    on_evaluate = _restart
    on_save = _restart

    def summary(self, samples_per_step: int) -> dict[str, float | int | None]:
        if not self.steps:
            return {"steady_steps": 0, "steady_step_seconds": None, "steady_samples_per_second": None}
        return {
            "steady_steps": self.steps,
            "steady_step_seconds": self.seconds / self.steps,
            "steady_samples_per_second": samples_per_step * self.steps / self.seconds,
        }


# Kernel (GPU) or operator (CPU) names -> what they compute. Matrix products: cuBLAS
# (nvjet, sm90_xmma, *gemm*), cutlass, bitsandbytes' int8 matmul; attention: flash/memory-
# efficient SDPA kernels. The rest is element-wise work, reductions, copies and casts.
_GEMM = ("gemm", "nvjet", "xmma", "cutlass", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
         "aten::linear", "igemmlt", "int8_mm", "kgemm")
_ATTENTION = ("flash", "fmha", "attention", "efficient_attention")


def kernel_category(name: str) -> str:
    n = name.lower()
    if any(k in n for k in _ATTENTION):
        return "attention"
    if any(k in n for k in _GEMM):
        return "matmul"
    if "memcpy" in n or "memset" in n:
        return "copy"
    return "other"


class ProfileSteps(TrainerCallback):
    """Profile optimizer steps (start, start + steps] with torch.profiler and write where the
    time goes: wall time, time the GPU was busy, and GPU time by kind (matmul, attention,
    other = element-wise/reductions/casts, copy), plus the top kernels, to `out`.

    On a machine without CUDA the same table is built from CPU operator self-times.
    """

    def __init__(self, start: int, steps: int, out):
        self.start, self.steps, self.out = start, steps, out
        self.prof = None
        self.t0 = 0.0
        self.summary: dict | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        import torch

        if self.prof is None and self.summary is None and state.global_step == self.start:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                acts.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()
            self.prof = torch.profiler.profile(activities=acts)
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if self.prof is None or state.global_step < self.start + self.steps:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        self.summary = self.summarise(self.prof, wall, cuda=torch.cuda.is_available())
        self.prof = None
        if state.is_world_process_zero:
            self.out.write_text(self.report(self.summary))

    def summarise(self, prof, wall: float, cuda: bool) -> dict:
        from collections import Counter

        by_kind: Counter = Counter()
        by_name: Counter = Counter()
        if cuda:
            from torch.autograd import DeviceType

            for e in prof.events():
                if e.device_type == DeviceType.CUDA:
                    us = e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
                    by_kind[kernel_category(e.name)] += us
                    by_name[e.name] += us
        else:
            for e in prof.key_averages():
                if e.key.startswith("aten::") and e.self_cpu_time_total > 0:
                    by_kind[kernel_category(e.key)] += e.self_cpu_time_total
                    by_name[e.key] += e.self_cpu_time_total
        busy = sum(by_kind.values()) / 1e6
        return {
            "steps": self.steps,
            "wall_s": wall,
            "device": "cuda" if cuda else "cpu",
            "busy_s": busy,
            "busy_fraction": busy / wall if wall else None,
            "seconds_by_kind": {k: v / 1e6 for k, v in by_kind.most_common()},
            "top": [(n, v / 1e6) for n, v in by_name.most_common(25)],
        }

    @staticmethod
    def report(s: dict) -> str:
        what = "GPU kernels" if s["device"] == "cuda" else "CPU operators (self time)"
        lines = [
            f"profile of {s['steps']} optimizer steps: wall {s['wall_s']:.3f} s, {what} {s['busy_s']:.3f} s "
            f"({100 * (s['busy_fraction'] or 0):.0f}% of the profiled wall time, which the profiler itself slows)",
            "",
            "| kind | seconds | share of busy |",
            "|---|---|---|",
        ]
        lines += [f"| {k} | {v:.3f} | {100 * v / s['busy_s']:.1f}% |" for k, v in s["seconds_by_kind"].items()]
        lines += ["", "| top kernels | seconds | kind |", "|---|---|---|"]
        lines += [f"| {n[:110]} | {v:.4f} | {kernel_category(n)} |" for n, v in s["top"]]
        return "\n".join(lines) + "\n"
