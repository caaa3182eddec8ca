"""`--recipe auto` for the train job: quantization, precision and checkpointing picked for this GPU.

    python -m jobs.train --recipe auto run=hi-1 data=cv_hi
    make train LANG=hi RECIPE=auto

auto = the walkthrough recipe (jobs/recipes/whisper-large-v2_lora-int8_1gpu.yaml) for everything
else (LoRA, lr, schedule, batch size), with model.quantization, model.precision and
model.gradient_checkpointing set by `choose()`: the fastest mode measured below whose peak
memory, scaled to the run's batch size, fits in 85% of the card. key=value flags still win over
the choice. `choose` is pure (tests give it a made-up GpuInfo); `detect` asks torch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("whisper_ft")

AUTO = "auto"
GIB = 2**30

# Share of the card's memory a predicted peak may use. The peaks below are
# torch.cuda.max_memory_allocated (tensors only): the CUDA context (~0.5 GiB), the caching
# allocator's fragmentation and a different clip mix need the other 15%.
USABLE_FRACTION = 0.85


@dataclass(frozen=True)
class GpuInfo:
    name: str
    """device name as the driver reports it, e.g. NVIDIA H100 80GB HBM3"""
    total_memory: int
    """bytes"""
    bf16: bool
    """native bf16 (compute capability 8.0+: A100, A10, L4, H100); T4 and V100 have none"""
    capability: tuple[int, int]
    """CUDA compute capability, e.g. (9, 0) for an H100, (7, 5) for a T4"""


@dataclass(frozen=True)
class Mode:
    """One measured training mode of whisper-large-v2 + LoRA."""

    quantization: str
    precision: str
    gradient_checkpointing: bool
    samples_per_s: float
    peak_gib: float
    """peak GPU memory at MEASURED_BATCH"""
    weights_gib: float
    """the part of the peak that does not grow with the batch (estimated, see FIXED_GIB)"""
    base_dtype: str = "fp32"
    """model.base_dtype: fp32 masters or the compute dtype (quantization=none only)"""
    compile: str = "none"
    """train.compile"""
    checkpoint_fraction: float = 1.0
    """model.checkpoint_fraction (with gradient_checkpointing)"""
    auto: bool = True
    """False: measured, but `choose` never picks it (it learnt worse: see the row's comment)"""

    def label(self, precision: str | None = None) -> str:
        ckpt = "no checkpointing" if not self.gradient_checkpointing else (
            "checkpointing" if self.checkpoint_fraction == 1 else f"checkpointing {self.checkpoint_fraction:.0%}")
        parts = [self.quantization, precision or self.precision]
        if self.base_dtype == "compute":
            parts.append("half-precision base")
        if self.compile != "none":
            parts.append(f"compiled {self.compile}")
        return "/".join([*parts, ckpt])

    def key(self) -> tuple:
        """What tells two modes apart, the precision aside."""
        return (self.quantization, self.gradient_checkpointing, self.base_dtype, self.compile, self.checkpoint_fraction)

    def peak_at(self, batch_size: int) -> float:
        """Predicted peak GiB: fixed part + activations (the rest of the measured peak) x batch / 8."""
        return self.weights_gib + (self.peak_gib - self.weights_gib) * batch_size / MEASURED_BATCH


# Not measured: parameter counts x bytes per parameter. large-v2 has 1.543 B parameters, 1.468 B
# of them in the layers' linear weights (what bitsandbytes quantizes) and 75 M elsewhere (kept in
# fp32 when quantized); LoRA r=32 on q,v is 15.7 M fp32 weights + grads + 2 Adam moments = 0.23 GiB.
#   none: 1.543 B x 4 B (fp32 masters)        + 0.23 = 6.0 GiB
#   half: 1.543 B x 2 B (base in bf16/fp16)   + 0.23 = 3.1 GiB
#   int8: 1.468 B x 1 B + 75 M x 4 B           + 0.23 = 1.9 GiB
#   nf4:  1.468 B x 0.5 B + 75 M x 4 B         + 0.23 = 1.2 GiB
FIXED_GIB = {"none": 6.0, "half": 3.1, "int8": 1.9, "nf4": 1.2}

# Measured on one H100 80GB through the real train job (`make bench`, README "GPU benchmarks"):
# whisper-large-v2 with random weights, batch 8, 30 s clips, 40-token labels, LoRA r=32 on
# q_proj/v_proj; peak = max_memory_allocated. The numbers are for large-v2 (large-v3 has the
# same size). For smaller bases (medium, small, base) nothing is scaled down: the rule is
# conservative there (the same mode needs less). nf4 is never picked (it learnt worse, below);
# int8 with checkpointing, the walkthrough's, only on cards too small for every other mode at
# that batch (its fixed part, 1.9 GiB, is the smallest left); int8 without checkpointing never.
MEASURED_ON = "H100 80GB, whisper-large-v2, batch 8"
MEASURED_BATCH = 8
_HALF = dict(base_dtype="compute")
MEASURED = (
    Mode("int8", "fp16", True, 5.0, 6.2, FIXED_GIB["int8"]),  # the walkthrough's recipe
    # nf4 learnt worse than int8 beyond seed noise (README "Quality of every mode auto can pick":
    # whisper-base, H200, 60 steps: normalized WER 8.1-8.4 % over 3 seeds vs int8's 3.5-5.9 % over 5),
    # so auto never picks it; model.quantization=nf4 or the QLoRA recipe still run it.
    Mode("nf4", "bf16", True, 8.0, 4.3, FIXED_GIB["nf4"], auto=False),
    Mode("none", "bf16", True, 10.3, 8.9, FIXED_GIB["none"]),
    Mode("none", "bf16", False, 16.7, 27.1, FIXED_GIB["none"]),
    Mode("none", "fp16", False, 16.7, 27.1, FIXED_GIB["none"]),
    Mode("int8", "fp16", False, 6.9, 36.1, FIXED_GIB["int8"]),
    Mode("none", "bf16", True, 11.7, 5.3, FIXED_GIB["half"], **_HALF),
    Mode("none", "bf16", False, 18.7, 21.2, FIXED_GIB["half"], **_HALF),
    Mode("none", "bf16", True, 17.3, 5.3, FIXED_GIB["half"], **_HALF, compile="layers"),
    Mode("none", "bf16", True, 23.2, 6.4, FIXED_GIB["half"], **_HALF, compile="layers", checkpoint_fraction=0.9),
    Mode("none", "bf16", False, 28.6, 19.5, FIXED_GIB["half"], **_HALF, compile="layers"),
)
WALKTHROUGH = MEASURED[0]


@dataclass(frozen=True)
class Choice:
    mode: Mode
    precision: str
    why: str
    """one line citing the card's memory, the margin and the measured numbers behind the pick"""

    @property
    def quantization(self) -> str:
        return self.mode.quantization

    @property
    def gradient_checkpointing(self) -> bool:
        return self.mode.gradient_checkpointing

    def settings(self) -> dict[str, str | bool | float]:
        """The choice as config keys and their typed values."""
        m = self.mode
        return {
            "model.quantization": m.quantization,
            "model.precision": self.precision,
            "model.gradient_checkpointing": m.gradient_checkpointing,
            "model.checkpoint_fraction": m.checkpoint_fraction,
            "model.base_dtype": m.base_dtype,
            "train.compile": m.compile,
        }

    def flags(self) -> list[str]:
        """The choice as key=value flags, as a user would write them."""
        return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.settings().items()]

    def __str__(self) -> str:
        return " ".join(self.flags())


def _candidates(bf16: bool) -> list[tuple[Mode, str]]:
    """(mode, precision to run it in), one per quantization x checkpointing, fastest first.

    The half precision is bf16 where the card has it (no fp16 overflow), else fp16: a row measured
    in bf16 then stands in for fp16 (the one pair measured both ways ran at the same speed).
    """
    half = "bf16" if bf16 else "fp16"
    out: dict[tuple, tuple[Mode, str]] = {}
    for m in MEASURED:
        if not m.auto:
            continue
        prec = "fp16" if m.precision == "bf16" and not bf16 else m.precision
        key = m.key()
        if key not in out or (m.precision == half and out[key][0].precision != half):
            out[key] = (m, prec)
    return sorted(out.values(), key=lambda mp: (-mp[0].samples_per_s, mp[0].peak_gib))


def choose(gpu: GpuInfo | None, batch_size: int) -> Choice:
    """The fastest measured mode whose peak at `batch_size` fits in USABLE_FRACTION of the card."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    if gpu is None:
        return Choice(Mode("none", "fp32", False, 0, 0, 0), "fp32", (
            "no CUDA GPU is visible: fp32 (a CPU has no fast fp16/bf16), no quantization (bitsandbytes "
            "int8/nf4 only slow a CPU down), no checkpointing (as the CPU recipe: it only costs time; "
            "set model.gradient_checkpointing=true if RAM runs short)"
        ))
    total = gpu.total_memory / GIB
    budget = total * USABLE_FRACTION
    card = (
        f"{gpu.name} (sm {gpu.capability[0]}.{gpu.capability[1]}{'' if gpu.bf16 else ', no bf16'}) "
        f"has {total:.1f} GiB, {USABLE_FRACTION:.0%} = {budget:.1f} GiB usable"
    )
    source = f"measured on {MEASURED_ON}; conservative for smaller bases"
    cands = _candidates(gpu.bf16)
    fits = [(m, p) for m, p in cands if m.peak_at(batch_size) <= budget]
    if fits:
        mode, prec = fits[0]
        skipped = [
            f"{m.label(p)} {m.samples_per_s} samples/s would need ~{m.peak_at(batch_size):.1f} GiB"
            for m, p in cands if m.samples_per_s > mode.samples_per_s
        ]
        stand_in = "" if prec == mode.precision else f" (measured in {mode.precision}, run in {prec})"
        why = (
            f"{card}; fastest measured mode that fits at batch {batch_size}: {mode.label(prec)}{stand_in}, "
            f"{mode.samples_per_s} samples/s, peak {mode.peak_gib} GiB at batch {MEASURED_BATCH}"
            + (f" -> ~{mode.peak_at(batch_size):.1f} GiB at batch {batch_size}" if batch_size != MEASURED_BATCH else "")
            + (f"; faster but too big: {', '.join(skipped)}" if skipped else "")
            + (f"; the walkthrough's {WALKTHROUGH.label()} does {WALKTHROUGH.samples_per_s} samples/s "
               f"at {WALKTHROUGH.peak_gib} GiB" if mode is not WALKTHROUGH else "")
            + f" ({source})"
        )
        return Choice(mode, prec, why)
    # Nothing fits at this batch size: the smallest mode, and the batch size that would fit.
    mode, prec = min(cands, key=lambda mp: mp[0].peak_at(batch_size))
    per_clip = (mode.peak_gib - mode.weights_gib) / MEASURED_BATCH
    best = math.floor((budget - mode.weights_gib) / per_clip)
    if best >= 1:
        # The largest batch that fits and divides yours: the same clips per optimizer step.
        fit = max(b for b in range(1, best + 1) if batch_size % b == 0)
        advice = (f"use train.batch_size={fit} train.grad_accum={batch_size // fit} "
                  f"(~{mode.peak_at(fit):.1f} GiB; multiply grad_accum by any you had)")
    else:
        advice = f"even batch 1 needs ~{mode.peak_at(1):.1f} GiB: use a bigger GPU or a smaller model.base"
    # Smaller modes auto does not pick (they learnt worse), for whoever prefers memory to quality.
    worse = [f"model.quantization={m.quantization} (~{m.peak_at(batch_size):.1f} GiB, learnt worse: README)"
             for m in MEASURED if not m.auto and m.peak_at(batch_size) < mode.peak_at(batch_size)]
    if worse:
        advice += f"; or {', '.join(worse)}"
    why = (
        f"{card}; no measured mode fits at batch {batch_size}: the smallest, {mode.label(prec)} "
        f"({mode.samples_per_s} samples/s, peak {mode.peak_gib} GiB at batch {MEASURED_BATCH}), needs "
        f"~{mode.peak_at(batch_size):.1f} GiB; {advice} ({source})"
    )
    return Choice(mode, prec, why)


def pickable(batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)) -> list[Choice]:
    """Every (mode, precision) that `choose` returns for some card and batch size: cards of 1 to
    200 GiB with and without bf16, the batch sizes given. What a quality guard must cover."""
    seen: dict[tuple, Choice] = {}
    for bf16 in (True, False):
        for gib in range(1, 201):
            gpu = GpuInfo(f"{gib} GiB", gib * GIB, bf16, (9, 0) if bf16 else (7, 5))
            for b in batch_sizes:
                c = choose(gpu, b)
                seen.setdefault((c.mode.key(), c.precision), c)
    return sorted(seen.values(), key=lambda c: (-c.mode.samples_per_s, c.precision))


def detect() -> GpuInfo | None:
    """This process's CUDA device (LOCAL_RANK under torchrun), or None without one."""
    import os

    import torch

    if not torch.cuda.is_available():
        return None
    index = int(os.environ.get("LOCAL_RANK", "0"))
    props = torch.cuda.get_device_properties(index)
    # From the capability, not torch.cuda.is_bf16_supported(): that also says yes where bf16 is
    # only emulated (T4, V100), which runs but slowly.
    return GpuInfo(props.name, props.total_memory, props.major >= 8, (props.major, props.minor))


def _flag_keys(flags: list[str]) -> set[str]:
    from lib.config import parse_override

    def walk(node: dict, prefix: str) -> set[str]:
        keys = set()
        for k, v in node.items():
            keys |= walk(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
        return keys

    return set().union(*(walk(parse_override(f), "") for f in flags))


def apply_auto(cfg, flags: list[str], probe: Callable[[], GpuInfo | None] | None = None):
    """`--recipe auto` on a built TrainConfig: (the config with the choice applied, what was chosen).

    `cfg` was built from the walkthrough recipe and your key=value `flags`; the choice replaces
    the settings your flags did not name (dataclasses.replace, so every section's checks run
    again on the result), so the layers are: defaults < walkthrough recipe < the choice < flags.
    """
    import dataclasses

    choice = choose((probe or detect)(), cfg.train.batch_size)
    settings = choice.settings()
    named = _flag_keys(flags)
    won = [f for f in flags if _flag_keys([f]) & set(settings)]
    log.info("recipe auto: %s because %s%s", choice, choice.why, f"; your flags win: {' '.join(won)}" if won else "")
    section = {"model": {}, "train": {}}
    for key, value in settings.items():
        if key not in named:
            head, name = key.split(".", 1)
            section[head][name] = value
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **section["model"]),
                              train=dataclasses.replace(cfg.train, **section["train"]))
    return cfg, {"settings": settings, "why": choice.why, "your_flags_won": won}
