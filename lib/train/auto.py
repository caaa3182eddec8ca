"""`--recipe auto` for the train job: quantization, precision, checkpointing, and the split of the
effective batch into per-device batch x gradient accumulation, picked for this GPU.

    python -m jobs.train --recipe auto run=hi-1 data=cv_hi
    make train LANG=hi RECIPE=auto

auto = the walkthrough recipe (jobs/recipes/whisper-large-v2_lora-int8_1gpu.yaml) for everything
else (LoRA, lr, schedule), with model.quantization, model.precision, model.base_dtype,
train.compile, model.gradient_checkpointing, model.checkpoint_fraction, train.batch_size and
train.grad_accum set by `choose()`: of every (measured mode, per-device batch that divides the
effective batch), the one with the best predicted samples/s whose predicted peak memory, at the
run's longest label, fits in 85% of the card. The effective batch (train.batch_size x
train.grad_accum) is what you asked for, so the optimization is the same; when your flags name
both train.batch_size and train.grad_accum, that split is kept too. Other key=value flags still
win over the choice. `choose` is pure (tests give it a made-up GpuInfo); `detect` asks torch.

The measured figures are data (lib/train/measured.py reads them): lib/train/measured.json, shipped,
and DATA_DIR/bench/large-v2/measured.json, which `make bench` writes on your GPU and which takes
the shipped figures' place, mode by mode, on that GPU. This module holds the rule: what the
figures predict at another batch and label length, and which mode and batch to pick.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from itertools import pairwise

from lib.train import measured
from lib.whisper import MAX_POSITIONS
from lib.whisper import MAX_PROMPT as MAX_PROMPT_TOKENS

log = logging.getLogger("whisper_ft")

AUTO = "auto"
GIB = 2**30

# Share of the card's memory a predicted peak may use. The measured peaks are
# torch.cuda.max_memory_allocated (tensors only): the CUDA context (~0.5 GiB), the caching
# allocator's fragmentation and a different clip mix need the other 15%.
USABLE_FRACTION = 0.85

# How the peak grows with the label length. The peaks were measured with 40-token labels
# (label rows of 40 tokens, <|startoftranscript|> included: 39 decoder positions). Two parts grow
# with the label length T, per clip:
#  - the loss: logits are T x 51,865 (vocab). Whisper's loss is CrossEntropyLoss on the bf16/fp16
#    logits; autocast runs it in fp32, and the peak comes in its backward, holding the fp32
#    log-softmax (saved by the forward) and two fp32 gradients of the same shape (nll_loss's, then
#    log_softmax's): 3 x 4 = 12 bytes a logit. The half-precision logits themselves are gone by
#    then (Trainer.compute_loss drops the model's outputs before backward); the forward's own
#    peak, bf16 logits + fp32 upcast + fp32 log-softmax, is 10. 40 tokens: 12 x 40 x 51,865 =
#    24.9 MB a clip; 400 tokens: 249 MB a clip.
#  - the decoder's activations: a decoder position keeps about what an encoder frame keeps (plus
#    cross-attention on its query side), and the encoder has 1,500 frames: at 40 tokens the
#    decoder is a few % of a clip's activations, at 400 a quarter more. Counted, not guessed:
#    `python -m lib.tools.activation_memory` (large-v2 on fake tensors, bf16 base, LoRA r=32 q,v,
#    no checkpointing) gives 2,556 MiB a clip at 40 tokens, 3,175 at 400: 1.720 MiB a token =
#    0.0673 % of a clip's activations at 40 tokens, and 12.0 bytes a logit at the peak (as above).
#    That count is CPU autocast, eager, so only the ratio is used: each token beyond 40 adds
#    0.0673 % to the mode's measured activations (the peak minus the fixed part, less the 40-token
#    logits). An estimate for the checkpointed modes (their layers keep less per position, in the
#    encoder and the decoder alike, so the share is about the same) and for int8.
#  - the checkpointed modes (every layer checkpointed) peak elsewhere at 40 tokens: the same count
#    with checkpointing=true gives 246 MiB a clip at its peak, of which 128 MiB (CKPT_KEPT_SHARE)
#    are kept for the backward (each layer's input) and the rest is one layer recomputed in the
#    backward; at 320 tokens the peak is the loss instead, 12 bytes a logit above what is kept.
#    So a checkpointed mode's clip is kept x (1 + share x (tokens - 40)) + the larger of the
#    recompute and the loss. Checked on one H100 run (2026-12-07 22:22, int8-ckpt-pack: 5.89 GiB
#    at batch 8, 320-token labels): 6.62 predicted (the old rule, the whole 40-token clip scaled
#    plus the loss, said 8.27). The rest of the gap is the 40-token figure: 6.2 GiB measured
#    before model.int8_half_inputs; the H200 measured 4.92 since, with which this rule gives 5.25.
# Fewer than 40 tokens: the 40-token figure (nothing measured below it).
MEASURED_LABELS = 40
VOCAB = 51865
LOGIT_BYTES = 12
DECODER_SHARE_PER_TOKEN = 0.000673
CKPT_KEPT_SHARE = 0.52
"""a fully checkpointed mode's 40-token clip: the share kept for the backward (128 of 246 MiB,
`python -m lib.tools.activation_memory checkpointing=true`); the rest is a layer's recompute"""
MAX_LABEL_TOKENS = MAX_POSITIONS
"""Whisper's decoder positions (max_target_positions): no label row is longer (prepare drops them)"""

PACK_BELOW_SECONDS = 15.0
"""auto sets train.pack=true when the median train clip is shorter: one such clip per 30-s window is
more than half padding (a 5-s clip: 25 of 30 s, 5/6 of the encoder's work), and a window of them
teaches the timestamped multi-segment form that long-form decoding asks for. At 15 s and above a
window holds one or two clips: little to gain, and the clips are long-form-like already."""
PACK_LR_FACTOR = 2.0
"""auto multiplies the recipe's train.lr by this when the windows are packed (unless train.lr is
named). A packed step holds several clips a window (synth-hi: 9; Common Voice: about 4.5), so its
gradient averages over several times the tokens of an unpacked step, and at the recipe's lr the
packed runs lagged: whisper-base on synth-hi (docs/results.md "Packed training and quality"),
68 x 2 windows at lr 1e-3: clip WER 6.7-7.0 % (unpacked 60 x 8: 3.2-5.9 %); at 2e-3: see there."""
PACK_PREFIX = 3
"""label tokens before a clip's segments in a packed label: <|sot|> <|lang|> <|task|> (multilingual
Whisper; an English-only base has 1, so its estimate is 2 tokens high)"""
PACK_LABEL_MULTIPLE = 64
"""the packed label estimate is rounded up to this: a compiled run pads its label rows so
(lib.train.trainer.COMPILED_LABEL_MULTIPLE)"""


def logits_gib(label_tokens: int) -> float:
    """The loss's memory a clip at its peak, GiB: 12 bytes x label tokens x vocabulary."""
    return LOGIT_BYTES * label_tokens * VOCAB / GIB

# How the speed depends on the per-device batch. At batch 8 a step is partly host-bound: the GPU
# is busy 37-62 % of it, waiting on Python to launch the next kernels; at batch 32, compiled, 88-89 %
# (docs/results.md). The step time t(b) is then about max(host, b x GPU time a clip), a
# convex curve. Each mode holds the samples/s measured at each batch it ran (`speeds()`; the
# figures: lib/train/measured.json):
#  - at a measured batch: that number;
#  - between two measured batches: the step time on the straight line between them (a convex
#    curve lies below its chord, so this never predicts more than the truth);
#  - below the smallest: the step takes as long as there (host-bound: samples/s ~ batch);
#  - above the largest: the largest's samples/s (no gain assumed).
# The fastest mode ran at 8 (28.6 samples/s: 8 / 28.6 = 0.280 s a step) and 32 (49.7: 0.644 s):
# at 16, t = 0.280 + (0.644 - 0.280) x 8/24 = 0.401 s -> 39.9 samples/s, an estimate; at 4,
# 4 / 0.280 = 14.3, an estimate. The H200 measured the same mode at 27.4 (batch 8) and 49.6 (32).
# Every other mode ran at batch 8 only: from 8 up, its batch-8 number; below, b/8 of it.
# Speeds are at 40-token labels; longer labels slow every mode by about the same decoder and loss
# work, so the ranking stands (not measured).


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
    """One measured training mode of whisper-large-v2 + LoRA, as `choose` predicts from it (`modes`
    builds them from lib/train/measured.py's figures)."""

    quantization: str
    precision: str
    gradient_checkpointing: bool
    samples_per_s: float
    """measured at `batch`"""
    peak_gib: float
    """peak GPU memory at `batch`, MEASURED_LABELS-token labels"""
    weights_gib: float
    """the part of the peak that does not grow with the batch (estimated, see FIXED_GIB)"""
    base_dtype: str = "fp32"
    """model.base_dtype: fp32 masters or the compute dtype (quantization=none only)"""
    compile: str = "none"
    """train.compile"""
    checkpoint_fraction: float = 1.0
    """model.checkpoint_fraction (with gradient_checkpointing)"""
    auto: bool = True
    """False: measured, but `choose` never picks it (it learnt worse: NEVER_PICKED)"""
    measured_at: tuple[tuple[int, float, float | None], ...] = ()
    """(batch, samples/s, peak GiB) measured at other batch sizes, same card and labels"""
    batch: int = 8
    """the batch samples_per_s and peak_gib were measured at: MEASURED_BATCH where measured there"""
    source: str = ""
    """where the figures come from: file, GPU, date, run (lib/train/measured.py)"""

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

    def speeds(self) -> list[tuple[int, float]]:
        """(batch, samples/s) measured, by batch."""
        return sorted({self.batch: self.samples_per_s, **{b: s for b, s, _ in self.measured_at}}.items())

    def speed_at(self, batch: int) -> tuple[float, str]:
        """Predicted samples/s at `batch`, and whether it was measured or how it is estimated (see above)."""
        points = self.speeds()
        measured = dict(points)
        if batch in measured:
            return measured[batch], f"measured at batch {batch}"
        (lo, s_lo), (hi, s_hi) = points[0], points[-1]
        if batch < lo:
            return batch * s_lo / lo, f"estimate: a step as long as at batch {lo}"
        if batch > hi:
            return s_hi, f"estimate: no faster than at batch {hi}"
        (b0, s0), (b1, s1) = next((p, q) for p, q in pairwise(points) if p[0] < batch < q[0])
        t0, t1 = b0 / s0, b1 / s1
        step = t0 + (t1 - t0) * (batch - b0) / (b1 - b0)
        return batch / step, f"estimate: step time between batch {b0} and {b1}"

    def clip_gib(self, label_tokens: int = MEASURED_LABELS) -> float:
        """Predicted memory a clip adds at `label_tokens`-token labels (see DECODER_SHARE_PER_TOKEN)."""
        tokens = max(label_tokens, MEASURED_LABELS)
        at_40 = (self.peak_gib - self.weights_gib) / self.batch
        grow = 1 + DECODER_SHARE_PER_TOKEN * (tokens - MEASURED_LABELS)
        if self.gradient_checkpointing and self.checkpoint_fraction == 1:
            kept = CKPT_KEPT_SHARE * at_40
            return kept * grow + max(at_40 - kept, logits_gib(tokens))
        rest = at_40 - logits_gib(MEASURED_LABELS)
        return rest * grow + logits_gib(tokens)

    def peak_at(self, batch_size: int, label_tokens: int = MEASURED_LABELS) -> float:
        """Predicted peak GiB: fixed part + batch x what a clip adds (from the peak measured at `batch`, 40 tokens)."""
        return self.weights_gib + batch_size * self.clip_gib(label_tokens)


# Not measured: parameter counts x bytes per parameter. large-v2 has 1.543 B parameters, 1.468 B
# of them in the layers' linear weights (what bitsandbytes quantizes) and 75 M elsewhere (kept in
# fp32 when quantized); LoRA r=32 on q,v is 15.7 M fp32 weights + grads + 2 Adam moments = 0.23 GiB.
#   none: 1.543 B x 4 B (fp32 masters)        + 0.23 = 6.0 GiB
#   half: 1.543 B x 2 B (base in bf16/fp16)   + 0.23 = 3.1 GiB
#   int8: 1.468 B x 1 B + 75 M x 4 B           + 0.23 = 1.9 GiB
#   nf4:  1.468 B x 0.5 B + 75 M x 4 B         + 0.23 = 1.2 GiB
FIXED_GIB = {"none": 6.0, "half": 3.1, "int8": 1.9, "nf4": 1.2}

# The shipped figures (lib/train/measured.json) are for large-v2 (large-v3 has the same size). For
# smaller bases (medium, small, base) nothing is scaled down: the rule is conservative
# there (the same mode needs less). int8 with checkpointing, the walkthrough's, is picked only on
# cards too small for every other mode at that batch (its fixed part, 1.9 GiB, is the smallest
# left); int8 without checkpointing never.
MEASURED_BATCH = 8
"""the batch every shipped mode was measured at; a mode's figures at this batch are its reference"""
NEVER_PICKED = {
    # nf4 learnt worse than int8 beyond seed noise (docs/results.md "Quality of every mode auto can pick":
    # whisper-base, H200, 60 steps: normalized WER 8.1-8.4 % over 3 seeds vs int8's 3.5-5.9 % over 5),
    # so auto never picks it; model.quantization=nf4 or the QLoRA recipe still run it.
    "nf4": "learnt worse: docs/results.md",
}
"""quantization -> why `choose` never returns it (a verdict on quality, not a measurement)"""


def _fixed_gib(quantization: str, base_dtype: str) -> float:
    return FIXED_GIB["half" if quantization == "none" and base_dtype == "compute" else quantization]


def to_mode(setting: measured.Setting, figures: measured.Measured) -> Mode | None:
    """A measured mode as `choose` predicts from it: the reference figures at MEASURED_BATCH (else
    the smallest batch with a peak), the other batches' in measured_at; None without a peak."""
    points = sorted(setting.points, key=lambda p: p.batch)
    peaked = [p for p in points if p.peak_gib is not None]
    if not peaked:
        return None
    ref = next((p for p in peaked if p.batch == MEASURED_BATCH), peaked[0])
    return Mode(setting.quantization, setting.precision, setting.gradient_checkpointing, ref.samples_per_s,
                ref.peak_gib, _fixed_gib(setting.quantization, setting.base_dtype), base_dtype=setting.base_dtype,
                compile=setting.compile, checkpoint_fraction=setting.checkpoint_fraction,
                auto=setting.quantization not in NEVER_PICKED,
                measured_at=tuple((p.batch, p.samples_per_s, p.peak_gib) for p in points if p is not ref),
                batch=ref.batch, source=figures.origin(points))


@dataclass(frozen=True)
class Table:
    """The modes `choose` picks among, and one line on where their figures come from."""

    modes: tuple[Mode, ...]
    source: str
    notes: tuple[str, ...] = ()
    """what of a bench's file was left out, and why (logged)"""

    def walkthrough(self) -> Mode:
        """The walkthrough recipe's mode: int8, fp16, every layer checkpointed."""
        return next(m for m in self.modes if m.key() == ("int8", True, "fp32", "none", 1.0) and m.precision == "fp16")


def table(figures: measured.Figures) -> Table:
    """The figures that apply on one GPU (lib.train.measured.for_gpu) as modes, and their source line."""
    modes = tuple(m for m in (to_mode(s, f) for s, f in figures.modes) if m is not None)
    shipped, *own = figures.files
    source = f"measured on {shipped.summary}"
    if own:
        mine = [s for s, f in figures.modes if f is own[0]]
        source = (f"measured on {own[0].summary} for {len(mine)} mode(s) ({measured.shown(own[0].path)}), "
                  f"the rest on {shipped.summary} ({measured.shown(shipped.path)})")
    return Table(modes, f"{source}; conservative for smaller bases", figures.notes)


SHIPPED = table(measured.for_gpu(None, None))
"""the shipped figures: what `choose` uses unless given another table"""
if measured.shipped().label_tokens != MEASURED_LABELS or measured.shipped().model != measured.MODEL:
    raise RuntimeError(f"{measured.SHIPPED}: the memory rule here starts from {MEASURED_LABELS}-token labels on "
                       f"whisper-{measured.MODEL}")
MEASURED = SHIPPED.modes
WALKTHROUGH = SHIPPED.walkthrough()
BATCH_KEYS = ("train.batch_size", "train.grad_accum")
# The mode settings a flag may fix, in the order they narrow `choose`'s modes (memory first).
FIXED_ORDER = ("model.quantization", "model.gradient_checkpointing", "model.checkpoint_fraction", "model.base_dtype",
               "train.compile", "model.precision")


@dataclass(frozen=True)
class Choice:
    mode: Mode
    precision: str
    why: str
    """one line citing the card's memory, the margin and the measured numbers behind the pick"""
    batch_size: int | None = None
    """train.batch_size: clips per device per step (None: not chosen, as for pickable's modes)"""
    grad_accum: int | None = None
    """train.grad_accum: batch_size x grad_accum is the effective batch asked for"""
    samples_per_s: float | None = None
    """predicted at batch_size (Mode.speed_at)"""
    peak_gib: float | None = None
    """predicted at batch_size and label_tokens (Mode.peak_at)"""
    label_tokens: int | None = None
    """the longest label the prediction assumed"""

    @property
    def quantization(self) -> str:
        return self.mode.quantization

    @property
    def gradient_checkpointing(self) -> bool:
        return self.mode.gradient_checkpointing

    def settings(self, batch: bool = True) -> dict[str, str | bool | float | int]:
        """The choice as config keys and their typed values (the batch split too, when chosen and `batch`)."""
        m = self.mode
        out: dict[str, str | bool | float | int] = {
            "model.quantization": m.quantization,
            "model.precision": self.precision,
            "model.gradient_checkpointing": m.gradient_checkpointing,
            "model.checkpoint_fraction": m.checkpoint_fraction,
            "model.base_dtype": m.base_dtype,
            "train.compile": m.compile,
        }
        if batch and self.batch_size is not None:
            out.update({"train.batch_size": self.batch_size, "train.grad_accum": self.grad_accum})
        return out

    def flags(self, batch: bool = True) -> list[str]:
        """The choice as key=value flags, as a user would write them."""
        return [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in self.settings(batch).items()]

    def __str__(self) -> str:
        return " ".join(self.flags())


def _candidates(bf16: bool, modes: tuple[Mode, ...] = MEASURED) -> list[tuple[Mode, str]]:
    """(mode, precision to run it in), one per quantization x checkpointing, fastest first.

    The half precision is bf16 where the card has it (no fp16 overflow), else fp16: a row measured
    in bf16 then stands in for fp16 (the one pair measured both ways ran at the same speed).
    """
    half = "bf16" if bf16 else "fp16"
    out: dict[tuple, tuple[Mode, str]] = {}
    for m in modes:
        if not m.auto:
            continue
        prec = "fp16" if m.precision == "bf16" and not bf16 else m.precision
        key = m.key()
        if key not in out or (m.precision == half and out[key][0].precision != half):
            out[key] = (m, prec)
    return sorted(out.values(), key=lambda mp: (-mp[0].samples_per_s, mp[0].peak_gib))


@dataclass(frozen=True)
class _Option:
    mode: Mode
    precision: str
    batch: int
    speed: float
    basis: str
    peak: float

    def describe(self) -> str:
        return f"{self.mode.label(self.precision)} at batch {self.batch}: {self.speed:.1f} samples/s, ~{self.peak:.1f} GiB"


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def choose(gpu: GpuInfo | None, batch_size: int, grad_accum: int = 1, label_tokens: int = MEASURED_LABELS,
           keep_split: bool = False, fixed: dict | None = None, figures: Table = SHIPPED) -> Choice:
    """The (mode, per-device batch) with the best predicted samples/s whose predicted peak fits in
    USABLE_FRACTION of the card; batch_size x grad_accum, the effective batch, is kept.

    Per-device batches are the divisors of the effective batch (`keep_split`: batch_size only);
    ties go to the smaller peak. label_tokens: the longest label row (the peak is set by the batch
    that holds it). fixed: settings your flags fixed (settings() keys): only modes that agree are
    considered (all of them when none does, and the why-line says so). figures: the measured modes
    (default the shipped ones; apply_auto passes this GPU's, `table(measured.for_gpu(...))`).
    """
    if batch_size < 1 or grad_accum < 1:
        raise ValueError(f"batch_size={batch_size} grad_accum={grad_accum}: both must be >= 1")
    effective = batch_size * grad_accum
    if gpu is None:
        return Choice(Mode("none", "fp32", False, 0, 0, 0), "fp32", (
            "no CUDA GPU is visible: fp32 (a CPU has no fast fp16/bf16), no quantization (bitsandbytes "
            "int8/nf4 only slow a CPU down), no checkpointing (as the CPU recipe: it only costs time; "
            "set model.gradient_checkpointing=true if RAM runs short), your batch split as given"
        ), batch_size, grad_accum)
    total = gpu.total_memory / GIB
    budget = total * USABLE_FRACTION
    tokens = label_tokens
    card = (
        f"{gpu.name} (sm {gpu.capability[0]}.{gpu.capability[1]}{'' if gpu.bf16 else ', no bf16'}) "
        f"has {total:.1f} GiB, {USABLE_FRACTION:.0%} = {budget:.1f} GiB usable; labels up to {tokens} tokens; "
        f"{effective} clips per optimizer step ({batch_size} x {grad_accum} asked"
        f"{': both named, kept' if keep_split else ''})"
    )
    source = figures.source
    walk = figures.walkthrough()
    cands = _candidates(gpu.bf16, figures.modes)
    # Your flags' settings narrow the modes, the ones that move memory most first; one no
    # measured mode has (model.precision=bf16 with int8, say) is left out of the narrowing.
    unmatched = []
    for key in FIXED_ORDER:
        if key in (fixed or {}):
            agree = [(m, p) for m, p in cands if Choice(m, p, "").settings()[key] == fixed[key]]
            if agree:
                cands = agree
            else:
                unmatched.append(f"{key}={fixed[key]}")
    if unmatched:
        card += f"; no measured mode has {' '.join(unmatched)}: predicted without it"
    sizes = [batch_size] if keep_split else divisors(effective)
    options = [_Option(m, p, b, *m.speed_at(b), m.peak_at(b, tokens)) for m, p in cands for b in sizes]
    fits = [o for o in options if o.peak <= budget]
    if fits:
        best = max(fits, key=lambda o: (o.speed, -o.peak))
        mode, prec, b = best.mode, best.precision, best.batch
        # per faster mode, the smallest batch at which it would beat the pick: what it would need
        faster = {}
        for o in options:
            if o.speed > best.speed and o.mode.key() not in faster:
                faster[o.mode.key()] = o
        stand_in = "" if prec == mode.precision else f" (measured in {mode.precision}, run in {prec})"
        capped = (not keep_split and b == effective and mode.speed_at(2 * b)[0] > best.speed
                  and mode.peak_at(2 * b, tokens) <= budget)
        why = (
            f"{card}; best predicted that fits: train.batch_size={b} train.grad_accum={effective // b}, "
            f"{mode.label(prec)}{stand_in}, {best.speed:.1f} samples/s ({best.basis}), ~{best.peak:.1f} GiB "
            f"({mode.peak_gib} GiB measured at batch {mode.batch}, {MEASURED_LABELS}-token labels; {mode.source})"
            + (f"; faster but too big: {', '.join(o.describe() for o in faster.values())}" if faster else "")
            + (f"; the per-device batch is capped by the effective batch ({effective} clips per optimizer step): "
               f"a larger one would change the optimization" if capped else "")
            + (f"; the walkthrough's {walk.label()} does {walk.samples_per_s} samples/s "
               f"at {walk.peak_gib} GiB (batch {walk.batch})" if mode is not walk else "")
            + f" ({source})"
        )
        return Choice(mode, prec, why, b, effective // b, best.speed, best.peak, tokens)
    # Nothing fits: the smallest mode at the smallest batch allowed, and what would fit.
    b = sizes[0]
    mode, prec = min(cands, key=lambda mp: mp[0].peak_at(b, tokens))
    need = mode.peak_at(b, tokens)
    fit = [d for d in divisors(effective) if mode.peak_at(d, tokens) <= budget]
    if keep_split and fit:
        advice = (f"use train.batch_size={fit[-1]} train.grad_accum={effective // fit[-1]} "
                  f"(~{mode.peak_at(fit[-1], tokens):.1f} GiB), or name only one of the two and auto splits "
                  f"the {effective} clips itself")
    else:
        advice = "use a bigger GPU or a smaller model.base"
    # Smaller modes auto does not pick (they learnt worse), for whoever prefers memory to quality.
    worse = [f"model.quantization={m.quantization} (~{m.peak_at(b, tokens):.1f} GiB, {NEVER_PICKED[m.quantization]})"
             for m in figures.modes if not m.auto and m.peak_at(b, tokens) < need]
    if worse:
        advice += f"; or {', '.join(worse)}"
    why = (
        f"{card}; no measured mode fits at batch {b}: the smallest, {mode.label(prec)} "
        f"({mode.samples_per_s} samples/s, peak {mode.peak_gib} GiB at batch {mode.batch}; {mode.source}), needs "
        f"~{need:.1f} GiB; {advice} ({source})"
    )
    speed = mode.speed_at(b)[0]
    return Choice(mode, prec, why, b, effective // b, speed, need, tokens)


def pickable(batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
             label_tokens: tuple[int, ...] = (MEASURED_LABELS, MAX_LABEL_TOKENS)) -> list[Choice]:
    """Every (mode, precision) that `choose` returns for some card, effective batch and label length:
    cards of 1 to 200 GiB with and without bf16, the batch sizes and label lengths given. What a
    quality guard must cover; the batch split is left out (batch_size None)."""
    seen: dict[tuple, Choice] = {}
    for bf16 in (True, False):
        for gib in range(1, 201):
            gpu = GpuInfo(f"{gib} GiB", gib * GIB, bf16, (9, 0) if bf16 else (7, 5))
            for b in batch_sizes:
                for tokens in label_tokens:
                    c = choose(gpu, b, 1, tokens)
                    seen.setdefault((c.mode.key(), c.precision), replace(c, batch_size=None, grad_accum=None))
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


def train_columns(cfg, env) -> list[tuple]:
    """(seconds, label tokens, timestamped-label tokens) of each corpus's train split in data=, read
    once from the shards' columns (lib.dataset.prepared.clip_lengths: no audio) for decide_pack and
    train_label_tokens."""
    from lib.dataset.prepared import clip_lengths, open_prepared

    return [clip_lengths(*open_prepared(env, corpus.name), "train") for corpus in cfg.corpora()]


def train_label_tokens(cfg, env, columns: list[tuple] | None = None) -> tuple[int, str]:
    """(the longest label row the run's training will see, where that number came from).

    The prepared manifest stores no label lengths, so this reads the `labels` column of every
    train shard (lib.dataset.prepared.label_lengths: no audio; about 4 bytes a token, 10,000 clips of
    50 tokens are 2 MB) of every corpus in data=. The longest, not a percentile: labels are padded
    to the longest of their batch, so the batch holding it sets the peak. train.* options that
    lengthen what the decoder sees are added: timestamps one token, previous-text prompts up to
    lib.train.augment.MAX_PROMPT + 1; at most MAX_LABEL_TOKENS.
    """
    from lib.dataset.prepared import label_lengths, open_prepared
    from lib.whisper import MAX_PROMPT

    t0 = time.time()
    longest = clips = 0
    for j, corpus in enumerate(cfg.corpora()):
        lengths = columns[j][1] if columns is not None else label_lengths(*open_prepared(env, corpus.name), "train")
        clips += len(lengths)
        longest = max(longest, int(lengths.max()) if len(lengths) else 0)
    tokens, added = longest, []
    if cfg.train.timestamp_probability:
        tokens, added = tokens + 1, [*added, "+1 for train.timestamp_probability"]
    if cfg.train.prompt_probability:
        tokens, added = tokens + 1 + MAX_PROMPT, [*added, f"+{1 + MAX_PROMPT} for train.prompt_probability"]
    tokens = min(tokens, MAX_LABEL_TOKENS)
    return tokens, (f"the longest train label of data={cfg.data}, {longest} tokens over {clips} clips (the shards' "
                    f"labels column, read in {time.time() - t0:.1f} s){''.join(f', {a}' for a in added)}")


@dataclass(frozen=True)
class PackChoice:
    """What auto decided for train.pack, and why (logged, and kept in metrics.json's recipe)."""

    pack: bool
    why: str
    label_tokens: int = 0
    """with pack: the longest packed label the run will see (decoder positions), for the memory estimate"""


def decide_pack(cfg, env, columns: list[tuple] | None = None) -> PackChoice:
    """train.pack=true when the median train clip (every corpus of data= together) is under
    PACK_BELOW_SECONDS, unless train.timestamp_probability is set (a packed window is always
    timestamped: the two do not combine). Read from the shards' duration, labels and ts_labels
    columns (no audio); the longest packed label comes from planning each corpus's windows in
    source order, as lib.train.packing plans them in shuffled order (the same limits: 30 s at the
    longest pause and the slowest speed, 448 positions), rounded up to PACK_LABEL_MULTIPLE."""
    import numpy as np

    from lib.train.packing import PackLimits, clip_tokens, plan_windows

    t = cfg.train
    if t.timestamp_probability:
        return PackChoice(False, f"train.timestamp_probability={t.timestamp_probability} is set, and a packed "
                                 f"window is always timestamped: the two do not combine")
    seconds, longest = [], 0
    limits = PackLimits.of(t, PACK_PREFIX)
    for secs, labels, ts in columns if columns is not None else train_columns(cfg, env):
        if not len(secs):
            continue
        seconds.append(secs)
        tokens = clip_tokens(labels, ts, PACK_PREFIX)
        order, starts, _ = plan_windows(secs, tokens, limits)
        longest = max(longest, PACK_PREFIX + int(np.add.reduceat(tokens[order].astype(np.int64), starts[:-1]).max()))
    if not seconds:
        return PackChoice(False, "the train split holds no clips")
    median = float(np.median(np.concatenate(seconds)))
    if median >= PACK_BELOW_SECONDS:
        return PackChoice(False, f"the median train clip is {median:.1f} s (>= {PACK_BELOW_SECONDS:g} s: a 30-s window "
                                 f"holds one or two)")
    if t.prompt_probability:
        longest += 1 + MAX_PROMPT_TOKENS
    tokens = min(MAX_LABEL_TOKENS, -(-longest // PACK_LABEL_MULTIPLE) * PACK_LABEL_MULTIPLE)
    return PackChoice(True, f"the median train clip is {median:.1f} s (< {PACK_BELOW_SECONDS:g} s): one a window "
                            f"would be {100 * (1 - median / 30):.0f} % padding; packed labels up to {tokens} tokens",
                      tokens)


MODE_KEYS = tuple(Choice(WALKTHROUGH, "fp16", "").settings(batch=False))
"""the config keys a mode sets (model.quantization, ..., train.compile), without the batch split"""


def config_settings(cfg, keys) -> dict:
    """A TrainConfig's values of settings() keys ("model.quantization", "train.compile", ...)."""
    sections = {"model": cfg.model, "train": cfg.train}
    return {k: getattr(sections[k.split(".")[0]], k.split(".", 1)[1]) for k in keys}


def _flag_keys(flags: list[str]) -> set[str]:
    from lib.config import parse_override

    def walk(node: dict, prefix: str) -> set[str]:
        keys = set()
        for k, v in node.items():
            keys |= walk(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}"}
        return keys

    return set().union(*(walk(parse_override(f), "") for f in flags))


def apply_auto(cfg, flags: list[str], env=None, probe: Callable[[], GpuInfo | None] | None = None,
               label_tokens: int | None = None):
    """`--recipe auto` on a built TrainConfig: (the config with the choice applied, what was chosen).

    `cfg` was built from the walkthrough recipe and your key=value `flags`; the choice replaces
    the settings your flags did not name (dataclasses.replace, so every section's checks run
    again on the result), so the layers are: defaults < walkthrough recipe < the choice < flags.
    The batch is the exception: train.batch_size x train.grad_accum (flags or recipe) is the
    effective batch, which auto keeps and re-splits, unless your flags name both (then that split
    is kept). label_tokens: the longest label (default: read from the train data, through `env`).
    The figures: the shipped ones, and where `env` is given, the bench's file for this GPU
    (lib.train.measured.for_gpu); the log line says which file each figure came from.
    """
    import dataclasses

    gpu = (probe or detect)()
    named = _flag_keys(flags)
    keep = set(BATCH_KEYS) <= named
    source = None
    packing = columns = None
    if env is not None and "train.pack" not in named:
        columns = train_columns(cfg, env)  # read once: for the packing decision and the longest label
        packing = decide_pack(cfg, env, columns)
        log.info("recipe auto: train.pack=%s because %s (train.pack=%s on the command line decides instead)",
                 str(packing.pack).lower(), packing.why, str(not packing.pack).lower())
    if gpu is not None and label_tokens is None:
        label_tokens, source = train_label_tokens(cfg, env, columns)
        if packing and packing.pack and packing.label_tokens > label_tokens:
            label_tokens, source = packing.label_tokens, f"packed windows ({packing.why})"
    mode_keys = set(MODE_KEYS)
    fixed = config_settings(cfg, sorted(mode_keys & named))
    t = cfg.train
    figures = SHIPPED
    if gpu is not None and env is not None:
        figures = table(measured.for_gpu(gpu.name, env.data_dir))
        for note in figures.notes:
            log.warning("recipe auto: %s", note)
    choice = choose(gpu, t.batch_size, t.grad_accum, label_tokens or MEASURED_LABELS, keep_split=keep, fixed=fixed,
                    figures=figures)
    settings = choice.settings()
    won = [f for f in flags if _flag_keys([f]) & mode_keys]
    split = ""
    if (choice.batch_size, choice.grad_accum) != (t.batch_size, t.grad_accum):
        split = (f"; {t.batch_size} x {t.grad_accum} clips per optimizer step run as {choice.batch_size} x "
                 f"{choice.grad_accum} (the same {t.batch_size * t.grad_accum}; flags naming both train.batch_size "
                 f"and train.grad_accum keep a split)")
    log.info("recipe auto: %s because %s%s%s%s", choice, choice.why, f"; labels: {source}" if source else "", split,
             f"; your flags win: {' '.join(won)}" if won else "")
    section = {"model": {}, "train": {}}
    for key, value in settings.items():
        if key in BATCH_KEYS or key not in named:
            head, name = key.split(".", 1)
            section[head][name] = value
    if packing:
        section["train"]["pack"] = packing.pack
    lr = None
    if (packing.pack if packing else cfg.train.pack) and "train.lr" not in named:
        lr = section["train"]["lr"] = cfg.train.lr * PACK_LR_FACTOR
        log.info("recipe auto: train.lr=%g (%g x the recipe's %g) because the windows are packed: a step holds "
                 "several clips a window (train.lr on the command line decides instead)", lr, PACK_LR_FACTOR,
                 cfg.train.lr)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **section["model"]),
                              train=dataclasses.replace(cfg.train, **section["train"]))
    return cfg, {"settings": settings, "why": choice.why, "your_flags_won": won,
                 "figures": choice.mode.source or None, "label_tokens": choice.label_tokens, "label_source": source,
                 "predicted": {"samples_per_s": choice.samples_per_s, "peak_gib": choice.peak_gib},
                 "pack": {"pack": packing.pack, "why": packing.why} if packing else None, "lr": lr}
