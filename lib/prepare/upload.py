"""Prepare into a bucket (out=s3://bucket/prefix, gs://...): the same contract as on disk, on objects.

    s3://bucket/prefix/                       the dataset, as train and eval read it (data=<that URL>)
      train/shard-000000000-000002000.parquet   a finished chunk's shard, uploaded whole
      train/.shard-000000000-000002000.json     its marker, written after it: the staging sidecar
                                                (fingerprint, rows, the shard's bytes, kept rows, skips)
      manifest.json                             written last: its presence marks the dataset complete
    DATA_DIR/prepared/.NAME.to-bucket/        local scratch: a chunk's shard until it is uploaded

A bucket has no rename, so there is no staging folder to swap: shards go to their final names, and
only the manifest, written last, makes them a dataset (readers take the shard list from it, never
from a listing). A re-prepare with other inputs or settings deletes the old manifest first, so the
dataset is absent, never a mix, until it finishes.

A chunk is done when its marker names this fingerprint and row range and its shard is in the bucket
with the marker's byte count: an object store never shows a half-uploaded object under its name, and
a shard whose marker never came, or whose size differs, is redone. Each index of a sharded prepare
(a Kubernetes Indexed Job) uploads its own chunks; the one that finds every marker in the bucket
finishes: the speaking-rate check on the markers, stale objects out, the manifest, the markers out.
Two indexes finishing at once write the same manifest (no lock is needed: every step is idempotent).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from lib.dataset import bucket
from lib.prepare import staging
from lib.prepare.sources import SPLITS
from lib.prepare.workers import drop_rows, rate_drops

log = logging.getLogger("whisper_ft")

MANIFEST = "manifest.json"


class BucketOut:
    """A dataset being written to `url`, with `local` as scratch for shards before their upload."""

    def __init__(self, url: str, local: Path):
        self.url, self.local = url.rstrip("/"), local

    def key(self, rel: str) -> str:
        return f"{self.url}/{rel}"

    # ------------------------------------------------------------ what is done

    def listing(self, splits) -> dict[str, dict[str, int]]:
        """{split: {object name: bytes}}: one listing per split."""
        return {s: bucket.sizes(self.key(s), "list the finished shards") for s in splits}

    def done(self, chunks: list[staging.Chunk], fp: str) -> list[dict[str, Any] | None]:
        """Each chunk's marker if the chunk is finished in the bucket for fingerprint `fp`, else None."""
        have = self.listing(sorted({c.split for c in chunks}))
        return [self._side(c, fp, have[c.split]) for c in chunks]

    def _side(self, chunk: staging.Chunk, fp: str, names: dict[str, int]) -> dict[str, Any] | None:
        marker, shard = Path(chunk.sidecar).name, Path(chunk.file).name
        if marker not in names:
            return None
        try:
            side = json.loads(bucket.read_bytes(self.key(chunk.sidecar), "read a shard's marker"))
        except (FileNotFoundError, ValueError):
            return None
        if not staging.of_chunk(side, fp, chunk):
            return None
        if side.get("rows", 0) == 0:
            return side
        dropped = side.get("rate_dropped") or []
        size = names.get(shard)
        if size is None:  # every row dropped by the speaking-rate check (which said so first), else lost
            return side if dropped and len(dropped) == side["rows"] else None
        if size == side.get("bytes") or (dropped and size == side.get("rate_bytes")):
            return side
        if dropped and self._rows(chunk) == side["rows"] - len(dropped):
            return side  # rewritten by a finisher that was stopped before it recorded the new size
        return None

    def _rows(self, chunk: staging.Chunk) -> int | None:
        import pyarrow.parquet as pq

        def read():
            with bucket.filesystem(self.url)[0].open(bucket.filesystem(self.key(chunk.file))[1], "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows

        try:
            return bucket.call(self.key(chunk.file), "read a shard's footer", read)
        except (FileNotFoundError, ValueError, OSError):
            return None

    # ------------------------------------------------------------ a chunk up

    def publish(self, chunk: staging.Chunk, side: dict[str, Any]) -> None:
        """A chunk finished in the local scratch: its shard up, then its marker, then the local copy out."""
        shard = self.local / chunk.file
        if side.get("rows"):
            bucket.upload(shard, self.key(chunk.file), f"upload {chunk.file}")
        bucket.write_bytes(self.key(chunk.sidecar), json.dumps(side).encode(), f"write {chunk.sidecar}")
        shard.unlink(missing_ok=True)
        (self.local / chunk.sidecar).unlink(missing_ok=True)

    # ------------------------------------------------------------ the finish

    def manifest(self) -> dict[str, Any] | None:
        try:
            return json.loads(bucket.read_bytes(self.key(MANIFEST), "read manifest.json"))
        except (FileNotFoundError, ValueError):
            return None

    def unfinish(self, why: str) -> None:
        """Delete the manifest of the dataset there: from now on it is incomplete until prepared."""
        log.warning("prepare: %s: %s; its manifest.json is deleted first, so that no reader takes the shards "
                    "being rewritten for a dataset until the new manifest is written", bucket.redact(self.url), why)
        bucket.remove([self.key(MANIFEST)], "delete the old manifest.json")

    def apply_fast_speech(self, plan: list[staging.Chunk], sides: list[dict[str, Any]],
                          max_ratio: float) -> list[dict[str, str]]:
        """lib.prepare.workers.apply_fast_speech on the bucket: the drops go into the marker first,
        then the shard is rewritten locally and uploaded, then the marker records its new size."""
        skipped: list[dict[str, str]] = []
        for chunk, side, positions in rate_drops(plan, sides, max_ratio, skipped):
            if side.get("rate_dropped") != positions:
                side["rate_dropped"] = positions
                side.pop("rate_bytes", None)
                bucket.write_bytes(self.key(chunk.sidecar), json.dumps(side).encode(), f"write {chunk.sidecar}")
            if "rate_bytes" in side:
                continue
            local = self.local / chunk.file
            local.parent.mkdir(parents=True, exist_ok=True)
            try:
                bucket.download(self.key(chunk.file), local, f"download {chunk.file}")
            except FileNotFoundError:
                side["rate_bytes"] = 0  # already deleted: every row dropped
            else:
                after = drop_rows(local, positions, side["rows"])
                if after:
                    bucket.upload(local, self.key(chunk.file), f"upload {chunk.file}")
                else:
                    bucket.remove([self.key(chunk.file)], f"delete {chunk.file}")
                side["rate_bytes"] = after
                local.unlink(missing_ok=True)
            bucket.write_bytes(self.key(chunk.sidecar), json.dumps(side).encode(), f"write {chunk.sidecar}")
        return skipped

    def shard_sizes(self, plan: list[staging.Chunk]) -> dict[str, int]:
        """{shard file: bytes} of the plan's shards in the bucket now."""
        have = self.listing(sorted({c.split for c in plan}))
        return {c.file: have[c.split][Path(c.file).name] for c in plan if Path(c.file).name in have[c.split]}

    def remove_stale(self, plan: list[staging.Chunk], keep_shards: set[str]) -> int:
        """Shards in the bucket's split folders that the new manifest does not list (an earlier
        plan's, another chunk_rows), and markers of no planned chunk. Returns the objects removed."""
        markers = {c.sidecar for c in plan}
        stale = []
        for split, names in self.listing(SPLITS).items():
            for name in names:
                rel = f"{split}/{name}"
                if (name.startswith("shard-") and name.endswith(".parquet") and rel not in keep_shards) or (
                        name.startswith(".shard-") and name.endswith(".json") and rel not in markers):
                    stale.append(self.key(rel))
        bucket.remove(stale, "delete stale shards")
        return len(stale)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Last, in one request: from now on the dataset is complete."""
        bucket.write_bytes(self.key(MANIFEST), json.dumps(manifest, indent=1, default=str).encode(),
                           "write manifest.json")

    def remove_markers(self) -> None:
        """After the manifest (and in an up-to-date rerun, what a finisher stopped after it left)."""
        markers = [self.key(f"{split}/{name}") for split, names in self.listing(SPLITS).items() for name in names
                   if name.startswith(".shard-") and name.endswith(".json")]
        bucket.remove(markers, "delete the shard markers")

    def clean_local(self) -> None:
        shutil.rmtree(self.local, ignore_errors=True)
