"""Transcribe in batches with a loaded Whisper (lib/model.py loads it), and time generation.

Language and task are always forced at generation (`generate(language=, task=)`), never
left to Whisper's language detection: a fine-tuned Hindi model asked to detect the
language of a short clip sometimes answers Urdu and transcribes in the wrong script.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from lib.audio import SAMPLING_RATE, WINDOW_SECONDS

log = logging.getLogger("whisper_ft")

def features_for(processor, audios: Sequence[np.ndarray], dtype, device, on_device: bool = False):
    """Log-mel features of the clips as the model's input. on_device: compute them on the
    model's GPU (torch STFT) rather than on the CPU (lib.collator.log_mel, as the training
    collator does); the speed comparison uses it so that both of its legs time generation."""
    clips = [np.asarray(a, dtype=np.float32) for a in audios]
    if on_device and str(device).startswith("cuda"):
        feats = processor.feature_extractor(clips, sampling_rate=SAMPLING_RATE, return_tensors="pt",
                                            device=str(device)).input_features
    else:
        from lib.collator import log_mel

        feats = log_mel(processor.feature_extractor, clips)
    return feats.to(device=device, dtype=dtype)


def _model_dtype(model):
    import torch

    for p in model.parameters():
        if p.dtype.is_floating_point and p.dtype != torch.float32:
            return p.dtype
    return torch.float32


class _DropMaxLengthNotice(logging.Filter):
    """Whisper checkpoints carry max_length=448, so every generate(max_new_tokens=) call warns
    that both are set (max_new_tokens wins, which is what we want): once per batch is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "seem to have been set. `max_new_tokens` will take precedence" not in record.getMessage()


logging.getLogger("transformers.generation.utils").addFilter(_DropMaxLengthNotice())


# Whisper's decoder has 448 positions; generate() starts from the 4-token prompt
# <|startoftranscript|><|lang|><|task|><|notimestamps|>, which leaves 444 new tokens.
MAX_POSITIONS, PROMPT_TOKENS = 448, 4
MAX_NEW_TOKENS = MAX_POSITIONS - PROMPT_TOKENS


def decode_budget(label_lengths: Sequence[int], prompt_tokens: int = PROMPT_TOKENS,
                  max_positions: int = MAX_POSITIONS) -> int:
    """New tokens to generate for a split: its longest label plus a margin, capped at what the
    model can emit.

    Why not a fixed 225 (the walkthrough's): Whisper spends about 5 tokens per Hindi word, so a
    30-s Hindi segment (about 75 words) needs about 390; cut at 225, the missing words count as
    deletions in every WER. A label is prompt + text + <|endoftext|>, so it needs
    len - prompt new tokens; the margin (25 % + 8) leaves a hypothesis room to be longer than
    its reference, which WER should see rather than a cut.
    """
    need = max((int(n) for n in label_lengths), default=prompt_tokens) - prompt_tokens
    return max(16, min(max_positions - prompt_tokens, int(need * 1.25) + 8))


def generate_batch(model, processor, audios: Sequence[np.ndarray], language: str, task: str,
                   max_new_tokens: int = MAX_NEW_TOKENS, num_beams: int = 1, min_new_tokens: int = 0,
                   features_on_device: bool = False, return_truncated: bool = False):
    """Transcripts of up to 30-s clips, language and task forced, special tokens removed.
    min_new_tokens forces that many tokens (timing random weights, which stop at random).
    return_truncated: also a flag per clip, true when its hypothesis ran out of tokens
    (max_new_tokens reached with no <|endoftext|>: the end of what was said is missing)."""
    import torch

    device = next(model.parameters()).device
    feats = features_for(processor, audios, _model_dtype(model), device, features_on_device)
    extra = {"min_new_tokens": min_new_tokens} if min_new_tokens else {}
    with torch.inference_mode():
        tokens = model.generate(
            input_features=feats, language=language, task=task, max_new_tokens=max_new_tokens,
            num_beams=num_beams, **extra,
        )
    texts = [t.strip() for t in processor.batch_decode(tokens, skip_special_tokens=True)]
    if not return_truncated:
        return texts
    # A row cut by the budget holds max_new_tokens tokens and no <|endoftext|>. Both are needed:
    # Whisper's generate returns the text tokens without the prompt and strips the final
    # <|endoftext|> of the longest row of a batch, so that row holds no eos even when it ended
    # (shorter rows are padded with the eos id). Testing for eos alone flagged one finished
    # clip per batch as cut: 4-7 complete transcripts per eval on real whisper-base.
    eos = processor.tokenizer.eos_token_id
    return texts, [bool((row != eos).all()) and len(row) >= max_new_tokens for row in tokens]


def transcribe_all(model, processor, audios: Sequence[np.ndarray], language: str, task: str,
                   batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS, desc: str = "transcribe",
                   num_beams: int = 1) -> tuple[list[str], list[bool]]:
    """Batched transcription with a progress bar (clips/s shows in the bar): (texts, truncated flags)."""
    from tqdm.auto import tqdm

    out: list[str] = []
    cut: list[bool] = []
    with tqdm(total=len(audios), desc=desc, unit="clip") as bar:
        for i in range(0, len(audios), batch_size):
            chunk = audios[i:i + batch_size]
            texts, flags = generate_batch(model, processor, chunk, language, task, max_new_tokens, num_beams,
                                          return_truncated=True)
            out += texts
            cut += flags
            bar.update(len(chunk))
    return out, cut


def hallucination_check(model, processor, clips: Sequence[tuple[str, np.ndarray]], label: str, with_base: bool,
                        language: str, task: str, batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS,
                        num_beams: int = 1) -> dict[str, Any]:
    """Transcribe (kind, audio) clips without speech (lib.augment.eval_no_speech_clips) with the
    model as given (`label`) and, with_base, its base (adapter disabled), the way the clips of the
    split were: {clips, kinds, results: {name: lib.metrics.hallucination}, examples: {name: [..]}}.
    Forced language, greedy, as the split's WER: what a user's pipeline does with a silent chunk."""
    from lib.metrics import hallucination

    kinds, audios = [k for k, _ in clips], [a for _, a in clips]
    hyps = {label: transcribe_all(model, processor, audios, language, task, batch_size, max_new_tokens,
                                  f"{label} no-speech", num_beams)[0]}
    if with_base:
        with model.disable_adapter():
            hyps["base"] = transcribe_all(model, processor, audios, language, task, batch_size, max_new_tokens,
                                          "base no-speech", num_beams)[0]
    counts: dict[str, int] = {}
    for k in kinds:
        counts[k] = counts.get(k, 0) + 1
    return {
        "clips": len(clips),
        "kinds": counts,
        "results": {name: hallucination(h, kinds) for name, h in hyps.items()},
        # a few texts written for silence, to show what the model makes up
        "examples": {name: [f"{k}: {t.strip()[:120]}" for k, t in zip(kinds, h, strict=True) if t.strip()][:5]
                     for name, h in hyps.items()},
    }


def transcribe_dataset(model, processor, ds, language: str, task: str, batch_size: int = 16,
                       max_new_tokens: int = MAX_NEW_TOKENS, desc: str = "transcribe", num_beams: int = 1
                       ) -> tuple[list[str], float, list[bool]]:
    """Transcripts of a prepared split's `audio` column, read batch by batch (a test split
    of 3000 x 5-s clips is 3000 x 80 000 floats: too many to hold as Python lists), the
    seconds spent generating, and per clip whether the hypothesis was cut at max_new_tokens."""
    from tqdm.auto import tqdm

    from lib.prepared import audio_arrays

    out: list[str] = []
    cut: list[bool] = []
    seconds = 0.0
    with tqdm(total=len(ds), desc=desc, unit="clip") as bar:
        for i in range(0, len(ds), batch_size):
            chunk = audio_arrays(ds, i, i + batch_size)  # decoded batch by batch: never the whole split
            t0 = time.perf_counter()
            texts, flags = generate_batch(model, processor, chunk, language, task, max_new_tokens, num_beams,
                                          return_truncated=True)
            seconds += time.perf_counter() - t0
            out += texts
            cut += flags
            bar.update(len(chunk))
    return out, seconds, cut


def transcribe_long(model, processor, audio: np.ndarray, language: str, task: str,
                    max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 8) -> str:
    """A file of any length: fixed 30-s windows transcribed as a batch and joined; a window
    whose transcript ran out of tokens is logged (its end is missing from the text).

    Simple and predictable; a word cut by a window edge may come out broken (Whisper's
    timestamp-based long-form decoding avoids that but is much slower on a CPU).
    """
    step = WINDOW_SECONDS * SAMPLING_RATE
    windows = [audio[i:i + step] for i in range(0, max(len(audio), 1), step)]
    texts, cut = transcribe_all(model, processor, windows, language, task, batch_size, max_new_tokens,
                                desc="30-s windows")
    for k in (k for k, c in enumerate(cut) if c):
        log.warning("transcribe: window %d (%d-%d s) hit max_new_tokens=%d: the end of its transcript is missing; "
                    "raise max_new_tokens (at most %d)", k + 1, k * WINDOW_SECONDS, (k + 1) * WINDOW_SECONDS,
                    max_new_tokens, MAX_NEW_TOKENS)
    return " ".join(t for t in texts if t)


def benchmark(model, processor, audios: Sequence[np.ndarray], language: str, task: str,
              batch_size: int, max_new_tokens: int = 225, autocast: bool = False,
              min_new_tokens: int = 0) -> dict[str, Any]:
    """Clips per second of generation for these settings (one warm-up batch not counted), and
    the transcripts. Log-mel is computed on the model's device, so that the time is generation's."""
    import contextlib

    import torch

    device = next(model.parameters()).device
    ctx = (torch.autocast(device_type=device.type, dtype=torch.float16) if autocast and device.type == "cuda"
           else contextlib.nullcontext())
    gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, features_on_device=True)
    texts: list[str] = []
    with ctx:
        generate_batch(model, processor, audios[:batch_size], language, task, **gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(audios), batch_size):
            texts += generate_batch(model, processor, audios[i:i + batch_size], language, task, **gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"clips": len(audios), "seconds": seconds, "clips_per_s": len(audios) / seconds,
            "batch_size": batch_size, "autocast": autocast, "new_tokens": max_new_tokens, "texts": texts}


def speed_compare(source, audios: Sequence[np.ndarray], language: str, task: str, batch_size: int,
                  precision: str, max_new_tokens: int = 225, min_new_tokens: int = 0) -> dict[str, Any]:
    """Our eval settings vs the walkthrough's eval loop (8-bit model, batch 8, fp16 autocast)
    on the same clips, and the share of identical transcripts; the walkthrough leg needs a GPU
    (bitsandbytes int8 + autocast). `make eval speed_compare=true` and `make bench` both use it.

    source: a lib.model.ModelSource. min_new_tokens = max_new_tokens forces every clip to the
    same length (the bench's random weights would otherwise stop at random).
    """
    import gc

    import torch

    from lib.model import load_model

    result: dict[str, Any] = {}
    model, processor, info = load_model(source, precision, "none")
    result["ours"] = {**benchmark(model, processor, audios, language, task, batch_size, max_new_tokens,
                                  min_new_tokens=min_new_tokens), **info}
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        model, processor, info = load_model(source, "fp16", "int8")
        result["walkthrough"] = {
            **benchmark(model, processor, audios, language, task, 8, max_new_tokens, autocast=True,
                        min_new_tokens=min_new_tokens), **info
        }
        del model
        torch.cuda.empty_cache()
        ours, theirs = result["ours"].pop("texts"), result["walkthrough"].pop("texts")
        result["speedup"] = result["ours"]["clips_per_s"] / result["walkthrough"]["clips_per_s"]
        result["same_transcripts"] = sum(a == b for a, b in zip(ours, theirs, strict=True)) / max(len(ours), 1)
    else:
        result["ours"].pop("texts")
        result["walkthrough"] = "skipped: the walkthrough loop (int8 + fp16 autocast) needs a GPU"
    return result


def model_legs(model, label: str, with_base: bool) -> dict[str, Any]:
    """The models an eval scores, each as a context to run it in: `label` as loaded, then, for
    an adapter, the base zero-shot (the same weights with the adapter disabled)."""
    import contextlib

    legs: dict[str, Any] = {label: contextlib.nullcontext}
    if with_base:
        legs["base"] = model.disable_adapter
    return legs
