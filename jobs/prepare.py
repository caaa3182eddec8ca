"""Prepare a speech dataset for Whisper fine-tuning: DATA_DIR/prepared/NAME (see lib/prepared.py).

    python -m jobs.prepare --recipe jobs/recipes/prepare_cv_hi.yaml [--env-file .env] [key=value ...]
    python -m jobs.prepare name=cv_hi language=hi source.kind=cv source.path=/data/cv-corpus-17.0/hi
    python -m jobs.prepare name=fleurs_hi language=hi source.kind=hub source.hub_id=google/fleurs \
        source.hub_config=hi_in source.hub_revision=refs/convert/parquet source.text_column=raw_transcription

Reads a Common Voice release folder, a Mozilla Data Collective download, a Hugging Face Hub
dataset, a CSV/TSV/JSONL manifest or an audiofolder; decodes and resamples every clip to
16 kHz mono, tokenizes the canonical transcript (lib.metrics.canonical) with the
<|lang|><|task|> prefix, and drops (and reports) rows that cannot train: undecodable or
truncated audio, missing clips, empty transcripts, clips outside [min_duration,
max_duration], labels over max_target_positions, speech impossibly fast for the audio,
duplicate clips, and train (validation) rows whose clip or sentence is in validation or test.
Re-running with the same inputs and config does nothing; a killed run resumes by chunk.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from lib import summary
from lib.audio import SAMPLING_RATE
from lib.cli import run_job
from lib.config import to_dict
from lib.data import (
    PROCESS_VERSION,
    Limits,
    Processor,
    drop_fast_speech,
    fingerprint,
    load_tokenizer,
    max_target_positions,
    process_split,
    versions,
    write_split,
)
from lib.env import Env
from lib.errors import UserError
from lib.language import known_languages, resolve_language
from lib.prepared import MANIFEST, tokenizer_signature, write_manifest
from lib.sources import SourceConfig, drop_overlaps, read_source

log = logging.getLogger("whisper_ft")


@dataclass
class PrepareConfig:
    """`make prepare`: which source, which language, which filters."""

    name: str = "dataset"
    """Output folder name: DATA_DIR/prepared/NAME; `make train DATA=NAME` (data=NAME) reads it."""
    language: str = "hi"
    """ISO code of the speech (hi, en, ...) or its English name; must be a Whisper language."""
    task: Literal["transcribe", "translate"] = "transcribe"
    """Whisper task token in the label prefix."""
    model: str = "openai/whisper-large-v2"
    """Local folder or Hub id whose tokenizer makes the labels (use the model you will train)."""
    num_proc: int = 2
    """Worker processes for decoding: about one per CPU core."""
    min_duration: float = 0.1
    """Seconds; shorter clips are skipped (an empty or click-only recording)."""
    max_duration: float = 30.0
    """Seconds; longer clips are skipped: Whisper sees 30 s windows (3000 mel frames)."""
    max_rate_vs_median: float = 2.5
    """Skip clips spoken faster (characters/s) than this many times their language's median in
    the corpus: audio cut short with the full transcript. 0 turns the check off."""
    chunk_rows: int = 2000
    """Rows per saved chunk: a killed job redoes at most one chunk per split."""
    force: bool = False
    """Redo the work even if DATA_DIR/prepared/NAME is up to date."""
    source: SourceConfig = field(default_factory=SourceConfig)

    def __post_init__(self) -> None:
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise UserError(f"name={self.name!r}: give a plain folder name such as name=cv_hi")
        if self.num_proc < 1:
            raise UserError(f"num_proc={self.num_proc}: must be at least 1")
        if not 0 <= self.min_duration < self.max_duration <= 30.0:
            raise UserError(f"min_duration={self.min_duration} / max_duration={self.max_duration}: need "
                            f"0 <= min_duration < max_duration <= 30 (Whisper's window is 30 s)")
        if self.max_rate_vs_median < 0 or 0 < self.max_rate_vs_median <= 1:
            raise UserError(f"max_rate_vs_median={self.max_rate_vs_median}: use a ratio above 1 (default 2.5), "
                            f"or 0 to turn the speaking-rate check off")
        if self.chunk_rows < 1:
            raise UserError(f"chunk_rows={self.chunk_rows}: must be at least 1")


def main(cfg: PrepareConfig, env: Env) -> dict:
    started = time.time()
    out = env.prepared_dir(cfg.name)
    # 1. Check the language against the tokenizer before any work.
    tokenizer = load_tokenizer(cfg.model)
    cfg.language = resolve_language(cfg.language, tokenizer)
    known = sorted(known_languages(tokenizer))
    limits = Limits(cfg.min_duration, cfg.max_duration, max_target_positions(cfg.model))
    log.info("prepare: %s -> %s, language=%s task=%s, tokenizer %s, clips %.1f-%.0f s, labels <= %d tokens",
             cfg.source.kind, out, cfg.language, cfg.task, cfg.model, cfg.min_duration, cfg.max_duration,
             limits.max_label_tokens)

    # 2. Read the source rows (downloading for mdc, loading for hub); nothing is decoded yet.
    rows = read_source(cfg.source, cfg.language, env)
    overlaps = drop_overlaps(rows)  # duplicate clips; test/validation clips or sentences in train
    for split, by_reason in overlaps.items():
        log.warning("prepare: dropped from %s: %s (listed in manifest.json)", split,
                    ", ".join(f"{n} {why}" for why, n in by_reason.items()))
    counts_in = {s: len(d) for s, d in rows.splits.items()}
    log.info("prepare: rows read per split %s from %s", counts_in, rows.describe)

    # 3. Skip everything if a finished dataset was made from the same inputs and config.
    settings = {k: v for k, v in to_dict(cfg).items() if k not in ("num_proc", "force", "chunk_rows", "name")}
    fp = fingerprint(PROCESS_VERSION, settings, rows.signature, limits.max_label_tokens)
    if (out / MANIFEST).is_file() and not cfg.force:
        import json

        old = json.loads((out / MANIFEST).read_text())
        if old.get("fingerprint") == fp:
            log.info("prepare: %s is up to date (fingerprint %s); pass force=true to redo", out, fp)
            summary.done("prepare (up to date)", summary.prepare_summary(out, old))
            return old

    # 4. Decode, resample, filter and tokenize each split, chunk by chunk, in a work folder.
    work = out.parent / f".{cfg.name}.partial"
    processor = Processor(cfg.model, cfg.task, limits, known)
    skipped = list(rows.skipped)
    kept = {}
    for split, ds in rows.splits.items():
        kept[split], skipped_split = process_split(ds, split, work / "chunks", processor, cfg.num_proc,
                                                   cfg.chunk_rows, fp)
        skipped += skipped_split
    # Needs every split's durations first: the median is the corpus's.
    skipped += drop_fast_speech(kept, cfg.max_rate_vs_median, rows.splits)

    # 5. Write the splits, then the manifest last; swap the finished folder into place.
    stage = work / "dataset"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    splits = {}
    for split, ds in kept.items():
        if ds is None or len(ds) == 0:
            log.warning("prepare: split %s has no usable rows; it is not written", split)
            continue
        splits[split] = write_split(ds, stage / split)
    if not splits:
        raise UserError(f"no usable rows in any split: see the skip reasons above ({len(skipped)} rows skipped)")
    for split, info in splits.items():
        info["rows_read"] = counts_in.get(split, 0) + sum(1 for s in rows.skipped if s["split"] == split)
        info["skipped"] = sum(1 for s in skipped if s["split"] == split)
    manifest = {
        "name": cfg.name,
        "fingerprint": fp,
        "source": rows.describe,
        "language": cfg.language,
        "task": cfg.task,
        "tokenizer": cfg.model,
        "tokenizer_signature": tokenizer_signature(tokenizer, cfg.language, cfg.task),
        "sampling_rate": SAMPLING_RATE,
        "max_target_positions": limits.max_label_tokens,
        "splits": splits,
        "skipped_by_reason": dict(Counter(s["reason"].split(":")[0] for s in skipped)),
        "dropped_overlaps": overlaps,
        "skipped": skipped,
        "versions": versions(),
        "config": to_dict(cfg),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": round(time.time() - started, 1),
    }
    write_manifest(stage, manifest)
    old = out.parent / f".{cfg.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.replace(old)
    stage.replace(out)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(work, ignore_errors=True)

    # 6. Report.
    for split, info in splits.items():
        log.info("prepare: %-10s %6d rows  %7.3f h  (%d read, %d skipped)", split, info["rows"], info["hours"],
                 info["rows_read"], info["skipped"])
    for s in skipped[:20]:
        log.warning("prepare: skipped %s %s: %s", s["split"], s["where"], s["reason"])
    if len(skipped) > 20:
        log.warning("prepare: ... and %d more skipped rows, all listed in %s", len(skipped) - 20, out / MANIFEST)
    log.info("prepare: wrote %s in %.1f s", out, time.time() - started)
    summary.done("prepare", summary.prepare_summary(out, manifest))
    return manifest


if __name__ == "__main__":
    raise SystemExit(run_job("prepare", __doc__, PrepareConfig, main))
