"""Merge a LoRA adapter into its base, check the result, convert to CTranslate2, push to the Hub.

    OUT/                      a standalone transformers model: loads with
                              pipeline("automatic-speech-recognition", model=OUT)
      config.json model.safetensors generation_config.json (language + task set)
      tokenizer*.json processor_config.json preprocessor_config.json
      export.json             what was merged, dtype, verification numbers, fingerprint
    OUT-ct2-int8/             optional CTranslate2 model (faster-whisper / ctranslate2.models.Whisper)

Everything is written to a hidden staging folder next to OUT and moved into place only
after verification passes, so OUT never holds a half-written or unverified model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from lib.errors import UserError
from lib.inference import ONE_WINDOW, features_for
from lib.model import (
    ModelSource,
    attach_adapter,
    load_base,
    load_processor,
)
from lib.whisper import MAX_POSITIONS, SAMPLING_RATE

log = logging.getLogger("whisper_ft")

Dtype = Literal["fp16", "bf16", "fp32"]
MANIFEST = "export.json"
# Teacher-forced logits of the merged model vs base + adapter, as max |diff| / max |logit|.
# Saving in fp16 rounds each weight to ~1e-3 relative, bf16 to ~4e-3; fp32 only reorders sums.
LOGIT_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 5e-2}


def fingerprint(source: ModelSource, dtype: str) -> str:
    """Identifies what an export holds: the adapter weights, the base, the dtype."""
    h = hashlib.sha256(f"{source.base}|{dtype}".encode())
    if source.adapter:
        weights = Path(source.adapter) / "adapter_model.safetensors"
        h.update(weights.read_bytes() if weights.is_file() else source.adapter.encode())
    return h.hexdigest()[:16]


def check_destination(out: Path, fp: str, force: bool) -> None:
    """An OUT holding anything but this same export is never replaced silently."""
    if not out.exists() or not any(out.iterdir()):
        return
    if force:
        log.warning("export: replacing %s (force=true)", out)
        return
    manifest = out / MANIFEST
    held = json.loads(manifest.read_text()).get("fingerprint") if manifest.is_file() else None
    if held == fp:
        log.info("export: %s holds this same export (fingerprint %s); writing it again", out, fp)
        return
    what = f"a different export (fingerprint {held})" if held else "files that are not an export of ours"
    raise UserError(f"{out} already holds {what}: set force=true to replace it, or out= another folder")


def load_float_base(name: str, dtype: Dtype, device: str = "cpu"):
    """The base in a float dtype, whatever quantization it was trained with.

    Why never 8-bit/4-bit: merging computes W + (alpha/r) * B @ A into the base weight. In an
    8-bit base, W is int8 with a per-row scale, so the sum is rounded back to 256 levels per
    row and most of the small LoRA update disappears (tests/export/test_export.py shows the damage);
    and the saved "merged" model would need bitsandbytes to load. The adapter was trained on
    the quantized base, but its update belongs to the float weights the quantization stands for.
    """
    return load_base(name, "none", dtype, base_dtype="compute", device=device).eval()


def merge(source: ModelSource, dtype: Dtype, device: str = "cpu"):
    """base (float) + adapter -> one plain WhisperForConditionalGeneration."""
    if not source.adapter:
        raise UserError("nothing to merge: give run=NAME or adapter=DIR (model= alone is already a full model)")
    base = load_float_base(source.base, dtype, device)
    return merge_into(base, source.adapter, source.base)


def merge_into(base, adapter: str, base_name: str):
    """Attach the adapter to an already loaded float base and fold it in."""
    if getattr(base, "is_quantized", False) or getattr(base, "hf_quantizer", None) is not None:
        raise UserError("refusing to merge into a quantized (8-bit/4-bit) base: load it in fp16/bf16/fp32 "
                        "(see lib.export.merge.load_float_base for why)")
    return attach_adapter(base, adapter, base_name).merge_and_unload().eval()


def save_merged(model, processor, out: Path, language: str, task: str) -> None:
    """save_pretrained of model + processor, with language and task in generation_config.json
    so that a plain pipeline() transcribes in the right language without extra arguments."""
    out.mkdir(parents=True, exist_ok=True)
    gen = model.generation_config
    gen.language, gen.task = language, task
    gen.forced_decoder_ids = None  # deprecated; language/task above are the supported way
    model.save_pretrained(out)
    processor.save_pretrained(out)
    # transformers 5 keeps the feature extractor inside processor_config.json; CTranslate2
    # and older transformers look for preprocessor_config.json, so write it as well.
    processor.feature_extractor.save_pretrained(out)


def _teacher_forced_logits(model, processor, audio, token_ids: list[int]):
    import torch

    device = next(model.parameters()).device
    feats = features_for(processor, [audio], next(model.parameters()).dtype, device)
    ids = torch.tensor([token_ids], device=device)
    with torch.inference_mode():
        return model(input_features=feats, decoder_input_ids=ids).logits.float().cpu()


def compare_models(reference, candidate, processor, clips: Sequence[np.ndarray], language: str, task: str,
                   max_new_tokens: int = 64) -> dict[str, Any]:
    """Transcripts of both models on the clips, and teacher-forced logits on the reference's tokens."""
    from lib.inference import generate_batch
    from lib.metrics import normalize, wer

    ref_texts = generate_batch(reference, processor, clips, language, task, max_new_tokens)
    cand_texts = generate_batch(candidate, processor, clips, language, task, max_new_tokens)
    tok = processor.tokenizer
    tok.set_prefix_tokens(language=language, task=task, predict_timestamps=False)
    worst = 0.0
    from tqdm.auto import tqdm

    # two forward passes a clip: the slow part of the check on a CPU, so it shows progress and an ETA
    for audio, text in tqdm(list(zip(clips, ref_texts, strict=True)), desc="export check: logits", unit="clip"):
        ids = tok(text).input_ids[:-1][:max_new_tokens]  # prefix + text, without <|endoftext|>
        a = _teacher_forced_logits(reference, processor, audio, ids)
        b = _teacher_forced_logits(candidate, processor, audio, ids)
        worst = max(worst, float((a - b).abs().max() / a.abs().max().clamp_min(1e-6)))
    return {
        "clips": len(clips),
        "identical": sum(a == b for a, b in zip(ref_texts, cand_texts, strict=True)),
        "wer_vs_reference": wer([normalize(t) for t in ref_texts], [normalize(t) for t in cand_texts]),
        "max_relative_logit_diff": worst,
        "reference_texts": ref_texts,
        "candidate_texts": cand_texts,
    }


def verify_merged(source: ModelSource, merged_dir: Path, clips: Sequence[np.ndarray], language: str,
                  task: str, dtype: Dtype, max_wer: float, device: str = "cpu",
                  max_new_tokens: int = 64) -> dict[str, Any]:
    """Reload the saved merged model and compare it with base + adapter; UserError if they differ."""
    # fp32 on the CPU (half-precision matmuls there are slow and partial): the merged
    # weights keep their fp16/bf16 rounding, which is what we want to measure.
    run_dtype = "fp32" if device == "cpu" else dtype
    reference = attach_adapter(load_float_base(source.base, run_dtype, device), source.adapter, source.base)
    candidate = load_base(str(merged_dir), "none", run_dtype, base_dtype="compute", device=device).eval()
    processor = load_processor(source.adapter, source.base)
    result = compare_models(reference, candidate, processor, clips, language, task, max_new_tokens)
    tol = LOGIT_TOLERANCE[dtype]
    result.update(max_wer=max_wer, logit_tolerance=tol,
                  passed=result["wer_vs_reference"] <= max_wer and result["max_relative_logit_diff"] <= tol)
    log.info("export: verify merged: %d/%d transcripts identical, WER vs adapter %.2f %%, logit diff %.2e (max %.0e)",
             result["identical"], result["clips"], 100 * result["wer_vs_reference"],
             result["max_relative_logit_diff"], tol)
    if not result["passed"]:
        first = next((i for i, (a, b) in enumerate(zip(result["reference_texts"], result["candidate_texts"],
                                                        strict=True)) if a != b), 0)
        raise UserError(
            f"export verification FAILED: the merged model in {merged_dir} does not behave like "
            f"base + adapter (WER between them {100 * result['wer_vs_reference']:.2f} % > "
            f"{100 * max_wer:.2f} % allowed, or logit diff {result['max_relative_logit_diff']:.2e} > {tol:.0e}). "
            f"Clip {first}: adapter said {result['reference_texts'][first]!r}, merged said "
            f"{result['candidate_texts'][first]!r}. The model was NOT moved into place; try dtype=fp32, "
            f"and check that model= is the base the adapter was trained on"
        )
    return result


def convert_ctranslate2(merged_dir: Path, out: Path, quantization: str) -> None:
    """TransformersConverter on the saved merged folder; its errors become a clear UserError."""
    from importlib.metadata import version

    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    try:
        converter = TransformersConverter(str(merged_dir), copy_files=["tokenizer.json", "preprocessor_config.json"])
        converter.convert(str(out), quantization=quantization, force=True)
    except Exception as e:
        raise UserError(
            f"CTranslate2 {ctranslate2.__version__} could not convert this Whisper saved by transformers "
            f"{version('transformers')}: {type(e).__name__}: {e}. The merged model in {merged_dir} is fine; "
            f"rerun with ctranslate2=none, or convert it with a CTranslate2 release that supports it"
        ) from e


def _text_tokens(ids, tok) -> list[int]:
    """Token ids without special tokens (<|endoftext|> = 50257 and everything above it)."""
    return [int(i) for i in ids if int(i) < tok.eos_token_id]


def hf_tokens(model, processor, clips: Sequence[np.ndarray], language: str, task: str,
              max_new_tokens: int) -> list[list[int]]:
    import torch

    device = next(model.parameters()).device
    feats = features_for(processor, clips, next(model.parameters()).dtype, device)
    with torch.inference_mode():
        out = model.generate(input_features=feats, language=language, task=task, max_new_tokens=max_new_tokens,
                             **ONE_WINDOW)
    return [_text_tokens(row, processor.tokenizer) for row in out]


def ct2_tokens(ct2_dir: Path, processor, clips: Sequence[np.ndarray], language: str, task: str,
               compute_type: str) -> list[list[int]]:
    """Greedy tokens from ctranslate2.models.Whisper on the CPU, with generate()'s prompt."""
    import ctranslate2

    model = ctranslate2.models.Whisper(str(ct2_dir), device="cpu", compute_type=compute_type)
    feats = processor.feature_extractor([np.asarray(c, dtype=np.float32) for c in clips],
                                        sampling_rate=SAMPLING_RATE, return_tensors="np").input_features
    tok = processor.tokenizer
    prompt = tok.convert_tokens_to_ids(["<|startoftranscript|>", f"<|{language}|>", f"<|{task}|>",
                                        "<|notimestamps|>"])
    # CTranslate2 4.8 stops Whisper at max_length // 2 new tokens (OpenAI's sample_len rule),
    # so we leave it the full 448 and cut to the transformers budget when comparing.
    results = model.generate(ctranslate2.StorageView.from_array(np.ascontiguousarray(feats)),
                             [prompt] * len(clips), beam_size=1, max_length=MAX_POSITIONS)
    return [_text_tokens(r.sequences_ids[0], tok) for r in results]


def compare_tokens(ref_ids: list[list[int]], got_ids: list[list[int]], tok, max_new_tokens: int):
    """(reference texts, candidate texts, candidate ids, WER between them) of two runtimes' tokens
    for the same clips: the export checks of CTranslate2 and whisper.cpp against the merged model."""
    from lib.metrics import normalize, wer

    # A transcript cut by the token budget is compared over the same number of tokens.
    got_ids = [g[:len(r)] if len(r) >= max_new_tokens else g for r, g in zip(ref_ids, got_ids, strict=True)]
    ref = [tok.decode(r).strip() for r in ref_ids]
    got = [tok.decode(g).strip() for g in got_ids]
    return ref, got, got_ids, wer([normalize(t) for t in ref], [normalize(t) for t in got])


def verify_ct2(ct2_dir: Path, merged, processor, clips: Sequence[np.ndarray], language: str, task: str,
               quantization: str, max_wer: float, max_new_tokens: int = 64) -> dict[str, Any]:
    """CTranslate2 transcripts vs the merged transformers model's; UserError beyond max_wer."""

    # The CPU has no float16 kernels in CTranslate2: a float16 model runs as float32 here.
    compute_type = "int8" if quantization.startswith("int8") else "float32"
    ref_ids = hf_tokens(merged, processor, clips, language, task, max_new_tokens)
    got_ids = ct2_tokens(ct2_dir, processor, clips, language, task, compute_type)
    ref, got, got_ids, w = compare_tokens(ref_ids, got_ids, processor.tokenizer, max_new_tokens)
    result = {"clips": len(clips), "identical": sum(a == b for a, b in zip(ref, got, strict=True)),
              "wer_vs_merged": w, "max_wer": max_wer, "compute_type": compute_type, "passed": w <= max_wer}
    log.info("export: verify ctranslate2 (%s): %d/%d identical, WER vs merged %.2f %%",
             compute_type, result["identical"], len(clips), 100 * w)
    if not result["passed"]:
        i = next((k for k, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b), 0)
        raise UserError(
            f"CTranslate2 verification FAILED for {ct2_dir}: WER vs the merged model {100 * w:.2f} % > "
            f"{100 * max_wer:.2f} % allowed (clip {i}: merged {ref[i]!r}, ct2 {got[i]!r}); "
            f"try ctranslate2=float16, or raise ct2_max_wer= if int8 drift is acceptable"
        )
    return result


def move_into_place(staging: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
