"""Training data that streams from shards: bounded memory, a shuffle buffer, several corpora, exact resume.

Every training sample has a position k = 0, 1, 2, ... and what sits at position k is a pure
function of (train.seed, the manifests, train.shuffle_buffer): nothing depends on what was read
before. So the Trainer reads positions in order (a sequential sampler: the shuffling is done
here), and a resumed run at optimizer step s continues at position s x batch x grad_accum x
processes: the Trainer skips the consumed batches by their indices (accelerate's
SkipBatchSampler), without reading or decoding a single clip. DataLoader workers read the
shards themselves (local paths or fsspec URLs) and decode audio next to the collator's log-mel.

ShardStream (one corpus). Epoch e = positions e*N .. (e+1)*N-1 (N = the split's rows). The
epoch's shard order is a seeded permutation; consecutive shards in that order form windows of
at least train.shuffle_buffer rows; the rows of a window are emitted in a seeded random order.
That is a shuffle buffer whose content is known from the position alone: a worker holds at
most the shards of one window in memory (encoded audio: ~40 KB per 5-s mp3 clip), however
large the corpus.

Mixture (data=cv_hi:0.7,fleurs_hi:0.3). Positions come in blocks of 1,000; each block holds
exactly round(weight x 1000) samples of each corpus (largest remainder) in a seeded order, and
corpus j's i-th sample is its own stream's position i. A small corpus is repeated more often
(more epochs of it); the proportions hold in every block, not only on average.
"""

from __future__ import annotations

import bisect
import logging
import os
from collections import OrderedDict
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from lib.dataset import shards
from lib.errors import UserError

log = logging.getLogger("whisper_ft")

MIX_BLOCK = 1000
"""positions per mixing block: proportions are exact within each block"""

READ_COLUMNS = ["id", "audio", "labels", "duration", "speaker", "where", "ts_labels"]
"""what a training row needs of a shard; ts_labels (a manifest's segments) reads as [] in shards
prepared before the column existed (lib.dataset.shards.read_shard)"""


def block_counts(weights: list[float], block: int = MIX_BLOCK) -> list[int]:
    """Samples of each corpus per block: weights normalized, largest remainder, each >= 1."""
    w = np.asarray(weights, dtype=float)
    if len(w) > block:
        raise UserError(f"{len(w)} corpora: at most {block} can be mixed")
    exact = w / w.sum() * block
    counts = np.maximum(np.floor(exact).astype(int), 1)
    while counts.sum() < block:
        counts[int(np.argmax(exact - counts))] += 1
    while counts.sum() > block:
        counts[int(np.argmax(np.where(counts > 1, counts - exact, -np.inf)))] -= 1
    return [int(c) for c in counts]


class ShardStream(Dataset):
    """Position k -> a row of one corpus's split, shuffled by windows (see the module docstring)."""

    def __init__(self, root, manifest: dict[str, Any], split: str = "train", seed: int = 0,
                 shuffle_buffer: int = 4096, name: str | None = None, length: int | None = None):
        from lib.dataset.prepared import split_shards

        self.root, self.split, self.seed, self.name = str(root), split, int(seed), name or str(root)
        self.shards = split_shards(root, manifest, split)
        self.rows = [int(s["rows"]) for s in self.shards]
        self.n = sum(self.rows)
        if self.n == 0:
            raise UserError(f"data={self.name}: the {split} split is empty; prepare more data")
        self.buffer = max(1, int(shuffle_buffer))
        self.length = self.n if length is None else int(length)
        self._epochs: OrderedDict[int, list[tuple[int, list[int]]]] = OrderedDict()
        self._starts: dict[int, list[int]] = {}  # each epoch's window offsets, for the bisect
        self._windows: OrderedDict[tuple[int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()
        self._tables: OrderedDict[int, dict[str, list]] = OrderedDict()
        # shards kept per worker: one window (>= buffer rows, < buffer + a shard) and one shard of slack;
        # a worker reads positions in increasing order, so it never goes back to an older window
        self._max_rows = self.buffer + 2 * max(self.rows)

    def __len__(self) -> int:
        return self.length

    def __getstate__(self):  # DataLoader workers start with empty caches
        state = self.__dict__.copy()
        state["_epochs"], state["_windows"], state["_tables"] = OrderedDict(), OrderedDict(), OrderedDict()
        state["_starts"] = {}
        return state

    def windows(self, epoch: int) -> list[tuple[int, list[int]]]:
        """[(first offset, [shard indices])] of an epoch, in order."""
        if epoch not in self._epochs:
            order = np.random.default_rng([self.seed, epoch, 0]).permutation(len(self.shards))
            out, group, start, rows = [], [], 0, 0
            for s in order:
                group.append(int(s))
                rows += self.rows[s]
                if rows >= self.buffer:
                    out.append((start, group))
                    start, group, rows = start + rows, [], 0
            if group:
                out.append((start, group))
            self._epochs[epoch] = out
            self._starts[epoch] = [start for start, _ in out]
            while len(self._epochs) > 2:
                self._starts.pop(self._epochs.popitem(last=False)[0], None)
        return self._epochs[epoch]

    def locate(self, k: int) -> tuple[int, int]:
        """(shard index, row within the shard) at position k, from the plan alone (no reading)."""
        if k < 0:
            raise IndexError(k)
        epoch, offset = divmod(int(k), self.n)
        wins = self.windows(epoch)
        w = bisect.bisect_right(self._starts[epoch], offset) - 1
        key = (epoch, w)
        if key not in self._windows:
            start, group = wins[w]
            sizes = np.asarray([self.rows[s] for s in group])
            perm = np.random.default_rng([self.seed, epoch, 1, w]).permutation(int(sizes.sum()))
            self._windows[key] = (perm, np.cumsum(sizes) - sizes, np.asarray(group))
            while len(self._windows) > 4:
                self._windows.popitem(last=False)
        perm, firsts, group = self._windows[key]
        r = int(perm[offset - wins[w][0]])
        i = int(np.searchsorted(firsts, r, side="right") - 1)
        return int(group[i]), r - int(firsts[i])

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """The split's row (0..N-1: shards in manifest order, rows within) at each position of `epoch`,
        all N at once: what locate() gives one by one, from the same seeded permutations, for
        lib/train/packing.py's plan. int32: 7 million clips are 28 MB."""
        firsts = np.cumsum(self.rows) - np.asarray(self.rows)
        out = np.empty(self.n, dtype=np.int64 if self.n >= 2**31 else np.int32)
        for w, (start, group) in enumerate(self.windows(epoch)):
            rows = np.concatenate([np.arange(firsts[s], firsts[s] + self.rows[s]) for s in group])
            perm = np.random.default_rng([self.seed, epoch, 1, w]).permutation(len(rows))
            out[start:start + len(rows)] = rows[perm]
        return out

    def table(self, shard: int) -> dict[str, list]:
        """A shard's columns as Python lists, cached (LRU, one window of rows and a shard)."""
        if shard in self._tables:
            self._tables.move_to_end(shard)
            return self._tables[shard]
        url = self.shards[shard]["url"]
        try:
            t = shards.read_shard(url, columns=READ_COLUMNS).to_pydict()
        except FileNotFoundError:
            raise UserError(f"data={self.name}: shard {url} is missing (listed in its manifest.json): the dataset "
                            f"was moved or deleted after prepare; prepare it again") from None
        if len(t["id"]) != self.rows[shard]:
            raise UserError(f"{url}: {len(t['id'])} rows, but its manifest.json says {self.rows[shard]}: the dataset "
                            f"was changed after prepare; prepare it again")
        self._tables[shard] = t
        held = sum(len(v["id"]) for v in self._tables.values())
        while held > self._max_rows and len(self._tables) > 1:
            held -= len(self._tables.popitem(last=False)[1]["id"])
        return t

    def __getitem__(self, k: int) -> dict[str, Any]:
        from lib.dataset.prepared import decode_row

        shard, row = self.locate(k)
        t = self.table(shard)
        rec = {c: t[c][row] for c in READ_COLUMNS}
        # the previous clip of the same recording or speaker (source order), for prompt training
        prev = t["labels"][row - 1] if row > 0 and t["speaker"][row - 1] == rec["speaker"] else []
        return {"audio": decode_row(rec), "labels": np.asarray(rec["labels"], dtype=np.int64), "prev_labels": prev,
                "ts_labels": rec["ts_labels"] or [], "id": rec["id"], "corpus": self.name, "position": int(k)}


class Mixture(Dataset):
    """Several corpora by weight: position k -> (corpus j, its own position i) in blocks of MIX_BLOCK."""

    def __init__(self, parts: list[tuple[str, Any]], weights: list[float], seed: int = 0, length: int | None = None,
                 block: int = MIX_BLOCK):
        self.parts, self.seed, self.block = parts, int(seed), block
        self.counts = block_counts(weights, block)
        self.length = length if length is not None else sum(len(d) for _, d in parts)
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def __len__(self) -> int:
        return self.length

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_blocks"] = OrderedDict()
        return state

    def locate(self, k: int) -> tuple[int, int]:
        b, s = divmod(int(k), self.block)
        if b not in self._blocks:
            assign = np.repeat(np.arange(len(self.counts)), self.counts)
            assign = np.random.default_rng([self.seed, 2, b]).permutation(assign)
            rank = np.zeros(self.block, dtype=np.int64)
            for j in range(len(self.counts)):
                at = np.flatnonzero(assign == j)
                rank[at] = np.arange(len(at))
            self._blocks[b] = (assign, rank)
            while len(self._blocks) > 4:
                self._blocks.popitem(last=False)
        assign, rank = self._blocks[b]
        j = int(assign[s])
        return j, b * self.counts[j] + int(rank[s])

    def __getitem__(self, k: int) -> dict[str, Any]:
        j, i = self.locate(k)
        name, part = self.parts[j]
        row = dict(part[i])
        row["corpus"], row["position"] = name, int(k)
        return row


class Decoded(Dataset):
    """A load_split dataset (validation) with its audio decoded per row, for the Trainer's eval."""

    def __init__(self, ds, name: str | None = None):
        self.ds = ds.select_columns([c for c in ("id", "audio", "labels", "where") if c in ds.column_names])
        self.name = name

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        from lib.dataset.prepared import decode_row

        row = self.ds[int(i)]
        return {"audio": decode_row(row), "labels": np.asarray(row["labels"], dtype=np.int64), "id": row["id"]}

    @property
    def labels(self) -> list[list[int]]:
        return self.ds["labels"]


class Traced(Dataset):
    """Appends "position, corpus, clip id" of every fetched sample to a file (train.data_trace):
    which clips a loss spike saw, and proof that a resumed run continues the order."""

    def __init__(self, ds, path):
        self.ds, self.path = ds, str(path)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, k: int) -> dict[str, Any]:
        row = self.ds[k]
        line = f"{int(k)}\t{row.get('corpus', '')}\t{row.get('id', '')}\n".encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)  # one write per line with O_APPEND: whole lines from several workers
        finally:
            os.close(fd)
        return row
