"""Builders shared by tests: a tiny Whisper model on disk, and prepared datasets in the contract format."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"
TOKENIZER_DIR = FIXTURES / "whisper_tokenizer"
# Real whisper-base weights for the slow tests, where a developer checkout has them: the
# `shared/` folder beside the repository (a user's clone has none; those tests then skip or fail).
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
                   speakers: dict[str, list[str]] | None = None) -> Path:
    """Write a prepared dataset in the lib.dataset.prepared contract (format 2: FLAC in Parquet shards):
    rows = {split: [(text, audio16k), ...]}; speakers = {split: [speaker id per row]}."""
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
        splits[split] = write_rows(out, split, (
            {"id": f"{split}-{i}", "audio": a, "text": t, "labels": tok(t).input_ids, "language": language,
             "speaker": spk[i], "where": f"test row {i}"} for i, (t, a) in enumerate(items)), shard_rows=shard_rows)
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
