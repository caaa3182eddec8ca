"""Transcribe in batches with a loaded Whisper (lib/model.py loads it), and time generation.

Language and task are always forced at generation (`generate(language=, task=)`), never
left to Whisper's language detection: a fine-tuned Hindi model asked to detect the
language of a short clip sometimes answers Urdu and transcribes in the wrong script.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lib.whisper import MAX_NEW_TOKENS, MAX_POSITIONS, PROMPT_TOKENS, SAMPLING_RATE, WINDOW_SECONDS

log = logging.getLogger("whisper_ft")

def features_for(processor, audios: Sequence[np.ndarray], dtype, device, on_device: bool = False):
    """Log-mel features of the clips as the model's input. on_device: compute them on the
    model's GPU (torch STFT) rather than on the CPU (lib.audio.log_mel, as the training
    collator does); the speed comparison uses it so that both of its legs time generation."""
    clips = [np.asarray(a, dtype=np.float32) for a in audios]
    if on_device and str(device).startswith("cuda"):
        feats = processor.feature_extractor(clips, sampling_rate=SAMPLING_RATE, return_tensors="pt",
                                            device=str(device)).input_features
    else:
        from lib.audio import log_mel

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


@dataclass(frozen=True)
class NoSpeechGate:
    """Drop the transcript of a clip that Whisper itself says holds no speech.

    The no-speech probability is P(<|nospeech|>) (<|nocaptions|> in older v2 files) at the first
    decoder position, right after <|startoftranscript|>, where Whisper was trained to name the
    language or say "no speech"; forced-language decoding never reads it, so without a gate a
    silent clip always gets a transcript (32 of 32 on whisper-base, docs/results.md). A clip is judged
    silent when that probability is above `no_speech_threshold` and its transcript's mean
    log-probability per token is below `logprob_threshold`.

    logprob_threshold=0 (the default) leaves the decision to the probability alone (every mean
    log-probability is below 0). -1.0 is openai-whisper's and faster-whisper's rule, meant to keep
    a transcript the model is sure of; measured on whisper-base it kept all 32 hallucinations of
    every model, because a loop on silence ("आप लग़ लग़ लग़ ...") is a confident one. Fine-tuning
    on labels that all start <|sot|> <|hi|> lowers the probability on silence (0.80 -> 0.40 mean);
    train.no_speech_fraction (label "token") raises it (0.96-0.99), docs/results.md.
    """

    no_speech_threshold: float = 0.6
    logprob_threshold: float = 0.0

    def __post_init__(self):
        from lib.errors import UserError

        if not 0 <= self.no_speech_threshold <= 1:
            raise UserError(f"no_speech_threshold={self.no_speech_threshold}: must be in [0, 1] (default 0.6), "
                            f"or none to turn the no-speech gate off")
        if self.logprob_threshold > 0:
            raise UserError(f"logprob_threshold={self.logprob_threshold}: a log-probability is <= 0 (0 = the "
                            f"no-speech probability alone decides; Whisper's own rule uses -1.0)")

    @classmethod
    def of(cls, no_speech_threshold: float | None, logprob_threshold: float = 0.0) -> NoSpeechGate | None:
        """The gate a job's flags ask for; None (no gate) when no_speech_threshold is unset."""
        return None if no_speech_threshold is None else cls(float(no_speech_threshold), float(logprob_threshold))


@dataclass
class Decoded:
    """One batch's transcripts and what is known about each."""

    texts: list[str]
    """the transcripts, special tokens removed; empty where the gate judged the clip silent"""
    truncated: list[bool]
    """the hypothesis ran out of tokens (max_new_tokens reached with no <|endoftext|>)"""
    silent: list[bool] = field(default_factory=list)
    """judged without speech by the NoSpeechGate (text dropped); all False without a gate"""
    raw: list[str] = field(default_factory=list)
    """the transcripts before the gate"""
    no_speech_prob: list[float] = field(default_factory=list)
    """P(no-speech token) after <|startoftranscript|>; NaN without a gate"""


ONE_WINDOW = {"force_unique_generate_call": True}
"""generate() kwargs for clips of up to 30 s: one decoding pass per clip. Why: transformers' Whisper
generate() loops `while seek < the input's frames`, and after a pass that writes two timestamp
tokens (a fine-tune trained on timestamped or packed windows can write them even after
<|notimestamps|>) it seeks to the last one; `<|0.00|><|0.00|>` seeks by 0 frames, so the clip is
decoded again and again, for ever. Seen on an H100 after 10 packed steps of large-v2: the Trainer's
evaluation of 2 clips x 8 tokens never returned (tests/foundation/test_model.py rigs a model that
does it). With this the output holds the decoder prompt too (<|sot|> <|hi|> <|transcribe|>
<|notimestamps|>): strip_prompt removes it."""


def strip_prompt(tokens, tokenizer):
    """Rows of a ONE_WINDOW generate() output without the decoder prompt (everything up to and
    including <|notimestamps|>), as generate() returns them otherwise."""
    nots = tokenizer.convert_tokens_to_ids("<|notimestamps|>")
    hits = (tokens[0] == nots).nonzero()
    return tokens[:, int(hits[0]) + 1:] if len(hits) else tokens


def decode_batch(model, processor, audios: Sequence[np.ndarray], language: str, task: str,
                 max_new_tokens: int = MAX_NEW_TOKENS, num_beams: int = 1, min_new_tokens: int = 0,
                 features_on_device: bool = False, gate: NoSpeechGate | None = None,
                 cache: str = "dynamic") -> Decoded:
    """Transcripts of up to 30-s clips, language and task forced, with the NoSpeechGate applied
    when one is given. min_new_tokens forces that many tokens (timing random weights, which stop
    at random). With a gate the encoder runs once: its output feeds both generate() and the
    one-position decoder pass that reads the no-speech probability. cache="static": a fixed-size
    key/value cache, which lets generate() compile the decoder step (transformers compiles a
    model's forward by itself when the cache is static): the first batch of each size pays the
    compilation."""
    import torch

    device = next(model.parameters()).device
    feats = features_for(processor, audios, _model_dtype(model), device, features_on_device)
    extra = {"min_new_tokens": min_new_tokens} if min_new_tokens else {}
    if cache != "dynamic":
        extra["cache_implementation"] = cache
    with torch.inference_mode():
        if gate is None:
            tokens = model.generate(input_features=feats, language=language, task=task,
                                    max_new_tokens=max_new_tokens, num_beams=num_beams, **extra, **ONE_WINDOW)
        else:
            encoded = model.get_encoder()(feats)
            tokens = model.generate(encoder_outputs=encoded, language=language, task=task,
                                    max_new_tokens=max_new_tokens, num_beams=num_beams, **extra, **ONE_WINDOW)
        tokens = strip_prompt(tokens, processor.tokenizer)
    texts = [t.strip() for t in processor.batch_decode(tokens, skip_special_tokens=True)]
    # A row cut by the budget holds max_new_tokens tokens and no <|endoftext|>. Both are needed:
    # Whisper's generate returns the text tokens without the prompt and strips the final
    # <|endoftext|> of the longest row of a batch, so that row holds no eos even when it ended
    # (shorter rows are padded with the eos id). Testing for eos alone flagged one finished
    # clip per batch as cut: 4-7 complete transcripts per eval on real whisper-base.
    eos = processor.tokenizer.eos_token_id
    cut = [bool((row != eos).all()) and len(row) >= max_new_tokens for row in tokens]
    if gate is None:
        n = len(texts)
        return Decoded(texts, cut, [False] * n, list(texts), [float("nan")] * n)
    probs, logprobs = gate_scores(model, processor.tokenizer, encoded, tokens, language, task,
                                  gate.no_speech_threshold)
    silent = [p > gate.no_speech_threshold and lp < gate.logprob_threshold for p, lp in zip(probs, logprobs,
                                                                                          strict=True)]
    return Decoded(["" if s else t for t, s in zip(texts, silent, strict=True)], cut, silent, texts, probs)


def gate_scores(model, tokenizer, encoded, tokens, language: str, task: str,
                above: float = 0.0) -> tuple[list[float], list[float]]:
    """(no-speech probability, average log-probability per token) of each row of a batch that
    generate() produced from `encoded` (the encoder's output). The log-probability is computed
    only for rows whose no-speech probability is above `above` (the gate's threshold: for the
    others it cannot matter; NaN there), by one teacher-forced decoder pass over the prompt, the
    text tokens and <|endoftext|>, averaged as openai-whisper does: the sum over the text tokens
    and the end token, divided by their count."""
    import torch

    from lib.errors import UserError
    from lib.whisper import NO_SPEECH_NAMES, no_speech_id, token_id

    no_speech = no_speech_id(tokenizer)
    names = ["<|startoftranscript|>", f"<|{language}|>", f"<|{task}|>", "<|notimestamps|>"]
    prompt = [token_id(tokenizer, n) for n in names]
    if no_speech is None or None in prompt:
        missing = [n for n, i in zip(names, prompt, strict=True) if i is None] + ([] if no_speech else
                                                                                 ["/".join(NO_SPEECH_NAMES)])
        raise UserError(f"the model's tokenizer has no {', '.join(missing)} token, which the no-speech gate needs: "
                        f"set no_speech_threshold=none")
    hidden = encoded.last_hidden_state if hasattr(encoded, "last_hidden_state") else encoded[0]
    n = hidden.shape[0]
    device = hidden.device
    eos = tokenizer.eos_token_id
    with torch.inference_mode():
        start = torch.full((n, 1), prompt[0], dtype=torch.long, device=device)
        logits = model(encoder_outputs=(hidden,), decoder_input_ids=start).logits[:, 0].float()
        probs = logits.softmax(-1)[:, no_speech].tolist()
        logprobs = [float("nan")] * n
        rows = [k for k in range(n) if probs[k] > above]
        for k in rows:  # one row at a time: few rows qualify, and a full batch of logits is large
            seq = [int(t) for t in tokens[k]]
            text = seq[:seq.index(eos)] if eos in seq else seq
            ids = torch.tensor([prompt + text + [eos]], device=device)
            out = model(encoder_outputs=(hidden[k:k + 1],), decoder_input_ids=ids[:, :-1]).logits[0].float()
            lp = out.log_softmax(-1)[len(prompt) - 1:].gather(1, ids[0, len(prompt):, None])
            logprobs[k] = float(lp.sum()) / (len(text) + 1)
    return probs, logprobs


def generate_batch(model, processor, audios: Sequence[np.ndarray], language: str, task: str,
                   max_new_tokens: int = MAX_NEW_TOKENS, num_beams: int = 1, min_new_tokens: int = 0,
                   features_on_device: bool = False, return_truncated: bool = False,
                   gate: NoSpeechGate | None = None, cache: str = "dynamic"):
    """decode_batch's texts, and with return_truncated its truncated flags too."""
    d = decode_batch(model, processor, audios, language, task, max_new_tokens, num_beams, min_new_tokens,
                     features_on_device, gate, cache)
    return (d.texts, d.truncated) if return_truncated else d.texts


def _extend(total: Decoded, part: Decoded) -> None:
    total.texts += part.texts
    total.truncated += part.truncated
    total.silent += part.silent
    total.raw += part.raw
    total.no_speech_prob += part.no_speech_prob


def transcribe_all(model, processor, audios: Sequence[np.ndarray], language: str, task: str,
                   batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS, desc: str = "transcribe",
                   num_beams: int = 1, gate: NoSpeechGate | None = None) -> Decoded:
    """Batched transcription with a progress bar (clips/s shows in the bar)."""
    from tqdm.auto import tqdm

    out = Decoded([], [])
    with tqdm(total=len(audios), desc=desc, unit="clip") as bar:
        for i in range(0, len(audios), batch_size):
            chunk = audios[i:i + batch_size]
            _extend(out, decode_batch(model, processor, chunk, language, task, max_new_tokens, num_beams, gate=gate))
            bar.update(len(chunk))
    return out


def hallucination_check(model, processor, clips: Sequence[tuple[str, np.ndarray]], label: str, with_base: bool,
                        language: str, task: str, batch_size: int = 16, max_new_tokens: int = MAX_NEW_TOKENS,
                        num_beams: int = 1, gate: NoSpeechGate | None = None) -> dict[str, Any]:
    """Transcribe (kind, audio) clips without speech (lib.train.augment.eval_no_speech_clips) with the
    model as given (`label`) and, with_base, its base (adapter disabled), the way the clips of the
    split were: {clips, kinds, gate, results: {name: lib.metrics.hallucination}, ungated: {name: ...},
    no_speech_prob: {name: mean}, examples: {name: [..]}}. Forced language, greedy, as the split's
    WER: what a user's pipeline does with a silent chunk. `results` is after the no-speech gate
    (what eval and transcribe output), `ungated` the model's own transcripts before it."""
    from lib.metrics import hallucination

    kinds, audios = [k for k, _ in clips], [a for _, a in clips]
    decoded = {label: transcribe_all(model, processor, audios, language, task, batch_size, max_new_tokens,
                                     f"{label} no-speech", num_beams, gate)}
    if with_base:
        with model.disable_adapter():
            decoded["base"] = transcribe_all(model, processor, audios, language, task, batch_size, max_new_tokens,
                                             "base no-speech", num_beams, gate)
    counts: dict[str, int] = {}
    for k in kinds:
        counts[k] = counts.get(k, 0) + 1
    out = {
        "clips": len(clips),
        "kinds": counts,
        "gate": vars(gate) if gate else None,
        "results": {name: hallucination(d.texts, kinds) for name, d in decoded.items()},
        # a few texts written for silence, to show what the model makes up
        "examples": {name: [f"{k}: {t.strip()[:120]}" for k, t in zip(kinds, d.texts, strict=True) if t.strip()][:5]
                     for name, d in decoded.items()},
    }
    if gate:
        out["ungated"] = {name: hallucination(d.raw, kinds) for name, d in decoded.items()}
        out["no_speech_prob"] = {name: float(np.mean(d.no_speech_prob)) for name, d in decoded.items()}
    return out


def transcribe_dataset(model, processor, ds, language: str, task: str, batch_size: int = 16,
                       max_new_tokens: int = MAX_NEW_TOKENS, desc: str = "transcribe", num_beams: int = 1,
                       gate: NoSpeechGate | None = None, cache: str = "dynamic") -> tuple[Decoded, float]:
    """Transcripts of a prepared split's `audio` column, read batch by batch (a test split
    of 3000 x 5-s clips is 3000 x 80 000 floats: too many to hold as Python lists), and the
    seconds spent generating."""
    from tqdm.auto import tqdm

    from lib.dataset.prepared import audio_arrays

    out = Decoded([], [])
    seconds = 0.0
    with tqdm(total=len(ds), desc=desc, unit="clip") as bar:
        for i in range(0, len(ds), batch_size):
            chunk = audio_arrays(ds, i, i + batch_size)  # decoded batch by batch: never the whole split
            t0 = time.perf_counter()
            _extend(out, decode_batch(model, processor, chunk, language, task, max_new_tokens, num_beams, gate=gate,
                                      cache=cache))
            seconds += time.perf_counter() - t0
            bar.update(len(chunk))
    return out, seconds


def transcribe_long(model, processor, audio: np.ndarray, language: str, task: str,
                    max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 8,
                    gate: NoSpeechGate | None = None) -> str:
    """A file of any length: fixed 30-s windows transcribed as a batch and joined; a window
    whose transcript ran out of tokens is logged (its end is missing from the text), and so is
    a window the no-speech gate judged silent (its text is dropped).

    Simple and predictable; a word cut by a window edge may come out broken (Whisper's
    timestamp-based long-form decoding avoids that but is much slower on a CPU).
    """
    step = WINDOW_SECONDS * SAMPLING_RATE
    windows = [audio[i:i + step] for i in range(0, max(len(audio), 1), step)]
    d = transcribe_all(model, processor, windows, language, task, batch_size, max_new_tokens,
                       desc="30-s windows", gate=gate)
    for k in (k for k, c in enumerate(d.truncated) if c):
        log.warning("transcribe: window %d (%d-%d s) hit max_new_tokens=%d: the end of its transcript is missing; "
                    "raise max_new_tokens (at most %d)", k + 1, k * WINDOW_SECONDS, (k + 1) * WINDOW_SECONDS,
                    max_new_tokens, MAX_NEW_TOKENS)
    for k in (k for k, s in enumerate(d.silent) if s):
        log.info("transcribe: window %d (%d-%d s) judged without speech (no-speech probability %.2f > %g): its "
                 "text %r dropped (no_speech_threshold=none keeps it)", k + 1, k * WINDOW_SECONDS,
                 (k + 1) * WINDOW_SECONDS, d.no_speech_prob[k], gate.no_speech_threshold, d.raw[k][:80])
    return " ".join(t for t in d.texts if t)


def benchmark(model, processor, audios: Sequence[np.ndarray], language: str, task: str,
              batch_size: int, max_new_tokens: int = 225, autocast: bool = False,
              min_new_tokens: int = 0, cache: str = "dynamic") -> dict[str, Any]:
    """Clips per second of generation for these settings (one warm-up batch not counted), and
    the transcripts. Log-mel is computed on the model's device, so that the time is generation's."""
    import contextlib

    import torch

    device = next(model.parameters()).device
    ctx = (torch.autocast(device_type=device.type, dtype=torch.float16) if autocast and device.type == "cuda"
           else contextlib.nullcontext())
    gen = dict(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, features_on_device=True, cache=cache)
    texts: list[str] = []
    with ctx:
        # warm-up: one batch, and the last (shorter) batch's size too where compilation is per shape
        generate_batch(model, processor, audios[:batch_size], language, task, **gen)
        if cache != "dynamic" and len(audios) % batch_size:
            generate_batch(model, processor, audios[:len(audios) % batch_size], language, task, **gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(audios), batch_size):
            texts += generate_batch(model, processor, audios[i:i + batch_size], language, task, **gen)
        if device.type == "cuda":
            torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    return {"clips": len(audios), "seconds": seconds, "clips_per_s": len(audios) / seconds,
            "batch_size": batch_size, "autocast": autocast, "new_tokens": max_new_tokens, "cache": cache,
            "texts": texts}


def speed_compare(source, audios: Sequence[np.ndarray], language: str, task: str, batch_size: int,
                  precision: str, max_new_tokens: int = 225, min_new_tokens: int = 0,
                  variants: Sequence[tuple[int, str]] = (), walkthrough_clips: int | None = None) -> dict[str, Any]:
    """Our eval settings vs the walkthrough's eval loop (8-bit model, batch 8, fp16 autocast)
    on the same clips, and the share of identical transcripts; the walkthrough leg needs a GPU
    (bitsandbytes int8 + autocast). `make eval speed_compare=true` and `make bench` both use it.

    source: a lib.model.ModelSource. min_new_tokens = max_new_tokens forces every clip to the
    same length (the bench's random weights would otherwise stop at random). variants: more
    (batch size, cache) settings of ours timed on the same model (result["variants"]).
    walkthrough_clips: time the walkthrough loop on the first N clips only (it is ~20-50x
    slower); its rate is clips/s all the same, and transcripts are compared on those N.
    """
    import gc

    import torch

    from lib.model import load_model

    result: dict[str, Any] = {}
    model, processor, info = load_model(source, precision, "none")
    result["ours"] = {**benchmark(model, processor, audios, language, task, batch_size, max_new_tokens,
                                  min_new_tokens=min_new_tokens), **info}
    runs = []
    for b, cache in variants:
        try:
            runs.append(benchmark(model, processor, audios, language, task, b, max_new_tokens,
                                  min_new_tokens=min_new_tokens, cache=cache))
        except Exception as e:  # a setting this stack cannot run is a row, not a lost bench
            log.warning("speed_compare: batch %d, %s cache failed: %s", b, cache, e)
            runs.append({"batch_size": b, "cache": cache, "error": f"{type(e).__name__}: {str(e)[:200]}"})
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        model, processor, info = load_model(source, "fp16", "int8")
        n = min(len(audios), walkthrough_clips or len(audios))
        result["walkthrough"] = {
            **benchmark(model, processor, audios[:n], language, task, 8, max_new_tokens, autocast=True,
                        min_new_tokens=min_new_tokens), **info
        }
        del model
        torch.cuda.empty_cache()
        theirs = result["walkthrough"].pop("texts")
        ref = result["walkthrough"]["clips_per_s"]
        for r in [result["ours"], *runs]:
            if "texts" in r:
                texts = r.pop("texts")[:n]
                r["speedup"] = r["clips_per_s"] / ref
                r["same_transcripts"] = sum(a == b for a, b in zip(texts, theirs, strict=True)) / max(n, 1)
        result["speedup"] = result["ours"].pop("speedup")
        result["same_transcripts"] = result["ours"].pop("same_transcripts")
    else:
        for r in [result["ours"], *runs]:
            r.pop("texts", None)
        result["walkthrough"] = "skipped: the walkthrough loop (int8 + fp16 autocast) needs a GPU"
    if variants:
        result["variants"] = runs
    return result


def model_legs(model, label: str, with_base: bool) -> dict[str, Any]:
    """The models an eval scores, each as a context to run it in: `label` as loaded, then, for
    an adapter, the base zero-shot (the same weights with the adapter disabled)."""
    import contextlib

    legs: dict[str, Any] = {label: contextlib.nullcontext}
    if with_base:
        legs["base"] = model.disable_adapter
    return legs
