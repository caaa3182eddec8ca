"""Turn source rows into prepared rows: decode, resample, filter, tokenize; write the dataset.

One row in, one row out: a row that cannot be used keeps its place with `skip` set to the
reason, so that the report lists every dropped row and counts add up
(kept + skipped = rows read). Work is cut into chunks of `chunk_rows`; each finished
chunk is saved under the work folder with a marker, so a killed job resumes where it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lib.audio import SAMPLING_RATE, AudioError, decode
from lib.errors import UserError
from lib.metrics import canonical

log = logging.getLogger("whisper_ft")

# Bump when the processing below changes what it writes, so old prepared data is redone.
# 2: transcripts are lib.metrics.canonical (NFC, ASCII digits, no zero-width joiners).
PROCESS_VERSION = 2


def load_tokenizer(model: str, language: str | None = None, task: str = "transcribe"):
    from transformers import WhisperTokenizer

    try:
        return WhisperTokenizer.from_pretrained(model, language=language, task=task)
    except (OSError, ValueError) as e:
        raise UserError(f"model={model}: cannot load its Whisper tokenizer ({str(e).splitlines()[0][:200]}); "
                        f"give a local model folder or a Hub id available offline") from None


def max_target_positions(model: str) -> int:
    """The decoder's length limit (448 for every released Whisper), from the model's config."""
    from transformers import AutoConfig

    try:
        return int(AutoConfig.from_pretrained(model).max_target_positions)
    except Exception:  # tokenizer-only folder: every Whisper size uses 448
        return 448


@dataclass
class Limits:
    min_duration: float
    max_duration: float
    max_label_tokens: int


class Processor:
    """The map function: a batch of source rows -> prepared rows with a `skip` reason ('' = keep).

    Picklable (datasets ships it to num_proc workers); each worker loads the tokenizer once.
    """

    def __init__(self, model: str, task: str, limits: Limits, known_languages: list[str]):
        self.model, self.task, self.limits = model, task, limits
        self.known = set(known_languages)
        self._tok = None
        self._lang = None

    def _labels(self, text: str, language: str) -> list[int]:
        if self._tok is None:
            self._tok = load_tokenizer(self.model, language, self.task)
            self._lang = language
        if language != self._lang:
            self._tok.set_prefix_tokens(language=language, task=self.task)
            self._lang = language
        return self._tok(text).input_ids

    def row(self, audio_ref: dict, text: str, language: str) -> tuple[np.ndarray, list[int], str]:
        lim = self.limits
        text = canonical(text or "")
        if not text:
            return None, [], "empty transcript"
        if language not in self.known:
            return None, [], f"unknown language '{language}' in the language column"
        name = audio_ref.get("path") or "<bytes>"
        try:
            audio = decode(audio_ref["bytes"] if audio_ref.get("bytes") else audio_ref.get("path") or "", name)
        except AudioError as e:
            return None, [], str(e)
        seconds = len(audio) / SAMPLING_RATE
        if seconds > lim.max_duration:
            return None, [], f"too long: {seconds:.1f} s > max_duration={lim.max_duration:g} s"
        if seconds < lim.min_duration:
            return None, [], f"too short: {seconds:.3f} s < min_duration={lim.min_duration:g} s"
        labels = self._labels(text, language)
        if len(labels) > lim.max_label_tokens:
            return None, [], f"labels too long: {len(labels)} tokens > {lim.max_label_tokens} (max_target_positions)"
        return audio, labels, ""

    def __call__(self, batch: dict[str, list]) -> dict[str, list]:
        out = {"audio": [], "labels": [], "duration": [], "skip": []}
        for ref, text, lang in zip(batch["audio"], batch["text"], batch["language"], strict=True):
            audio, labels, reason = self.row(ref, text, lang)
            out["audio"].append(audio if audio is not None else np.zeros(0, np.float32))
            out["labels"].append(labels)
            out["duration"].append(len(audio) / SAMPLING_RATE if audio is not None else 0.0)
            out["skip"].append(reason)
        # The target is the canonical spelling that every score compares (lib.metrics).
        out["text"] = [canonical(t or "") for t in batch["text"]]
        return out


def _work_features():
    from datasets import Features, Value

    from lib.prepared import features

    f = dict(features())
    f.update(skip=Value("string"), where=Value("string"))
    return Features(f)


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def chunk_name(lo: int, hi: int) -> str:
    """The work folder of rows lo..hi-1 of a split: its identity is the row range."""
    return f"chunk-{lo:09d}-{hi:09d}"


def process_split(rows, split: str, work: Path, processor: Processor, num_proc: int, chunk_rows: int,
                  fp: str):
    """Process one split in chunks saved under work/split/; returns (kept dataset, skipped list)."""
    from datasets import concatenate_datasets, load_from_disk

    from lib.prepared import COLUMNS, features

    n = len(rows)
    if n == 0:  # e.g. every train row was also in test: nothing to save (an empty save does not load)
        return None, []
    chunks = []
    n_chunks = max(1, -(-n // chunk_rows))
    planned = set()
    for c in range(n_chunks):
        lo, hi = c * chunk_rows, min(n, (c + 1) * chunk_rows)
        # The folder is named by its row range, not its index: a rerun with another
        # chunk_rows (say 10 -> 5 after running out of memory) must not reuse "chunk 1" =
        # rows 10-19 as rows 5-9, which duplicated or lost rows and still exited 0.
        out = work / split / chunk_name(lo, hi)
        planned.add(out.name)
        marker = out / f".done-{fp}"
        if marker.is_file():
            done = load_from_disk(str(out))
            if len(done) == hi - lo:
                log.info("%s: chunk %d/%d (rows %d-%d) already done, reusing", split, c + 1, n_chunks, lo, hi - 1)
                chunks.append(done)
                continue
            log.warning("%s: chunk %s holds %d rows, not %d: redoing it", split, out.name, len(done), hi - lo)
        shutil.rmtree(out, ignore_errors=True)
        part = rows.select(range(lo, hi))
        procs = max(1, min(num_proc, hi - lo))
        done = part.map(
            processor, batched=True, batch_size=16, num_proc=procs if procs > 1 else None,
            features=_work_features(), remove_columns=[c for c in part.column_names if c not in ("id", "language", "where")],
            desc=f"{split} {c + 1}/{n_chunks}: decode, resample, tokenize", new_fingerprint=f"{fp}-{split}-{lo}-{hi}",
        )
        done.save_to_disk(str(out))
        marker.touch()
        chunks.append(load_from_disk(str(out)))
    # Chunks of an earlier plan (another chunk_rows) are never read again: free their disk.
    for stale in (work / split).glob("chunk-*"):
        if stale.name not in planned:
            shutil.rmtree(stale, ignore_errors=True)
    if not chunks:
        return None, []
    full = concatenate_datasets(chunks) if len(chunks) > 1 else chunks[0]
    skip_col = full["skip"]
    skipped = [{"split": split, "id": i, "where": w, "reason": r}
               for i, w, r, in zip(full["id"], full["where"], skip_col, strict=True) if r]
    keep = [i for i, r in enumerate(skip_col) if not r]
    kept = full.select(keep).select_columns(list(COLUMNS)).cast(features())
    return kept, skipped


# The speaking-rate check needs a median worth the name: fewer clips of a language, no check.
RATE_MIN_CLIPS = 10


def drop_fast_speech(kept: dict[str, Any], max_ratio: float, sources: dict[str, Any]) -> list[dict[str, str]]:
    """Skip clips whose transcript is spoken impossibly fast for their audio; returns the skips.

    An mp3 cut short by a failed copy and without a Xing/Info length header decodes "fine"
    into, say, 2 s of a 6 s sentence and trains the model to hallucinate the rest. Nothing in
    the file tells, but the rate does: characters (spaces excluded) per second far above the
    median of the corpus in that language (all splits together). Silence only lowers a clip's
    rate, so a real clip rarely reaches 2.5x the median: Common Voice's spread is about 0.5-1.5x.
    `kept` is filtered in place; `sources` (the source rows) give each skip its file and line;
    max_ratio 0 turns the check off.
    """
    if max_ratio <= 0:
        return []
    rates: dict[str, list[float]] = {}
    per_split = {}
    for split, ds in kept.items():
        if ds is None or len(ds) == 0:
            continue
        chars = [len(t.replace(" ", "")) for t in ds["text"]]
        rows = list(zip(chars, ds["duration"], ds["language"], strict=True))
        per_split[split] = rows
        for n, d, lang in rows:
            if d > 0:
                rates.setdefault(lang, []).append(n / d)
    medians = {lang: float(np.median(r)) for lang, r in rates.items() if len(r) >= RATE_MIN_CLIPS}
    skipped = []
    for split, rows in per_split.items():
        ds, keep, where = kept[split], [], None
        for i, (n, d, lang) in enumerate(rows):
            median = medians.get(lang)
            rate = n / d if d > 0 else float("inf")
            if median and rate > max_ratio * median:
                if where is None:
                    src = sources[split]
                    where = dict(zip(src["id"], src["where"], strict=True))
                row_id = ds[i]["id"]
                skipped.append({"split": split, "id": row_id, "where": where.get(row_id, row_id),
                                "reason": f"speech too fast: {rate:.0f} characters/s for {d:.2f} s of audio, "
                                          f"{rate / median:.1f}x the '{lang}' median of {median:.1f} "
                                          f"(max_rate_vs_median={max_ratio:g}): truncated audio or the wrong "
                                          f"transcript?"})
            else:
                keep.append(i)
        if len(keep) < len(ds):
            kept[split] = ds.select(keep)
    return skipped


def write_split(ds, dest: Path) -> dict[str, float]:
    ds.save_to_disk(str(dest))
    seconds = float(np.sum(ds["duration"])) if len(ds) else 0.0
    return {"rows": len(ds), "hours": round(seconds / 3600, 4), "seconds": round(seconds, 1)}


def versions() -> dict[str, str]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("datasets", "transformers", "tokenizers", "soundfile", "soxr", "librosa", "numpy", "pyarrow",
                "datacollective", "huggingface-hub"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out
