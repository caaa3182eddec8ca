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
