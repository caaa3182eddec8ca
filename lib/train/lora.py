"""Make a loaded Whisper base trainable with LoRA: freeze it, checkpoint, compile, wrap with PEFT.

    model, base = build_training_model(cfg, plan, token)   # what `make train` trains

Loading (the base, its quantization and dtype) is lib/model.py's, shared with every job;
what is here only training needs. The Whisper, PEFT and bitsandbytes subtleties of training
live here, each with its why-comment: the encoder input-grad hook, reentrant checkpointing
for int8, partial checkpointing, regional compilation, the loss-kwargs opt-out.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import torch

from lib.errors import UserError

log = logging.getLogger("whisper_ft")


def build_training_model(cfg, plan, token: str | None = None):
    """(model, base): cfg.model.base loaded per cfg.model (lib.model.load_base) in plan.precision,
    plan.language and cfg.task set for generation, frozen, checkpointed and compiled per cfg, LoRA
    per cfg.lora. plan: lib.train.config.TrainPlan (lib.train.trainer.check_setup's).

    Seeded first: lora_A's random init must not depend on whatever ran before in this process.
    `base` is the underlying WhisperForConditionalGeneration (its generation config is saved
    with the adapter).
    """
    from transformers import set_seed

    from lib import model as M

    precision = plan.precision
    set_seed(cfg.train.seed)
    t0 = time.time()
    base = M.load_base(cfg.model.base, cfg.model.quantization, precision, cfg.model.base_dtype,
                       token=token, flag="model.base")
    M.set_generation_language(base, plan.language, cfg.task)
    half = precision in ("fp16", "bf16") and cfg.model.int8_half_inputs
    M.set_spec_augment(base, cfg.train.spec_augment, cfg.train.mask_time_prob, cfg.train.mask_feature_prob)
    base = prepare_for_training(base, cfg.model.quantization, cfg.model.gradient_checkpointing,
                                cfg.model.checkpoint_fraction, M.DTYPES[precision] if half else None)
    model = apply_lora(base, cfg.lora)
    if cfg.train.compile == "layers":
        log.info("compile: %d encoder/decoder layers with torch.compile (compiled on their first step)",
                 compile_layers(model))
    trainable, total = count_parameters(model)
    log.info(
        "model: %s, %s, %s, checkpointing %s, loaded in %.0f s; trainable params: %s of %s (%.2f%%)",
        cfg.model.base, cfg.model.quantization, precision,
        "on" if cfg.model.gradient_checkpointing else "off", time.time() - t0,
        f"{trainable:,}", f"{total:,}", 100 * trainable / total,
    )
    return model, base


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


def _input_to(dtype):
    def hook(module, args):
        x, *rest = args
        return (x.to(dtype), *rest) if x.dtype == torch.float32 else None

    return hook


def cast_int8_inputs(model, dtype: torch.dtype) -> int:
    """Hand every 8-bit linear layer its input in `dtype` (the run's fp16 or bf16); returns how
    many layers.

    Why: PEFT's prepare_model_for_kbit_training upcasts layer norms to fp32, so the 8-bit
    layers receive fp32 activations. bitsandbytes' MatMul8bitLt casts them to fp16 for the
    int8 product in forward anyway (its "inputs will be cast from float32 to float16"
    warning), but computes the input gradient in backward in the input's dtype: fp32 matrix
    products on CUDA cores, 0.35 s of a 1.6 s large-v2 step in the H100 profile. With the
    cast in front of the layer the forward is the same and the backward runs in half
    precision; the gradient is cast back to fp32 by autograd at the .to(). The LoRA branch of
    PEFT's wrapper still sees the original fp32 input (the hook is on the base layer).
    Only for a half-precision run: fp16's range needs the Trainer's loss scaling (the
    encoder's input gradients are ~1e-6 and underflow in fp16 without it), bf16 has fp32's.
    """
    import bitsandbytes as bnb

    hook = _input_to(dtype)
    n = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear8bitLt):
            m.register_forward_pre_hook(hook)
            n += 1
    return n


def prepare_for_training(model, quantization: str, gradient_checkpointing: bool, checkpoint_fraction: float = 1.0,
                         int8_input_dtype: torch.dtype | None = None):
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
            enable_checkpointing(model, ckpt_kwargs)
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
    if quantization == "int8" and int8_input_dtype is not None:
        cast_int8_inputs(model, int8_input_dtype)
    return model


def enable_checkpointing(model, kwargs: dict) -> None:
    """Gradient checkpointing on every layer of an unquantized model, by whichever name this
    transformers has for it."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


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
    import functools

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
    """Wrap with LoRA (cfg is lib.train.config.LoraSection); unknown targets -> UserError."""
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
