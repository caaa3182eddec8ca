"""Benchmark `make prepare` and measure its storage (format 2: encoded audio in Parquet shards).

    python -m lib.tools.bench_prepare                    # 1,000 mp3 clips, num_proc=2
    python -m lib.tools.bench_prepare source_format=wav  # the same clips as 16 kHz 16-bit wav
    python -m lib.tools.bench_prepare clips=200 num_proc=1 model=tests/fixtures/whisper_tokenizer

1. Throughput: writes CLIPS five-second clips (synthesized voice-like signals, each its own;
   48 kHz mono mp3 as Common Voice ships, or 16 kHz PCM wav) in a temporary Common Voice
   layout, runs the prepare job on them (`python -m jobs.prepare`, its own process) with
   num_proc workers and prints clips/s (wall clock: process start, tokenizer load and writing
   included).
2. Storage, from the manifest: bytes per audio hour of the prepared dataset and of the source's
   encoded clips, their ratio, and the staging folder's peak against the final size; next to
   a precomputed 80 x 3000 float32 log-mel (960,000 bytes a clip), and the CPU time to compute
   log-mel for a batch of 8 x 30 s with WhisperFeatureExtractor (numpy path and torch path).
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lib.cli import run_job
from lib.env import Env
from lib.errors import UserError
from lib.tools.runner import ROOT, last_error, run_job_process

SECONDS = 5.0


def synth_clip(i: int, sr: int = 48_000, fmt: str = "mp3") -> bytes:
    """Clip i, speech-like: a harmonic 'voice' (one of 10) whose pitch glides, amplitude-modulated
    into syllables, with its own noise. Every clip differs: copies of a few clips would let
    Parquet's zstd find the repeats and make the stored size meaningless.
    fmt mp3: 48 kHz mp3; wav: 16 kHz 16-bit PCM (sr is then 16 kHz)."""
    import soundfile as sf

    rng = np.random.default_rng(i)
    v = i % 10
    t = np.arange(int(SECONDS * sr)) / sr
    f0 = 100 + 15 * v + 20 * np.sin(2 * np.pi * (0.5 + 0.01 * (i % 17)) * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voice = sum(np.sin(k * phase) / k for k in range(1, 8))
    syllables = 0.5 * (1 + np.sin(2 * np.pi * (3 + 0.2 * v) * t + i)) ** 2
    x = 0.2 * voice * syllables + 0.01 * rng.standard_normal(t.size)
    x = (x / np.abs(x).max() * 0.8).astype(np.float32)
    buf = io.BytesIO()
    if fmt == "wav":
        sf.write(buf, x, sr, format="WAV", subtype="PCM_16")
    else:
        sf.write(buf, x, sr, format="MP3")
    return buf.getvalue()


def make_release(root: Path, n: int, fmt: str = "mp3") -> Path:
    clips = root / "clips"
    clips.mkdir(parents=True)
    sr = 16_000 if fmt == "wav" else 48_000
    header = ["client_id", "path", "sentence_id", "sentence", "up_votes", "down_votes", "age", "gender",
              "accents", "variant", "locale", "segment"]
    with open(root / "train.tsv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        for i in range(n):
            name = f"common_voice_hi_{i:08d}.{fmt}"
            (clips / name).write_bytes(synth_clip(i, sr, fmt))
            w.writerow([f"c{i % 50}", name, str(i), f"यह वाक्य संख्या {i} है।", 2, 0, "", "", "", "", "hi", ""])
    return root


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_throughput(n: int, num_proc: int, model: str, work: Path, fmt: str = "mp3") -> dict:
    release = make_release(work / "cv", n, fmt)
    source_bytes = dir_bytes(release / "clips")
    args = [f"model={model}", "name=bench", "language=hi", "source.kind=cv", f"source.path={release}",
            "source.validation=", "source.test=", "validation_fraction=0", f"num_proc={num_proc}"]
    t0 = time.perf_counter()
    code, output = run_job_process("prepare", args, Env(data_dir=work / "data"), work / "prepare.log")
    wall = time.perf_counter() - t0
    if code != 0:
        raise UserError(f"bench_prepare: the prepare job failed (exit {code}): {last_error(output)}")
    out = work / "data" / "prepared" / "bench"
    manifest = json.loads((out / "manifest.json").read_text())
    rows, st = manifest["splits"]["train"]["rows"], manifest["storage"]
    return {"clips": n, "source_format": fmt, "rows_written": rows, "num_proc": num_proc, "wall_s": round(wall, 1),
            "clips_per_s": round(n / wall, 1), "clips_per_s_per_worker": round(n / wall / num_proc, 1),
            "audio_hours_per_s": round(n * SECONDS / 3600 / wall, 4),
            "source_bytes_per_clip": source_bytes // n, "prepared_bytes_per_clip": dir_bytes(out / "train") // rows,
            "stored_formats": st["formats"], "mb_per_audio_hour": round(st["bytes_per_audio_hour"] / 1e6, 1),
            "source_mb_per_audio_hour": round(st["source_bytes_per_audio_hour"] / 1e6, 1),
            "bytes_vs_source": st["bytes_vs_source"], "peak_vs_final": st["peak_vs_final"]}


def bench_logmel(batch: int = 8, repeats: int = 3) -> dict:
    import torch
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=80)
    rng = np.random.default_rng(0)
    audio = [(0.1 * rng.standard_normal(30 * 16_000)).astype(np.float32) for _ in range(batch)]
    out = {"batch": f"{batch} x 30 s", "torch_threads": torch.get_num_threads()}
    for label, kwargs in (("numpy", {}), ("torch_cpu", {"device": "cpu"})):
        fe(audio[:1], sampling_rate=16_000, return_tensors="np", **kwargs)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            feats = fe(audio, sampling_rate=16_000, return_tensors="np", **kwargs).input_features
            times.append(time.perf_counter() - t0)
        out[f"{label}_s_per_batch"] = round(min(times), 3)
        out["logmel_shape"] = list(feats.shape)
    out["logmel_bytes_per_clip"] = 80 * 3000 * 4
    return out


@dataclass
class BenchPrepareConfig:
    clips: int = 1000
    """five-second clips to prepare"""
    source_format: str = "mp3"
    """mp3 (48 kHz, as Common Voice) or wav (16 kHz 16-bit PCM: stored as FLAC)"""
    num_proc: int = 2
    """prepare's worker processes"""
    model: str = str(ROOT / "tests" / "fixtures" / "whisper_tokenizer")
    """tokenizer (a Whisper folder or Hub id) prepare tokenizes with"""
    throughput: bool = True
    """false: only the log-mel timing"""

    def __post_init__(self):
        if self.clips < 1 or self.num_proc < 1:
            raise UserError("clips and num_proc must be >= 1")
        if self.source_format not in ("mp3", "wav"):
            raise UserError(f"source_format={self.source_format}: use mp3 or wav")


def main(cfg: BenchPrepareConfig, env: Env) -> dict:
    # 1. Prepare throughput on a temporary Common Voice release; 2. log-mel cost per batch.
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        if cfg.throughput:
            results["throughput"] = bench_throughput(cfg.clips, cfg.num_proc, cfg.model, Path(tmp), cfg.source_format)
    results["logmel"] = bench_logmel()
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    raise SystemExit(run_job("bench_prepare", __doc__, BenchPrepareConfig, main))
