"""lib/audio: decoding, resampling and the truncation checks, on the committed clips and on bytes."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lib.audio import AudioError, decode

FIX = Path(__file__).resolve().parents[1] / "fixtures"
CLIPS = FIX / "cv_release" / "clips"


def _wav_bytes(seconds: float, sr: int) -> bytes:
    buf = io.BytesIO()
    t = np.arange(int(seconds * sr)) / sr
    sf.write(buf, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_mp3_48k_decodes_to_16k_mono():
    audio = decode(CLIPS / "common_voice_hi_00001000.mp3")
    info = sf.info(str(CLIPS / "common_voice_hi_00001000.mp3"))
    assert info.samplerate == 48_000
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) / 16_000 - info.duration) < 0.01
    assert 0.01 < np.abs(audio).max() <= 1.0


def test_stereo_44k_bytes_are_downmixed_and_resampled():
    buf = io.BytesIO()
    t = np.arange(44_100) / 44_100
    left = np.sin(2 * np.pi * 300 * t)
    sf.write(buf, np.stack([left, -left], axis=1).astype(np.float32) * 0.5, 44_100, format="WAV")
    audio = decode(buf.getvalue(), "stereo.wav")
    assert len(audio) == 16_000
    assert np.abs(audio).max() < 1e-3  # left and -left cancel: proves a mean over channels


def test_truncated_wav_is_reported_with_the_missing_bytes():
    data = _wav_bytes(1.0, 16_000)
    assert decode(data, "ok.wav").shape == (16_000,)
    with pytest.raises(AudioError, match=r"truncated: cut\.wav is 16000 bytes shorter"):
        decode(data[: len(data) - 16_000], "cut.wav")


def test_committed_bad_clips():
    with pytest.raises(AudioError, match="does not decode"):
        decode(CLIPS / "common_voice_hi_09000001.mp3")  # random bytes
    with pytest.raises(AudioError, match="truncated"):
        decode(CLIPS / "common_voice_hi_09000002.mp3")  # first half of an mp3 with an Info header
    with pytest.raises(AudioError, match="truncated"):
        decode(FIX / "manifest" / "clips" / "truncated.wav")
    with pytest.raises(AudioError, match="missing: .*does not exist"):
        decode(CLIPS / "common_voice_hi_09000004.mp3")
    with pytest.raises(AudioError, match="0 bytes"):
        decode(b"", "empty.wav")
