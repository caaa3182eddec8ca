"""Long-form evaluation: recordings longer than Whisper's 30-s window, decoded sequentially
with timestamps, scored for WER and for whether the timestamps make sense.

A fine-tune trained on short clips with <|notimestamps|> can lose what long-form decoding
relies on: transformers' sequential decoding (WhisperForConditionalGeneration.generate on
more than 3000 mel frames) cuts the audio where the model's last timestamp says a segment
ended, and seeks on from there. A model that no longer predicts timestamps decodes each
30-s window as one blob; one whose timestamps go backwards or past the audio repeats or
drops speech. So the report gives both numbers, for the base and for the fine-tune:

  WER over whole recordings (words cut at a window edge and repeated count as errors), and
  the share of segments whose timestamps are valid: predicted (not a window without any
  timestamp token), non-empty, end after start, not before the previous segment's end,
  inside the audio.

Recordings come from the test split (consecutive clips joined, `join_plan`) or from a
long-form set the user gives (`longform.manifest=`: audio,text columns, as prepare reads).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lib.errors import UserError
from lib.whisper import (
    MAX_NEW_TOKENS,
    MAX_POSITIONS,
    MAX_PROMPT,
    PROMPT_TOKENS,
    SAMPLING_RATE,
    WINDOW_SECONDS,
)

log = logging.getLogger("whisper_ft")

# With condition_on_prev_tokens, transformers puts up to max_target_positions // 2 - 1 = 223
# previous tokens and <|startofprev|> before the 3-4 token prompt: 448 - 224 - 4 = 220 new
# tokens per window at most (more raises a ValueError mid-recording). Without it, 444.
MAX_NEW_CONDITIONED = MAX_POSITIONS - (MAX_PROMPT + 1) - PROMPT_TOKENS
MAX_NEW_PLAIN = MAX_NEW_TOKENS
# Timestamps are 0.02-s steps; a segment may end a little past the audio's last sample
# (the window is padded to 30 s) or start a step before the previous end.
TOLERANCE_SECONDS = 0.5
# transformers' recommended fallback (generation_whisper.py docstring): temperatures tried
# in turn while a window's compression ratio (token-based, hence 1.35 not zlib's 2.4) or
# mean log-probability says it looped or is unsure.
FALLBACK = dict(temperature=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0), compression_ratio_threshold=1.35,
                logprob_threshold=-1.0)


@dataclass
class LongformConfig:
    recordings: int = 3
    """long recordings to score (0 turns long-form evaluation off); joined from the test split unless manifest= is set"""
    minutes: float = 1.0
    """length of each joined recording, at most (0.5 to 5; 1 to 5 is a real long-form check)"""
    gap_seconds: float = 0.5
    """silence put between joined clips (a pause, as between sentences of one speaker)"""
    manifest: str | None = None
    """a long-form set of your own: CSV/TSV/JSONL with audio (path relative to the file) and text columns"""
    condition_on_prev_tokens: bool = True
    """feed each window the previous window's text, as long-form decoding in openai-whisper does"""
    temperature_fallback: bool = False
    """retry a window at higher temperatures when it loops (compression ratio) or is unsure (log-prob):
    usually better text, but sampled, so two runs can differ; off: greedy and reproducible"""
    max_new_tokens: int | None = None
    """tokens per 30-s window; default: eval's max_new_tokens= when set, else 220 with condition_on_prev_tokens
    (224 positions go to the previous text), else 444"""
    batch_size: int = 4
    """recordings decoded together"""

    def __post_init__(self):
        if self.recordings < 0:
            raise UserError("longform.recordings must be >= 0 (0 turns long-form evaluation off)")
        if not 0.5 <= self.minutes <= 5:
            raise UserError("longform.minutes must be 0.5..5: long-form means more than one 30-s window")
        if self.gap_seconds < 0:
            raise UserError("longform.gap_seconds must be >= 0")
        if self.batch_size < 1:
            raise UserError("longform.batch_size must be >= 1")
        cap = MAX_NEW_CONDITIONED if self.condition_on_prev_tokens else MAX_NEW_PLAIN
        if self.max_new_tokens is not None and not 1 <= self.max_new_tokens <= cap:
            raise UserError(f"longform.max_new_tokens must be 1..{cap} with condition_on_prev_tokens="
                            f"{str(self.condition_on_prev_tokens).lower()}")

    def window_budget(self, eval_max_new_tokens: int | None = None) -> int:
        """New tokens per window: this section's flag, else eval's max_new_tokens= (a user who caps
        clips caps windows too), else the most the positions allow; never past that cap."""
        cap = MAX_NEW_CONDITIONED if self.condition_on_prev_tokens else MAX_NEW_PLAIN
        return min(cap, self.max_new_tokens or eval_max_new_tokens or cap)


@dataclass
class Recording:
    """One long-form item: its audio, reference, and (joined) the clip ids it was made of."""

    id: str
    audio: np.ndarray
    text: str
    clips: list[str]

    @property
    def duration(self) -> float:
        return len(self.audio) / SAMPLING_RATE


def join_plan(durations: Sequence[float], minutes: float, recordings: int, gap: float = 0.0) -> list[list[int]]:
    """Which consecutive clips make each recording: indices, in split order, at most
    `minutes` long each (gaps included), at most `recordings` of them.

    A recording closes when its next clip would take it past `minutes`; the unfinished tail
    of the split is dropped (it would be a short recording), unless the whole split is
    shorter than one recording, in which case all of it is the one recording. Nothing is
    random: the same split gives the same recordings.
    """
    if recordings < 1:
        return []
    limit = minutes * 60
    plan: list[list[int]] = []
    cur: list[int] = []
    total = 0.0
    for i, d in enumerate(durations):
        add = d + (gap if cur else 0.0)
        if cur and total + add > limit:
            plan.append(cur)
            if len(plan) == recordings:
                return plan
            cur, total, add = [], 0.0, d
        if not cur and d > limit:
            continue  # a single clip longer than a recording cannot be part of one
        cur.append(i)
        total += add
    if not plan and cur and recordings:
        plan.append(cur)
    return plan


def join_clips(ds, plan: list[list[int]], gap: float) -> list[Recording]:
    """The recordings of `plan` from a prepared split: audio joined with `gap` s of silence,
    references joined with a space."""
    from lib.dataset.prepared import decode_row

    silence = np.zeros(int(gap * SAMPLING_RATE), np.float32)
    ids, texts = ds["id"], ds["text"]
    out = []
    for k, idx in enumerate(plan):
        parts: list[np.ndarray] = []
        for j, i in enumerate(idx):
            if j:
                parts.append(silence)
            parts.append(decode_row(ds[int(i)]))
        out.append(Recording(f"joined-{k}", np.concatenate(parts), " ".join(texts[i] for i in idx),
                             [ids[i] for i in idx]))
    return out


def read_longform_manifest(path: str | Path, limit: int | None = None) -> list[Recording]:
    """A user's long-form set (longform.manifest=): one recording per row, audio decoded by
    the same code as prepare's clips, text in the canonical spelling scores compare."""
    from lib.audio import load_file
    from lib.metrics import canonical
    from lib.prepare.sources import AUDIO_COLUMNS, TEXT_COLUMNS, _read_table

    file = Path(path)
    if not file.is_file():
        raise UserError(f"longform.manifest={path}: no such file")
    table = _read_table(file)
    if not table:
        raise UserError(f"longform.manifest={path}: no rows")
    columns = list(table[0][1])
    audio_col = next((c for c in AUDIO_COLUMNS if c in columns), None)
    text_col = next((c for c in TEXT_COLUMNS if c in columns), None)
    if audio_col is None or text_col is None:
        raise UserError(f"longform.manifest={path}: needs an audio and a text column (found {', '.join(columns)})")
    out = []
    for line, row in table[:limit]:
        rel = str(row.get(audio_col) or "").strip()
        text = canonical(str(row.get(text_col) or ""))
        if not rel or not text:
            raise UserError(f"longform.manifest={path} line {line}: empty {audio_col if not rel else text_col}")
        audio_path = Path(rel) if Path(rel).is_absolute() else file.parent / rel
        out.append(Recording(rel, load_file(audio_path, f"longform.manifest={path} line {line}"), text, [rel]))
    return out


def decode_recordings(model, processor, recordings: Sequence[Recording], language: str, task: str,
                      cfg: LongformConfig, desc: str = "long-form", max_new_tokens: int | None = None) -> list[tuple[str, list[dict[str, Any]]]]:
    """(text, segments) per recording, through transformers' sequential long-form decoding
    with timestamps. A segment is {start, end, text, timestamped} in seconds of the recording.

    The features keep the whole recording (truncation=False) padded to the longest of the
    batch, with an attention mask that tells generate where each one ends; a batch of
    recordings that all fit one window must instead be padded to exactly 3000 frames, which
    is what the short-form path of generate expects.
    """
    import torch
    from tqdm.auto import tqdm

    from lib.inference import _model_dtype

    device = next(model.parameters()).device
    dtype = _model_dtype(model)
    gen_cfg = getattr(model, "generation_config", None)
    # Timestamp tokens follow <|notimestamps|>: <|0.00|> is its id + 1 (50364 in v2, 50365 in v3).
    timestamp_begin = int(gen_cfg.no_timestamps_token_id) + 1
    extra = FALLBACK if cfg.temperature_fallback else {}
    out: list[tuple[str, list[dict[str, Any]]]] = []
    for i in tqdm(range(0, len(recordings), cfg.batch_size), desc=desc, unit="batch"):
        chunk = recordings[i:i + cfg.batch_size]
        audios = [r.audio for r in chunk]
        long = max(len(a) for a in audios) > WINDOW_SECONDS * SAMPLING_RATE
        kw = dict(truncation=False, padding="longest", return_attention_mask=True) if long else {}
        feats = processor.feature_extractor(audios, sampling_rate=SAMPLING_RATE, return_tensors="pt", **kw)
        inputs = {"input_features": feats.input_features.to(device=device, dtype=dtype)}
        if long:
            inputs["attention_mask"] = feats.attention_mask.to(device)
        with torch.inference_mode():
            res = model.generate(**inputs, language=language, task=task, return_timestamps=True,
                                 return_segments=True, condition_on_prev_tokens=cfg.condition_on_prev_tokens,
                                 max_new_tokens=cfg.window_budget(max_new_tokens), **extra)
        for segs in res["segments"]:
            plain = []
            for s in segs:
                toks = [int(t) for t in s["tokens"]]
                plain.append({"start": float(s["start"]), "end": float(s["end"]),
                              "text": processor.tokenizer.decode(toks, skip_special_tokens=True).strip(),
                              "timestamped": bool(toks) and toks[0] >= timestamp_begin})
            out.append((" ".join(s["text"] for s in plain if s["text"]), plain))
    return out


def segment_problems(segments: Sequence[dict[str, Any]], duration: float,
                     tolerance: float = TOLERANCE_SECONDS) -> list[list[str]]:
    """Per segment, what is wrong with its timestamps ([] = valid):
    no timestamps   the window had no timestamp token (generate made it one segment spanning the window)
    empty           no text between the timestamps
    not increasing  end <= start, or it starts before the previous segment ended
    outside audio   it starts before 0 or ends after the recording (plus `tolerance` s)
    """
    problems = []
    prev_end = 0.0
    for s in segments:
        p = []
        start, end = float(s["start"]), float(s["end"])
        if not s.get("timestamped", True):
            p.append("no timestamps")
        if not str(s.get("text", "")).strip():
            p.append("empty")
        if end <= start or start < prev_end - tolerance:
            p.append("not increasing")
        if start < 0 or end > duration + tolerance:
            p.append("outside audio")
        problems.append(p)
        prev_end = max(prev_end, end)
    return problems


def timestamp_validity(decoded: Sequence[list[dict[str, Any]]], durations: Sequence[float]) -> dict[str, Any]:
    """Counts over recordings: segments, valid segments and their share, recordings whose every
    segment is valid, and how often each problem of segment_problems occurred."""
    n = valid = whole = 0
    reasons: Counter = Counter()
    for segs, dur in zip(decoded, durations, strict=True):
        probs = segment_problems(segs, dur)
        n += len(probs)
        valid += sum(not p for p in probs)
        whole += bool(probs) and all(not p for p in probs)
        reasons.update(r for p in probs for r in p)
    return {"segments": n, "valid_segments": valid, "valid_share": valid / n if n else 0.0,
            "recordings_all_valid": whole, "problems": dict(reasons)}


def evaluate(legs: dict[str, Callable[[], AbstractContextManager]], model, processor,
             recordings: Sequence[Recording], language: str, task: str, cfg: LongformConfig,
             source: str, max_new_tokens: int | None = None) -> dict[str, Any]:
    """The report's `longform` section: per leg (adapter, base, ...) long-form WER and timestamp
    validity, plus each recording's hypothesis and segments."""
    from lib.metrics import score

    durations = [r.duration for r in recordings]
    section: dict[str, Any] = {
        "source": source, "recordings": len(recordings), "audio_minutes": sum(durations) / 60,
        "longest_minutes": max(durations, default=0) / 60, "window_max_new_tokens": cfg.window_budget(max_new_tokens),
        "condition_on_prev_tokens": cfg.condition_on_prev_tokens,
        "temperature_fallback": cfg.temperature_fallback, "results": {}, "items": {},
    }
    refs = [r.text for r in recordings]
    for name, ctx in legs.items():
        with ctx():
            decoded = decode_recordings(model, processor, recordings, language, task, cfg, f"long-form {name}",
                                        max_new_tokens)
        metrics, _ = score(refs, [t for t, _ in decoded], [r.id for r in recordings])
        ts = timestamp_validity([s for _, s in decoded], durations)
        section["results"][name] = {**{k: metrics[k] for k in ("normalized_wer", "wer", "cer", "repetition")},
                                    "timestamps": ts}
        section["items"][name] = [{"id": r.id, "seconds": round(r.duration, 2), "clips": r.clips,
                                   "hypothesis": t, "segments": s} for r, (t, s) in zip(recordings, decoded, strict=True)]
        log.info("eval: long-form %-7s normalized WER %.2f %% over %d recordings; timestamps valid in %d of %d "
                 "segments (%.1f %%)%s", name, 100 * metrics["normalized_wer"], len(recordings), ts["valid_segments"],
                 ts["segments"], 100 * ts["valid_share"],
                 f"; problems {ts['problems']}" if ts["problems"] else "")
    section["references"] = refs
    return section


def render(report: dict[str, Any]) -> list[str]:
    """report.md lines for the long-form section ([] when it was not run)."""
    lf = report.get("longform")
    if not lf:
        return []
    names = list(lf["results"])
    res = lf["results"]
    lines = ["", "## Long-form (sequential decoding with timestamps)", "",
             f"- {lf['recordings']} recordings, {lf['audio_minutes']:.1f} min in all (longest "
             f"{lf['longest_minutes']:.1f} min), from {lf['source']}",
             f"- condition_on_prev_tokens {str(lf['condition_on_prev_tokens']).lower()}, temperature fallback "
             f"{str(lf['temperature_fallback']).lower()}, up to {lf['window_max_new_tokens']} tokens per window", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---|" * len(names),
             "| long-form WER, normalized | " + " | ".join(f"{100 * res[n]['normalized_wer']:.2f} %" for n in names) + " |",
             "| long-form WER, exact text | " + " | ".join(f"{100 * res[n]['wer']:.2f} %" for n in names) + " |",
             "| segments with valid, increasing timestamps | " + " | ".join(
                 f"{100 * res[n]['timestamps']['valid_share']:.1f} % ({res[n]['timestamps']['valid_segments']}"
                 f"/{res[n]['timestamps']['segments']})" for n in names) + " |",
             "| recordings with every segment valid | " + " | ".join(
                 f"{res[n]['timestamps']['recordings_all_valid']}/{lf['recordings']}" for n in names) + " |",
             "| timestamp problems | " + " | ".join(
                 ", ".join(f"{k} {v}" for k, v in sorted(res[n]["timestamps"]["problems"].items())) or "none"
                 for n in names) + " |"]
    return lines


def recordings_for(cfg: LongformConfig, ds, split: str) -> tuple[list[Recording], str]:
    """The recordings eval scores and where they came from: longform.manifest= when set, else
    the split's clips joined by join_plan (a warning when the split is shorter than one)."""
    if cfg.manifest:
        return read_longform_manifest(cfg.manifest, cfg.recordings), f"longform.manifest={cfg.manifest}"
    durations = [float(d) for d in ds["duration"]]
    plan = join_plan(durations, cfg.minutes, cfg.recordings, cfg.gap_seconds)
    recs = join_clips(ds, plan, cfg.gap_seconds)
    if recs and len(recs) < cfg.recordings or (recs and recs[-1].duration < 0.5 * cfg.minutes * 60):
        log.warning("eval: long-form: the %s split made %d recording(s) of %.1f min at most (asked: %d of up to "
                    "%g min); score more clips (limit=) or give longform.manifest=", split, len(recs),
                    max(r.duration for r in recs) / 60, cfg.recordings, cfg.minutes)
    return recs, f"consecutive {split} clips joined with {cfg.gap_seconds:g} s of silence (up to {cfg.minutes:g} min each)"
