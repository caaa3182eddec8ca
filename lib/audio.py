"""Decode audio files or bytes to mono float32 at 16 kHz, and tell a broken file from a good one.

Decoding is ours, not the `datasets` Audio feature's: datasets 5 decodes through torchcodec,
which needs FFmpeg libraries matched to its build. soundfile's bundled libsndfile reads
wav/flac/ogg/mp3 itself; librosa (audioread) is the fallback for anything else.

A truncated file often decodes "fine" into a shorter clip, so `decode` also checks what the
container promised: a WAV `data` chunk longer than the bytes on disk, or an MP3 whose
Xing/Info header counts more stream bytes than the file holds, is reported as truncated.

`log_mel` turns decoded clips into the model's input features (training batches, eval, export's
check), computing the STFT of the audio only, not of the padding up to 30 s.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lib.whisper import SAMPLING_RATE

if TYPE_CHECKING:  # torch is imported where log-mel is computed: decoding needs none
    import torch


class AudioError(Exception):
    """The clip cannot be used; the message is the reason written to the skip report."""


def _wav_missing_bytes(head: bytes, size: int) -> int:
    """Bytes a RIFF/WAVE file's `data` chunk declares beyond the end of the file (0 if complete)."""
    if head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return 0
    pos = 12
    while pos + 8 <= len(head):
        chunk, length = head[pos : pos + 4], struct.unpack("<I", head[pos + 4 : pos + 8])[0]
        if chunk == b"data":
            # 0xFFFFFFFF / 0 are "unknown length" markers written by streaming encoders.
            if length in (0, 0xFFFFFFFF):
                return 0
            return max(0, pos + 8 + length - size)
        pos += 8 + length + (length & 1)
    return 0


def _mp3_missing_bytes(head: bytes, size: int) -> int:
    """Stream bytes an MP3's Xing/Info header declares beyond the end of the file (0 if unknown)."""
    start = 0
    if head[:3] == b"ID3" and len(head) >= 10:
        # ID3v2 size is 4 x 7-bit "syncsafe" bytes, after a 10-byte header.
        start = 10 + ((head[6] << 21) | (head[7] << 14) | (head[8] << 7) | head[9])
    for tag in (b"Xing", b"Info"):
        at = head.find(tag, start, start + 200)
        if at < 0:
            continue
        flags = struct.unpack(">I", head[at + 4 : at + 8])[0]
        off = at + 8 + (4 if flags & 1 else 0)
        if not flags & 2 or off + 4 > len(head):
            return 0
        declared = struct.unpack(">I", head[off : off + 4])[0]
        # 1% slack: some encoders count the ID3v1 tag or padding differently.
        missing = declared - (size - start)
        return missing if missing > declared // 100 else 0
    return 0


def check_complete(data: bytes, name: str) -> None:
    """Raise AudioError if the container header says the file was cut short."""
    head = data[:16_384]
    missing = _wav_missing_bytes(head, len(data)) or _mp3_missing_bytes(head, len(data))
    if missing:
        raise AudioError(f"truncated: {name} is {missing} bytes shorter than its header declares")


def _read(data: bytes, name: str) -> tuple[np.ndarray, int]:
    import soundfile as sf

    try:
        audio, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
        return audio.mean(axis=1), sr
    except Exception as sf_error:  # libsndfile could not read it: try audioread via librosa
        try:
            import librosa

            audio, sr = librosa.load(io.BytesIO(data), sr=None, mono=True)
            return audio.astype(np.float32), int(sr)
        except Exception:
            detail = str(sf_error).splitlines()[0].rsplit(": ", 1)[-1][:120]
            raise AudioError(f"does not decode: {name} ({detail})") from None


def resample(audio: np.ndarray, sr: int, target: int = SAMPLING_RATE) -> np.ndarray:
    """Resample with soxr (high quality, fast); a no-op at the target rate."""
    if sr == target:
        return audio.astype(np.float32, copy=False)
    import soxr

    return soxr.resample(audio, sr, target, quality="HQ").astype(np.float32, copy=False)


def read_bytes(path: str | Path, name: str | None = None) -> bytes:
    """A clip file's encoded bytes (prepare keeps them); AudioError when it is missing or unreadable."""
    name = name or str(path)
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise AudioError(f"missing: {name} does not exist") from None
    except OSError as e:
        raise AudioError(f"unreadable: {name} ({e.strerror})") from None


def header_seconds(source: str | Path | bytes) -> float | None:
    """The duration a file's header declares, read without decoding the audio (frames / rate),
    or None when the header does not say or cannot be read (decode then tells)."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else str(source))
    except Exception:
        return None
    if info.frames <= 0 or info.samplerate <= 0:
        return None
    return info.frames / info.samplerate


def decode(source: str | Path | bytes, name: str | None = None, target: int = SAMPLING_RATE) -> np.ndarray:
    """A file path or encoded bytes -> mono float32 at `target` Hz. Raises AudioError with the reason."""
    if isinstance(source, (str, Path)):
        name = name or str(source)
        data = read_bytes(source, name)
    else:
        data, name = bytes(source), name or "<bytes>"
    if not data:
        raise AudioError(f"empty file: {name} has 0 bytes")
    check_complete(data, name)
    audio, sr = _read(data, name)
    if audio.size == 0:
        raise AudioError(f"no samples: {name} decodes to 0 samples")
    if not np.isfinite(audio).all():
        raise AudioError(f"does not decode: {name} has NaN or infinite samples")
    return resample(audio, sr, target)


def load_file(path: str | Path, flag: str = "audio") -> np.ndarray:
    """A user's audio file (transcribe) through the same decoder and checks as prepare's clips;
    a file that cannot be used is a UserError naming the flag and the reason."""
    from lib.errors import UserError

    if not Path(path).is_file():
        raise UserError(f"{flag}={path}: no such file")
    try:
        return decode(path)
    except AudioError as e:
        raise UserError(f"{flag}={path}: cannot decode it ({e}); give a complete wav, flac, ogg or mp3 file") from None


def log_mel(feature_extractor, audio: list[np.ndarray], sampling_rate: int = SAMPLING_RATE) -> torch.Tensor:
    """The feature extractor's log-mel of 30-s windows (batch x mels x 3000), computed on the audio only.

    WhisperFeatureExtractor pads every clip with zeros to 30 s and takes the STFT of all of it: for
    a 5-s clip, 5/6 of the work is frames of silence, whose log-mel is a known constant (log10 of
    the 1e-10 floor, then raised to the clip's max - 8 like every frame). Here the STFT covers
    the longest clip plus 400 zero samples (every frame that reaches real audio), and the rest
    is filled with that constant: the same numbers as the extractor's (a test holds them within
    1e-5) at 1/3-1/6 of the cost for 5-10-s clips; the loader worker's largest cost otherwise.
    Falls back to the extractor for what it does differently (dither, another rate or window).
    """
    import torch

    fe = feature_extractor
    n_samples, hop, n_fft = fe.n_samples, fe.hop_length, fe.n_fft
    if getattr(fe, "dither", 0.0) or sampling_rate != fe.sampling_rate or not audio:
        return fe(audio, sampling_rate=sampling_rate, return_tensors="pt").input_features
    frames = n_samples // hop  # 3000
    longest = min(max(len(a) for a in audio), n_samples)
    # frames 0..k-1 cover every sample of the longest clip (a frame reaches n_fft/2 to either side)
    k = min(frames, -(-(longest + n_fft // 2) // hop) + 1)
    width = min(n_samples, (k - 1) * hop + n_fft // 2 + 1) if k < frames else n_samples
    wave = torch.zeros(len(audio), width, dtype=torch.float32)
    for i, a in enumerate(audio):
        a = a[:n_samples]
        wave[i, : min(len(a), width)] = torch.from_numpy(np.ascontiguousarray(a[:width], dtype=np.float32))
    window = torch.hann_window(n_fft)
    stft = torch.stft(wave, n_fft, hop, window=window, return_complex=True)
    magnitudes = (stft[..., :k].abs() ** 2).contiguous()
    mel = torch.from_numpy(fe.mel_filters).to(torch.float32).T @ magnitudes
    log_spec = torch.clamp(mel, min=1e-10).log10()
    silent = torch.tensor(-10.0)  # log10 of the floor: frames of padding only
    top = log_spec.amax(dim=(1, 2), keepdim=True)
    if k < frames:
        top = torch.maximum(top, silent)
    floor = top - 8.0
    out = torch.empty(len(audio), log_spec.shape[1], frames, dtype=torch.float32)
    out[..., :k] = torch.maximum(log_spec, floor)
    if k < frames:
        out[..., k:] = torch.maximum(silent, floor)
    return (out + 4.0) / 4.0
