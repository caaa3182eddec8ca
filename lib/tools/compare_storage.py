"""How much a storage codec changes what the model hears: one split prepared several ways, against a reference.

    python -m lib.tools.compare_storage reference=synth-flac others=synth-opus32,synth-opus16 \
        evals=$DATA_DIR/evals model=$WHISPER_BASE

For the same clips (matched by file name without extension, so a .wav and its .mp3 pair up)
of `split` in the prepared dataset `reference` and in each of `others`, prints a Markdown row
per dataset: the split's stored MB per audio hour, the waveform SNR against the reference's
decoded audio (median and worst clip), the mean (and 99th percentile) absolute difference of
the log-mel features the model sees, and, where `evals`/NAME/predictions.tsv exists (written by
`python -m jobs.eval ... out=EVALS/NAME`), how many transcripts are identical to the
reference's and the WER / CER of that eval. Used for the pcm_codec=opus quality check
(docs/results.md "Storage of prepared data"): zero-shot transcripts of a model that is wrong on the language
still move when its input moves, which makes their equality a sensitive test of the input.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lib.cli import run_job
from lib.env import Env
from lib.errors import UserError


@dataclass
class CompareStorageConfig:
    reference: str = "synth-flac"
    """prepared dataset (name under DATA_DIR/prepared, or a folder) whose audio is the reference"""
    others: list[str] = field(default_factory=list)
    """prepared datasets of the same clips stored another way (pcm_codec=opus, mp3, ...)"""
    split: str = "test"
    """which split to compare"""
    evals: str | None = None
    """folder of jobs.eval outputs named like the datasets (EVALS/NAME/predictions.tsv); none: no transcripts"""
    mels: int = 80
    """log-mel bins of the model (80; large-v3: 128)"""

    def __post_init__(self) -> None:
        if not self.others:
            raise UserError("others=: name one or more prepared datasets to compare with reference=")


def load(env: Env, name: str, split: str) -> tuple[dict[str, np.ndarray], dict]:
    """{clip stem: 16 kHz float32} of a split, and the dataset's split entry of manifest.json."""
    from lib.dataset.prepared import audio_arrays, load_split, open_prepared

    root, manifest = open_prepared(env, name)
    ds = load_split(root, split, manifest)
    return dict(zip((Path(i).stem for i in ds["id"]), audio_arrays(ds), strict=True)), manifest["splits"][split]


def transcripts(evals: str | None, name: str) -> tuple[dict[str, str], dict]:
    """{clip stem: hypothesis} and the model's results of EVALS/NAME (empty when absent)."""
    folder = Path(evals or "") / name
    if not evals or not (folder / "predictions.tsv").is_file():
        return {}, {}
    with open(folder / "predictions.tsv", encoding="utf-8", newline="") as f:
        hyps = {Path(r["id"]).stem: r["hypothesis"] for r in csv.DictReader(f, delimiter="\t")}
    report = json.loads((folder / "report.json").read_text()) if (folder / "report.json").is_file() else {}
    return hyps, report.get("results", {}).get("model", {})


def snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    n = min(len(ref), len(got))
    noise = np.sum((ref[:n].astype(np.float64) - got[:n]) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref[:n].astype(np.float64) ** 2) / noise))


def main(cfg: CompareStorageConfig, env: Env) -> list[dict]:
    from transformers import WhisperFeatureExtractor

    from lib.audio import log_mel

    fe = WhisperFeatureExtractor(feature_size=cfg.mels)

    def mel(audio: np.ndarray, frames: int) -> np.ndarray:
        return log_mel(fe, [audio])[0, :, :frames].numpy()  # 100 frames a second; the clip's, not the padding

    ref, _ = load(env, cfg.reference, cfg.split)
    ref_hyps, _ = transcripts(cfg.evals, cfg.reference)
    ref_mels = {k: mel(a, len(a) // 160) for k, a in ref.items()}  # once: every dataset is compared with them
    rows = []
    for name in [cfg.reference, *cfg.others]:
        got, info = load(env, name, cfg.split)
        missing = sorted(set(ref) - set(got))
        if missing:
            raise UserError(f"{name}: split {cfg.split} lacks {len(missing)} of {cfg.reference}'s clips (first: "
                            f"{missing[0]}): compare datasets prepared from the same clips")
        frames = {k: min(len(ref[k]), len(got[k])) // 160 for k in ref}
        diff = np.concatenate([np.abs(mel(got[k], frames[k]) - ref_mels[k][:, :frames[k]]).ravel() for k in ref])
        snr = [snr_db(ref[k], got[k]) for k in ref]
        hyps, results = transcripts(cfg.evals, name)
        same = sum(hyps.get(k) == h for k, h in ref_hyps.items()) if hyps and ref_hyps else None
        rows.append({"data": name, "mb_per_hour": info["bytes"] / max(info["seconds"], 1e-9) * 3600 / 1e6,
                     "formats": info.get("formats"), "clips": len(ref),
                     "length_diff_max": max(abs(len(ref[k]) - len(got[k])) for k in ref),
                     "snr_median": float(np.median(snr)), "snr_min": float(min(snr)),
                     "logmel_mean": float(diff.mean()), "logmel_p99": float(np.quantile(diff, 0.99)),
                     "identical": same, "wer": results.get("normalized_wer"), "cer": results.get("normalized_cer")})
    print("| data | stored | MB/h | identical transcripts | WER / CER | SNR median (min) | |d log-mel| mean (p99) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        scores = f"{100 * r['wer']:.2f} % / {100 * r['cer']:.2f} %" if r["wer"] is not None else "-"
        same = f"{r['identical']} / {len(ref_hyps)}" if r["identical"] is not None else "-"
        print(f"| {r['data']} | {r['formats']} | {r['mb_per_hour']:.1f} | {same} | {scores} | "
              f"{r['snr_median']:.1f} dB ({r['snr_min']:.1f}) | {r['logmel_mean']:.4f} ({r['logmel_p99']:.3f}) |")
    return rows


if __name__ == "__main__":
    raise SystemExit(run_job("compare_storage", __doc__, CompareStorageConfig, main))
