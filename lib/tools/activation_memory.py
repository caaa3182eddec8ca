"""How a training step's memory grows with the label length, counted on fake tensors (no GPU).

    python -m lib.tools.activation_memory                        # large-v2, batch 1, 40 and 400 tokens
    python -m lib.tools.activation_memory arch=medium label_tokens=40,200

Where lib/train/auto.py's DECODER_SHARE_PER_TOKEN and LOGIT_BYTES come from. The model is built at
`arch` under torch's FakeTensorMode (shapes and dtypes only: no weights are stored and nothing
is computed, so large-v2 takes seconds on a CPU) as the fastest `--recipe auto` mode runs it:
frozen base in bf16, bf16 autocast, SDPA attention, no checkpointing, LoRA r=32 on q_proj and
v_proj computed as PEFT does (the input cast to the fp32 adapter weights, dropout, A, B). One
forward and backward of `batch_size` 30-s inputs and labels of each length; every tensor an op
creates is counted until it is freed. Printed per length: the bytes kept for backward at the
end of the forward without the loss's own (the activations), the loss's log-softmax (fp32),
and the step's peak.

The counts are of CPU autocast in eager mode: the absolute figures are not the GPU's (CUDA
autocast keeps layer norms in fp32, dropout masks differ, `train.compile=layers` frees more);
lib/train/auto.py takes only the ratio (what one more label token adds, over the activations of a
clip at 40 tokens) and the loss's bytes per logit, and scales the peaks measured on the GPU.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field

from lib.cli import run_job
from lib.env import Env
from lib.errors import UserError
from lib.tools.models import ARCHS, whisper_config
from lib.whisper import MAX_POSITIONS, MEL_FRAMES

log = logging.getLogger("whisper_ft")
MIB = 2**20


@dataclass
class Config:
    arch: str = "large-v2"
    """Whisper size (lib/tools/models.ARCHS)"""
    batch_size: int = 1
    """clips of 30 s per step"""
    label_tokens: list[int] = field(default_factory=lambda: [40, 400])
    """label lengths to count, each <= 448 (Whisper's decoder positions)"""
    lora_r: int = 32
    """LoRA rank on q_proj and v_proj"""
    checkpointing: bool = False
    """count with gradient checkpointing on every layer (the checkpointed modes: each layer keeps its
    input, and recomputes the rest in the backward)"""

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise UserError(f"arch={self.arch}: choose one of {', '.join(ARCHS)}")
        if not self.label_tokens or not all(1 < t <= MAX_POSITIONS for t in self.label_tokens):
            raise UserError(f"label_tokens={self.label_tokens}: each must be in 2..448")


def _counter():
    """A dispatch mode that counts the bytes of live tensors created under it, and their peak."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class Live(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.seen: set[int] = set()

        def _free(self, key: int, n: int) -> None:
            self.live -= n
            self.seen.discard(key)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if any(r.alias_info is not None for r in func._schema.returns):
                return out  # a view or an in-place op: no new memory
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    storage = t.untyped_storage()
                    if id(storage) in self.seen:
                        continue
                    n = storage.nbytes()
                    self.seen.add(id(storage))
                    self.live += n
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._free, id(storage), n)
            return out

    return Live()


def step_memory(arch: str, batch_size: int, label_tokens: int, lora_r: int = 32,
                checkpointing: bool = False) -> dict[str, int]:
    """Bytes of one training step: activations (kept for backward, the loss's excluded), the
    loss's fp32 log-softmax, and the peak, all above the weights."""
    import torch
    from torch import nn
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import WhisperForConditionalGeneration

    class Lora(nn.Module):  # PEFT's LoRA Linear forward, without PEFT (its .to() cannot swap fake tensors)
        def __init__(self, base: nn.Linear):
            super().__init__()
            self.base = base
            self.lora_A = nn.Linear(base.in_features, lora_r, bias=False, dtype=torch.float32)
            self.lora_B = nn.Linear(lora_r, base.out_features, bias=False, dtype=torch.float32)
            self.dropout = nn.Dropout(0.05)

        def forward(self, x):
            return self.base(x) + self.lora_B(self.lora_A(self.dropout(x.to(torch.float32)))) * 2.0

    config = whisper_config(arch)
    config._attn_implementation = "sdpa"
    with FakeTensorMode():
        torch.set_default_dtype(torch.bfloat16)  # model.base_dtype=compute: the frozen base in bf16
        try:
            model = WhisperForConditionalGeneration(config)
        finally:
            torch.set_default_dtype(torch.float32)
        model.requires_grad_(False)
        for stack in (model.model.encoder.layers, model.model.decoder.layers):
            for layer in stack:
                for attn in (layer.self_attn, getattr(layer, "encoder_attn", None)):
                    if attn is not None:
                        attn.q_proj, attn.v_proj = Lora(attn.q_proj), Lora(attn.v_proj)
        model.train()
        if checkpointing:  # as lib.train.lora turns it on for the unquantized modes
            from lib.train.lora import enable_checkpointing

            enable_checkpointing(model, {"use_reentrant": False})
            model.config.use_cache = False
        features = torch.randn(batch_size, config.num_mel_bins, MEL_FRAMES)
        labels = torch.randint(0, 50_000, (batch_size, label_tokens - 1))  # the <|sot|> is the decoder's start
        live = _counter()
        with live:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(input_features=features, labels=labels).loss
            after_forward = live.live
            loss.backward()
            del loss
    log_softmax = 4 * batch_size * (label_tokens - 1) * config.vocab_size
    return {"activations": after_forward - log_softmax, "log_softmax": log_softmax, "peak": live.peak}


def main(cfg: Config, env: Env) -> dict:
    del env  # nothing is read or written
    rows = {t: step_memory(cfg.arch, cfg.batch_size, t, cfg.lora_r, cfg.checkpointing) for t in cfg.label_tokens}
    for t, m in rows.items():
        print(f"{cfg.arch}, batch {cfg.batch_size}, {t}-token labels: activations {m['activations'] / MIB:.0f} MiB, "
              f"log-softmax {m['log_softmax'] / MIB:.0f} MiB, peak {m['peak'] / MIB:.0f} MiB "
              f"({(m['peak'] - m['activations']) / (cfg.batch_size * (t - 1) * whisper_config(cfg.arch).vocab_size):.1f}"
              f" bytes per logit above the activations)")
    lo, hi = min(rows), max(rows)
    if hi > lo:
        per_token = (rows[hi]["activations"] - rows[lo]["activations"]) / (hi - lo) / cfg.batch_size
        share = per_token * cfg.batch_size / rows[lo]["activations"]
        print(f"one more label token keeps {per_token / MIB:.3f} MiB more activations a clip = "
              f"{100 * share:.4f} % of a clip's at {lo} tokens")
    return rows


if __name__ == "__main__":
    raise SystemExit(run_job("activation_memory", __doc__, Config, main))
