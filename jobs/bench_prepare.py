"""Benchmark `make prepare` and measure the storage decision (raw 16 kHz audio vs log-mel).

    .venv/bin/python -m jobs.bench_prepare [--clips 1000] [--num-proc 2] [--model tests/fixtures/whisper_tokenizer]

1. Throughput: writes CLIPS five-second 48 kHz mono mp3 clips (10 synthesized voices-like
   signals, copied) in a temporary Common Voice layout, runs the prepare job on them with
   --num-proc workers and prints clips/s (wall clock, tokenizer load and writing included).
2. Storage: bytes per clip on disk of the prepared dataset (float32 16 kHz audio) versus a
   precomputed 80 x 3000 float32 log-mel (960,000 bytes a clip), and the CPU time to compute
   log-mel for a batch of 8 x 30 s with WhisperFeatureExtractor (numpy path and torch path).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np

SECONDS = 5.0


def synth_clips(n_voices: int = 10, sr: int = 48_000) -> list[bytes]:
    """Speech-like mp3s: a harmonic 'voice' whose pitch glides, amplitude-modulated into syllables."""
    import soundfile as sf

    rng = np.random.default_rng(0)
    t = np.arange(int(SECONDS * sr)) / sr
    out = []
    for v in range(n_voices):
        f0 = 100 + 15 * v + 20 * np.sin(2 * np.pi * 0.5 * t)
        phase = 2 * np.pi * np.cumsum(f0) / sr
        voice = sum(np.sin(k * phase) / k for k in range(1, 8))
        syllables = 0.5 * (1 + np.sin(2 * np.pi * (3 + 0.2 * v) * t)) ** 2
        x = 0.2 * voice * syllables + 0.01 * rng.standard_normal(t.size)
        buf = io.BytesIO()
        sf.write(buf, (x / np.abs(x).max() * 0.8).astype(np.float32), sr, format="MP3")
        out.append(buf.getvalue())
    return out


def make_release(root: Path, n: int) -> Path:
    clips = root / "clips"
    clips.mkdir(parents=True)
    voices = synth_clips()
    header = ["client_id", "path", "sentence_id", "sentence", "up_votes", "down_votes", "age", "gender",
              "accents", "variant", "locale", "segment"]
    with open(root / "train.tsv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(header)
        for i in range(n):
            name = f"common_voice_hi_{i:08d}.mp3"
            (clips / name).write_bytes(voices[i % len(voices)])
            w.writerow([f"c{i % 50}", name, str(i), f"यह वाक्य संख्या {i} है।", 2, 0, "", "", "", "", "hi", ""])
    return root


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_throughput(n: int, num_proc: int, model: str, work: Path) -> dict:
    from jobs.prepare import PrepareConfig, main
    from lib.config import load_config
    from lib.env import Env

    release = make_release(work / "cv", n)
    mp3_bytes = dir_bytes(release / "clips")
    cfg = load_config(PrepareConfig, None, [
        f"model={model}", "name=bench", "language=hi", "source.kind=cv", f"source.path={release}",
        "source.validation=", "source.test=", f"num_proc={num_proc}"])
    t0 = time.perf_counter()
    manifest = main(cfg, Env(data_dir=work / "data"))
    wall = time.perf_counter() - t0
    out = work / "data" / "prepared" / "bench"
    rows = manifest["splits"]["train"]["rows"]
    return {"clips": n, "rows_written": rows, "num_proc": num_proc, "wall_s": round(wall, 1),
            "clips_per_s": round(n / wall, 1), "audio_hours_per_s": round(n * SECONDS / 3600 / wall, 4),
            "mp3_bytes_per_clip": mp3_bytes // n, "prepared_bytes_per_clip": dir_bytes(out / "train") // rows}


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=1000)
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--model", default=str(Path(__file__).parent.parent / "tests" / "fixtures" / "whisper_tokenizer"))
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args()
    from lib.cli import setup_logging

    setup_logging()
    results = {}
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        if not args.skip_throughput:
            results["throughput"] = bench_throughput(args.clips, args.num_proc, args.model, Path(tmp))
    results["logmel"] = bench_logmel()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
