"""whisper.cpp export: write a transformers Whisper as a GGML model file, check it in whisper.cpp.

The file (ggml-model-<type>.bin) is whisper.cpp's own legacy format, the one its
`models/ggml-*.bin` downloads use, read by whisper_model_load in whisper.cpp's
src/whisper.cpp. Written here from that loader's reads, little-endian throughout:

    uint32 magic 0x67676d6c ("ggml")
    int32  n_vocab n_audio_ctx n_audio_state n_audio_head n_audio_layer
           n_text_ctx n_text_state n_text_head n_text_layer n_mels ftype
    int32  n_mel n_fft, then n_mel x n_fft float32   the log-mel filter bank
    int32  n, then n x (uint32 len, len bytes)      the byte-level BPE tokens 0..n-1
                                                    (the loader names the special ones itself)
    per tensor: int32 n_dims, int32 name_len, int32 type, n_dims x int32 ne (fastest first),
                name, data                          (no padding between tensors)

Tensor names are OpenAI's (encoder.blocks.0.attn.query.weight), not transformers'.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import struct
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lib.errors import UserError
from lib.whisper import ENCODER_POSITIONS, SAMPLING_RATE

log = logging.getLogger("whisper_ft")

# No f32: whisper.cpp 1.8.5 (pywhispercpp 1.5.1) loads an f32 file but its CPU convolution
# aborts on an f32 kernel (GGML_ASSERT(src0->type == GGML_TYPE_F16) in ops.cpp), and the
# loader allocates the kernels in f32 for an f32 file, so there is no f32 file it can run.
GgmlType = Literal["f16", "q8_0", "q5_0"]
MAGIC = 0x67676D6C
# ggml's type ids (enum ggml_type) and whole-file types (enum ggml_ftype) for each choice.
TENSOR_TYPE = {"f32": 0, "f16": 1, "q5_0": 6, "q8_0": 8}
FILE_TYPE = {"f16": 1, "q8_0": 7, "q5_0": 8}
# The loader splits ftype into qntvr * 1000 + ftype; quantized files carry ggml's
# quantization version (2 since 2023), float files 0.
QNT_VERSION, QNT_VERSION_FACTOR = 2, 1000
MIN_SAMPLES = SAMPLING_RATE * 105 // 100  # whisper.cpp decodes nothing under 100 mel frames (1 s)
QK = 32  # values per quantization block (q8_0 and q5_0)


def file_name(ggml_type: str) -> str:
    return f"ggml-model-{ggml_type}.bin"


# --- names and shapes -------------------------------------------------------------------

_LAYER_PARTS = {
    "self_attn.q_proj": "attn.query", "self_attn.k_proj": "attn.key", "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out", "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query", "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value", "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "fc1": "mlp.0", "fc2": "mlp.2", "final_layer_norm": "mlp_ln",
}
_TOP = {
    "model.encoder.conv1": "encoder.conv1", "model.encoder.conv2": "encoder.conv2",
    "model.encoder.embed_positions": "encoder.positional_embedding",
    "model.encoder.layer_norm": "encoder.ln_post",
    "model.decoder.embed_tokens": "decoder.token_embedding",
    "model.decoder.embed_positions": "decoder.positional_embedding",
    "model.decoder.layer_norm": "decoder.ln",
}
_LAYER = re.compile(r"model\.(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")


def ggml_name(hf_name: str) -> str | None:
    """whisper.cpp's name for a transformers state-dict key; None for proj_out (whisper.cpp
    computes the logits with the token embedding, so proj_out must be tied to it: checked)."""
    if hf_name == "proj_out.weight":
        return None
    m = _LAYER.match(hf_name)
    if m:
        stack, i, part, kind = m.groups()
        if part not in _LAYER_PARTS:
            raise UserError(f"whisper.cpp has no place for the weight {hf_name}: this is not a standard Whisper")
        return f"{stack}.blocks.{i}.{_LAYER_PARTS[part]}.{kind}"
    stem, _, kind = hf_name.rpartition(".")
    if stem not in _TOP:
        raise UserError(f"whisper.cpp has no place for the weight {hf_name}: this is not a standard Whisper")
    # The position tables are bare tensors in OpenAI's naming, not modules with a .weight.
    return _TOP[stem] if stem.endswith("embed_positions") else f"{_TOP[stem]}.{kind}"


def tensor_type(name: str, ndim: int, ggml_type: str) -> str:
    """What whisper_model_load allocates for each tensor (it checks the byte count, so this
    must match exactly): 2-D matrices and the token embedding in the file's type; the conv
    kernels (3-D) in f16; biases (conv biases as [1, n_state]), norms, position tables in f32."""
    if ndim == 1 or name.endswith("positional_embedding") or (name.startswith("encoder.conv") and ndim == 2):
        return "f32"
    if ndim == 3:
        return "f16"
    return ggml_type


def check_supported(config) -> None:
    """whisper.cpp hard-codes parts of OpenAI's architecture; a config outside them loads
    into the wrong shapes, so it is refused here with the field that differs."""
    problems = []
    for side, state, ffn in (("encoder", config.d_model, config.encoder_ffn_dim),
                             ("decoder", config.d_model, config.decoder_ffn_dim)):
        if ffn != 4 * state:
            problems.append(f"{side}_ffn_dim={ffn} (whisper.cpp assumes 4 x d_model = {4 * state})")
    if config.max_source_positions != ENCODER_POSITIONS:
        problems.append(f"max_source_positions={config.max_source_positions} (whisper.cpp feeds 30 s = {ENCODER_POSITIONS} positions)")
    if config.activation_function != "gelu":
        problems.append(f"activation_function={config.activation_function} (whisper.cpp uses gelu)")
    if getattr(config, "scale_embedding", False):
        problems.append("scale_embedding=true (whisper.cpp does not scale the token embedding)")
    if problems:
        raise UserError("this Whisper cannot be written for whisper.cpp: " + "; ".join(problems)
                        + ". Export with ggml=none")


# --- quantization (ggml's reference block formats) --------------------------------------

def quantize_q8_0(x: np.ndarray) -> bytes:
    """Blocks of 32 values: fp16 scale d = max|x| / 127, then 32 int8 round(x / d)."""
    blocks = x.astype(np.float32).reshape(-1, QK)
    d = np.abs(blocks).max(axis=1) / 127.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d > 0)
    q = np.round(blocks * inv[:, None]).astype(np.int8)
    out = np.empty(len(blocks), dtype=[("d", "<f2"), ("qs", "i1", QK)])
    out["d"], out["qs"] = d.astype(np.float16), q
    return out.tobytes()


def quantize_q5_0(x: np.ndarray) -> bytes:
    """Blocks of 32 values: fp16 scale d = m / -16 where m is the value of largest magnitude
    (sign kept), q = clamp(floor(x / d + 16.5), 0, 31) so that x ~ (q - 16) * d; the low 4
    bits of value j and j + 16 share byte j of qs, the 5th bits go into the 32-bit qh."""
    blocks = x.astype(np.float32).reshape(-1, QK)
    m = blocks[np.arange(len(blocks)), np.abs(blocks).argmax(axis=1)]
    d = m / -16.0
    inv = np.divide(1.0, d, out=np.zeros_like(d), where=d != 0)
    q = np.clip(np.floor(blocks * inv[:, None] + 16.5), 0, 31).astype(np.uint32)
    lo, hi = q[:, :16], q[:, 16:]
    qs = ((lo & 0x0F) | ((hi & 0x0F) << 4)).astype(np.uint8)
    qh = ((q >> 4) & 1) << np.arange(QK, dtype=np.uint32)
    out = np.empty(len(blocks), dtype=[("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])
    out["d"], out["qh"], out["qs"] = d.astype(np.float16), qh.sum(axis=1, dtype=np.uint32), qs
    return out.tobytes()


def dequantize(data: bytes, kind: str) -> np.ndarray:
    """The inverse of the two packers above (tests use it to check a round trip)."""
    if kind == "q8_0":
        b = np.frombuffer(data, dtype=[("d", "<f2"), ("qs", "i1", QK)])
        return (b["qs"].astype(np.float32) * b["d"].astype(np.float32)[:, None]).ravel()
    b = np.frombuffer(data, dtype=[("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])
    lo = np.concatenate([b["qs"] & 0x0F, b["qs"] >> 4], axis=1).astype(np.int32)
    high = (b["qh"][:, None] >> np.arange(QK, dtype=np.uint32)) & 1
    q = lo | (high.astype(np.int32) << 4)
    return ((q - 16).astype(np.float32) * b["d"].astype(np.float32)[:, None]).ravel()


def encode(x: np.ndarray, kind: str) -> bytes:
    if kind == "f32":
        return x.astype("<f4").tobytes()
    if kind == "f16":
        return x.astype("<f2").tobytes()
    if x.shape[-1] % QK:
        raise UserError(f"{kind} needs rows of a multiple of {QK} values, this model has {x.shape[-1]}: use ggml=f16")
    return quantize_q8_0(x) if kind == "q8_0" else quantize_q5_0(x)


# --- the tokenizer's bytes --------------------------------------------------------------

def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE (GPT-2, Whisper) spells each byte as a printable character: bytes that
    are printable stay themselves, the other 68 are shifted to 256 + n in order. whisper.cpp
    stores the raw bytes, so tokens that are half of a UTF-8 character survive."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def token_bytes(tokenizer) -> list[bytes]:
    """Raw bytes of every ordinary token, ids 0 .. <|endoftext|> - 1."""
    dec = _byte_decoder()
    out = []
    for tok in tokenizer.convert_ids_to_tokens(list(range(tokenizer.eos_token_id))):
        try:
            out.append(bytes(dec[c] for c in tok))
        except KeyError as e:
            raise UserError(f"token {tok!r} is not byte-level BPE: whisper.cpp needs Whisper's own tokenizer") from e
    return out


# --- the writer -------------------------------------------------------------------------

def write_ggml(model, processor, path: Path, ggml_type: GgmlType) -> dict[str, Any]:
    """Write the (merged, float) transformers Whisper `model` to `path` in whisper.cpp's format."""
    import torch

    config = model.config
    check_supported(config)
    state = {k: v.detach().to("cpu", torch.float32).numpy() for k, v in model.state_dict().items()}
    if "proj_out.weight" in state and not np.array_equal(state["proj_out.weight"],
                                                         state["model.decoder.embed_tokens.weight"]):
        raise UserError("proj_out is not tied to the token embedding; whisper.cpp computes logits with the "
                        "embedding, so this model cannot be exported to it (ggml=none)")
    tok = processor.tokenizer
    words = token_bytes(tok)
    filters = np.asarray(processor.feature_extractor.mel_filters, dtype=np.float32).T  # (201, 80) -> (80, 201)
    if filters.shape[0] != config.num_mel_bins:
        raise UserError(f"the feature extractor has {filters.shape[0]} mel bins, the model {config.num_mel_bins}")
    ftype = FILE_TYPE[ggml_type] + (QNT_VERSION * QNT_VERSION_FACTOR if ggml_type.startswith("q") else 0)
    hparams = [config.vocab_size, config.max_source_positions, config.d_model, config.encoder_attention_heads,
               config.encoder_layers, config.max_target_positions, config.d_model, config.decoder_attention_heads,
               config.decoder_layers, config.num_mel_bins, ftype]
    counts = {"f32": 0, "f16": 0, "q8_0": 0, "q5_0": 0}
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(struct.pack("<I", MAGIC))
        f.write(struct.pack("<11i", *hparams))
        f.write(struct.pack("<2i", *filters.shape))
        f.write(filters.astype("<f4").tobytes())
        f.write(struct.pack("<i", len(words)))
        for w in words:
            f.write(struct.pack("<I", len(w)) + w)
        for hf_name, x in state.items():
            name = ggml_name(hf_name)
            if name is None:
                continue
            if name in ("encoder.conv1.bias", "encoder.conv2.bias"):
                x = x.reshape(-1, 1)  # whisper.cpp adds it as a [1, n_state] column to the conv output
            kind = tensor_type(name, x.ndim, ggml_type)
            raw = name.encode()
            f.write(struct.pack("<3i", x.ndim, len(raw), TENSOR_TYPE[kind]))
            f.write(struct.pack(f"<{x.ndim}i", *reversed(x.shape)))  # ggml's ne[0] is numpy's last axis
            f.write(raw)
            f.write(encode(x, kind))
            counts[kind] += 1
    size = path.stat().st_size
    log.info("export: whisper.cpp %s model %s (%.1f MB; tensors %s)", ggml_type, path, size / 1e6,
             ", ".join(f"{k} {v}" for k, v in counts.items() if v))
    return {"path": str(path), "type": ggml_type, "bytes": size, "tensors": {k: v for k, v in counts.items() if v}}


# --- whisper.cpp's own runtime ----------------------------------------------------------

@contextlib.contextmanager
def captured_stderr():
    """whisper.cpp logs every load and decode (dozens of lines) to file descriptor 2 from C,
    past Python's sys.stderr: catch them at the descriptor, to quote when something fails."""
    sys.stderr.flush()
    saved = os.dup(2)
    buf = io.StringIO()
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield buf
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            buf.write(tmp.read().decode("utf-8", "replace"))


def whispercpp_tokens(path: Path, clips: Sequence[np.ndarray], language: str, task: str,
                      suppress_nst: bool, max_tokens: int, n_threads: int = 2) -> list[list[int]]:
    """Greedy text tokens of each clip from whisper.cpp (pywhispercpp's bundled build), which
    computes its own log-mel from the PCM with the file's filter bank, as on a device.

    Settings chosen to decode what transformers' generate() decodes: temperature 0 and no
    temperature fallback (whisper.cpp's default retries a low-confidence window at 0.2, 0.4,
    ..., sampling: a different decoder, not a different model); no timestamps; one window,
    no previous-text prompt; non-speech tokens suppressed when the generation config
    suppresses them (suppress_tokens); at most max_tokens per clip (a model that never says
    <|endoftext|> otherwise runs to 220 tokens: 12 s a clip even for a 2-layer model)."""
    import _pywhispercpp as pw

    with captured_stderr() as logged:
        ctx = pw.whisper_init_from_file_with_params(str(path), pw.whisper_context_default_params())
    if ctx is None:
        tail = "\n".join(logged.getvalue().splitlines()[-6:])
        raise UserError(f"whisper.cpp could not load {path}; its log ends:\n{tail}")
    try:
        params = pw.whisper_full_default_params(pw.WHISPER_SAMPLING_GREEDY)
        settings = dict(n_threads=n_threads, language=language, translate=task == "translate", no_context=True,
                        no_timestamps=True, single_segment=True, print_progress=False, print_realtime=False,
                        print_timestamps=False, print_special=False, temperature=0.0, temperature_inc=0.0, max_tokens=max_tokens,
                        suppress_blank=True, suppress_nst=suppress_nst)
        for k, v in settings.items():
            setattr(params, k, v)
        params.greedy = {"best_of": 1}
        eot = pw.whisper_token_eot(ctx)
        out = []
        for clip in clips:
            # whisper.cpp skips input under 1 s ("input is too short") and returns nothing;
            # trailing silence changes nothing for the model, whose window is zero-padded to
            # 30 s anyway (transformers pads the same way), so short clips get it here.
            audio = np.zeros(max(len(clip), MIN_SAMPLES), dtype=np.float32)
            audio[:len(clip)] = clip
            with captured_stderr():
                rc = pw.whisper_full(ctx, params, audio, audio.size)
            if rc != 0:
                raise UserError(f"whisper.cpp failed to transcribe a clip with {path} (whisper_full returned {rc})")
            ids = [pw.whisper_full_get_token_id(ctx, s, j)
                   for s in range(pw.whisper_full_n_segments(ctx)) for j in range(pw.whisper_full_n_tokens(ctx, s))]
            # whisper.cpp stops a segment one token past max_tokens (measured: 13 for 12).
            out.append([int(i) for i in ids if int(i) < eot][:max_tokens])
        return out
    finally:
        pw.whisper_free(ctx)


def _suppresses_non_speech(model) -> bool:
    return bool(getattr(model.generation_config, "suppress_tokens", None))


def verify_ggml(path: Path, merged, processor, clips: Sequence[np.ndarray], language: str, task: str,
                max_wer: float, max_new_tokens: int = 64) -> dict[str, Any]:
    """whisper.cpp transcripts vs the merged transformers model's; UserError beyond max_wer."""
    from lib.export.merge import compare_tokens, hf_tokens

    ref_ids = hf_tokens(merged, processor, clips, language, task, max_new_tokens)
    got_ids = whispercpp_tokens(path, clips, language, task, _suppresses_non_speech(merged), max_new_tokens)
    ref, got, got_ids, w = compare_tokens(ref_ids, got_ids, processor.tokenizer, max_new_tokens)
    result = {"clips": len(clips), "identical": sum(a == b for a, b in zip(ref, got, strict=True)),
              "identical_tokens": sum(a == b for a, b in zip(ref_ids, got_ids, strict=True)),
              "wer_vs_merged": w, "max_wer": max_wer, "passed": w <= max_wer}
    log.info("export: verify whisper.cpp: %d/%d transcripts identical, WER vs merged %.2f %% (max %.0f %%)",
             result["identical"], len(clips), 100 * w, 100 * max_wer)
    if not result["passed"]:
        i = next((k for k, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b), 0)
        raise UserError(
            f"whisper.cpp verification FAILED for {path}: WER vs the merged model {100 * w:.2f} % > "
            f"{100 * max_wer:.2f} % allowed (clip {i}: merged {ref[i]!r}, whisper.cpp {got[i]!r}). "
            f"The file was NOT moved into place; try ggml=f16 (quantization drifts more), "
            f"or raise ggml_max_wer= if the drift is acceptable"
        )
    return result

