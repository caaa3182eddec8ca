"""The packing plan at scale (train.pack, lib/train/packing.py): time and memory of planning an
epoch of 7 million clips (about 10,000 hours of Common Voice-like 5-s clips), from their durations
and label lengths alone.

    python -m lib.tools.bench_packing                         # 7,000,000 clips in shards of 2,000, 2 epochs
    python -m lib.tools.bench_packing clips=1000000 epochs=3 speed_perturb=0.1
    python -m lib.tools.bench_packing clips=2000 epochs=3 clip_median=5 clip_spread=0.4 clip_max=20 \
        tokens_per_second=10 single_fraction=0.1     # the bench's clips=cv corpus: speech a window

Synthetic and offline: durations lognormal around 4.6 s within 1-15 s, labels of 10-120 tokens (or
the bench's clips=cv corpus with clip_median=5 clip_spread=0.4 clip_max=20 tokens_per_second=10), a
manifest of shards that exist only as row counts (ShardStream's epoch order needs no more). For
each epoch it times the epoch's order (ShardStream.epoch_rows: 7 million positions -> rows) and
the plan (PackedStream.plan: gather the clips' costs in that order, plan_windows), then measures
the plan's peak memory in a second pass under tracemalloc (numpy reports its buffers to it; the
traced pass is slower, so it is not the timed one). It prints what a DataLoader worker holds (the
per-clip arrays, the plans, the pickled dataset) and the read of one real shard's plan columns
(duration, labels, ts_labels of 2,000 rows written to a temporary folder with 40 KB of audio
bytes a row, which the read must skip), times the shards: the start-up read, on a local disk.

Measured figures: docs/results.md, "Packing plan at scale", with the machine and the date.
"""

from __future__ import annotations

import logging
import pickle
import tempfile
import time
import tracemalloc
from dataclasses import dataclass

import numpy as np

from lib.cli import run_job
from lib.env import Env
from lib.errors import UserError

log = logging.getLogger("whisper_ft")
MB = 1e6


@dataclass
class Config:
    clips: int = 7_000_000
    """clips in the synthetic train split (7 million 5-s clips: about 10,000 hours)"""
    shard_rows: int = 2000
    """rows per shard, as prepare writes them"""
    shuffle_buffer: int = 4096
    """train.shuffle_buffer"""
    epochs: int = 2
    """epochs planned (the second as a worker reaching it would)"""
    speed_perturb: float = 0.0
    """train.speed_perturb (the plan budgets the slowest speed)"""
    single_fraction: float = 0.2
    """train.pack_single_fraction"""
    plain_fraction: float = 0.0
    """train.pack_plain_fraction"""
    lookahead: int = 16
    """train.pack_lookahead"""
    seed: int = 0
    """train.seed"""
    clip_median: float = 4.6
    """median clip, seconds (log-normal)"""
    clip_spread: float = 0.35
    """sigma of log(duration)"""
    clip_max: float = 15.0
    """durations are clipped to 1..clip_max seconds"""
    tokens_per_second: float = 0.0
    """text tokens a second of speech (a label is 5 more: prefix, <|notimestamps|>, <|eot|>); 0 = labels
    of 10-120 tokens drawn independently of the duration"""

    def __post_init__(self):
        if self.clips < 1 or self.shard_rows < 1 or self.epochs < 1:
            raise UserError("clips, shard_rows and epochs must be >= 1")
        if not (1 <= self.clip_median <= self.clip_max and self.clip_spread >= 0 and self.tokens_per_second >= 0):
            raise UserError(f"clip_median={self.clip_median:g} clip_max={self.clip_max:g} clip_spread="
                            f"{self.clip_spread:g} tokens_per_second={self.tokens_per_second:g}: need 1 <= clip_median "
                            "<= clip_max, clip_spread >= 0 and tokens_per_second >= 0")


def synthetic(cfg: Config):
    """(ShardStream over a manifest of row counts only, seconds float32, label lengths int64)."""
    from lib.train.stream import ShardStream

    rng = np.random.default_rng(cfg.seed)
    seconds = np.clip(rng.lognormal(np.log(cfg.clip_median), cfg.clip_spread, cfg.clips), 1.0, cfg.clip_max).astype(np.float32)
    if cfg.tokens_per_second:  # the bench's clips=cv labels: <|sot|> <|hi|> <|transcribe|> <|notimestamps|> text <|eot|>
        from lib.tools.bench import cv_text_tokens

        labels = cv_text_tokens(seconds, cfg.tokens_per_second) + 5
    else:
        labels = rng.integers(10, 121, cfg.clips)
    sizes = [cfg.shard_rows] * (cfg.clips // cfg.shard_rows) + ([cfg.clips % cfg.shard_rows] if cfg.clips % cfg.shard_rows else [])
    manifest = {"splits": {"train": {"shards": [{"file": f"train/shard-{i}.parquet", "rows": r}
                                                for i, r in enumerate(sizes)]}}}
    stream = ShardStream("/nonexistent", manifest, "train", cfg.seed, cfg.shuffle_buffer, name="synthetic")
    return stream, seconds, labels


def shard_read_seconds(rows: int) -> float:
    """Seconds to read one shard's plan columns (lib.train.packing.PLAN_COLUMNS) with `rows` rows of
    40 KB of audio bytes each (a 5-s mp3), from a local temporary folder, best of 3."""
    from lib.dataset import shards
    from lib.train.packing import PLAN_COLUMNS

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/shard.parquet"
        shards.write_shard(path, {
            "id": [f"c{i}" for i in range(rows)], "audio": [rng.bytes(40_000) for _ in range(rows)],
            "audio_format": ["mp3"] * rows, "text": ["x"] * rows,
            "labels": [list(range(int(n))) for n in rng.integers(10, 121, rows)], "language": ["hi"] * rows,
            "duration": rng.uniform(1, 15, rows).tolist(), "speaker": [""] * rows, "where": [""] * rows,
            "ts_labels": [[] for _ in range(rows)]})
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            shards.read_shard(path, columns=PLAN_COLUMNS)
            best = min(best, time.perf_counter() - t0)
    return best


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (VmRSS) or its peak so far (VmHWM), from /proc (Linux)."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024 / MB
    return float("nan")


def main(cfg: Config, env: Env) -> dict:
    # (lib.train.packing imports torch: both are loaded before the memory baseline is read)
    from lib.train.config import TrainSection
    from lib.train.packing import SINGLE, PackedStream, clip_tokens

    prefix = 3  # <|sot|> <|lang|> <|task|>: the plan only counts tokens
    base = rss_mb()
    t = TrainSection(pack=True, speed_perturb=cfg.speed_perturb, pack_single_fraction=cfg.single_fraction,
                     pack_plain_fraction=cfg.plain_fraction, pack_lookahead=cfg.lookahead, seed=cfg.seed, shuffle_buffer=cfg.shuffle_buffer)
    t0 = time.perf_counter()
    stream, seconds, labels = synthetic(cfg)
    tokens = clip_tokens(labels, np.zeros_like(labels), prefix)
    del labels
    log.info("synthetic split: %d clips (%.0f hours) in %d shards, made in %.1f s", cfg.clips,
             float(seconds.sum(dtype=np.float64)) / 3600, len(stream.shards), time.perf_counter() - t0)

    packed = PackedStream(stream, t, (seconds, tokens, list(range(prefix))))
    rows = []
    for epoch in range(cfg.epochs):
        t0 = time.perf_counter()
        stream.epoch_rows(epoch)
        order_s = time.perf_counter() - t0
        t0, c0 = time.perf_counter(), time.process_time()
        _, _, kinds, _ = packed.plan(epoch)
        # CPU time too: on a shared machine the wall clock also counts other processes' turns
        plan_s, plan_cpu = time.perf_counter() - t0, time.process_time() - c0
        packed._plans.pop(epoch)  # planned again below, under tracemalloc
        tracemalloc.start()
        packed.plan(epoch)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        w, single = len(kinds), float((kinds == SINGLE).mean())
        rows.append({"epoch": epoch, "order_s": order_s, "plan_s": plan_s, "plan_cpu_s": plan_cpu, "peak_mb": peak / MB,
                     "windows": w, "clips_per_window": cfg.clips / w, "seconds_per_window":
                     float(seconds.sum(dtype=np.float64)) / w, "single_share": single})
        log.info("epoch %d: order %.2f s (epoch_rows alone), plan %.2f s wall, %.2f s CPU (order + gather + "
                 "plan_windows), peak %.0f MB (traced); %d windows, %.2f clips and %.1f s of audio a window, %.1f %% "
                 "single-clip", epoch, order_s, plan_s, plan_cpu, peak / MB, w, cfg.clips / w,
                 float(seconds.sum(dtype=np.float64)) / w, 100 * single)
    peak_rss = rss_mb("VmHWM") - base
    held = seconds.nbytes + tokens.nbytes + sum(a.nbytes for plan in packed._plans.values() for a in plan)
    pickled = len(pickle.dumps(packed))
    read = shard_read_seconds(cfg.shard_rows)
    log.info("a worker holds %.0f MB (per-clip arrays %.0f MB + %d epochs' plans); pickled dataset %.0f MB; the "
             "process's peak RSS rose %.0f MB over its %.0f MB after imports (synthetic data, orders, plans, the traced "
             "passes)", held / MB, (seconds.nbytes + tokens.nbytes) / MB, len(packed._plans), pickled / MB, peak_rss, base)
    log.info("plan columns of one %d-row shard read in %.3f s: %d shards %.0f s at start-up (local disk, cached)",
             cfg.shard_rows, read, len(stream.shards), read * len(stream.shards))
    return {"epochs": rows, "held_mb": held / MB, "pickled_mb": pickled / MB, "peak_rss_rise_mb": peak_rss,
            "shard_read_s": read, "startup_read_s": read * len(stream.shards)}


if __name__ == "__main__":
    raise SystemExit(run_job("bench_packing", __doc__, Config, main))
