"""Load a Whisper base (full, 8-bit or 4-bit) and wrap it with LoRA for training.

Checks run before any weights are read: the base is a Whisper model (config.model_type),
the language is one the tokenizer knows, the quantization mode works on this machine,
the precision fits the hardware.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

from lib.errors import UserError

log = logging.getLogger("whisper_ft")


def load_base_config(base: str, token: str | None = None):
    """The base's config.json only (kilobytes): refuse anything that is not Whisper."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(base, token=token)
    except (OSError, ValueError) as e:
        raise UserError(
            f"model.base={base}: cannot read its config ({str(e).splitlines()[0]}); give a local "
            f"Whisper folder or a Hub id such as openai/whisper-large-v2 (gated repos need HF_TOKEN)"
        ) from None
    if getattr(cfg, "model_type", None) != "whisper":
        raise UserError(
            f"model.base={base} is a '{getattr(cfg, 'model_type', '?')}' model, not Whisper: "
            f"set model.base to a Whisper checkpoint, e.g. openai/whisper-large-v2"
        )
    return cfg


def load_processor(base: str, token: str | None = None):
    from transformers import WhisperProcessor

    try:
        return WhisperProcessor.from_pretrained(base, token=token)
    except (OSError, ValueError) as e:
        raise UserError(f"model.base={base}: no Whisper processor/tokenizer there ({e})") from None


def resolve_language(tokenizer, language: str) -> str:
    """Normalise a code or name ('hi', 'Hindi') to the code; unknown -> UserError naming language=."""
    from transformers.models.whisper.tokenization_whisper import LANGUAGES, TO_LANGUAGE_CODE

    lang = language.strip().lower()
    code = lang if lang in LANGUAGES else TO_LANGUAGE_CODE.get(lang)
    if code is None or tokenizer.convert_tokens_to_ids(f"<|{code}|>") in (None, tokenizer.unk_token_id):
        raise UserError(
            f"language={language!r} is not a Whisper language; use a code such as hi, de, ta, sw "
            f"(known: {', '.join(sorted(LANGUAGES))})"
        )
    return code


def resolve_precision(precision: str) -> str:
    """auto -> bf16 on GPUs that support it (Ampere+), fp16 on older GPUs (T4, V100), fp32 on CPU.

    including_emulation=False: torch otherwise answers yes on a T4/V100, where bf16 is emulated
    and far slower than fp16.
    """
    cuda = torch.cuda.is_available()
    if precision == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if precision == "fp16" and not cuda:
        raise UserError(
            "model.precision=fp16 needs a CUDA GPU and none is visible: "
            "use model.precision=auto (fp32 on CPU) or fp32"
        )
    if precision == "bf16" and not cuda:
        # Allowed when asked for by name: CPU autocast does bf16, slowly on most CPUs. It is how
        # the bf16 numerics of the fast recipes are checked on real weights without a GPU
        # (jobs/bench_quality.py cpu_bf16=true).
        log.warning("model.precision=bf16 on a CPU: bf16 autocast on the CPU, for checking numerics; "
                    "slower than fp32 on most CPUs (model.precision=auto picks fp32)")
        return precision
    if precision == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise UserError("model.precision=bf16: this GPU has no bf16 (e.g. T4); use fp16 or auto")
    return precision


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def check_quantization(quantization: str) -> None:
    """int8 / nf4 need bitsandbytes with a backend for this device; test one tiny layer."""
    if quantization == "none":
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        import bitsandbytes as bnb

        with torch.no_grad():
            if quantization == "int8":
                layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False).to(device)
                x = torch.randn(2, 64, device=device, dtype=torch.float16)
            else:
                layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4", compute_dtype=torch.float32).to(device)
                x = torch.randn(2, 64, device=device)
            layer(x)
    except Exception as e:  # ImportError, missing native library, unsupported device
        raise UserError(
            f"model.quantization={quantization}: bitsandbytes does not work on this machine ({device}): "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; "
            f"use model.quantization=none (more memory) or run on a CUDA GPU"
        ) from None


def quantization_config(quantization: str, compute_dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "nf4":
        # QLoRA: NF4 storage, double-quantised constants (~0.4 bit/param saved), matmuls in compute_dtype.
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    return None


class _Once(logging.Filter):
    """Let each distinct message through once, then say that repeats are dropped.

    Why: bitsandbytes' MatMul8bitLt logs "inputs will be cast from torch.float32 to float16"
    on every call of every 8-bit layer, not once: 66,592 lines in a 10-step large-v2 run
    (6.7 MB of log), which buries everything else in a real run's log.
    """

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        record.msg, record.args = f"{msg} (logged once; repeats dropped)", None
        return True


def quiet_repeated_bitsandbytes_warnings() -> None:
    lg = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Once) for f in lg.filters):
        lg.addFilter(_Once())


def load_base_model(base: str, quantization: str, precision: str, token: str | None = None,
                    base_dtype: str = "fp32"):
    """WhisperForConditionalGeneration, quantized per `quantization`; precision already resolved.

    base_dtype (quantization=none only): "fp32" keeps fp32 weights with AMP casting per op,
    the configuration measured in the README's GPU table; "compute" stores the frozen base
    in the compute dtype, half the memory (large-v2: 6.2 -> 3.1 GB) and no per-op weight
    cast. The trainable LoRA weights stay fp32 either way (PEFT's autocast_adapter_dtype).
    """
    from transformers import WhisperForConditionalGeneration

    compute = DTYPES[precision]
    kwargs: dict[str, Any] = {"token": token}
    if quantization == "none":
        kwargs["dtype"] = compute if base_dtype == "compute" else torch.float32
    else:
        quiet_repeated_bitsandbytes_warnings()
        kwargs["quantization_config"] = quantization_config(quantization, compute)
        kwargs["dtype"] = compute
        # bitsandbytes quantizes while loading, onto one device: this process's GPU (torchrun
        # sets LOCAL_RANK per process), or the CPU.
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", 0)) if torch.cuda.is_available() else "cpu"}
    return WhisperForConditionalGeneration.from_pretrained(base, **kwargs)


def _require_grad_on_encoder_input(module, inputs, output):
    output.requires_grad_(True)


def _features_to_conv_dtype(module, args):
    """Cast the log-mel features (fp32 from the collator) to encoder conv1's weight dtype.

    Why: with a half-precision base (model.base_dtype=compute) the Trainer's bf16/fp16 step
    can run conv1 outside autocast, and conv1d refuses fp32 input with a bf16 bias (seen on
    an H100: "Input type (float) and bias type (c10::BFloat16) should be the same"). A no-op
    for fp32 and quantized bases, whose conv1 is fp32.
    """
    x, *rest = args
    return (x.to(module.weight.dtype), *rest) if x.dtype != module.weight.dtype else None


def add_encoder_input_grad_hook(model):
    """Make encoder conv1's output require grad.

    Why: with the base frozen, nothing entering the encoder requires grad. Reentrant
    activation checkpointing (torch.utils.checkpoint use_reentrant=True) then sees inputs
    without grad and drops the gradient of everything inside the checkpointed layers, so
    encoder LoRA weights silently never train. transformers' enable_input_require_grads()
    only hooks get_input_embeddings(), which for Whisper is the *decoder* token embedding,
    not the audio path. We use non-reentrant checkpointing (no such problem), and keep this
    hook so that a reentrant setting (older torch/PEFT defaults) stays correct.
    """
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else model.model.encoder
    encoder.conv1.register_forward_pre_hook(_features_to_conv_dtype)
    return encoder.conv1.register_forward_hook(_require_grad_on_encoder_input)


def prepare_for_training(model, quantization: str, gradient_checkpointing: bool, checkpoint_fraction: float = 1.0):
    """Freeze the base, upcast what must be fp32, turn on (non-reentrant) checkpointing
    for `checkpoint_fraction` of the encoder and decoder layers (see select_checkpointed)."""
    from peft import prepare_model_for_kbit_training

    # Non-reentrant checkpointing frees what autograd saved with save_for_backward; but
    # bitsandbytes' MatMul8bitLt keeps its input on ctx (ctx.tensors = (CAt, subA, A)), out of
    # reach of those hooks, so under int8 every linear's input (fp32 after PEFT's upcast)
    # lives until backward and checkpointing saves little: 17.6 GiB on an H100 (large-v2,
    # batch 8) against 5.4 for the reentrant walkthrough loop. Reentrant checkpointing runs
    # the forward under no_grad, so nothing is stashed. Measured on the CPU (base-size model,
    # batch 4, 30 s, extra RSS in forward+backward): int8 2221 MiB non-reentrant, 1078 MiB
    # reentrant, 2584 MiB without checkpointing; identical LoRA gradients. The encoder input
    # hook below makes reentrant checkpointing see an input that requires grad.
    ckpt_kwargs = {"use_reentrant": quantization == "int8"}
    if quantization != "none":
        # PEFT freezes the base, upcasts the non-quantized parameters (layer norms, conv,
        # embeddings) to fp32 and turns checkpointing on. Kept as PEFT does it: a run that
        # routed it through activation_checkpointing_enable instead measured slower and
        # larger on an H100 (nf4, large-v2, batch 8: 6.2 samples/s at 5.9 GiB vs 8.0 at
        # 4.3 GiB), though that run also used 8 dataloader workers instead of 2.
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs=ckpt_kwargs,
        )
    else:
        for p in model.parameters():
            p.requires_grad_(False)
        if gradient_checkpointing:
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=ckpt_kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=ckpt_kwargs)
    if gradient_checkpointing:
        model.config.use_cache = False  # the KV cache is useless in training and clashes with checkpointing
        if checkpoint_fraction < 1:
            select_checkpointed(model, checkpoint_fraction)
    # Whisper's forward takes **kwargs, so Trainer assumes it honours num_items_in_batch and
    # then multiplies the loss by the number of processes (and skips dividing by grad_accum).
    # Whisper ignores it (plain mean cross-entropy): with 2 processes the loss and gradient
    # came out 2x, and grad clipping fired at half the real norm. Opt out (Trainer's own knob).
    model.accepts_loss_kwargs = False
    add_encoder_input_grad_hook(model)
    return model


def select_checkpointed(model, fraction: float) -> int:
    """Keep checkpointing on `fraction` of each layer stack, evenly spaced; returns how many.

    Why: checkpointing trades a second forward for memory, layer by layer. Most of the
    memory is in the encoder's 1,500 positions, so a card with room for a few layers'
    activations runs those layers once and recomputes only the rest: the step costs
    1 + fraction/2 forward-and-backwards' worth of compute in between the two settings.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    whisper = model.model if hasattr(model, "model") else model
    on = 0
    for stack in (whisper.encoder.layers, whisper.decoder.layers):
        layers = [m for m in stack if isinstance(m, GradientCheckpointingLayer)]
        for i, layer in enumerate(layers):
            # layer i is checkpointed when the running count floor((i+1) f) steps up at it
            keep = int((i + 1) * fraction) > int(i * fraction)
            layer.gradient_checkpointing = keep and layer.gradient_checkpointing
            on += bool(layer.gradient_checkpointing)
    return on


def check_compiler(mode: str) -> None:
    """torch.compile needs a C compiler at run time: Triton builds its launcher with one on a
    GPU, inductor's CPU code is C++. Fail before loading weights, naming the flag."""
    import shutil

    cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if not cc or not shutil.which(cc):
        raise UserError(
            f"train.compile={mode} needs a C compiler (torch.compile's Triton/C++ code is built on first use) "
            f"and none was found (CC, cc, gcc, clang): install gcc, or set train.compile=none (slower steps)"
        )


def compile_layers(model) -> int:
    """torch.compile each encoder and decoder layer in place (regional compilation); returns how many.

    Why per layer: the 32 + 32 layers of large-v2 share code, so one compiled graph serves
    each stack (parameters are graph inputs), and compiling takes about a minute where the
    whole model took longer than ten; the fused kernels are where the time goes (layer
    norm, residual adds, GELU, LoRA dropout between the matrix products).

    A checkpointed layer gets its body compiled and the checkpoint left outside, in eager
    mode: compiling transformers' checkpointing wrapper (the checkpoint traced into the
    graph) failed on an H100 with torch 2.11 in the decoder layers ("Node add_461 was
    invalid, but is output", inductor's partitioner), while torch 2.13 on the CPU compiled it.
    """
    import functools
    import types

    from transformers.modeling_layers import GradientCheckpointingLayer

    n = 0
    for m in model.modules():
        if not isinstance(m, GradientCheckpointingLayer):
            continue
        body = getattr(type(m).forward, "__wrapped__", None)  # forward without the checkpointing wrapper
        if m.gradient_checkpointing and body is not None:
            m.forward = functools.partial(_checkpoint_compiled, m, torch.compile(types.MethodType(body, m)))
        else:
            m.compile()
        n += 1
    return n


def _checkpoint_compiled(layer, compiled, *args, **kwargs):
    """A checkpointed layer's forward: eager checkpoint (the layer's own settings, e.g.
    non-reentrant) around the compiled body; plain compiled body in eval/generation.

    Keyword arguments are bound into the function, the checkpoint gets only the positional
    ones, as transformers' own wrapper does: reentrant checkpointing (int8, see
    prepare_for_training) refuses keyword arguments ("Unexpected keyword arguments: use_cache")
    and only passes gradients to positional tensors, which is why Whisper's layers take
    hidden_states and encoder_hidden_states positionally. The cache is dropped as there:
    the recompute in backward would write it a second time.
    """
    if layer.gradient_checkpointing and layer.training and torch.is_grad_enabled():
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        if kwargs.get("cache") is not None and not getattr(layer, "_can_checkpoint_with_cache", False):
            kwargs["cache"] = None
        return layer._gradient_checkpointing_func(functools.partial(compiled, **kwargs), *args)
    return compiled(*args, **kwargs)


def lora_config(r: int, alpha: int, dropout: float, target_modules: list[str]):
    """PEFT LoraConfig. No task_type: SEQ_2_SEQ_LM wraps Whisper in a class whose forward
    passes input_ids, which Whisper does not take."""
    from peft import LoraConfig

    targets: Any = "all-linear" if target_modules == ["all-linear"] else list(target_modules)
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", target_modules=targets)


def apply_lora(model, cfg):
    """Wrap with LoRA (cfg is lib.train_config.LoraSection); unknown targets -> UserError."""
    from peft import get_peft_model

    try:
        return get_peft_model(model, lora_config(cfg.r, cfg.alpha, cfg.dropout, cfg.target_modules))
    except ValueError as e:
        raise UserError(
            f"lora.target_modules={','.join(cfg.target_modules)}: {str(e).splitlines()[0]} "
            f"(Whisper has q_proj, k_proj, v_proj, out_proj, fc1, fc2; or use all-linear)"
        ) from None


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; 4-bit packed weights count as stored elements x 2."""
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if p.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored uint8
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def set_generation_language(model, language: str, task: str) -> None:
    """Generation (eval WER, and whoever loads the adapter) decodes in `language`, not auto-detect."""
    gen = model.generation_config
    gen.language = language
    gen.task = task
    gen.forced_decoder_ids = None  # the old way; with language/task set, generate() builds the prompt
    if hasattr(model.config, "forced_decoder_ids"):
        model.config.forced_decoder_ids = None
