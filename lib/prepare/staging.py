"""Prepare's staging folder: the chunk plan, each chunk's shard and sidecar, and the swap into place.

    DATA_DIR/prepared/.NAME.partial/          the staging folder; becomes DATA_DIR/prepared/NAME
      train/shard-000000000-000002000.parquet   a finished chunk: the final shard itself
      train/.shard-000000000-000002000.json     its sidecar, written after it: the fingerprint, the
                                                kept rows' (chars, duration, language, ...), skips
      .hub-cache-0/                             a Hub source's download for index 0 (deleted when done)
      manifest.json                             written last, just before the swap
    DATA_DIR/prepared/.NAME.lock/LOCK           held by the process that writes the manifest

The plan is deterministic: every split in SPLITS order, cut into chunks of chunk_rows rows, so
that every index of a sharded prepare (shard_count=N shard_index=i) computes the same plan and
takes the chunks c with c % N == i. A chunk is done when its sidecar matches the fingerprint and
its shard is there; a shard without a sidecar (killed between the two writes) is redone, and a
shard is never written in place (lib.dataset.shards.write_shard: temporary name, then rename), so no
reader ever meets a half file under a shard's name.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib.dataset import shards
from lib.files import write_json
from lib.prepare.sources import SPLITS

log = logging.getLogger("whisper_ft")

HUB_CACHE = ".hub-cache-"
"""prefix of the folders (one per index) a Hub source is downloaded into, inside the staging folder"""


@dataclass(frozen=True)
class Chunk:
    """Rows lo..hi-1 of one split: one task for a worker, one shard."""

    index: int
    """its place in the plan: index c belongs to shard_index c % shard_count"""
    split: str
    lo: int
    hi: int

    @property
    def file(self) -> str:
        """the shard, relative to the dataset folder"""
        return shards.shard_name(self.split, self.lo, self.hi)

    @property
    def sidecar(self) -> str:
        return f"{self.split}/.shard-{self.lo:09d}-{self.hi:09d}.json"

    def describe(self) -> str:
        return f"{self.split} rows {self.lo}-{self.hi - 1}"


def plan_chunks(split_rows: dict[str, int], chunk_rows: int) -> list[Chunk]:
    """Every split (in SPLITS order) cut into row ranges of chunk_rows; empty splits have none."""
    plan = []
    for split in (s for s in SPLITS if split_rows.get(s)):
        n = split_rows[split]
        for lo in range(0, n, chunk_rows):
            plan.append(Chunk(len(plan), split, lo, min(n, lo + chunk_rows)))
    return plan


def mine(plan: list[Chunk], shard_count: int, shard_index: int) -> list[Chunk]:
    """The chunks of index `shard_index` of `shard_count`: every shard_count-th, from shard_index."""
    return [c for c in plan if c.index % shard_count == shard_index]


# ---------------------------------------------------------------- sidecars


def write_sidecar(stage: Path, chunk: Chunk, data: dict[str, Any]) -> None:
    """Written after the shard: its presence marks the chunk done."""
    write_json(stage / chunk.sidecar, data, indent=None)


def of_chunk(side: dict[str, Any], fp: str, chunk: Chunk) -> bool:
    """Whether a sidecar (or a bucket's shard marker) is this chunk's: the same fingerprint and row range."""
    return side.get("fingerprint") == fp and (side.get("lo"), side.get("hi")) == (chunk.lo, chunk.hi)


def read_sidecar(stage: Path, chunk: Chunk, fp: str) -> dict[str, Any] | None:
    """The chunk's sidecar if the chunk is done for fingerprint `fp`, else None (redo it).

    Done: the sidecar names this fingerprint and row range, and its shard exists with at most
    the sidecar's rows (fewer once the speaking-rate check has dropped some: the finalizer
    records those in the sidecar's "rate_dropped" before it rewrites the shard)."""
    try:
        side = json.loads((stage / chunk.sidecar).read_text())
    except (OSError, ValueError):
        return None
    if not of_chunk(side, fp, chunk):
        return None
    if side.get("rows", 0) == 0:
        return side
    try:
        import pyarrow.parquet as pq

        if pq.read_metadata(stage / chunk.file).num_rows > side["rows"]:
            return None
    except FileNotFoundError:
        # Deleted by the speaking-rate check, which dropped every row (and said so first).
        return side if len(side.get("rate_dropped") or []) == side["rows"] else None
    except (OSError, ValueError):
        return None
    return side


def remove_chunk_leftovers(stage: Path, chunk: Chunk) -> None:
    """Before (re)doing a chunk: its shard, sidecar and any temporary file a killed writer left.
    Only the chunk's owner calls this, so no other process is writing these names."""
    folder = stage / chunk.split
    if not folder.is_dir():
        return
    shard, side = Path(chunk.file).name, Path(chunk.sidecar).name
    for p in folder.iterdir():
        if p.name in (shard, side) or p.name.startswith((f".{shard}.tmp-", f"{side}.tmp-")):
            p.unlink(missing_ok=True)


def remove_stale(stage: Path, plan: list[Chunk], keep_shards: set[str]) -> int:
    """Everything in the staging folder that is not part of the finished dataset: shards of an
    earlier plan (another chunk_rows), temporary files of killed writers, Hub caches, folders of
    splits no longer planned. Sidecars of the plan stay (deleted after the swap). Returns bytes freed."""
    keep = {stage / f for f in keep_shards} | {stage / c.sidecar for c in plan}
    splits = {c.split for c in plan}
    freed = 0
    for p in sorted(stage.iterdir()):
        if p.is_dir() and p.name in splits:
            freed += sum(_remove(f) for f in sorted(p.iterdir()) if f not in keep)
        elif p.name != "manifest.json":
            freed += _remove(p)
    return freed


def _remove(p: Path) -> int:
    """Delete a file or folder (another process may be deleting it too); returns its bytes."""
    try:
        if p.is_dir():
            size = folder_bytes(p, skip_hub_cache=False)
            shutil.rmtree(p, ignore_errors=True)
            return size
        size = p.stat().st_size
        p.unlink()
        return size
    except FileNotFoundError:
        return 0


# ---------------------------------------------------------------- disk use


def folder_bytes(path: Path, skip_hub_cache: bool = True) -> int:
    """Bytes of the files under `path` (a Hub source's download, which is the source and not
    something prepare made, is left out unless skip_hub_cache=False)."""
    total = 0
    try:
        entries = list(os.scandir(path))
    except (FileNotFoundError, NotADirectoryError):
        return 0
    for e in entries:
        try:
            if e.is_dir(follow_symlinks=False):
                if not (skip_hub_cache and e.name.startswith(HUB_CACHE)):
                    total += folder_bytes(Path(e.path), skip_hub_cache)
            elif e.is_file(follow_symlinks=False):
                total += e.stat(follow_symlinks=False).st_size
        except FileNotFoundError:  # renamed or removed by another writer meanwhile
            continue
    return total


class DiskWatch:
    """The staging folder's size, looked at after each chunk; the largest seen is the peak.

    A look lists every file, so on a large dataset it is taken only when the time since the
    last one is at least 10x what that one cost (at most ~10 % of the time spent walking)."""

    def __init__(self, stage: Path):
        self.stage, self.peak, self._next, self._cost = stage, 0, 0.0, 0.0

    def look(self, force: bool = False, extra: int = 0) -> int | None:
        now = time.monotonic()
        if not force and now < self._next:
            return None
        size = folder_bytes(self.stage) + extra
        self._cost = time.monotonic() - now
        self._next = time.monotonic() + 10 * self._cost
        self.peak = max(self.peak, size)
        return size


# ---------------------------------------------------------------- the end


def swap_into_place(stage: Path, out: Path) -> None:
    """The finished staging folder becomes `out`; the dataset that was there is removed. A kill
    between the two renames leaves `out` missing and the new dataset whole in the staging folder:
    a rerun finds every chunk done and swaps it in."""
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.replace(old)
    stage.replace(out)
    shutil.rmtree(old, ignore_errors=True)


def remove_sidecars(out: Path) -> None:
    """After the swap: the sidecars were the staging folder's bookkeeping, not the dataset's."""
    for split in SPLITS:
        folder = out / split
        if folder.is_dir():
            for p in folder.glob(".shard-*.json"):
                p.unlink(missing_ok=True)
