"""The prepared-dataset contract between `make prepare` and `make train` / `make eval`.

    DATA_DIR/prepared/NAME/
      manifest.json         source, language, tokenizer, counts and hours per split,
                            skipped rows with reasons, package versions, resolved config
      train/ validation/ test/   one `datasets.Dataset.save_to_disk` folder per split

Every split has these columns:
  id        str            stable row id (clip file name or manifest row)
  audio     list[float32]  mono waveform at 16 kHz (lib.audio.SAMPLING_RATE), not log-mel: log-mel
                           is computed per batch by the collator (see README, storage)
  text      str            the transcript in lib.metrics.canonical spelling (NFC, ASCII
                           digits, no zero-width joiners): what labels encode, what eval scores
  labels    list[int32]    tokenized transcript with the language/task prefix and
                           <|endoftext|>, as WhisperTokenizer(language, task) makes it
  language  str            ISO code of the row's language (e.g. "hi")
  duration  float32        seconds
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lib.errors import UserError

SPLITS = ("train", "validation", "test")
COLUMNS = ("id", "audio", "text", "labels", "language", "duration")
MANIFEST = "manifest.json"


def features():
    """The datasets Features of every prepared split."""
    from datasets import Features, Sequence, Value

    return Features(
        {
            "id": Value("string"),
            "audio": Sequence(Value("float32")),
            "text": Value("string"),
            "labels": Sequence(Value("int32")),
            "language": Value("string"),
            "duration": Value("float32"),
        }
    )


def _require_manifest(path: Path) -> Path:
    mf = path / MANIFEST
    if not mf.is_file():
        raise UserError(
            f"no prepared dataset at {path} ({MANIFEST} missing): run `make prepare` first, "
            f"or set data= to one of: {', '.join(list_prepared(path.parent)) or '(none yet)'}"
        )
    return mf


def read_manifest(path: str | Path) -> dict[str, Any]:
    return json.loads(_require_manifest(Path(path)).read_text())


def open_prepared(env, data: str) -> tuple[Path, dict[str, Any]]:
    """(folder, manifest) of `data=`: a prepared dataset's name under DATA_DIR/prepared, or the
    path of a prepared folder; a missing one names the flag and the datasets there are."""
    if data and (Path(data) / MANIFEST).is_file():
        path = Path(data)
    else:
        path = env.prepared_dir(data)
    if not (path / MANIFEST).is_file():
        have = list_prepared(path.parent)
        raise UserError(
            f"data={data}: no prepared dataset at {path}; run `make prepare` first or pick one of: "
            f"{', '.join(have) if have else '(none prepared yet)'}"
        )
    return path, read_manifest(path)


def list_prepared(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file())


def load_split(path: str | Path, split: str):
    """One split as a datasets.Dataset; a clear error if it was not prepared."""
    from datasets import load_from_disk

    path = Path(path)
    _require_manifest(path)
    d = path / split
    if not d.is_dir():
        have = [s for s in SPLITS if (path / s).is_dir()]
        raise UserError(
            f"prepared dataset {path} has no '{split}' split (it has: {', '.join(have) or 'none'}); "
            f"prepare it with that split or choose another"
        )
    ds = load_from_disk(str(d))
    missing = [c for c in COLUMNS if c not in ds.column_names]
    if missing:
        raise UserError(f"{d}: columns {missing} missing; it was not written by `make prepare`: prepare again")
    return ds


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json last and atomically: its presence marks a finished dataset."""
    path = Path(path)
    tmp = path / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False, default=str))
    tmp.replace(path / MANIFEST)


# The special tokens whose ids a label sequence relies on. Their ids differ between Whisper
# generations: large-v3 added a language, so v2's <|transcribe|> (50359) is v3's <|translate|>,
# and v2's <|notimestamps|> (50363) is v3's <|nospeech|>.
SPECIAL_TOKENS = ("<|endoftext|>", "<|startoftranscript|>", "<|translate|>", "<|transcribe|>",
                  "<|startoflm|>", "<|startofprev|>", "<|nocaptions|>", "<|nospeech|>", "<|notimestamps|>")


def tokenizer_signature(tokenizer, language: str, task: str) -> dict[str, Any]:
    """What the labels were tokenized with: the prefix every label starts with, the special
    tokens' ids, the vocabulary size. Stored in manifest.json; train and eval compare it
    with their base's tokenizer (check_tokenizer)."""
    tokenizer.set_prefix_tokens(language=language, task=task, predict_timestamps=False)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    unk = tokenizer.unk_token_id
    return {
        "prefix": [int(i) for i in tokenizer.prefix_tokens],
        "special_ids": {t: int(i) for t, i in ids.items() if i is not None and i != unk},
        "vocab_size": len(tokenizer),
    }


def check_tokenizer(manifest: dict[str, Any], tokenizer, data: str, base: str, flag: str) -> None:
    """Refuse a base whose tokenizer gives the prepared labels other meanings.

    A dataset prepared with one Whisper's tokenizer trains another without any error: the ids
    are just numbers, and a large-v3 run on large-v2 labels learns to start every transcript
    with <|translate|> <|nospeech|>. Prepared folders written before the signature was stored
    are passed with a warning (prepare again to have them checked).
    """
    import logging

    stored = manifest.get("tokenizer_signature")
    if not stored:
        logging.getLogger("whisper_ft").warning(
            "data=%s: its manifest.json (prepared before tokenizer signatures were stored) cannot say which "
            "tokenizer made its labels; prepare it again with model=%s to have that checked", data, base)
        return
    language, task = manifest.get("language"), manifest.get("task") or "transcribe"
    ours = tokenizer_signature(tokenizer, language, task)
    diff = [k for k in ("prefix", "vocab_size") if stored.get(k) != ours[k]]
    diff += [f"{t} {stored['special_ids'].get(t)} vs {ours['special_ids'].get(t)}"
             for t in sorted(set(stored.get("special_ids", {})) | set(ours["special_ids"]))
             if stored.get("special_ids", {}).get(t) != ours["special_ids"].get(t)]
    if diff:
        raise UserError(
            f"data={data} was tokenized with {manifest.get('tokenizer')!r}, whose token ids differ from "
            f"{flag}={base}'s ({'; '.join(map(str, diff[:4]))}): its labels would mean other tokens to this "
            f"model. Prepare the data again with model={base} (make prepare ... ARGS=\"model={base}\"), "
            f"or train/evaluate the model it was prepared for"
        )
