"""The data benchmark: prepare and the training loader on a synthetic corpus, made offline.

    make bench-data                                   # 1,000 and 10,000 clips, the table below
    python -m lib.tools.bench_data sizes=1000 workers=1,2 pcm_clips=500
    python -m lib.tools.bench_data sizes=200 pcm_clips=200 pcm_codecs=flac,opus opus_kbps=24
    python -m lib.tools.bench_data sizes=1000,10000 num_proc=4 out=/data/bench-data.json

For each corpus size it writes a Common Voice release of 5-s mp3 clips at 48 kHz (speech-like
signals from a bank of 200 distinct voices, so that no two neighbouring clips are the same bytes),
runs `make prepare`'s job on it in its own process, and measures:
  - prepare clips/s, and per core (num_proc workers);
  - bytes per audio hour: the source's mp3, the prepared shards, and the peak of the output and
    work folders while prepare ran (sampled every 0.2 s), and peak/final;
  - peak RAM of prepare's process tree (RSS summed over the job and its workers, sampled);
  - the training loader: lib.train.stream.ShardStream + the collator (decode, resample to 16 kHz,
    log-mel) in a torch DataLoader with 1, 2, ... workers of one thread each: clips/s, per worker,
    and the loader's peak RAM (all processes), on the same shards.
A PCM source (16 kHz 16-bit wav) is prepared once per pcm_codecs entry (prepare's pcm_codec:
re-encoded to FLAC, or to Opus at opus_kbps) and gives the bytes per hour of that path, and the
loader's speed with one worker on it (Opus costs more to decode than FLAC). Prints a table (and
JSON with out=); the issue's targets are checked and marked.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lib.cli import run_job
from lib.env import Env
from lib.errors import UserError
from lib.tools.runner import ROOT, last_error
from lib.whisper import SAMPLING_RATE, SOT_ID

SECONDS = 5.0
VOICES = 200
# The goals the data benchmark marks (docs/speed.md)
MAX_RATIO_COMPRESSED = 1.2
MAX_MB_PER_HOUR_PCM = 60
MAX_PEAK_OVER_FINAL = 1.3
MIN_CLIPS_PER_WORKER = 60


def voice(v: int, sr: int) -> np.ndarray:
    """A speech-like 5-s signal: a harmonic voice whose pitch glides, cut into syllables, over noise."""
    rng = np.random.default_rng(v)
    t = np.arange(int(SECONDS * sr)) / sr
    f0 = 90 + 150 * rng.random() + 25 * np.sin(2 * np.pi * (0.3 + 0.4 * rng.random()) * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    amps = rng.random(10) / np.arange(1, 11)
    x = sum(a * np.sin(k * phase) for k, a in enumerate(amps, start=1))
    syllables = (0.5 * (1 + np.sin(2 * np.pi * (2.5 + 2 * rng.random()) * t + rng.random() * 6))) ** 2
    x = 0.2 * x * syllables + 0.005 * rng.standard_normal(t.size)
    return (x / np.abs(x).max() * 0.7).astype(np.float32)


def encoded(kind: str) -> list[bytes]:
    """The bank of clips: mp3 at 48 kHz (Common Voice's format) or 16-bit wav at 16 kHz."""
    import soundfile as sf

    out = []
    for v in range(VOICES):
        buf = io.BytesIO()
        if kind == "mp3":
            sf.write(buf, voice(v, 48_000), 48_000, format="MP3")
        else:
            sf.write(buf, voice(v, SAMPLING_RATE), SAMPLING_RATE, format="WAV", subtype="PCM_16")
        out.append(buf.getvalue())
    return out


def make_release(root: Path, n: int, kind: str) -> int:
    """A Common Voice release of n clips (train.tsv only); returns the clips' bytes."""
    clips = root / "clips"
    clips.mkdir(parents=True)
    bank = encoded(kind)
    total = 0
    with open(root / "train.tsv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["client_id", "path", "sentence_id", "sentence", "up_votes", "down_votes", "age", "gender",
                    "accents", "variant", "locale", "segment"])
        for i in range(n):
            name = f"common_voice_hi_{i:08d}.{kind}"
            data = bank[i % VOICES]
            (clips / name).write_bytes(data)
            total += len(data)
            w.writerow([f"c{i % 97}", name, str(i), f"यह वाक्य संख्या {i} है।", 2, 0, "", "", "", "", "hi", ""])
    return total


def tree_rss(pid: int) -> int:
    """Memory of a process and all its descendants (from /proc): the sum of their PSS, so that
    pages a forked worker shares with its parent count once, not once per process."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(d))
        except (OSError, IndexError, ValueError):
            continue
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except (OSError, StopIteration, ValueError):
            pass
        todo += children.get(p, [])
    return total


def dir_bytes(*paths: Path) -> int:
    total = 0
    for path in paths:
        for dirpath, _, files in os.walk(path):
            for name in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, name))
                except OSError:
                    pass
    return total


class Sampler:
    """Samples f() every `every` seconds on a thread; .peak is the largest value seen."""

    def __init__(self, f, every: float = 0.2):
        self.f, self.every, self.peak, self._stop = f, every, 0, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.f())
            self._stop.wait(self.every)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.f())


def prepare(work: Path, n: int, kind: str, num_proc: int, model: str, chunk_rows: int = 2000,
            pcm_codec: str | None = None, opus_kbps: int = 32) -> dict:
    """Run the prepare job on a release (made on first use; a wav one serves every pcm_codec);
    wall time, disk and RAM peaks, sizes. pcm_codec: prepare's, for a wav release (None: default)."""
    release = work / f"cv-{kind}-{n}"
    source_bytes = dir_bytes(release / "clips") if release.exists() else make_release(release, n, kind)
    codec_flags = [f"pcm_codec={pcm_codec}", f"opus_kbps={opus_kbps}"] if pcm_codec else []
    label = f"{kind}-{n}" + (f"-{pcm_codec}" if pcm_codec else "")
    data = work / f"data-{label}"
    (data / "prepared").mkdir(parents=True)
    cmd = [sys.executable, "-m", "jobs.prepare", f"model={model}", "data=bench", "language=hi", "source.kind=cv",
           f"source.path={release}", "source.validation=", "source.test=", "validation_fraction=0",
           f"num_proc={num_proc}", "max_rate_vs_median=0", f"chunk_rows={chunk_rows}", *codec_flags]
    log = work / f"prepare-{label}.log"
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "DATA_DIR": str(data)}, stdout=out,
                                stderr=subprocess.STDOUT)
        with Sampler(lambda: dir_bytes(data / "prepared")) as disk, Sampler(lambda: tree_rss(proc.pid)) as ram:
            code = proc.wait()
    wall = time.perf_counter() - t0
    if code != 0:
        raise UserError(f"bench_data: the prepare job failed (exit {code}): {last_error(log.read_text())}; see {log}")
    out_dir = data / "prepared" / "bench"
    manifest = json.loads((out_dir / "manifest.json").read_text())
    final = dir_bytes(out_dir)
    hours = n * SECONDS / 3600
    return {"source": kind, "clips": n, "rows": manifest["splits"]["train"]["rows"], "num_proc": num_proc,
            "stored_as": manifest["storage"].get("pcm_storage") if kind != "mp3" else "mp3, as is",
            "pcm_codec": pcm_codec, "opus_kbps": opus_kbps if pcm_codec == "opus" else None,
            "wall_s": round(wall, 1), "clips_per_s": round(n / wall, 1),
            "clips_per_s_per_core": round(n / wall / num_proc, 1),
            "source_bytes_per_hour": round(source_bytes / hours), "final_bytes_per_hour": round(final / hours),
            "peak_bytes_per_hour": round(disk.peak / hours), "final_over_source": round(final / source_bytes, 3),
            "peak_over_final": round(disk.peak / final, 3), "peak_ram_bytes": ram.peak, "data_dir": str(out_dir)}


def _one_thread(_):
    import torch

    torch.set_num_threads(1)


def loader(prepared: Path, workers: int, batches: int, batch_size: int = 8, shuffle_buffer: int = 4096) -> dict:
    """Clips/s of ShardStream + WhisperCollator through a DataLoader with `workers` workers."""
    import torch
    from torch.utils.data import DataLoader
    from transformers import WhisperFeatureExtractor

    from lib.dataset.prepared import open_prepared
    from lib.train.collator import WhisperCollator
    from lib.train.stream import ShardStream

    where, manifest = open_prepared(Env(data_dir=prepared.parent.parent), str(prepared))
    ds = ShardStream(where, manifest, "train", seed=0, shuffle_buffer=shuffle_buffer)
    ds.length = (batches + 2 * workers) * batch_size
    collate = WhisperCollator(WhisperFeatureExtractor(feature_size=80), decoder_start_token_id=SOT_ID)
    torch.set_num_threads(1)
    dl = DataLoader(ds, batch_size=batch_size, num_workers=workers, collate_fn=collate, worker_init_fn=_one_thread,
                    prefetch_factor=4 if workers else None)
    it = iter(dl)
    with Sampler(lambda: tree_rss(os.getpid())) as ram:
        for _ in range(max(1, workers)):  # warm-up: workers started, first window read
            next(it)
        t0 = time.perf_counter()
        n = 0
        for batch in it:
            n += batch["input_features"].shape[0]
        wall = time.perf_counter() - t0
    rate = n / wall
    return {"workers": workers, "clips": n, "clips_per_s": round(rate, 1),
            "clips_per_s_per_worker": round(rate / max(workers, 1), 1), "peak_ram_bytes": ram.peak}


@dataclass
class BenchDataConfig:
    sizes: list[int] = field(default_factory=lambda: [1000, 10000])
    """corpus sizes in clips (5-s mp3 at 48 kHz): the largest must be >= 10,000 for the targets"""
    num_proc: int = 2
    """prepare's worker processes (one per core)"""
    workers: list[int] = field(default_factory=lambda: [1, 2])
    """loader worker counts to time (one thread each)"""
    loader_batches: int = 60
    """batches of 8 timed per loader measurement"""
    pcm_clips: int = 1000
    """clips of the PCM (16 kHz wav) source; 0 skips it"""
    pcm_codecs: list[str] = field(default_factory=lambda: ["flac", "opus"])
    """prepare's pcm_codec for the PCM source, one prepare each: flac (lossless), opus (lossy)"""
    opus_kbps: int = 32
    """prepare's opus_kbps for the opus leg"""
    chunk_rows: int = 2000
    """prepare's chunk_rows (rows per shard and per worker task: what a prepare worker holds)"""
    shuffle_buffer: int = 4096
    """train.shuffle_buffer of the loader (what a loader worker holds: about one window)"""
    model: str = str(ROOT / "tests" / "fixtures" / "whisper_tokenizer")
    """tokenizer prepare uses (any Whisper folder or Hub id)"""
    work: str | None = None
    """folder for the corpora and prepared data (default: a temporary folder, deleted after)"""
    out: str | None = None
    """also write the results as JSON here"""

    def __post_init__(self):
        if not self.sizes or min(self.sizes) < 1 or self.num_proc < 1 or min(self.workers, default=1) < 0:
            raise UserError("sizes must be >= 1 clips, num_proc >= 1, workers >= 0")
        from lib.dataset.shards import PCM_CODECS

        bad = [c for c in self.pcm_codecs if c not in PCM_CODECS]
        if bad or (self.pcm_clips and not self.pcm_codecs):
            raise UserError(f"pcm_codecs={','.join(self.pcm_codecs)}: give one or more of {', '.join(PCM_CODECS)} "
                            f"(or pcm_clips=0 to skip the PCM source)")


def mb(x: float) -> str:
    return f"{x / 1e6:,.1f}"


def corpus_name(p: dict) -> str:
    """A table's first cell: "1,000 x 5 s mp3", "1,000 x 5 s wav -> opus 32 kbit/s"."""
    codec = p.get("pcm_codec")
    return (f"{p['clips']:,} x 5 s {p['source']}"
            + (f" -> {codec}" + (f" {p['opus_kbps']} kbit/s" if codec == "opus" else "") if codec else ""))


def render(results: dict) -> list[str]:
    lines = ["| corpus | prepare clips/s (per core) | source MB/h | prepared MB/h (x source) | peak MB/h "
             "(x final) | prepare peak RAM MB | loader clips/s per worker (workers) | loader peak RAM MB |",
             "|---|---|---|---|---|---|---|---|"]
    for p in results["prepare"]:
        loads = [r for r in results["loader"] if r["clips_in_corpus"] == p["clips"] and r["source"] == p["source"]
                 and r.get("pcm_codec") == p.get("pcm_codec")]
        lines.append(
            f"| {corpus_name(p)} | {p['clips_per_s']} ({p['clips_per_s_per_core']}) | "
            f"{mb(p['source_bytes_per_hour'])} | {mb(p['final_bytes_per_hour'])} ({p['final_over_source']}) | "
            f"{mb(p['peak_bytes_per_hour'])} ({p['peak_over_final']}) | {mb(p['peak_ram_bytes'])} | "
            + (", ".join(f"{r['clips_per_s_per_worker']} ({r['workers']})" for r in loads) or "-") + " | "
            + (", ".join(mb(r["peak_ram_bytes"]) for r in loads) or "-") + " |")
    return lines


def check_targets(results: dict) -> list[str]:
    out = []
    for p in results["prepare"]:
        if p["source"] == "mp3":
            out.append(f"{'ok' if p['final_over_source'] <= MAX_RATIO_COMPRESSED else 'MISSED'}: {p['clips']:,} mp3 "
                       f"clips prepared to {p['final_over_source']}x the source (target <= {MAX_RATIO_COMPRESSED})")
        else:
            out.append(f"{'ok' if p['final_bytes_per_hour'] <= MAX_MB_PER_HOUR_PCM * 1e6 else 'MISSED'}: PCM source "
                       f"prepared to {mb(p['final_bytes_per_hour'])} MB per hour as {p.get('stored_as') or 'FLAC'} "
                       f"(target <= {MAX_MB_PER_HOUR_PCM})")
        out.append(f"{'ok' if p['peak_over_final'] <= MAX_PEAK_OVER_FINAL else 'MISSED'}: {corpus_name(p)} "
                   f"peak disk {p['peak_over_final']}x the final size (target <= {MAX_PEAK_OVER_FINAL})")
    one = [r for r in results["loader"] if r["workers"] == 1 and r["source"] == "mp3"]
    for p in results["prepare"]:
        if p["source"] != "mp3":
            lo = [r for r in results["loader"] if r["source"] == p["source"] and r.get("pcm_codec") == p.get("pcm_codec")]
            out += [f"{corpus_name(p)}: prepare {p['clips_per_s_per_core']} clips/s per core, one loader worker "
                    f"{r['clips_per_s_per_worker']} clips/s ({r['workers']} worker(s))" for r in lo]
    for r in one:
        out.append(f"{'ok' if r['clips_per_s_per_worker'] >= MIN_CLIPS_PER_WORKER else 'MISSED'}: one loader worker "
                   f"{r['clips_per_s_per_worker']} clips/s of 5-s 48 kHz mp3 ({r['clips_in_corpus']:,}-clip corpus; "
                   f"target >= {MIN_CLIPS_PER_WORKER}); eight: ~{8 * r['clips_per_s_per_worker']:.0f}")
    mp3 = sorted((p for p in results["prepare"] if p["source"] == "mp3"), key=lambda p: p["clips"])
    if len(mp3) > 1:
        small, big = mp3[0], mp3[-1]
        grow = big["peak_ram_bytes"] / max(small["peak_ram_bytes"], 1)
        out.append(f"prepare peak RAM {mb(small['peak_ram_bytes'])} MB at {small['clips']:,} clips, "
                   f"{mb(big['peak_ram_bytes'])} MB at {big['clips']:,} ({grow:.2f}x for {big['clips'] / small['clips']:.0f}x the clips)")
        lo = [r for r in results["loader"] if r["clips_in_corpus"] == small["clips"]]
        hi = [r for r in results["loader"] if r["clips_in_corpus"] == big["clips"]]
        for a, b in zip(lo, hi, strict=False):
            out.append(f"loader peak RAM with {a['workers']} worker(s): {mb(a['peak_ram_bytes'])} MB at "
                       f"{small['clips']:,} clips, {mb(b['peak_ram_bytes'])} MB at {big['clips']:,}")
    return out


def main(cfg: BenchDataConfig, env: Env) -> dict:
    import shutil

    work = Path(cfg.work) if cfg.work else Path(tempfile.mkdtemp(prefix="bench_data_"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"prepare": [], "loader": [], "cores": os.cpu_count()}
    try:
        plan = [("mp3", n, None) for n in sorted(cfg.sizes)]
        plan += [("wav", cfg.pcm_clips, codec) for codec in cfg.pcm_codecs] if cfg.pcm_clips else []
        for i, (kind, n, codec) in enumerate(plan):
            print(f"bench_data: preparing {n:,} {kind} clips with num_proc={cfg.num_proc}"
                  + (f", pcm_codec={codec}" if codec else "") + " ...", file=sys.stderr, flush=True)
            p = prepare(work, n, kind, cfg.num_proc, cfg.model, cfg.chunk_rows, codec, cfg.opus_kbps)
            results["prepare"].append(p)
            print(f"bench_data:   {p['clips_per_s']} clips/s, {mb(p['final_bytes_per_hour'])} MB/h", file=sys.stderr)
            # Every loader worker count on mp3; one worker on each PCM codec (what its decode costs).
            for w in cfg.workers if kind == "mp3" else [max(1, min(cfg.workers, default=1))]:
                r = loader(Path(p["data_dir"]), w, cfg.loader_batches, shuffle_buffer=cfg.shuffle_buffer)
                results["loader"].append({"source": kind, "pcm_codec": codec, "clips_in_corpus": n, **r})
                print(f"bench_data:   loader {w} worker(s): {r['clips_per_s']} clips/s", file=sys.stderr)
            if all((k, m) != (kind, n) for k, m, _ in plan[i + 1:]):  # the release's last use
                shutil.rmtree(work / f"cv-{kind}-{n}", ignore_errors=True)
    finally:
        if not cfg.work:
            shutil.rmtree(work, ignore_errors=True)
    results["targets"] = check_targets(results)
    print("\n".join(render(results)))
    print("\n".join(f"- {t}" for t in results["targets"]))
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    raise SystemExit(run_job("bench_data", __doc__, BenchDataConfig, main))
