"""Prepare a speech dataset for Whisper fine-tuning: DATA_DIR/prepared/DATA (format 2, lib/dataset/shards.py).

    python -m jobs.prepare --recipe jobs/recipes/prepare_cv_hi.yaml [--env-file .env] [key=value ...]
    python -m jobs.prepare data=cv_hi language=hi source.kind=cv source.path=/data/cv-corpus-17.0/hi
    python -m jobs.prepare data=fleurs_hi language=hi source.kind=hub source.hub_id=google/fleurs \
        source.hub_config=hi_in source.hub_revision=refs/convert/parquet source.text_column=raw_transcription
    make prepare DATA=cv_hi ARGS="shard_count=4 shard_index=0"     # one of 4 machines (an Indexed Job's pod)
    make prepare DATA=cv_hi ARGS="out=s3://bucket/prepared/cv_hi"  # straight to a bucket (lib/prepare/upload.py)

Reads a Common Voice release folder, a Mozilla Data Collective download, a Hugging Face Hub
dataset, a CSV/TSV/JSONL manifest or an audiofolder; decodes every clip once (to check it and
measure it), keeps its encoded bytes (mp3/flac/ogg as they are, anything else as 16 kHz FLAC,
or Opus with pcm_codec=opus), tokenizes the canonical transcript (lib.metrics.canonical) with
the <|lang|><|task|> prefix (a manifest's `segments`, checked, also as timestamped labels: the
ts_labels column), and
drops (and reports) rows that cannot train: undecodable or truncated audio, missing clips,
empty transcripts, clips outside [min_duration, max_duration], labels over
max_target_positions, speech impossibly fast for the audio, duplicate clips, and train
(validation) rows whose clip or sentence is in validation or test. A source without a
validation split gets a speaker-disjoint slice of train (validation_fraction). Chunks of
chunk_rows rows are written as Parquet shards straight into DATA_DIR/prepared/.DATA.partial,
the manifest last, then the folder is swapped into place. Re-running with the same inputs and
config does nothing; a killed run reuses every finished shard. With shard_count=N each index
prepares every N-th chunk, and the one that finds every chunk done writes the manifest.
`data=` is the dataset train's and eval's data= read (name= is its old, deprecated name). With
out=s3://... (or gs://...) each finished shard is uploaded, then its marker, and the manifest
last; train and eval then read data=<that URL>.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lib import summary
from lib.cli import run_job
from lib.config import to_dict
from lib.dataset import bucket, shards
from lib.dataset.prepared import MANIFEST, tokenizer_signature, write_manifest
from lib.env import Env
from lib.errors import UserError
from lib.language import known_languages, resolve_language
from lib.prepare import staging
from lib.prepare.sources import SourceConfig, carve_validation, drop_overlaps, read_source
from lib.prepare.upload import BucketOut
from lib.prepare.workers import (
    PROCESS_VERSION,
    SEGMENTS_VERSION,
    Limits,
    Processor,
    Progress,
    apply_fast_speech,
    chunk_task,
    fingerprint,
    load_tokenizer,
    max_target_positions,
    run_chunks,
    split_summary,
    versions,
)
from lib.runlock import RunLock
from lib.whisper import SAMPLING_RATE, WINDOW_SECONDS

log = logging.getLogger("whisper_ft")


@dataclass
class PrepareConfig:
    """`make prepare`: which source, which language, which filters."""

    data: str | None = None
    """The prepared dataset it writes: DATA_DIR/prepared/DATA, the one `make train DATA=...` and
    `make eval DATA=...` (data=) read; a plain folder name (default: dataset)."""
    out: str | None = None
    """Where the dataset goes instead of DATA_DIR/prepared/DATA: a bucket URL (s3://bucket/prefix,
    gs://bucket/prefix; credentials from the environment, never in the URL) or a folder. Train and
    eval then read data=<the same URL or folder>."""
    name: str | None = None
    """Deprecated: the old name of data= (still read, with a warning)."""
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
    max_duration: float = float(WINDOW_SECONDS)
    """Seconds; longer clips are skipped: Whisper sees 30 s windows (3000 mel frames)."""
    max_rate_vs_median: float = 2.5
    """Skip clips spoken faster (characters/s) than this many times their language's median in
    the corpus: audio cut short with the full transcript. 0 turns the check off."""
    validation_fraction: float = 0.05
    """A source without a validation split: this share of train is held out as validation,
    speaker-disjoint where the rows have speaker ids. 0: no validation split."""
    chunk_rows: int = 2000
    """Rows per chunk = per shard, the unit of work and of resume: a worker holds one chunk's
    encoded audio in memory (2000 x 5 s mp3 ~ 80 MB; lower it for long PCM clips)."""
    shard_count: int = 1
    """Machines (Kubernetes Indexed Job pods) preparing this dataset together into one shared
    DATA_DIR; each takes every shard_count-th chunk."""
    shard_index: int | None = None
    """This machine's index, 0..shard_count-1; default: JOB_COMPLETION_INDEX (an Indexed Job sets it)."""
    pcm_codec: Literal["flac", "opus"] = "flac"
    """What PCM sources (wav, ...) are stored as: flac (lossless) or opus (lossy, opus_kbps); mp3/flac/ogg stay as given."""
    opus_kbps: int = 32
    """Opus bitrate in kbit/s for pcm_codec=opus (6..256): 32 is about 12-15 MB per audio hour, FLAC 65-90."""
    force: bool = False
    """Redo the work even if DATA_DIR/prepared/DATA is up to date."""
    source: SourceConfig = field(default_factory=SourceConfig)

    def __post_init__(self) -> None:
        if self.name is not None:
            if self.data is not None and self.data != self.name:
                raise UserError(f"data={self.data} and name={self.name}: name= is the old name of data=; give "
                                f"data= alone (data={self.data} or data={self.name})")
            log.warning("prepare: name=%s is deprecated: write data=%s (the same dataset, DATA_DIR/prepared/%s)",
                        self.name, self.name, self.name)
        target, flag = self.dataset(), "name" if self.data is None and self.name is not None else "data"
        if not target or "/" in target or target.startswith("."):
            raise UserError(f"{flag}={target!r}: give a plain folder name such as data=cv_hi")
        if self.out is not None:
            bucket.check_url(self.out, "out")
            if shards.is_url(self.out) and not bucket.is_bucket(self.out):
                raise UserError(f"out={bucket.redact(self.out)}: prepare writes to s3://, gs:// or a folder; "
                                f"give one of those")
            if not self.out.strip("/"):
                raise UserError("out= is empty: give s3://bucket/prefix, gs://bucket/prefix or a folder")
        if self.num_proc < 1:
            raise UserError(f"num_proc={self.num_proc}: must be at least 1")
        if not 0 <= self.min_duration < self.max_duration <= WINDOW_SECONDS:
            raise UserError(f"min_duration={self.min_duration} / max_duration={self.max_duration}: need "
                            f"0 <= min_duration < max_duration <= {WINDOW_SECONDS} (Whisper's window is {WINDOW_SECONDS} s)")
        if self.max_rate_vs_median < 0 or 0 < self.max_rate_vs_median <= 1:
            raise UserError(f"max_rate_vs_median={self.max_rate_vs_median}: use a ratio above 1 (default 2.5), "
                            f"or 0 to turn the speaking-rate check off")
        if not 0 <= self.validation_fraction <= 0.5:
            raise UserError(f"validation_fraction={self.validation_fraction}: use a share of train between 0 "
                            f"(no held-out validation) and 0.5; the default is 0.05")
        lo, hi = shards.OPUS_KBPS
        if not lo <= self.opus_kbps <= hi:
            raise UserError(f"opus_kbps={self.opus_kbps}: use {lo}..{hi} kbit/s (libsndfile's Opus range; 32 is "
                            f"the default, 16-24 still serve speech, more than 64 is no longer small)")
        if self.chunk_rows < 1:
            raise UserError(f"chunk_rows={self.chunk_rows}: must be at least 1")
        if self.shard_count < 1:
            raise UserError(f"shard_count={self.shard_count}: must be at least 1")
        if self.shard_index is not None and not 0 <= self.shard_index < self.shard_count:
            raise UserError(f"shard_index={self.shard_index}: must be 0..{self.shard_count - 1} "
                            f"for shard_count={self.shard_count}")
        if self.force and self.shard_count > 1:
            raise UserError("force=true with shard_count > 1: indexes that start after another one finished "
                            "would redo their chunks with nobody left to write the manifest; delete "
                            "DATA_DIR/prepared/DATA instead, then run every index")

    def dataset(self) -> str:
        """The dataset's folder name under DATA_DIR/prepared: data=, else the deprecated name=, else dataset."""
        for given in (self.data, self.name):
            if given is not None:
                return given
        return "dataset"

    def index(self, env: Env) -> int:
        """This process's shard index: shard_index, else JOB_COMPLETION_INDEX, for shard_count > 1."""
        if self.shard_count == 1:
            return 0
        index = self.shard_index if self.shard_index is not None else env.job_completion_index
        if index is None:
            raise UserError(f"shard_count={self.shard_count} needs shard_index=0..{self.shard_count - 1} (a "
                            f"Kubernetes Indexed Job sets JOB_COMPLETION_INDEX, which is used when it is absent)")
        if not 0 <= index < self.shard_count:
            raise UserError(f"JOB_COMPLETION_INDEX={index} is not below shard_count={self.shard_count}: make "
                            f"the Job's completions equal to shard_count")
        return index


@dataclass
class Resolved:
    """What prepare resolved from its config with the tokenizer; the PrepareConfig stays as given."""

    language: str
    """the language code the tokenizer knows (language=hindi -> hi): labels, manifest and fingerprint"""

    def record(self, cfg: PrepareConfig) -> dict[str, Any]:
        """The config as manifest.json records it (and its fingerprint reads it): the dataset under
        `name` (data= or the deprecated name=), the resolved language; the same keys as before data=."""
        rest = {k: v for k, v in to_dict(cfg).items() if k not in ("data", "name", "out")}
        # out= only where given: where a dataset goes is no part of what it holds (nor of its fingerprint)
        return {"name": cfg.dataset(), **rest, "language": self.language, **({"out": cfg.out} if cfg.out else {})}


def pcm_storage(cfg: PrepareConfig) -> str:
    """What PCM sources become, in words for the log and manifest.json's storage."""
    if cfg.pcm_codec == "opus":
        return f"Ogg/Opus {cfg.opus_kbps} kbit/s (lossy)"
    return "16-bit FLAC (lossless)"


def _finished(out, remote: BucketOut | None = None) -> dict | None:
    if remote is not None:
        return remote.manifest()
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def main(cfg: PrepareConfig, env: Env) -> dict:
    started = time.time()
    index, count = cfg.index(env), cfg.shard_count
    who = "prepare" if count == 1 else f"prepare [index {index} of {count}]"
    remote = None
    if cfg.out is not None and bucket.is_bucket(cfg.out):
        # A bucket: shards go to their final names (no rename there), the manifest last; each is
        # made in a local scratch folder first. Its bucket and credentials are checked before any work.
        bucket.check_bucket(cfg.out, "out", write=True)
        out: Any = cfg.out.rstrip("/")
        work = env.data_dir / "prepared" / f".{cfg.dataset()}.to-bucket"
        remote = BucketOut(out, work)
    else:
        out = Path(cfg.out) if cfg.out is not None else env.prepared_dir(cfg.dataset())
        work = out.parent / f".{out.name}.partial"  # the staging folder: shards land here, then it becomes `out`
    # 1. Check the language against the tokenizer before any work.
    tokenizer = load_tokenizer(cfg.model)
    resolved = Resolved(language=resolve_language(cfg.language, tokenizer))
    known = sorted(known_languages(tokenizer))
    limits = Limits(cfg.min_duration, cfg.max_duration, max_target_positions(cfg.model))
    log.info("%s: %s -> %s, language=%s task=%s, tokenizer %s, clips %.1f-%.0f s, labels <= %d tokens, "
             "PCM sources as %s", who, cfg.source.kind, out, resolved.language, cfg.task, cfg.model, cfg.min_duration,
             cfg.max_duration, limits.max_label_tokens, pcm_storage(cfg))

    # 2. Read the source rows (downloading for mdc; a hub source into the work folder, never
    #    HF_HOME); nothing is decoded yet. Drop duplicates and train/validation rows whose clip or
    #    sentence is held out; where the source has no validation, hold some of train out (by
    #    speaker) and drop the train rows that share a sentence with it.
    hub_cache = work / f"{staging.HUB_CACHE}{index}"
    rows = read_source(cfg.source, resolved.language, env, cache_dir=hub_cache if cfg.source.kind == "hub" else None)
    overlaps = drop_overlaps(rows)
    validation = carve_validation(rows, cfg.validation_fraction)
    if validation["made"] == "held out of train":
        for split, by_reason in drop_overlaps(rows).items():
            for why, n in by_reason.items():
                overlaps.setdefault(split, {})[why] = overlaps.get(split, {}).get(why, 0) + n
    for split, by_reason in overlaps.items():
        log.warning("%s: dropped from %s: %s (listed in manifest.json)", who, split,
                    ", ".join(f"{n} {why}" for why, n in by_reason.items()))
    counts_in = {s: len(d) for s, d in rows.splits.items()}
    log.info("%s: rows read per split %s from %s", who, counts_in, rows.describe)
    segment_rows = {s: sum(1 for v in d["segments"] if v) for s, d in rows.splits.items() if "segments" in d.column_names}
    if any(segment_rows.values()):
        log.info("%s: rows with segments (timestamped labels, ts_labels) per split %s", who, segment_rows)

    # 3. Skip everything if a finished dataset was made from the same inputs and config.
    #    The PCM codec is a part of its own, present only for opus: a flac dataset keeps the
    #    fingerprint it had before the flag existed (not redone), an opus one never matches it.
    settings = {k: v for k, v in resolved.record(cfg).items()
                if k not in ("num_proc", "force", "chunk_rows", "name", "shard_count", "shard_index", "pcm_codec",
                             "opus_kbps", "out")}
    fp = fingerprint(PROCESS_VERSION, settings, rows.signature, limits.max_label_tokens,
                     *([{"segments": SEGMENTS_VERSION}] if any(segment_rows.values()) else []),
                     *([{"pcm_codec": cfg.pcm_codec, "opus_kbps": cfg.opus_kbps}] if cfg.pcm_codec != "flac" else []))
    old = _finished(out, remote)
    if old is not None and old.get("format") != shards.FORMAT:
        log.warning("%s: %s was prepared in an older format (float32 arrays, before format %d: encoded audio in "
                    "Parquet shards); train and eval refuse it, so it is prepared again", who, out, shards.FORMAT)
    elif old is not None and old.get("fingerprint") == fp and not cfg.force:
        if remote is not None:
            remote.remove_markers()  # left by a finisher stopped just after the manifest
            remote.clean_local()
        else:
            staging.remove_sidecars(out)  # left by a finalizer killed just after its swap
        shutil.rmtree(hub_cache, ignore_errors=True)
        with contextlib.suppress(OSError):
            work.rmdir()  # made (empty) by a Hub download above
        log.info("%s: %s is up to date (fingerprint %s); pass force=true to redo", who, out, fp)
        summary.done("prepare (up to date)", summary.prepare_summary(out, old, env))
        return old
    if old is not None and remote is not None:
        remote.unfinish("force=true" if cfg.force and old.get("fingerprint") == fp else
                        "prepared from other inputs or settings")

    # 4. This index's chunks of the plan: reuse every finished shard, decode the rest on num_proc
    #    workers, each chunk written straight into the staging folder as its final shard.
    plan = staging.plan_chunks(counts_in, cfg.chunk_rows)
    ours = staging.mine(plan, count, index)
    if remote is None:
        todo = [c for c in ours if staging.read_sidecar(work, c, fp) is None]
    else:
        todo = [c for c, side in zip(ours, remote.done(ours, fp), strict=True) if side is None]
        # made here before a stop that came before their upload: only the upload is left
        for c in [c for c in todo if staging.read_sidecar(work, c, fp) is not None]:
            remote.publish(c, staging.read_sidecar(work, c, fp))
            todo.remove(c)
            log.info("%s: %s was finished here before the upload; uploaded it", who, c.describe())
    log.info("%s: %d chunks of <= %d rows in the plan, %d for this index: %d already done, %d to do on %d workers",
             who, len(plan), cfg.chunk_rows, len(ours), len(ours) - len(todo), len(todo), min(cfg.num_proc, len(todo)))
    work.mkdir(parents=True, exist_ok=True)
    processor = Processor(cfg.model, cfg.task, limits, known, cfg.pcm_codec, cfg.opus_kbps)
    progress = Progress(who, len(todo), sum(c.hi - c.lo for c in todo))
    extra = {"source_cache_bytes": staging.folder_bytes(hub_cache, skip_hub_cache=False)}
    on_done = progress.done
    if remote is not None:
        by_rows = {(c.split, c.lo): c for c in todo}

        def on_done(side: dict[str, Any]) -> None:  # upload as each chunk finishes: shard, then its marker
            remote.publish(by_rows[side["split"], side["lo"]], side)
            progress.done(side)
    run_chunks((lambda c=c: chunk_task(rows.splits[c.split], c, work, fp, extra) for c in todo), len(todo),
               processor, cfg.num_proc, on_done)
    shutil.rmtree(hub_cache, ignore_errors=True)  # this index is done with the source's bytes

    # 5. Every chunk of the plan done? Only then can the rate check (the corpus's median) and the
    #    manifest be written: by this process if so, else by the index that finishes last.
    sides = [staging.read_sidecar(work, c, fp) for c in plan] if remote is None else remote.done(plan, fp)
    missing = [c for c, side in zip(plan, sides, strict=True) if side is None]
    if missing:
        return _not_last(who, out, work, fp, plan, missing, len(ours), len(todo), env, remote)
    if remote is not None:
        # No lock in a bucket: two indexes finishing at once write the same manifest (every step redoes
        # nothing that is done).
        manifest = _finish(cfg, resolved, index, who, out, work, fp, plan, rows, counts_in, overlaps, validation,
                           tokenizer, limits, started, remote)
        _report(who, out, manifest, started, env)
        return manifest

    # 6. Finish under the lock (one writer, also when two indexes finish at once; a finalizer
    #    killed half-way leaves a lock that the rerun takes over): speaking-rate check, stale
    #    files out, manifest last, swap into place.
    lock = RunLock(out.parent / f".{out.name}.lock")
    try:
        lock.acquire()
    except UserError as e:  # a live process holds it: it is writing the manifest
        log.info("%s: another process is finishing the dataset (%s); nothing left for this index", who, e)
        summary.done(who, {"outputs": f"{out} (being finished by another index)"})
        return {}
    try:
        manifest = _finish(cfg, resolved, index, who, out, work, fp, plan, rows, counts_in, overlaps, validation,
                           tokenizer, limits, started)
    finally:
        lock.release()

    _report(who, out, manifest, started, env)
    return manifest


def _report(who, out, manifest, started, env: Env) -> None:
    """7. Report."""
    for split, info in manifest["splits"].items():
        log.info("%s: %-10s %6d rows  %7.3f h  %9.1f MB in %d shards  (%d read, %d skipped)", who, split,
                 info["rows"], info["hours"], info["bytes"] / 1e6, len(info["shards"]), info["rows_read"],
                 info["skipped"])
    st = manifest["storage"]
    log.info("%s: %.1f MB per audio hour (source %.1f MB, %.2fx), peak %.2fx the final size; stored formats %s "
             "(PCM sources as %s)", who, st["bytes_per_audio_hour"] / 1e6, st["source_bytes_per_audio_hour"] / 1e6,
             st["bytes_vs_source"], st["peak_vs_final"], st["formats"], st["pcm_storage"])
    skipped = manifest["skipped"]
    for s in skipped[:20]:
        log.warning("%s: skipped %s %s: %s", who, s["split"], s["where"], s["reason"])
    if len(skipped) > 20:
        log.warning("%s: ... and %d more skipped rows, all listed in %s", who, len(skipped) - 20,
                    shards.join(out, MANIFEST))
    log.info("%s: wrote %s in %.1f s", who, out, time.time() - started)
    summary.done("prepare", summary.prepare_summary(out, manifest, env))


def _not_last(who, out, work, fp, plan, missing, ours, did, env: Env, remote: BucketOut | None = None) -> dict:
    """An index whose chunks are done while others still work: say so, exit 0."""
    old = _finished(out, remote)
    if old is not None and old.get("fingerprint") == fp:
        log.info("%s: %s was finished meanwhile by another index", who, out)
        summary.done(who, summary.prepare_summary(out, old, env))
        return old
    log.info("%s: this index's %d chunks are done (%d prepared now); %d of the dataset's %d chunks are not "
             "done yet (first: %s); the index that finishes last writes the manifest and moves %s into place",
             who, ours, did, len(missing), len(plan), missing[0].describe(), out)
    summary.done(who, {"outputs": f"{work if remote is None else out} ({len(plan) - len(missing)} of {len(plan)} "
                                  f"chunks done)",
                       "next": "the last index to finish writes manifest.json; if every index has exited and "
                               "there is none, run any one index again"})
    return {"index_done": True, "chunks_missing": len(missing)}


def _finish(cfg, resolved, index, who, out, work, fp, plan, rows, counts_in, overlaps, validation, tokenizer,
            limits, started, remote: BucketOut | None = None) -> dict:
    """Under the lock (on disk): rate check on the sidecars, stale files out, manifest, swap. Each
    step can run again after a kill: rewritten shards are recognised, the manifest is recomputed.
    In a bucket (`remote`): the same on its markers and objects, the manifest written last."""
    old = _finished(out, remote)
    if old is not None and old.get("fingerprint") == fp and old.get("format") == shards.FORMAT and not cfg.force:
        return old  # another index finished between our check and the lock
    sides = [staging.read_sidecar(work, c, fp) for c in plan] if remote is None else remote.done(plan, fp)
    if any(side is None for side in sides) and remote is not None:
        old = _finished(out, remote)  # another index finished meanwhile and took its markers away
        if old is not None and old.get("fingerprint") == fp:
            return old
    if any(side is None for side in sides):
        raise UserError(f"{work}: chunks went missing while this process was finishing: another prepare of "
                        f"data={cfg.dataset()} with other settings is writing there; run one at a time")
    disk = staging.DiskWatch(work)
    disk.peak = max([side.get("staging_bytes") or 0 for side in sides])
    skipped = list(rows.skipped) + [s for side in sides for s in side["skipped"]]
    # Needs every split's rows first: the median is the corpus's.
    if remote is None:
        skipped += apply_fast_speech(work, plan, sides, cfg.max_rate_vs_median, disk)
        splits = split_summary(work, plan, sides)
    else:
        skipped += remote.apply_fast_speech(plan, sides, cfg.max_rate_vs_median)
        splits = split_summary(work, plan, sides, remote.shard_sizes(plan))
    for split in counts_in:
        if split not in splits:
            log.warning("%s: split %s has no usable rows; it is not written", who, split)
    if not splits:
        raise UserError(f"no usable rows in any split: see the skip reasons above ({len(skipped)} rows skipped)")
    for split, info in splits.items():
        info["rows_read"] = counts_in.get(split, 0) + sum(1 for s in rows.skipped if s["split"] == split)
        info["skipped"] = sum(1 for s in skipped if s["split"] == split)
    keep = {sh["file"] for info in splits.values() for sh in info["shards"]}
    if remote is None:
        staging.remove_stale(work, plan, keep)
    else:
        remote.remove_stale(plan, keep)
    total = sum(info["bytes"] for info in splits.values())
    source = sum(info["source_bytes"] for info in splits.values())
    hours = sum(info["seconds"] for info in splits.values()) / 3600
    storage = {
        "bytes": total,
        "source_bytes": source,
        "bytes_per_audio_hour": round(total / hours) if hours else 0,
        "source_bytes_per_audio_hour": round(source / hours) if hours else 0,
        "bytes_vs_source": round(total / source, 3) if source else None,
        "peak_bytes": max(disk.peak, total),
        "peak_vs_final": round(max(disk.peak, total) / total, 3),
        "source_cache_bytes": max(side.get("source_cache_bytes") or 0 for side in sides),
        "formats": dict(sum((Counter(info["formats"]) for info in splits.values()), Counter())),
        "pcm_codec": cfg.pcm_codec,
        "opus_kbps": cfg.opus_kbps if cfg.pcm_codec == "opus" else None,
        "pcm_storage": pcm_storage(cfg),
    }
    manifest = {
        "name": cfg.dataset(),
        "format": shards.FORMAT,
        "fingerprint": fp,
        "source": rows.describe,
        "language": resolved.language,
        "task": cfg.task,
        "tokenizer": cfg.model,
        "tokenizer_signature": tokenizer_signature(tokenizer, resolved.language, cfg.task),
        "sampling_rate": SAMPLING_RATE,
        "max_target_positions": limits.max_label_tokens,
        "columns": list(shards.COLUMNS),
        "splits": splits,
        "validation": validation,
        "storage": storage,
        "prepared_by": {"shard_count": cfg.shard_count, "chunks": len(plan), "chunk_rows": cfg.chunk_rows,
                        "finished_by_index": index},
        "skipped_by_reason": dict(Counter(s["reason"].split(":")[0] for s in skipped)),
        "dropped_overlaps": overlaps,
        "skipped": skipped,
        "versions": versions(),
        "config": resolved.record(cfg),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "elapsed_s": round(time.time() - started, 1),
    }
    if remote is not None:
        remote.write_manifest(manifest)  # last: from here the dataset in the bucket is complete
        remote.remove_markers()
        remote.clean_local()
        return manifest
    write_manifest(work, manifest)
    staging.swap_into_place(work, out)
    staging.remove_sidecars(out)
    return manifest


if __name__ == "__main__":
    raise SystemExit(run_job("prepare", __doc__, PrepareConfig, main))
