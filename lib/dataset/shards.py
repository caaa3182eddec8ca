"""The storage format of prepared datasets (format 2): Parquet shards of encoded audio.

    DATA_DIR/prepared/NAME/              (or s3://bucket/prepared/NAME, gs://..., any fsspec URL)
      manifest.json                      written last: its presence marks a finished dataset
      train/shard-000000000-000002000.parquet      rows 0..1999 of the train split's source rows
      train/shard-000002000-000004000.parquet      (skipped rows leave gaps: a shard holds <= 2000)
      validation/...  test/...

manifest.json["format"] == FORMAT, and manifest.json["splits"][split]["shards"] lists every
shard of the split in source order: {"file": "train/shard-...parquet", "rows": N,
"seconds": S, "bytes": B}. Readers take the shard list from the manifest, never from a folder
listing, so a stray half-written file is never read.

Every shard has the columns of SCHEMA:
  id            clip file name or manifest row: stable
  audio         the clip's encoded bytes: the source's own mp3/flac/ogg/opus bytes, kept as
                they are; anything else (PCM wav, ...) re-encoded at 16 kHz by prepare's
                pcm_codec: FLAC (lossless, the default) or Ogg/Opus at opus_kbps (lossy)
  audio_format  "mp3", "flac", "ogg", ... what `audio` holds (sniffed from its bytes)
  text          the transcript in lib.metrics.canonical spelling: what labels encode, what eval scores
  labels        tokenized transcript with the <|sot|><|lang|><|task|> prefix and <|endoftext|>
  language      ISO code of the row's language
  duration      seconds, measured when prepare decoded the clip
  speaker       speaker id where the source has one (Common Voice client_id), else ""
  where         the source row the clip came from (e.g. "train.tsv line 12"), for error messages
  ts_labels     the timestamped labels of a row whose manifest gave segments, `<|sot|> <|hi|>
                <|transcribe|> <|0.00|> first segment <|2.40|> <|2.40|> second ... <|5.10|>
                <|endoftext|>` (lib.train.augment.segmented); [] for every other row. Added within
                format 2: a shard written before it lacks the column, and read_shard gives
                such a shard's rows [] (no segments), so older folders still load

Decoding, resampling to 16 kHz and log-mel happen in the loader's workers (decode_audio), so the
prepared set is about the size of the source's encoded audio, not 230 MB of float32 per hour.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from lib.dataset import bucket

FORMAT = 2
"""manifest.json["format"] of datasets in this layout; older folders (float32 `datasets`
save_to_disk splits, no "format") are refused with a message to prepare again"""

COLUMNS = ("id", "audio", "audio_format", "text", "labels", "language", "duration", "speaker", "where", "ts_labels")

ADDED_COLUMNS = ("ts_labels",)
"""list columns added to format 2 after its first shards were written: read as [] where absent"""

KEPT_FORMATS = ("mp3", "flac", "ogg")
"""Encodings stored as the source gave them (ogg covers Vorbis and Opus); others are re-encoded"""

PCM_CODECS = ("flac", "opus")
"""What a PCM source (wav, ...) is re-encoded to: lossless FLAC, or lossy Ogg/Opus"""

PCM_FORMATS = {"flac": "flac", "opus": "ogg"}
"""The audio_format a PCM codec's bytes are stored under (sniff_format's name for them)"""

OPUS_KBPS = (6, 256)
"""The bitrates libsndfile's Opus encoder takes, kbit/s per channel"""

ROW_GROUP_ROWS = 256
"""Parquet row-group size: small enough that a reader can fetch a few rows of a shard"""


def schema():
    import pyarrow as pa

    return pa.schema([
        ("id", pa.string()),
        ("audio", pa.binary()),
        ("audio_format", pa.string()),
        ("text", pa.string()),
        ("labels", pa.list_(pa.int32())),
        ("language", pa.string()),
        ("duration", pa.float32()),
        ("speaker", pa.string()),
        ("where", pa.string()),
        ("ts_labels", pa.list_(pa.int32())),
    ])


def shard_name(split: str, lo: int, hi: int) -> str:
    """The shard of source rows lo..hi-1 of a split, relative to the dataset folder."""
    return f"{split}/shard-{lo:09d}-{hi:09d}.parquet"


def sniff_format(data: bytes) -> str:
    """What encoded audio bytes are, from their first bytes: mp3, flac, ogg, wav or unknown."""
    head = bytes(data[:12])
    if head[:4] == b"fLaC":
        return "flac"
    if head[:4] == b"OggS":
        return "ogg"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "wav"
    if head[:3] == b"ID3" or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0):
        return "mp3"
    return "unknown"


def flac_bytes(audio: np.ndarray, sampling_rate: int) -> bytes:
    """16-bit FLAC of a mono float waveform (lossless for 16-bit sources, about half of PCM)."""
    import soundfile as sf

    # Quantized here, by 32768: soundfile reads 16-bit samples as int / 32768 but writes floats
    # as round(x * 32767), so a 16-bit source written as float came back 1 step off above half scale.
    pcm = np.clip(np.round(np.asarray(audio, dtype=np.float64) * 32768.0), -32768, 32767).astype(np.int16)
    buf = io.BytesIO()
    sf.write(buf, pcm, sampling_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def opus_bytes(audio: np.ndarray, sampling_rate: int, kbps: int) -> bytes:
    """Ogg/Opus of a mono float waveform at `kbps` kbit/s (lossy; 32 kbit/s is 14.4 MB an hour
    plus Ogg's pages, against about 60-90 MB for FLAC of speech).

    libsndfile takes no bitrate, only a compression level in [0, 1] that it maps linearly onto
    6..256 kbit/s per channel (ogg_opus.c: bitrate = (1 - level) x 250000 + 6000), so the level
    is that mapping inverted; the half bit/s keeps its int() truncation from landing 1 below.
    Opus codes 16 kHz natively (wideband, no resampling), and libsndfile writes the pre-skip and
    the final granule position, so lib.audio.decode gives back exactly len(audio) samples."""
    import soundfile as sf

    lo, hi = OPUS_KBPS
    if not lo <= kbps <= hi:
        raise ValueError(f"opus kbps={kbps}: libsndfile's Opus encoder takes {lo}..{hi}")
    level = max(0.0, 1.0 - (kbps * 1000 + 0.5 - lo * 1000) / ((hi - lo) * 1000))
    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0), sampling_rate, format="OGG",
             subtype="OPUS", compression_level=level)
    return buf.getvalue()


def pcm_bytes(audio: np.ndarray, sampling_rate: int, codec: str = "flac", kbps: int = 32) -> tuple[bytes, str]:
    """(bytes, audio_format) of a decoded PCM clip in prepare's pcm_codec: FLAC, or Opus at kbps."""
    if codec == "flac":
        return flac_bytes(audio, sampling_rate), PCM_FORMATS["flac"]
    if codec == "opus":
        return opus_bytes(audio, sampling_rate, kbps), PCM_FORMATS["opus"]
    raise ValueError(f"pcm codec {codec!r}: use one of {', '.join(PCM_CODECS)}")


def compact(data: bytes, audio: np.ndarray, sampling_rate: int, codec: str = "flac",
            kbps: int = 32) -> tuple[bytes, str]:
    """(bytes to store, their format) for a clip whose source bytes are `data` and whose decoded
    waveform (at `sampling_rate`) is `audio`: compressed sources as they are, the rest (PCM) in
    `codec` (pcm_bytes: FLAC, or Opus at `kbps`)."""
    fmt = sniff_format(data)
    if fmt in KEPT_FORMATS:
        return bytes(data), fmt
    return pcm_bytes(audio, sampling_rate, codec, kbps)


def decode_audio(data: bytes, name: str) -> np.ndarray:
    """Stored bytes -> mono float32 at 16 kHz (lib.audio.decode, the decoder prepare checked them with)."""
    from lib.audio import decode

    return decode(bytes(data), name)


def is_url(path: str | Path) -> bool:
    """True for fsspec URLs (s3://, gs://, memory://, file://, ...), False for local paths."""
    return "://" in str(path)


def join(root: str | Path, rel: str) -> str:
    """A file of a dataset: a local path or a URL under `root`."""
    root = str(root)
    if is_url(root):
        return root.rstrip("/") + "/" + rel
    return os.path.join(root, rel)


def open_file(url: str, mode: str = "rb"):
    """A local path or an fsspec URL, opened (a bucket's credentials come from the environment:
    lib/dataset/bucket.py). For a whole read that retries, use read_bytes or read_shard."""
    if not is_url(url):
        return open(url, mode)
    fs, path = bucket.filesystem(url)
    return fs.open(path, mode)


def exists(url: str) -> bool:
    if not is_url(url):
        return os.path.exists(url)
    path = bucket.filesystem(url)[1]
    return bucket.call(url, "look for", lambda: bucket.filesystem(url)[0].exists(path))


def read_bytes(url: str) -> bytes:
    """A whole file; a bucket's network errors are retried (lib/dataset/bucket.py)."""
    if not is_url(url):
        with open(url, "rb") as f:
            return f.read()
    return bucket.read_bytes(url)


def read_shard(url: str, columns: list[str] | None = None):
    """One shard as a pyarrow Table (only `columns` when given, in that order); a column of
    ADDED_COLUMNS that the shard predates comes back as empty lists."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def read():
        with open_file(url) as f:
            pf = pq.ParquetFile(f)
            have = set(pf.schema_arrow.names)
            absent = [c for c in (columns or COLUMNS) if c in ADDED_COLUMNS and c not in have]
            return pf.read(columns=[c for c in columns if c not in absent] if columns else None), absent

    # A bucket's shard is read again from the start after a network error (bucket.call retries).
    table, absent = bucket.call(str(url), "read the shard", read) if is_url(url) else read()
    for c in absent:
        field = schema().field(c)
        table = table.append_column(field, pa.array([[]] * table.num_rows, type=field.type))
    return table.select(columns) if columns else table


def write_shard(path: str | Path, rows: dict[str, list[Any]] | Any) -> int:
    """Write a shard atomically (a temporary name, then rename): a killed writer leaves no file
    under the shard's name. `rows` is a column dict or a pyarrow Table. Returns its bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = 0 if isinstance(rows, pa.Table) else len(rows["id"])
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pydict(
        {c: rows.get(c, [[] for _ in range(n)] if c in ADDED_COLUMNS else [""] * n) for c in COLUMNS}, schema=schema())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, compression="zstd",
                   use_dictionary=["audio_format", "language", "speaker"])
    os.replace(tmp, path)
    return path.stat().st_size
