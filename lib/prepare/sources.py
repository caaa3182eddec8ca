"""Where `make prepare` reads speech from: each source kind becomes the same rows.

Every reader returns `Rows` per output split (train / validation / test): a `datasets.Dataset`
with the columns
    id     stable row id (clip file name, or hub split + index)
    audio  {"bytes": encoded bytes or None, "path": absolute path or name}  (never decoded here)
    text   the transcript as given
    language  ISO code of the row (the config's, or a manifest's `language` column)
    where  where a person finds the row: "train.tsv line 7", "manifest.csv line 3", ...
    speaker  the speaker's id where the source has one (Common Voice `client_id`, a `speaker`
           column of a manifest, source.speaker_column of a Hub set), else ""
    segments  a manifest's `segments` column, checked (parse_segments) and stored as JSON
           [[start, end, "text"], ...] (seconds from the clip's start); "" for none and for the
           other kinds. A Hub set has no such column (its rows lack the key).
plus a `signature`: what the inputs were (file hashes, clip sizes and times, hub fingerprints),
so that an unchanged re-run can be recognised and skipped.

Kinds: cv (a Common Voice release folder), mdc (download one from the Mozilla Data Collective,
then read it as cv), hub (a Hugging Face Hub dataset), manifest (CSV / TSV / JSONL file),
audiofolder (Hugging Face audiofolder layout: metadata.csv with file_name + transcription).
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lib.errors import UserError

log = logging.getLogger("whisper_ft")

SPLITS = ("train", "validation", "test")
# Common Voice ships dev.tsv; everything downstream calls it validation.
CV_DEFAULT_SPLITS = {"train": "train", "validation": "dev", "test": "test"}
HUB_DEFAULT_SPLITS = {"train": "train", "validation": "validation", "test": "test"}
CV_REQUIRED_COLUMNS = ("path", "sentence")
AUDIO_COLUMNS = ("audio", "path", "file_name", "audio_filepath", "file")
TEXT_COLUMNS = ("text", "sentence", "transcription", "transcript", "normalized_text")
SPLIT_ALIASES = {"train": "train", "validation": "validation", "valid": "validation",
                 "dev": "validation", "test": "test"}


@dataclass
class SourceConfig:
    """What to read. Only the fields of the chosen `kind` are used."""

    kind: Literal["cv", "mdc", "hub", "manifest", "audiofolder"] = "cv"
    """cv: Common Voice folder; mdc: Mozilla Data Collective download; hub: HF Hub dataset;
    manifest: CSV/TSV/JSONL file; audiofolder: folder with metadata.csv."""
    path: str = ""
    """cv / audiofolder: the folder; manifest: the file. Relative paths are from the repo root."""
    hub_id: str = ""
    """hub: dataset id, e.g. google/fleurs (a repo of data files: datasets 5 runs no loading script)."""
    hub_config: str | None = None
    """hub: the dataset config (subset), e.g. hi."""
    hub_revision: str | None = None
    """hub: a commit or tag, so that a re-run reads the same data."""
    mdc_id: str = ""
    """mdc: the dataset id (or slug) shown on mozilladatacollective.com."""
    train: str | None = None
    """Source split(s) that become our train, joined with '+': cv default 'train', hub 'train'
    (the walkthrough uses 'train+validation'). Empty string: no train split."""
    validation: str | None = None
    """Source split(s) for our validation: cv default 'dev', hub 'validation'. Empty: none read from
    the source; prepare then holds out validation_fraction of train as validation."""
    test: str | None = None
    """Source split(s) for our test: cv/hub default 'test'. Empty: none."""
    audio_column: str | None = None
    """hub / manifest: the audio column; default: the first of audio, path, file_name, ..."""
    text_column: str | None = None
    """hub / manifest: the transcript column; default: the first of text, sentence, transcription, ..."""
    speaker_column: str | None = None
    """hub: the speaker id column (for a speaker-disjoint held-out validation slice); default: the
    first of speaker_id, speaker, client_id; empty: none. cv reads client_id, manifests `speaker`."""
    allow_outside_paths: bool = False
    """cv / manifest / audiofolder: accept audio paths that leave the corpus folder ('../', or
    absolute elsewhere); off, such a row stops the job, naming it (a typo or a hostile file)."""

    def __post_init__(self) -> None:
        need = {"cv": "path", "audiofolder": "path", "manifest": "path", "hub": "hub_id", "mdc": "mdc_id"}
        key = need[self.kind]
        if not getattr(self, key):
            example = {"path": "/data/cv-corpus-17.0/hi", "hub_id": "google/fleurs",
                       "mdc_id": "<dataset id from mozilladatacollective.com>"}[key]
            raise UserError(f"source.kind={self.kind} needs source.{key}=..., e.g. source.{key}={example}")

    def split_map(self) -> dict[str, list[str]]:
        """Our split -> the source splits that make it, e.g. {'train': ['train', 'validation']}."""
        defaults = CV_DEFAULT_SPLITS if self.kind in ("cv", "mdc") else HUB_DEFAULT_SPLITS
        out = {}
        for split in SPLITS:
            expr = getattr(self, split)
            expr = defaults[split] if expr is None else expr
            parts = [p.strip() for p in str(expr).split("+") if p.strip()]
            if parts:
                out[split] = parts
        if not out:
            raise UserError("source.train, source.validation and source.test are all empty: name at least one split")
        return out


@dataclass
class Rows:
    """What a reader found: rows per split, and what they were read from."""

    splits: dict[str, Any]
    signature: dict[str, Any]
    describe: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)
    speaker_column: str | None = None
    """the source column the `speaker` ids came from (client_id, speaker, ...); None: no speaker ids"""


def _rows_dataset(records: list[dict[str, Any]]):
    from datasets import Dataset, Features, Value

    feats = Features({
        "id": Value("string"),
        "audio": {"bytes": Value("binary"), "path": Value("string")},
        "text": Value("string"),
        "language": Value("string"),
        "where": Value("string"),
        "speaker": Value("string"),
        "segments": Value("string"),
    })
    cols = {k: [r.get(k) or "" if k in ("speaker", "segments") else r[k] for r in records] for k in feats}
    return Dataset.from_dict(cols, features=feats)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _clips_signature(paths: list[str]) -> str:
    """Size and modification time of every clip: cheap, and changes when a clip is replaced."""
    h = hashlib.sha256()
    for p in sorted(set(paths)):
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def text_lines(file: Path):
    """The lines of a UTF-8 text file, for csv / json readers; a byte-order mark is dropped.

    Read line by line in binary and decoded here, so that a file in another encoding is a
    UserError (exit 2: retrying will not help) naming the file, the line and the encoding,
    not a bare UnicodeDecodeError (exit 1, "retry"). Excel's "CSV UTF-8" starts with a BOM,
    which would otherwise stick to the first column name ("\ufeffaudio").
    """
    with open(file, "rb") as f:
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                bad = raw[e.start:e.start + 1].hex()
                raise UserError(f"{file} line {n}: not UTF-8 (byte 0x{bad} at column {e.start + 1}); the file "
                                f"must be UTF-8: convert it, e.g. iconv -f latin1 -t utf-8 {file.name} > "
                                f"{file.stem}.utf8{file.suffix}") from None


# ---------------------------------------------------------------- Common Voice release folder


def find_cv_root(folder: Path, language: str) -> Path:
    """The folder holding the TSVs and clips/: the folder itself, or one locale folder below it."""
    if (folder / "clips").is_dir() and any(folder.glob("*.tsv")):
        return folder
    found = sorted({p.parent for p in folder.rglob("*.tsv") if (p.parent / "clips").is_dir()})
    if len(found) == 1:
        return found[0]
    for p in found:
        if p.name == language:
            return p
    if not found:
        raise UserError(f"{folder}: no Common Voice release here (expected clips/ next to train.tsv, dev.tsv, "
                        f"test.tsv): fix source.path")
    raise UserError(f"{folder} holds several releases ({', '.join(str(p) for p in found)}): "
                    f"point source.path at one of them")


def read_cv(folder: Path, src: SourceConfig, language: str) -> Rows:
    """A Common Voice release: <split>.tsv rows with `path` (a file in clips/) and `sentence`."""
    folder = find_cv_root(folder, language)
    clips = folder / "clips"
    splits, signature, skipped = {}, {}, []
    for split, names in src.split_map().items():
        records = []
        for name in names:
            tsv = folder / f"{name}.tsv"
            if not tsv.is_file():
                have = sorted(p.stem for p in folder.glob("*.tsv"))
                raise UserError(f"{tsv} not found (source.{split}={'+'.join(names)}): this release has "
                                f"{', '.join(have) or 'no TSVs'}; set source.{split}= to those names")
            signature[tsv.name] = _file_digest(tsv)
            # Mozilla's TSVs are not quoted: a sentence may hold a literal " character.
            reader = csv.DictReader(text_lines(tsv), delimiter="\t", quoting=csv.QUOTE_NONE)
            missing = [c for c in CV_REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(
                    f"{tsv}: column {', '.join(repr(c) for c in missing)} missing (header has: "
                    f"{', '.join(reader.fieldnames or []) or 'nothing'}); a Common Voice TSV needs "
                    f"{', '.join(CV_REQUIRED_COLUMNS)}: fix the header or point source.path at a release"
                )
            for line, row in enumerate(reader, start=2):
                where = f"{tsv.name} line {line}"
                clip = (row.get("path") or "").strip()
                if not clip or None in row:
                    skipped.append({"split": split, "id": clip or where, "where": where,
                                    "reason": "malformed row: wrong number of tab-separated fields"})
                    continue
                # A clip listed twice (train+validated) is dropped and counted by drop_overlaps.
                records.append({"id": clip, "audio": {"bytes": None, "path": str(clips / clip)},
                                "text": row.get("sentence") or "", "language": language, "where": where,
                                "speaker": (row.get("client_id") or "").strip()})
        check_inside(records, clips, src.allow_outside_paths)
        signature[f"clips:{split}"] = _clips_signature([r["audio"]["path"] for r in records])
        splits[split] = _rows_dataset(records)
    return Rows(splits, signature, {"kind": "cv", "path": str(folder)}, skipped, speaker_column="client_id")


# ---------------------------------------------------------------- checks on the rows of every source


def check_inside(records: list[dict[str, Any]], root: Path, allowed: bool) -> None:
    """UserError if an audio path leaves `root` ("../../etc/passwd", /elsewhere/x.wav), unless allowed."""
    if allowed:
        return
    top = os.path.normpath(os.path.abspath(root))
    outside = [r for r in records
               if os.path.commonpath([top, os.path.normpath(os.path.abspath(r["audio"]["path"]))]) != top]
    if outside:
        first = outside[0]
        more = f" (and {len(outside) - 1} more rows)" if len(outside) > 1 else ""
        raise UserError(f"{first['where']}: audio path {first['id']!r} is outside the corpus folder {top}{more}; "
                        f"fix the path, or set source.allow_outside_paths=true if the clips really live elsewhere")


# Splits in the order their rows are kept: a clip or sentence in test is dropped from
# validation and train, one in validation from train. Test is the published number and
# validation picks the best checkpoint; neither may have been trained on.
OVERLAP_ORDER = ("test", "validation", "train")


def drop_overlaps(rows: Rows) -> dict[str, dict[str, int]]:
    """Drop duplicate clips within a split, and rows of a split whose clip or sentence is in a
    split ranked above it (OVERLAP_ORDER); each drop goes to rows.skipped with its reason.

    Common Voice's validated.tsv holds every dev and test clip: source.train=train+validated
    put all test clips and sentences in train. Sentences are compared after
    lib.metrics.normalize, the normalization the scores use: "नमस्ते, आप कैसे हैं?" recorded by
    another speaker is still the test sentence. Hub rows have positional ids, so only their
    sentences are compared. Returns the counts per split and reason, for manifest.json.
    """
    from lib.metrics import normalize

    by_clip = rows.describe.get("kind") != "hub"
    seen_clips: dict[str, tuple[str, str]] = {}  # clip -> (split, where), for the splits ranked above
    seen_sentences: dict[str, tuple[str, str]] = {}
    counts: dict[str, dict[str, int]] = {}
    for split in (s for s in OVERLAP_ORDER if s in rows.splits):
        ds = rows.splits[split]
        texts, wheres, ids = ds["text"], ds["where"], ds["id"]
        clips = ([os.path.normpath(a["path"]) if a.get("path") else None for a in ds["audio"]] if by_clip
                 else [None] * len(ds))
        keep, here_clips, here_sentences, dropped_clips = [], {}, {}, {}
        for i, (text, where, clip) in enumerate(zip(texts, wheres, clips, strict=True)):
            sentence = normalize(text or "")
            reason = None
            if clip and clip in dropped_clips:  # listed again (train+validated), maybe spelled otherwise
                reason = dropped_clips[clip]
            elif clip and clip in seen_clips:
                reason = "in {}: same clip as {}".format(*seen_clips[clip])
            elif sentence and sentence in seen_sentences:
                reason = "in {}: same sentence as {}".format(*seen_sentences[sentence])
            elif clip and clip in here_clips:
                reason = f"duplicate: same clip as {here_clips[clip]}"
            if reason:
                if clip and not reason.startswith("duplicate"):
                    dropped_clips[clip] = reason
                rows.skipped.append({"split": split, "id": ids[i], "where": where, "reason": reason})
                key = reason.split(":")[0]
                counts.setdefault(split, {})[key] = counts.get(split, {}).get(key, 0) + 1
                continue
            keep.append(i)
            if clip:
                here_clips.setdefault(clip, where)
            if sentence:
                here_sentences.setdefault(sentence, where)
        for clip, where in here_clips.items():
            seen_clips.setdefault(clip, (split, where))
        for sentence, where in here_sentences.items():
            seen_sentences.setdefault(sentence, (split, where))
        if len(keep) < len(ds):
            rows.splits[split] = ds.select(keep)
    return counts


def _hash_order(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def carve_validation(rows: Rows, fraction: float) -> dict[str, Any]:
    """Hold out about `fraction` of train as validation when the source has no validation split;
    returns how validation was made, for manifest.json.

    Speaker-disjoint where the rows have speaker ids (Common Voice's client_id, a manifest's
    `speaker`): a validation speaker is never heard in train, so validation WER measures new
    voices rather than memorised ones. Otherwise each row is its own group (by row id). Groups
    are taken in the order of the sha256 of their key, never at random: the same corpus gives the
    same slice on every machine and every index of a sharded prepare. A group is taken while it
    fits the target (fraction x rows); if none fits (a few speakers with many clips each), the
    smallest one is. Run after drop_overlaps (so that no test clip is held out), then run
    drop_overlaps again: it drops the train rows whose sentence is in this validation (Common
    Voice has many speakers read the same sentence).
    """
    if "validation" in rows.splits:
        return {"made": "source split"}
    train = rows.splits.get("train")
    if fraction <= 0 or train is None or len(train) < 2:
        why = "validation_fraction=0" if fraction <= 0 else "no train split to hold rows out of"
        return {"made": "none", "why": why}
    speakers = list(train["speaker"])
    ids = list(train["id"])
    by_speaker = any(speakers)
    groups: dict[str, list[int]] = {}
    for i, (speaker, row_id) in enumerate(zip(speakers, ids, strict=True)):
        key = (f"speaker:{speaker}" if speaker else f"row:{row_id}") if by_speaker else f"row:{row_id}"
        groups.setdefault(key, []).append(i)
    how = {"made": "held out of train", "fraction": fraction,
           "by": f"speaker ({rows.speaker_column})" if by_speaker else "row id"}
    if len(groups) < 2:
        log.warning("prepare: no validation split, and train has a single speaker: no speaker-disjoint "
                    "validation slice can be held out; training runs without validation WER")
        return {**how, "made": "none", "why": "a single speaker in train"}
    order = sorted(groups, key=_hash_order)
    target = max(1, round(fraction * len(train)))
    taken: list[str] = []
    count = 0
    for key in order:
        if count + len(groups[key]) <= target:
            taken.append(key)
            count += len(groups[key])
    if not taken:
        taken = [min(order, key=lambda k: (len(groups[k]), _hash_order(k)))]
    held = sorted(i for k in taken for i in groups[k])
    held_set = set(held)
    rows.splits["validation"] = train.select(held)
    rows.splits["train"] = train.select([i for i in range(len(train)) if i not in held_set])
    how.update(rows=len(held), share=round(len(held) / len(train), 4))
    if by_speaker:
        how["speakers"] = sum(1 for k in taken if k.startswith("speaker:"))
    log.info("prepare: no validation split in the source: held out %d of %d train rows (%.1f %%) as validation, "
             "by %s (validation_fraction=%g; 0 turns this off)", len(held), len(train), 100 * len(held) / len(train),
             how["by"], fraction)
    return how


# ---------------------------------------------------------------- manifest and audiofolder


def _pick(columns: list[str], wanted: str | None, choices: tuple[str, ...], what: str, file: Path, flag: str) -> str:
    if wanted:
        if wanted not in columns:
            raise UserError(f"{file}: no column '{wanted}' ({flag}={wanted}); columns are {', '.join(columns)}")
        return wanted
    for c in choices:
        if c in columns:
            return c
    raise UserError(f"{file}: no {what} column (looked for {', '.join(choices)}; found {', '.join(columns) or 'none'}): "
                    f"rename the column or set {flag}=<column>")


def _read_table(file: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, row) pairs of a CSV, TSV or JSON-lines file."""
    suffix = file.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = []
        for n, line in enumerate(text_lines(file), 1):
            if not line.strip():
                continue
            try:
                rows.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{file} line {n}: not valid JSON ({e.msg}); one object per line") from None
        return rows
    if suffix not in (".csv", ".tsv"):
        raise UserError(f"{file}: manifest must be .csv, .tsv or .jsonl (source.path)")
    reader = csv.DictReader(text_lines(file), delimiter="\t" if suffix == ".tsv" else ",")
    return [(n, row) for n, row in enumerate(reader, 2)]


SEGMENTS_EXAMPLE = '[{"start": 0.0, "end": 2.4, "text": "..."}, ...] or [[0.0, 2.4, "..."], ...]'


def parse_segments(cell: Any, where: str, row_id: str) -> list[list[Any]]:
    """A manifest's `segments` cell -> [[start, end, text], ...], seconds from the clip's start.

    The cell is a JSON list (a string in CSV / TSV, a string or a list in JSONL) of
    {"start", "end", "text"} objects or [start, end, text] triples; empty, missing or [] = none.
    Checked here, before any clip is decoded: numbers, 0 <= start < end <= 30 s (Whisper's last
    timestamp token is <|30.00|>), a non-empty text, in order and not overlapping (a segment may
    start where the previous one ends). That the last end is inside the clip is checked once the
    clip is decoded (lib.prepare.workers.Processor). Any failure stops prepare, naming the row: a wrong
    segments column is a data problem that skipping rows would hide.
    """
    if cell is None or (isinstance(cell, str) and not cell.strip()):
        return []
    from lib.metrics import canonical
    from lib.whisper import MAX_SECONDS

    what = f"{where} ({row_id}): segments"
    value = cell
    if isinstance(cell, str):
        try:
            value = json.loads(cell)
        except json.JSONDecodeError as e:
            raise UserError(f"{what}: not JSON ({e.msg} at character {e.pos + 1}); give a JSON list: "
                            f"{SEGMENTS_EXAMPLE}") from None
    if not isinstance(value, list):
        raise UserError(f"{what}: a JSON {type(value).__name__}, not a list; give {SEGMENTS_EXAMPLE}")
    out: list[list[Any]] = []
    for n, seg in enumerate(value, 1):
        if isinstance(seg, dict):
            start, end, text = seg.get("start"), seg.get("end"), seg.get("text")
        elif isinstance(seg, list) and len(seg) == 3:
            start, end, text = seg
        else:
            raise UserError(f"{what}: segment {n} is {json.dumps(seg, ensure_ascii=False)[:80]}; each segment is "
                            f'{{"start": s, "end": e, "text": "..."}} or [s, e, "..."]')
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in (start, end)):
            raise UserError(f"{what}: segment {n}: start and end must be numbers of seconds, not {start!r} and {end!r}")
        if not isinstance(text, str) or not canonical(text):
            raise UserError(f"{what}: segment {n} ({start:g}-{end:g} s) has no text")
        if start < 0 or not start < end:
            raise UserError(f"{what}: segment {n} runs from {start:g} s to {end:g} s: need 0 <= start < end")
        if end > MAX_SECONDS:
            raise UserError(f"{what}: segment {n} ends at {end:g} s, past {MAX_SECONDS:g} s: Whisper's timestamps "
                            f"stop at <|30.00|>; cut the recording into clips of at most 30 s")
        if out and start < out[-1][0]:
            raise UserError(f"{what}: segment {n} starts at {start:g} s, before segment {n - 1} "
                            f"({out[-1][0]:g} s): list the segments in time order")
        if out and start < out[-1][1]:
            raise UserError(f"{what}: segment {n} ({start:g}-{end:g} s) overlaps segment {n - 1} "
                            f"({out[-1][0]:g}-{out[-1][1]:g} s): segments must not overlap")
        out.append([float(start), float(end), text])
    return out


def read_manifest_file(file: Path, src: SourceConfig, language: str, default_split: str | None = None,
                       rows_by_split: dict[str, list] | None = None, skipped: list | None = None) -> None:
    """Rows of one manifest into rows_by_split; a `split` column routes rows, else default_split."""
    table = _read_table(file)
    if not table:
        raise UserError(f"{file}: no rows")
    columns = list(table[0][1].keys())
    audio_col = _pick(columns, src.audio_column, AUDIO_COLUMNS, "audio path", file, "source.audio_column")
    text_col = _pick(columns, src.text_column, TEXT_COLUMNS, "transcript", file, "source.text_column")
    mismatched: list[str] = []
    for line, row in table:
        where = f"{file.name} line {line}"
        rel = str(row.get(audio_col) or "").strip()
        split = default_split or "train"
        if row.get("split"):
            split = SPLIT_ALIASES.get(str(row["split"]).strip().lower(), "")
            if not split:
                skipped.append({"split": "?", "id": rel or where, "where": where,
                                "reason": f"unknown split '{row['split']}' (use train, validation or test)"})
                continue
        if not rel:
            skipped.append({"split": split, "id": where, "where": where, "reason": f"empty '{audio_col}' column"})
            continue
        # normpath, not resolve(): "clips/../../x" is outside, a symlink inside the corpus is not.
        path = Path(os.path.normpath(rel if Path(rel).is_absolute() else file.parent / rel))
        text = str(row.get(text_col) or "")
        segments = parse_segments(row.get("segments"), where, rel)
        if segments and _squeezed(text) != _squeezed(" ".join(s[2] for s in segments)):
            mismatched.append(where)
        rows_by_split.setdefault(split, []).append({
            "id": rel, "audio": {"bytes": None, "path": str(path)}, "text": text,
            "language": str(row.get("language") or language).strip(), "where": where,
            "speaker": str(row.get("speaker") or "").strip(),
            "segments": json.dumps(segments, ensure_ascii=False) if segments else "",
        })
    if mismatched:
        # Not fatal: the text column stays what <|notimestamps|> labels and every score use, and
        # spellings may differ; but segments of another clip would teach the wrong words.
        log.warning("%s: %d rows whose segments' texts, joined, are not their '%s' column (normalized; first: "
                    "%s): check that the segments belong to those clips", file, len(mismatched), text_col,
                    mismatched[0])


def _squeezed(text: str) -> str:
    """normalize() without spaces: equal for the same words however they are split or spaced."""
    from lib.metrics import normalize

    return normalize(text).replace(" ", "")


def read_manifest_source(file: Path, src: SourceConfig, language: str) -> Rows:
    if not file.is_file():
        raise UserError(f"manifest {file} not found (source.path)")
    by_split, skipped = {}, []
    read_manifest_file(file, src, language, None, by_split, skipped)
    check_inside([r for rs in by_split.values() for r in rs], file.parent, src.allow_outside_paths)
    return _finish_local(by_split, skipped, {file.name: _file_digest(file)}, {"kind": "manifest", "path": str(file)})


def read_audiofolder(folder: Path, src: SourceConfig, language: str) -> Rows:
    """HF audiofolder: metadata.csv/.jsonl at the root (all train) or in train/, validation/, test/."""
    if not folder.is_dir():
        raise UserError(f"audiofolder {folder} not found (source.path)")
    by_split, skipped, signature = {}, [], {}
    metas = []
    for sub in ("", "train", "validation", "valid", "dev", "test"):
        for name in ("metadata.csv", "metadata.jsonl"):
            if (folder / sub / name).is_file():
                metas.append((SPLIT_ALIASES.get(sub, "train") if sub else None, folder / sub / name))
    if not metas:
        raise UserError(f"{folder}: no metadata.csv or metadata.jsonl (audiofolder layout: file_name + transcription "
                        f"columns, at the top or in train/ and test/)")
    for split, meta in metas:
        read_manifest_file(meta, src, language, split, by_split, skipped)
        signature[str(meta.relative_to(folder))] = _file_digest(meta)
    check_inside([r for rs in by_split.values() for r in rs], folder, src.allow_outside_paths)
    return _finish_local(by_split, skipped, signature, {"kind": "audiofolder", "path": str(folder)})


def _finish_local(by_split, skipped, signature, describe) -> Rows:
    splits = {}
    for split in SPLITS:
        if by_split.get(split):
            splits[split] = _rows_dataset(by_split[split])
            signature[f"clips:{split}"] = _clips_signature([r["audio"]["path"] for r in by_split[split]])
    if not splits:
        raise UserError(f"{describe['path']}: no usable rows")
    has_speakers = any(r["speaker"] for rs in by_split.values() for r in rs)
    return Rows(splits, signature, describe, skipped, speaker_column="speaker" if has_speakers else None)


# ---------------------------------------------------------------- Hugging Face Hub


@contextlib.contextmanager
def audio_kept_encoded():
    """While active, datasets' Audio feature stores files and bytes as they are, without torchcodec.

    datasets 5 imports torchcodec in Audio.encode_example for every value, even a plain file
    path, so `load_dataset` of a Hub repo in audiofolder shape (metadata.csv + clips) died
    with "please install 'torchcodec'" while building its Arrow cache. We never let datasets
    decode (lib/audio.py does, from these bytes or paths), so storing the value needs no codec:
    this does what encode_example does for a path or bytes. Anything else (a decoded array)
    still goes to datasets' own code.
    """
    from datasets.features.audio import Audio

    original = Audio.encode_example

    def encode(self, value):
        if isinstance(value, str):
            return {"bytes": None, "path": value}
        if isinstance(value, Path):
            return {"bytes": None, "path": str(value.absolute())}
        if isinstance(value, (bytes, bytearray)):
            return {"bytes": bytes(value), "path": None}
        if isinstance(value, dict) and "array" not in value and (value.get("bytes") or value.get("path")):
            if value.get("bytes") is None and value.get("path") and not os.path.isfile(value["path"]):
                return original(self, value)  # a path relative to an archive: datasets' own rules
            return {"bytes": value.get("bytes"), "path": value.get("path")}
        return original(self, value)

    Audio.encode_example = encode
    try:
        yield
    finally:
        Audio.encode_example = original


@contextlib.contextmanager
def hub_cache_in(folder: Path):
    """While active, everything a Hub download writes goes under `folder`, not HF_HOME.

    datasets 5 fetches a Hub repo's files through huggingface_hub's hf_hub_download, which
    ignores load_dataset's cache_dir and stores them in huggingface_hub's cache (HF_HOME/hub),
    and hf_xet keeps its chunk cache in HF_HOME/xet. A corpus of 1,000 h would stay there
    (encoded, ~60 GB) after prepare copied what it needs into shards. hf_hub_download reads
    `constants.HF_HUB_CACHE` at call time, and hf_xet reads HF_XET_CACHE from the environment,
    so both are pointed at `folder` for the block; prepare deletes the folder when it is done.
    """
    from huggingface_hub import constants

    saved = constants.HF_HUB_CACHE, os.environ.get("HF_XET_CACHE")
    constants.HF_HUB_CACHE = str(folder / "hub")
    os.environ["HF_XET_CACHE"] = str(folder / "xet")
    try:
        yield
    finally:
        constants.HF_HUB_CACHE = saved[0]
        if saved[1] is None:
            os.environ.pop("HF_XET_CACHE", None)
        else:
            os.environ["HF_XET_CACHE"] = saved[1]


SPEAKER_COLUMNS = ("speaker_id", "speaker", "client_id")


def read_hub(src: SourceConfig, language: str, token: str | None, cache_dir: Path | None = None) -> Rows:
    """load_dataset per split expression; audio kept encoded (Audio(decode=False)) so we decode it.

    `cache_dir` (prepare's work folder) receives the downloads and datasets' Arrow copy of them;
    prepare deletes it at the end, so HF_HOME keeps nothing of the corpus.
    """
    import datasets
    from datasets import Audio
    from datasets.exceptions import DatasetNotFoundError

    from lib.language import language_code

    splits, signature = {}, {}
    speaker_col = None
    for split, parts in src.split_map().items():
        expr = "+".join(parts)
        extra = {"cache_dir": str(cache_dir / "datasets")} if cache_dir is not None else {}
        try:
            with audio_kept_encoded(), (hub_cache_in(cache_dir) if cache_dir is not None else contextlib.nullcontext()):
                ds = datasets.load_dataset(src.hub_id, src.hub_config, split=expr, token=token or None,
                                           revision=src.hub_revision, **extra)
        except DatasetNotFoundError as e:
            msg = str(e)
            if "gated" in msg and not token:
                raise UserError(f"{src.hub_id} is gated: set HF_TOKEN=hf_... in your env file (--env-file, see "
                                f"env.example) after accepting its terms on https://huggingface.co/datasets/"
                                f"{src.hub_id}") from None
            if "gated" in msg:
                raise UserError(f"{src.hub_id} is gated and your HF_TOKEN has no access: accept its terms on "
                                f"https://huggingface.co/datasets/{src.hub_id} with the token's account") from None
            raise UserError(f"{src.hub_id}: {msg} (check source.hub_id and source.hub_config)") from None
        except ConnectionError as e:
            raise UserError(f"{src.hub_id}: cannot reach the Hugging Face Hub ({e}); check the network or "
                            f"HF_HUB_OFFLINE, or prepare from a local copy (source.kind=cv/manifest)") from None
        except ValueError as e:  # a bad split expression or config name
            raise UserError(f"{src.hub_id}: {e} (check source.{split}={expr} and source.hub_config)") from None
        # The fingerprint of what the Hub served (datasets derives it from the cached files).
        signature[f"hub:{split}"] = getattr(ds, "_fingerprint", None) or expr
        cols = ds.column_names
        where_file = Path(f"{src.hub_id}[{expr}]")
        audio_col = _pick(cols, src.audio_column, ("audio",), "audio", where_file, "source.audio_column")
        text_col = _pick(cols, src.text_column, TEXT_COLUMNS, "transcript", where_file, "source.text_column")
        if src.speaker_column:
            speaker_col = _pick(cols, src.speaker_column, (), "speaker", where_file, "source.speaker_column")
        elif src.speaker_column is None:
            speaker_col = next((c for c in SPEAKER_COLUMNS if c in cols and c not in (audio_col, text_col)), None)
        ds = ds.cast_column(audio_col, Audio(decode=False))
        lang_col = "language" if "language" in cols and "language" not in (audio_col, text_col) else None
        n = len(ds)
        # New columns are added beside the Arrow table (add_column), not by a map() that would
        # write the whole table, audio included, once more into the cache.
        langs = ([language_code(v) for v in ds[lang_col]] if lang_col else [language] * n)
        speakers = ([str(v or "").strip() for v in ds[speaker_col]] if speaker_col else [""] * n)
        ds = ds.remove_columns([c for c in cols if c not in (audio_col, text_col)])
        if audio_col != "audio":
            ds = ds.rename_column(audio_col, "audio")
        if text_col != "text":
            ds = ds.rename_column(text_col, "text")
        ds = ds.add_column("id", [f"{expr}/{i}" for i in range(n)])
        ds = ds.add_column("where", [f"{src.hub_id} split {expr} row {i}" for i in range(n)])
        # FLEURS's language column holds English names ("Hindi"): the row's code is "hi".
        ds = ds.add_column("language", langs)
        ds = ds.add_column("speaker", speakers)
        splits[split] = ds
    describe = {"kind": "hub", "hub_id": src.hub_id, "hub_config": src.hub_config, "revision": src.hub_revision,
                "splits": {k: "+".join(v) for k, v in src.split_map().items()}}
    return Rows(splits, signature, describe, speaker_column=speaker_col)


# ---------------------------------------------------------------- Mozilla Data Collective


def _extract(archive: Path, dest: Path) -> Path:
    """Unpack once into dest (via a temp folder renamed at the end, so a kill leaves no half folder)."""
    if dest.is_dir():
        return dest
    tmp = dest.with_name(dest.name + ".extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log.info("extracting %s -> %s", archive, dest)
    name = archive.name
    if name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
    elif name.endswith((".tar.gz", ".tgz", ".tar")):
        with tarfile.open(archive) as tf:
            tf.extractall(tmp, filter="data")  # "data" refuses absolute paths and links out of tmp
    else:
        raise UserError(f"{archive}: unknown archive type (expected .tar.gz, .tgz or .zip)")
    tmp.replace(dest)
    return dest


def download_mdc(src: SourceConfig, api_key: str | None, downloads: Path) -> Path:
    """Download (resumable, skipped when present) and unpack an MDC dataset; return the folder."""
    if not api_key:
        raise UserError("source.kind=mdc needs MDC_API_KEY: put MDC_API_KEY=... in your env file (--env-file, see "
                        "env.example); make a key on mozilladatacollective.com under your profile's API keys")
    import datacollective
    from datacollective import AuthenticationError

    # The SDK reads the key from the environment only.
    os.environ["MDC_API_KEY"] = api_key
    downloads.mkdir(parents=True, exist_ok=True)
    log.info("downloading MDC dataset %s into %s", src.mdc_id, downloads)
    try:
        archive = Path(datacollective.download_dataset(src.mdc_id, download_directory=str(downloads),
                                                       show_progress=True))
    except AuthenticationError:
        raise UserError("the Mozilla Data Collective refused MDC_API_KEY (invalid, expired or revoked): "
                        "make a new key and update your env file") from None
    except PermissionError as e:
        raise UserError(f"MDC dataset {src.mdc_id}: access denied ({e}); accept the dataset's terms on "
                        f"mozilladatacollective.com with the key's account") from None
    except FileNotFoundError as e:
        raise UserError(f"MDC dataset {src.mdc_id} not found ({e}): check source.mdc_id") from None
    stem = archive.name
    for suffix in (".tar.gz", ".tgz", ".zip", ".tar"):
        stem = stem.removesuffix(suffix)
    return _extract(archive, downloads / stem)


def read_source(src: SourceConfig, language: str, env, cache_dir: Path | None = None) -> Rows:
    """Dispatch on source.kind. `env` gives tokens and DATA_DIR (downloads go to DATA_DIR/downloads);
    `cache_dir`: where a Hub source's files and Arrow cache go (prepare's work folder)."""
    if src.kind == "hub":
        return read_hub(src, language, env.hf_token, cache_dir)
    if src.kind == "mdc":
        folder = download_mdc(src, env.mdc_api_key, env.data_dir / "downloads" / "mdc")
        rows = read_cv(folder, src, language)
        rows.describe = {"kind": "mdc", "mdc_id": src.mdc_id, "path": rows.describe["path"]}
        return rows
    path = Path(src.path).expanduser()
    if src.kind == "cv":
        if not path.is_dir():
            raise UserError(f"Common Voice folder {path} not found (source.path)")
        return read_cv(path, src, language)
    if src.kind == "manifest":
        return read_manifest_source(path, src, language)
    return read_audiofolder(path, src, language)
