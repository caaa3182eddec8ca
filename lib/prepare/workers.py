"""Turn source rows into shards: decode, check, tokenize, keep the encoded audio; the rate check.

One chunk of source rows (chunk_rows of one split) is one task and one shard (lib/dataset/shards.py):
a worker decodes each clip once with lib.audio.decode (truncation, duration limits), tokenizes
its canonical transcript and stores `shards.compact(source bytes, audio, ...)`: the source's own
mp3/flac/ogg bytes, or for anything else (PCM) 16 kHz audio in prepare's pcm_codec (FLAC, or
Opus). Nothing float32 reaches the disk. A row that cannot be used is listed in the chunk's
sidecar with its reason, so that the report lists every dropped row and the counts add up
(kept + skipped = rows read).

Workers are `num_proc` processes (spawn: a fresh interpreter each, no forked tokenizer or Arrow
thread state); a task carries only its own rows (paths and text, or a Hub chunk's bytes), and
the parent hands out at most 2 tasks per worker at a time, so memory does not grow with the corpus.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lib.audio import AudioError, decode, header_seconds, read_bytes
from lib.dataset import shards
from lib.errors import UserError
from lib.metrics import canonical
from lib.prepare import staging
from lib.summary import elapsed
from lib.whisper import MAX_POSITIONS, SAMPLING_RATE

log = logging.getLogger("whisper_ft")

# Bump when the processing below changes what it writes, so old prepared data is redone.
# 2: transcripts are lib.metrics.canonical (NFC, ASCII digits, no zero-width joiners).
# 3: format 2 (lib/dataset/shards.py): Parquet shards of encoded audio, speaker column, held-out validation.
PROCESS_VERSION = 3

# Part of the fingerprint only where the source has segments (a manifest's `segments` column),
# so that such a dataset prepared before they were read is redone while every other one stays
# up to date: 1: segments become the `ts_labels` column (lib/dataset/shards.py).
SEGMENTS_VERSION = 1

KEPT_FIELDS = ("id", "where", "chars", "duration", "language", "source_bytes", "audio_format", "segments")
"""what a sidecar keeps of each kept row, in shard order: enough for the speaking-rate check, its
skip messages and the manifest's counts without opening a shard ("segments": how many the row
has; sidecars written before it was kept have one field less: read through kept_segments)"""


def kept_segments(kept_row: list[Any]) -> int:
    """A sidecar row's number of segments (0 in sidecars written before the field existed)."""
    i = KEPT_FIELDS.index("segments")
    return int(kept_row[i]) if len(kept_row) > i else 0


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
        return MAX_POSITIONS


@dataclass
class Limits:
    min_duration: float
    max_duration: float
    max_label_tokens: int


@dataclass
class Clip:
    """One usable row, ready for its shard."""

    text: str
    labels: list[int]
    duration: float
    audio: bytes
    audio_format: str
    source_bytes: int
    ts_labels: list[int]
    """the row's segments as timestamped labels (lib.train.augment.segmented), [] without segments"""
    segments: int = 0


class Processor:
    """A source row -> a Clip, or the reason it cannot be used.

    Picklable (each worker process gets a copy); each process loads the tokenizer once.
    """

    def __init__(self, model: str, task: str, limits: Limits, known_languages: list[str],
                 pcm_codec: str = "flac", opus_kbps: int = 32):
        self.model, self.task, self.limits = model, task, limits
        self.pcm_codec, self.opus_kbps = pcm_codec, opus_kbps  # what PCM sources become (shards.compact)
        self.known = set(known_languages)
        self._tok = None
        self._lang = None
        self._special = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tok": None, "_lang": None, "_special": None}  # each worker loads its own

    def _labels(self, text: str, language: str) -> list[int]:
        if self._tok is None:
            self._tok = load_tokenizer(self.model, language, self.task)
            self._lang = language
        if language != self._lang:
            self._tok.set_prefix_tokens(language=language, task=self.task)
            self._lang = language
        return self._tok(text).input_ids

    def _segment_labels(self, labels: list[int], segments: list[list[Any]], seconds: float, where: str,
                        row_id: str) -> list[int]:
        """`labels` (the row's, whose prefix they share) with the row's checked segments
        (lib.prepare.sources.parse_segments) in Whisper's timestamped form. Each segment's text is
        tokenized as the transcript is (canonical spelling), with the leading space Whisper's
        segments carry (" Hello" is one token, "Hello" another)."""
        from lib.whisper import TIME_STEP, SpecialTokens, segmented

        end = segments[-1][1]  # in order and not overlapping: the last end is the latest
        if end > seconds + TIME_STEP:
            raise UserError(f"{where} ({row_id}): segments: segment {len(segments)} ends at {end:g} s, past the "
                            f"clip's end ({seconds:.2f} s): fix the segment times, or the clip")
        if self._special is None:
            try:
                self._special = SpecialTokens.of(self._tok)
            except UserError as e:
                raise UserError(f"{where} ({row_id}): segments need Whisper's special and timestamp tokens, which "
                                f"model={self.model}'s tokenizer lacks ({e}); prepare with a multilingual Whisper "
                                f"tokenizer, or without the segments column") from None
        encode = self._tok.encode
        return segmented(labels, [(s, e, encode(" " + canonical(text), add_special_tokens=False))
                                  for s, e, text in segments], self._special)

    def row(self, audio_ref: dict, text: str, language: str, segments: str = "", where: str = "",
            row_id: str = "") -> tuple[Clip | None, str]:
        """A Clip, or (None, why it is skipped). `segments`: the row's JSON from lib.prepare.sources
        (parse_segments), "" for none; `where` / `row_id` name the row in a segments error."""
        lim = self.limits
        # The target is the canonical spelling that every score compares (lib.metrics).
        text = canonical(text or "")
        if not text:
            return None, "empty transcript"
        if language not in self.known:
            return None, f"unknown language '{language}' in the language column"
        name = audio_ref.get("path") or "<bytes>"
        # A 2-hour recording in a manifest of clips: its header says so, before reading 230 MB and
        # decoding it (1.6 GB of float32 at its own rate) only to skip it. The 1 % + 0.1 s of slack
        # leaves a header's rounding to the exact check after decoding.
        declared = header_seconds(audio_ref.get("bytes") or audio_ref.get("path") or "")
        if declared is not None and declared > lim.max_duration * 1.01 + 0.1:
            return None, (f"too long: {declared:.1f} s > max_duration={lim.max_duration:g} s "
                          f"(from its header, not decoded)")
        try:
            data = audio_ref["bytes"] if audio_ref.get("bytes") else read_bytes(audio_ref.get("path") or "", name)
            audio = decode(data, name)
        except AudioError as e:
            return None, str(e)
        seconds = len(audio) / SAMPLING_RATE
        if seconds > lim.max_duration:
            return None, f"too long: {seconds:.1f} s > max_duration={lim.max_duration:g} s"
        if seconds < lim.min_duration:
            return None, f"too short: {seconds:.3f} s < min_duration={lim.min_duration:g} s"
        labels = self._labels(text, language)
        if len(labels) > lim.max_label_tokens:
            return None, f"labels too long: {len(labels)} tokens > {lim.max_label_tokens} (max_target_positions)"
        segs = json.loads(segments) if segments else []
        ts_labels = self._segment_labels(labels, segs, seconds, where, row_id) if segs else []
        stored, fmt = shards.compact(data, audio, SAMPLING_RATE, self.pcm_codec, self.opus_kbps)
        return Clip(text, labels, seconds, stored, fmt, len(data), ts_labels, len(segs)), ""


def fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- one chunk -> one shard


_PROCESSOR: Processor | None = None
_WATCH: dict[str, staging.DiskWatch] = {}


def _init_worker(processor: Processor) -> None:
    global _PROCESSOR
    _PROCESSOR = processor
    from lib.cli import setup_logging

    setup_logging()
    # A pool worker holds both ends of its task pipe, so it never sees the parent die: a
    # `kill PID` of the job (not of its process group) would leave the workers waiting forever.
    parent = os.getppid()

    def exit_with_parent() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=exit_with_parent, name="exit-with-parent", daemon=True).start()


def chunk_task(rows, chunk: staging.Chunk, stage: Path, fp: str, extra: dict[str, Any] | None = None) -> dict:
    """What a worker gets for one chunk: its rows only (for a Hub source, that chunk's bytes)."""
    batch = rows[chunk.lo:chunk.hi]
    cols = list(batch)
    return {"stage": str(stage), "chunk": (chunk.index, chunk.split, chunk.lo, chunk.hi), "fp": fp,
            "rows": [dict(zip(cols, vals, strict=True)) for vals in zip(*(batch[c] for c in cols), strict=True)],
            **(extra or {})}


def process_chunk(task: dict[str, Any]) -> dict[str, Any]:
    """Decode, check and tokenize a chunk's rows; write its shard, then its sidecar. Returns the sidecar."""
    started = time.perf_counter()
    proc = _PROCESSOR
    stage = Path(task["stage"])
    chunk = staging.Chunk(*task["chunk"])
    cols: dict[str, list] = {c: [] for c in shards.COLUMNS}
    kept, skipped = [], []
    for r in task["rows"]:
        clip, reason = proc.row(r["audio"], r["text"], r["language"], r.get("segments") or "", r["where"], r["id"])
        if reason:
            skipped.append({"split": chunk.split, "id": r["id"], "where": r["where"], "reason": reason})
            continue
        for key, value in (("id", r["id"]), ("audio", clip.audio), ("audio_format", clip.audio_format),
                           ("text", clip.text), ("labels", clip.labels), ("language", r["language"]),
                           ("duration", clip.duration), ("speaker", r.get("speaker") or ""), ("where", r["where"]),
                           ("ts_labels", clip.ts_labels)):
            cols[key].append(value)
        kept.append([r["id"], r["where"], len(clip.text.replace(" ", "")), round(clip.duration, 4), r["language"],
                     clip.source_bytes, clip.audio_format, clip.segments])
    staging.remove_chunk_leftovers(stage, chunk)
    nbytes = shards.write_shard(stage / chunk.file, cols) if kept else 0
    watch = _WATCH.setdefault(str(stage), staging.DiskWatch(stage))
    side = {"fingerprint": task["fp"], "split": chunk.split, "lo": chunk.lo, "hi": chunk.hi,
            "file": chunk.file if kept else None, "rows": len(kept), "bytes": nbytes,
            "seconds": round(float(sum(k[3] for k in kept)), 3), "skipped": skipped,
            "kept_fields": list(KEPT_FIELDS), "kept": kept, "staging_bytes": watch.look(),
            "source_cache_bytes": task.get("source_cache_bytes", 0),
            "elapsed_s": round(time.perf_counter() - started, 2)}
    staging.write_sidecar(stage, chunk, side)
    return side


class Progress:
    """Log lines as chunks finish: chunks done of this index's total, clips/s, ETA."""

    def __init__(self, label: str, chunks: int, rows: int):
        self.label, self.total_chunks, self.total_rows = label, chunks, rows
        self.chunks = self.rows = 0
        self.started = time.monotonic()

    def done(self, side: dict[str, Any]) -> None:
        self.chunks += 1
        self.rows += side["hi"] - side["lo"]
        spent = max(time.monotonic() - self.started, 1e-6)
        rate = self.rows / spent
        eta = (self.total_rows - self.rows) / rate if rate > 0 else 0.0
        log.info("%s: chunk %d/%d done (%s rows %d-%d: %d kept, %d skipped), %.1f clips/s, ETA %s", self.label,
                 self.chunks, self.total_chunks, side["split"], side["lo"], side["hi"] - 1, side["rows"],
                 len(side["skipped"]), rate, elapsed(eta))


def run_chunks(tasks: Iterable[Callable[[], dict[str, Any]]], count: int, processor: Processor, num_proc: int,
               on_done: Callable[[dict[str, Any]], None]) -> None:
    """Run `count` chunk tasks (each a function that builds its task) on num_proc processes;
    on_done gets each sidecar as its chunk finishes. num_proc=1 (or one chunk) runs in this process."""
    global _PROCESSOR
    procs = max(1, min(num_proc, count))
    if procs == 1:
        _PROCESSOR = processor
        try:
            for build in tasks:
                on_done(process_chunk(build()))
        finally:
            _PROCESSOR = None
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(procs, initializer=_init_worker, initargs=(processor,)) as pool:
        pending: deque = deque()
        for build in tasks:
            pending.append(pool.apply_async(process_chunk, (build(),)))
            # At most 2 tasks per worker are built (rows in memory) at a time.
            while len(pending) >= 2 * procs:
                on_done(pending.popleft().get())
        while pending:
            on_done(pending.popleft().get())


# ---------------------------------------------------------------- the speaking-rate check


# The speaking-rate check needs a median worth the name: fewer clips of a language, no check.
RATE_MIN_CLIPS = 10


def fast_speech(sidecars: list[dict[str, Any]], max_ratio: float) -> list[list[tuple[int, dict[str, str]]]]:
    """Clips whose transcript is spoken impossibly fast for their audio: for each sidecar (chunk),
    the positions of its kept rows to drop, with their skip entries.

    An mp3 cut short by a failed copy and without a Xing/Info length header decodes "fine"
    into, say, 2 s of a 6 s sentence and trains the model to hallucinate the rest. Nothing in
    the file tells, but the rate does: characters (spaces excluded) per second far above the
    median of the corpus in that language (all splits together). Silence only lowers a clip's
    rate, so a real clip rarely reaches 2.5x the median: Common Voice's spread is about 0.5-1.5x.
    It needs the whole corpus's median, so it runs once every chunk is done, on the sidecars
    (never the audio). max_ratio 0 turns the check off.
    """
    out: list[list[tuple[int, dict[str, str]]]] = [[] for _ in sidecars]
    if max_ratio <= 0:
        return out
    f = {name: i for i, name in enumerate(KEPT_FIELDS)}
    rates: dict[str, list[float]] = {}
    for side in sidecars:
        for k in side["kept"]:
            if k[f["duration"]] > 0:
                rates.setdefault(k[f["language"]], []).append(k[f["chars"]] / k[f["duration"]])
    medians = {lang: float(np.median(r)) for lang, r in rates.items() if len(r) >= RATE_MIN_CLIPS}
    for drop, side in zip(out, sidecars, strict=True):
        for pos, k in enumerate(side["kept"]):
            n, d, lang = k[f["chars"]], k[f["duration"]], k[f["language"]]
            median = medians.get(lang)
            rate = n / d if d > 0 else float("inf")
            if median and rate > max_ratio * median:
                drop.append((pos, {
                    "split": side["split"], "id": k[f["id"]], "where": k[f["where"]],
                    "reason": f"speech too fast: {rate:.0f} characters/s for {d:.2f} s of audio, "
                              f"{rate / median:.1f}x the '{lang}' median of {median:.1f} "
                              f"(max_rate_vs_median={max_ratio:g}): truncated audio or the wrong transcript?"}))
    return out


def drop_rows(path: Path, positions: list[int], rows_before: int) -> int:
    """Rewrite a shard without the rows at `positions` (atomically: write_shard); returns its
    bytes, 0 when no row is left (the shard is deleted). Idempotent: a shard already rewritten
    (a finalizer killed after this step) is left as it is."""
    import pyarrow.parquet as pq

    want = rows_before - len(positions)
    have = pq.read_metadata(path).num_rows
    if have == want:
        return path.stat().st_size
    if have != rows_before:
        raise UserError(f"{path} holds {have} rows, its sidecar {rows_before}: the staging folder was changed "
                        f"by hand; delete {path.parent.parent} and prepare again")
    if want == 0:
        path.unlink()
        return 0
    table = shards.read_shard(str(path))
    drop = set(positions)
    return shards.write_shard(path, table.take([i for i in range(rows_before) if i not in drop]))


def rate_drops(plan: list[staging.Chunk], sides: list[dict[str, Any]], max_ratio: float,
               skipped: list[dict[str, str]]) -> Iterator[tuple[staging.Chunk, dict[str, Any], list[int]]]:
    """(chunk, sidecar, row positions to drop) of each chunk that loses rows to the speaking-rate
    check, in plan order; every skip (those chunks' and the others') is appended to `skipped`.
    Shared by apply_fast_speech (on disk) and lib.prepare.upload (in a bucket)."""
    for chunk, side, drop in zip(plan, sides, fast_speech(sides, max_ratio), strict=True):
        skipped += [skip for _, skip in drop]
        if drop:
            yield chunk, side, [pos for pos, _ in drop]


def apply_fast_speech(stage: Path, plan: list[staging.Chunk], sides: list[dict[str, Any]], max_ratio: float,
                      disk: staging.DiskWatch) -> list[dict[str, str]]:
    """Run the speaking-rate check on every chunk's sidecar and rewrite only the shards that lose
    rows; returns the skips in plan order. Each sidecar records its drops ("rate_dropped") before
    its shard is rewritten, so a finalizer killed half-way resumes where it was."""
    skipped: list[dict[str, str]] = []
    size = disk.look(force=True)
    for chunk, side, positions in rate_drops(plan, sides, max_ratio, skipped):
        if side.get("rate_dropped") != positions:
            side["rate_dropped"] = positions
            staging.write_sidecar(stage, chunk, side)
        path = stage / chunk.file
        before = path.stat().st_size if path.exists() else 0
        after = drop_rows(path, positions, side["rows"]) if before else 0
        # While write_shard renames, the old shard and the new one are both on disk.
        disk.peak = max(disk.peak, size + after)
        size += after - before
        side["bytes"] = after
    return skipped


def split_summary(stage: Path, plan: list[staging.Chunk], sides: list[dict[str, Any]],
                  sizes: dict[str, int] | None = None) -> dict[str, dict[str, Any]]:
    """Per split, for manifest.json: rows, hours, seconds, bytes, the source's encoded bytes of the
    kept clips, the stored audio formats, the rows with segments and their segments, and every
    shard in source order. `sizes`: each shard's bytes where they are not files under `stage`
    (a bucket: lib/prepare/upload.py)."""
    f = {name: i for i, name in enumerate(KEPT_FIELDS)}
    out: dict[str, dict[str, Any]] = {}
    for chunk, side in zip(plan, sides, strict=True):
        info = out.setdefault(chunk.split, {"rows": 0, "seconds": 0.0, "bytes": 0, "source_bytes": 0,
                                            "formats": {}, "segment_rows": 0, "segments": 0, "shards": []})
        dropped = set(side.get("rate_dropped") or [])
        kept = [k for i, k in enumerate(side["kept"]) if i not in dropped]
        if not kept:
            continue
        seconds = float(sum(k[f["duration"]] for k in kept))
        nbytes = sizes[chunk.file] if sizes is not None else (stage / chunk.file).stat().st_size
        info["shards"].append({"file": chunk.file, "rows": len(kept), "seconds": round(seconds, 3), "bytes": nbytes})
        info["rows"] += len(kept)
        info["seconds"] += seconds
        info["bytes"] += nbytes
        info["source_bytes"] += sum(k[f["source_bytes"]] for k in kept)
        info["segment_rows"] += sum(1 for k in kept if kept_segments(k))
        info["segments"] += sum(kept_segments(k) for k in kept)
        for k in kept:
            info["formats"][k[f["audio_format"]]] = info["formats"].get(k[f["audio_format"]], 0) + 1
    for info in out.values():
        info["hours"] = round(info["seconds"] / 3600, 4)
        info["seconds"] = round(info["seconds"], 1)
    return {split: info for split, info in out.items() if info["rows"]}


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
