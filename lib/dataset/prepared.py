"""The prepared-dataset contract between `make prepare` and `make train` / `make eval`.

    DATA_DIR/prepared/NAME/       or any fsspec URL: s3://bucket/prepared/NAME, gs://..., file://...
      manifest.json               format, source, language, tokenizer, counts, hours and shards per
                                  split, skipped rows with reasons, package versions, resolved config
      train/ validation/ test/    Parquet shards of encoded audio (lib/dataset/shards.py says what is in them)

`open_prepared` finds a dataset by name or path/URL and refuses folders of an older format (float32
`datasets` splits) with the command that prepares them again. `load_split` reads a whole split
(eval, export checks: a test split is small) into memory, audio still encoded; `audio_arrays`
decodes rows to 16 kHz float32. Training streams shards instead (lib/train/stream.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lib.dataset import bucket, shards
from lib.errors import UserError
from lib.files import write_json

SPLITS = ("train", "validation", "test")
COLUMNS = shards.COLUMNS
MANIFEST = "manifest.json"


def _manifest_text(root: str | Path) -> str | None:
    url = shards.join(root, MANIFEST)
    try:
        return shards.read_bytes(url).decode("utf-8")
    except FileNotFoundError:
        return None


def read_manifest(path: str | Path) -> dict[str, Any]:
    text = _manifest_text(path)
    if text is None:
        raise UserError(f"no prepared dataset at {path} ({MANIFEST} missing): run `make prepare` first, or set "
                        f"data= to one of: {', '.join(list_prepared(Path(path).parent)) or '(none yet)'}")
    return json.loads(text)


def check_format(manifest: dict[str, Any], path: str | Path, data: str) -> None:
    """Refuse a dataset this code cannot read: one prepared before format 2 (float32 splits), or
    by a newer version of the product."""
    fmt = manifest.get("format")
    if fmt == shards.FORMAT:
        return
    name = manifest.get("name") or Path(str(path)).name
    if fmt is None or fmt < shards.FORMAT:
        raise UserError(
            f"data={data}: {path} was prepared in an older format (float32 audio splits, "
            f"{'no format' if fmt is None else f'format {fmt}'}; this version reads format {shards.FORMAT}: "
            f"Parquet shards of encoded audio, about 1/5 of the size). Prepare it again: make prepare "
            f"DATA={name} ARGS=\"force=true ...\" with the same source (its config is in {MANIFEST})")
    raise UserError(f"data={data}: {path} is format {fmt}, newer than this version reads ({shards.FORMAT}): "
                    f"update the image, or prepare it with this version")


def open_prepared(env, data: str) -> tuple[str | Path, dict[str, Any]]:
    """(folder or URL, manifest) of `data=`: a prepared dataset's name under DATA_DIR/prepared, the
    path of a prepared folder, or an fsspec URL of one (s3://..., gs://...: read in place, never
    copied; lib/dataset/bucket.py); a missing one names the flag and the datasets there are; an old
    format is refused."""
    if data and shards.is_url(data):
        root: str | Path = data.rstrip("/")
        bucket.check_bucket(str(root), "data")  # a missing bucket, refused credentials: exit 2 naming the URL
        text = _manifest_text(root)
        if text is None:
            raise UserError(f"data={bucket.redact(data)}: no {MANIFEST} at that URL, so no finished dataset is there "
                            f"(prepare writes it last): prepare it there (make prepare ... ARGS=\"out="
                            f"{bucket.redact(data)}\"), or fix the URL")
    else:
        root = Path(data) if data and (Path(data) / MANIFEST).is_file() else env.prepared_dir(data)
        text = _manifest_text(root)
        if text is None:
            have = list_prepared(root.parent)
            raise UserError(
                f"data={data}: no prepared dataset at {root}; run `make prepare` first or pick one of: "
                f"{', '.join(have) if have else '(none prepared yet)'}"
            )
    manifest = json.loads(text)
    check_format(manifest, root, data)
    return root, manifest


def list_prepared(root: str | Path) -> list[str]:
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / MANIFEST).is_file())


def has_split(manifest: dict[str, Any], split: str) -> bool:
    return bool(manifest.get("splits", {}).get(split, {}).get("shards"))


def split_shards(root: str | Path, manifest: dict[str, Any], split: str) -> list[dict[str, Any]]:
    """The shards of a split, in source order: [{"url", "file", "rows", ...}]; a split that was not
    prepared is an error naming the splits there are."""
    info = manifest.get("splits", {}).get(split)
    if not info or not info.get("shards"):
        have = [s for s in manifest.get("splits", {}) if has_split(manifest, s)]
        raise UserError(
            f"prepared dataset {root} has no '{split}' split (it has: {', '.join(have) or 'none'}); "
            f"prepare it with that split or choose another"
        )
    return [{**s, "url": shards.join(root, s["file"])} for s in info["shards"]]


def load_split(path: str | Path, split: str, manifest: dict[str, Any] | None = None, columns=None):
    """One split as an in-memory datasets.Dataset (audio still encoded: see audio_arrays)."""
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    if manifest is None:
        manifest = read_manifest(path)
        check_format(manifest, path, str(path))
    tables = []
    for s in split_shards(path, manifest, split):
        t = shards.read_shard(s["url"], columns=list(columns) if columns else None)
        if t.num_rows != s["rows"]:
            raise UserError(f"{s['url']}: {t.num_rows} rows, but {MANIFEST} says {s['rows']}: the dataset was changed "
                            f"after prepare (or a copy is incomplete); prepare it again")
        tables.append(t)
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return Dataset(InMemoryTable(table))


def label_lengths(root: str | Path, manifest: dict[str, Any], split: str) -> np.ndarray:
    """Tokens in each label row of a split (<|startoftranscript|> ... <|endoftext|>), in source order,
    from the shards' `labels` column alone: no audio is read (about 4 bytes a token)."""
    import pyarrow.compute as pc

    parts = [pc.list_value_length(shards.read_shard(s["url"], columns=["labels"])["labels"]).to_numpy()
             for s in split_shards(root, manifest, split)]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)


def clip_lengths(root: str | Path, manifest: dict[str, Any], split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(seconds float32, label tokens, timestamped-label tokens: 0 where a row has no segments) of each
    row of a split, in source order, from the shards' duration, labels and ts_labels columns: no audio."""
    import pyarrow.compute as pc

    seconds, labels, ts = [np.zeros(0, np.float32)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for s in split_shards(root, manifest, split):
        t = shards.read_shard(s["url"], columns=["duration", "labels", "ts_labels"])
        seconds.append(t["duration"].to_numpy().astype(np.float32))
        labels.append(pc.list_value_length(t["labels"]).to_numpy().astype(np.int64))
        ts.append(pc.list_value_length(t["ts_labels"]).fill_null(0).to_numpy().astype(np.int64))
    return np.concatenate(seconds), np.concatenate(labels), np.concatenate(ts)


def decode_row(row: dict[str, Any]) -> np.ndarray:
    """A prepared row's audio as 16 kHz float32; a clip that no longer decodes names its row."""
    from lib.audio import AudioError

    audio = row["audio"]
    if not isinstance(audio, (bytes, bytearray, memoryview)):  # an in-memory split of waveforms (tools, tests)
        return np.asarray(audio, dtype=np.float32)
    try:
        return shards.decode_audio(audio, str(row.get("id")))
    except AudioError as e:
        raise UserError(f"prepared clip {row.get('id')} ({row.get('where') or 'unknown source row'}) does not decode "
                        f"({e}): the prepared data is damaged; prepare it again") from None


def audio_arrays(ds, start: int = 0, stop: int | None = None) -> list[np.ndarray]:
    """Rows start..stop-1 of a load_split dataset, decoded to 16 kHz float32."""
    stop = len(ds) if stop is None else min(stop, len(ds))
    part = ds.select(range(start, stop)).select_columns([c for c in ("audio", "id", "where") if c in ds.column_names])
    part = part.with_format(None)
    return [decode_row(r) for r in part]


def write_rows(root: str | Path, split: str, rows, shard_rows: int = 2000, pcm_codec: str = "flac",
               opus_kbps: int = 32) -> dict[str, Any]:
    """Write rows (dicts with id, audio: 16 kHz float32 or encoded bytes, text, labels, and optionally
    language, speaker, where, ts_labels) as a split's shards under `root`; returns the split's manifest entry.
    Float32 audio is stored as prepare stores PCM (shards.pcm_bytes: FLAC, or Opus at opus_kbps).
    For tools and tests that make small datasets; `make prepare` writes through its own workers."""
    from lib.whisper import SAMPLING_RATE

    root = Path(root)
    info: dict[str, Any] = {"rows": 0, "seconds": 0.0, "bytes": 0, "segment_rows": 0, "shards": []}
    batch: list[dict[str, Any]] = []

    def flush(lo: int) -> None:
        cols: dict[str, list] = {c: [] for c in COLUMNS}
        for r in batch:
            audio = r["audio"]
            if isinstance(audio, (bytes, bytearray)):
                data, fmt = bytes(audio), shards.sniff_format(audio)
                seconds = float(r["duration"])
            else:
                audio = np.asarray(audio, dtype=np.float32)
                data, fmt = shards.pcm_bytes(audio, SAMPLING_RATE, pcm_codec, opus_kbps)
                seconds = len(audio) / SAMPLING_RATE
            for c, v in (("id", str(r["id"])), ("audio", data), ("audio_format", fmt), ("text", r["text"]),
                         ("labels", [int(x) for x in r["labels"]]), ("language", r.get("language", "")),
                         ("duration", seconds), ("speaker", r.get("speaker", "")), ("where", r.get("where", "")),
                         ("ts_labels", [int(x) for x in r.get("ts_labels", ())])):
                cols[c].append(v)
        rel = shards.shard_name(split, lo, lo + len(batch))
        size = shards.write_shard(root / rel, cols)
        secs = float(sum(cols["duration"]))
        info["shards"].append({"file": rel, "rows": len(batch), "seconds": round(secs, 3), "bytes": size})
        info["rows"] += len(batch)
        info["segment_rows"] += sum(1 for ts in cols["ts_labels"] if ts)
        info["seconds"] += secs
        info["bytes"] += size
        batch.clear()

    lo = 0
    for r in rows:
        batch.append(r)
        if len(batch) == shard_rows:
            n = len(batch)
            flush(lo)
            lo += n
    if batch:
        flush(lo)
    info["seconds"] = round(info["seconds"], 3)
    info["hours"] = round(info["seconds"] / 3600, 4)
    return info


def write_manifest(path: str | Path, manifest: dict[str, Any]) -> None:
    """Write manifest.json last and atomically: its presence marks a finished dataset."""
    write_json(Path(path) / MANIFEST, manifest, default=str)


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
