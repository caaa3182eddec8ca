"""Builders shared by tests: a tiny Whisper model on disk, and prepared datasets in the contract format."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import yaml

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_DIR = FIXTURES / "whisper_tokenizer"
# Real whisper-base weights for the slow tests, where a developer checkout has them: the
# `shared/` folder beside the repository (a user's clone has none; those tests then skip or fail).
REPO = Path(__file__).resolve().parents[1]
"""the repository's root"""
CV = FIXTURES / "cv_release"
MANIFEST_DIR = FIXTURES / "manifest"
SHARED_WHISPER_BASE = Path(__file__).resolve().parents[2] / "shared" / "models" / "whisper-base-hf"


def build_tiny_whisper(out: Path, seed: int = 0, **overrides) -> Path:
    """A 2-layer, d_model-64 Whisper with random weights and the real multilingual tokenizer,
    written with save_pretrained so that tests load it through the real from_pretrained path."""
    from transformers import WhisperConfig

    from lib.tools.models import save_random_whisper

    cfg = dict(
        vocab_size=51865,
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=448,
        pad_token_id=50257,
        bos_token_id=50257,
        eos_token_id=50257,
        decoder_start_token_id=50258,
    )
    cfg.update(overrides)
    return save_random_whisper(WhisperConfig(**cfg), out, TOKENIZER_DIR, seed=seed)


def tone(seconds: float, freq: float = 440.0, sr: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write_prepared(out: Path, model_dir: Path, rows: dict[str, list[tuple[str, np.ndarray]]],
                   language: str = "hi", name: str | None = None, shard_rows: int = 2000,
                   speakers: dict[str, list[str]] | None = None,
                   ts_labels: dict[str, list[list[int]]] | None = None) -> Path:
    """Write a prepared dataset in the lib.dataset.prepared contract (format 2: FLAC in Parquet shards):
    rows = {split: [(text, audio16k), ...]}; speakers = {split: [speaker id per row]}; ts_labels =
    {split: [a manifest's timestamped label per row, [] for none]}."""
    from transformers import WhisperTokenizer

    from lib.dataset import shards
    from lib.dataset.prepared import tokenizer_signature, write_manifest, write_rows

    tok = WhisperTokenizer.from_pretrained(model_dir, language=language, task="transcribe")
    out.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, items in rows.items():
        if (out / split).exists():
            shutil.rmtree(out / split)
        spk = (speakers or {}).get(split) or [""] * len(items)
        ts = (ts_labels or {}).get(split) or [[]] * len(items)
        splits[split] = write_rows(out, split, (
            {"id": f"{split}-{i}", "audio": a, "text": t, "labels": tok(t).input_ids, "language": language,
             "speaker": spk[i], "where": f"test row {i}", "ts_labels": ts[i]} for i, (t, a) in enumerate(items)),
            shard_rows=shard_rows)
    write_manifest(out, {
        "format": shards.FORMAT, "name": name or out.name, "source": {"kind": "test"}, "language": language,
        "task": "transcribe", "tokenizer": str(model_dir), "sampling_rate": 16_000,
        "tokenizer_signature": tokenizer_signature(tok, language, "transcribe"),
        "splits": splits, "skipped": [],
    })
    return out


def v3_like_tokenizer_dir(out: Path) -> Path:
    """The fixture tokenizer with large-v3's extra language token: <|yue|> at 50358, every id from
    <|translate|> up moved by one (v3: <|notimestamps|> 50364, <|0.00|> 50365). Lets tests check
    that code looks special tokens up by name rather than using v2's numbers."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    for f in TOKENIZER_DIR.iterdir():
        shutil.copy(f, out / f.name)
    tj = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    yue = 50358
    for tok in tj["added_tokens"]:
        if tok["id"] >= yue:
            tok["id"] += 1
    tj["added_tokens"].append({"id": yue, "content": "<|yue|>", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True})
    tj["added_tokens"].sort(key=lambda t: t["id"])
    for spec in (tj.get("post_processor") or {}).get("special_tokens", {}).values():
        spec["ids"] = [i + 1 if i >= yue else i for i in spec["ids"]]
    (out / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    return out
# ---------------------------------------------------------------- runs and adapters (eval, export, serve)


def make_adapter(base_dir: Path, out: Path, seed: int = 1, scale: float = 0.5) -> Path:
    """A non-trivial LoRA adapter (B perturbed, so it changes the model) saved the way train does."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig, WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    peft_model.save_pretrained(out)
    WhisperProcessor.from_pretrained(base_dir).save_pretrained(out)
    gen = GenerationConfig.from_pretrained(base_dir)
    gen.language, gen.task = "hi", "transcribe"
    gen.save_pretrained(out)
    return out


def make_run(data_dir: Path, base_dir: Path, name: str = "tiny-run", data: str = "tiny-hi") -> Path:
    """DATA_DIR/runs/NAME in the train job's contract, plus DATA_DIR/prepared/DATA."""
    run = data_dir / "runs" / name
    make_adapter(base_dir, run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump({
        "run": name, "data": data, "language": "hi", "task": "transcribe",
        "model": {"base": str(base_dir), "quantization": "int8"}, "lora": {"r": 4},
    }))
    (run / "log_history.json").write_text(json.dumps([
        {"step": 10, "loss": 3.2, "learning_rate": 1e-4, "epoch": 0.5},
        {"step": 20, "loss": 2.1, "learning_rate": 1e-4, "epoch": 1.0},
        {"step": 20, "eval_loss": 2.4, "eval_wer": 0.8, "epoch": 1.0},
        {"step": 30, "loss": 1.7, "learning_rate": 5e-5, "epoch": 1.5},
        {"step": 40, "eval_loss": 1.9, "eval_wer": 0.6, "epoch": 2.0},
    ]))
    (run / "metrics.json").write_text(json.dumps({"eval_wer": 0.6}))
    write_prepared(data_dir / "prepared" / data, base_dir, {
        "train": [("नमस्ते", tone(0.5))],
        "test": [("हमने उसका जन्मदिन मनाया।", tone(1.0, 300)), ("नमस्ते दुनिया", tone(0.7, 500)),
                 ("एक दो तीन", tone(1.2, 800))],
    })
    return run


# ---------------------------------------------------------------- reading what prepare wrote


def split_rows(out: Path, split: str, columns: list[str] | None = None) -> list[dict]:
    """A prepared split's rows, shard by shard in the order manifest.json lists them."""
    from lib.dataset import shards
    from lib.dataset.prepared import read_manifest

    manifest = read_manifest(out)
    rows = []
    for shard in manifest["splits"][split]["shards"]:
        rows += shards.read_shard(shards.join(out, shard["file"]), columns).to_pylist()
    return rows


def split_ids(out: Path, split: str) -> list[str]:
    return [r["id"] for r in split_rows(out, split, ["id"])]


def hub_parquet(folder: Path) -> dict[str, str]:
    """What the Hub's parquet export of a small CV-like dataset looks like: Audio + sentence."""
    from datasets import Audio, Dataset, Features, Value

    folder.mkdir(parents=True)
    files = {}
    for split, names in (("train", ["en_0", "en_1"]), ("validation", ["en_2"]), ("test", ["en_4", "en_5"])):
        recs = {"audio": [{"bytes": (MANIFEST_DIR / "clips" / f"{n}.wav").read_bytes(), "path": f"{n}.wav"}
                          for n in names],
                "sentence": [f"hub {n}" for n in names], "up_votes": [1] * len(names)}
        raw = Features({"audio": {"bytes": Value("binary"), "path": Value("string")},
                        "sentence": Value("string"), "up_votes": Value("int64")})
        ds = Dataset.from_dict(recs, features=raw)
        ds = ds.cast(Features({"audio": Audio(sampling_rate=16_000), "sentence": Value("string"),
                               "up_votes": Value("int64")}))
        files[split] = str(folder / f"{split}.parquet")
        ds.to_parquet(files[split])
    return files


# ---------------------------------------------------------------- train job flags


WORDS = ["नमस्ते", "धन्यवाद", "हाँ", "नहीं", "पानी", "घर"]
# Words whose labels have the same token count (8 ids with the Hindi/transcribe prefix): every
# batch of them has one shape, so compiled layers compile once and DDP's mean of per-process mean
# losses equals one process's mean over all tokens.
EVEN_WORDS = ["घर", "एक", "दो", "तीन"]


def write_even(root: Path, model_dir: Path, name: str = "toy") -> Path:
    """DATA_DIR `root` with prepared/NAME: the 4 EVEN_WORDS as 1 s tones, a train split only (no
    validation, so a run never stops to generate)."""
    write_prepared(root / "prepared" / name, model_dir,
                   {"train": [(w, tone(1.0, 200 + 150 * i)) for i, w in enumerate(EVEN_WORDS)]}, language="hi")
    return root


def train_flags(model_dir, run, **extra):
    """key=value flags for a 6-step fp32 run of the tiny model on DATA_DIR/prepared/toy."""
    base = {
        "run": run, "data": "toy", "model.base": str(model_dir), "model.quantization": "none",
        "model.precision": "auto", "model.gradient_checkpointing": "false",
        "lora.r": 4, "lora.alpha": 8, "train.batch_size": 2, "train.max_steps": 6,
        "train.eval_steps": 3, "train.save_steps": 3, "train.logging_steps": 1, "train.warmup_steps": 0,
        "train.generation_max_length": 8, "train.num_workers": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def train_cfg(model_dir, run, **extra):
    """The train job's config from train_flags, through the real loader."""
    from lib.config import load_config
    from lib.train.config import TrainConfig

    return load_config(TrainConfig, None, train_flags(model_dir, run, **extra))


def lora_weights(path: Path) -> dict:
    """An adapter folder's LoRA tensors by name."""
    from safetensors.torch import load_file

    return load_file(str(path / "adapter_model.safetensors"))


def sigterm_in_the_first_evaluation(monkeypatch) -> list[int]:
    """SIGTERM this process in the Trainer's first evaluation batch (then the batch runs on); the
    returned list gets the global step of every prediction batch."""
    import os
    import signal

    from transformers import Seq2SeqTrainer

    real, calls = Seq2SeqTrainer.prediction_step, []

    def predict_then_sigterm(self, *a, **k):
        calls.append(self.state.global_step)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *a, **k)

    monkeypatch.setattr(Seq2SeqTrainer, "prediction_step", predict_then_sigterm)
    return calls
