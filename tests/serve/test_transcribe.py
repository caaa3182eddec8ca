"""The transcribe job on short files written with soundfile."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from lib.env import Env
from lib.errors import UserError
from tests.helpers import make_adapter, tone

ROOT = Path(__file__).resolve().parents[2]


def test_transcribe_wav_with_adapter_and_resamples(tiny_model_dir, tmp_path, capsys):
    from jobs.transcribe import TranscribeConfig, main

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    wav = tmp_path / "clip.wav"
    stereo_44k = np.stack([tone(1.0, 440, sr=44_100)] * 2, axis=1)
    sf.write(wav, stereo_44k, 44_100)
    text = main(TranscribeConfig(audio=str(wav), adapter=str(adapter), max_new_tokens=8,
                                 out=str(tmp_path / "clip.txt")), Env(data_dir=tmp_path))
    assert text and capsys.readouterr().out.strip() == text
    assert (tmp_path / "clip.txt").read_text().strip() == text
    with pytest.raises(UserError, match="force=true"):
        main(TranscribeConfig(audio=str(wav), adapter=str(adapter), out=str(tmp_path / "clip.txt")),
             Env(data_dir=tmp_path))


def test_long_file_is_cut_into_windows(tiny_model_dir, tmp_path):
    from lib.audio import load_file
    from lib.inference import transcribe_long
    from lib.model import load_model, resolve_source

    flac = tmp_path / "long.flac"
    sf.write(flac, tone(31.0, 300), 16_000)
    audio = load_file(flac)
    assert len(audio) == 31 * 16_000
    model, processor, _ = load_model(resolve_source(Env(data_dir=tmp_path), model=str(tiny_model_dir)))
    text = transcribe_long(model, processor, audio, "hi", "transcribe", max_new_tokens=4)
    assert len(text.split()) >= 2  # one piece per 30-s window


def test_missing_or_bad_audio_is_a_clear_error(tmp_path):
    from jobs.transcribe import TranscribeConfig, main

    with pytest.raises(UserError, match=r"audio=.*nope.wav: no such file"):
        main(TranscribeConfig(audio=str(tmp_path / "nope.wav"), model="x"), Env(data_dir=tmp_path))
    junk = tmp_path / "junk.mp3"
    junk.write_bytes(b"not audio at all" * 10)
    with pytest.raises(UserError, match="cannot decode"):
        main(TranscribeConfig(audio=str(junk), model="x"), Env(data_dir=tmp_path))
    with pytest.raises(UserError, match="set audio="):
        TranscribeConfig()


def test_truncated_audio_is_refused_as_prepare_refuses_it(tmp_path):
    """transcribe decodes with lib/audio.py, as prepare does: a WAV cut short (its header
    declares more samples than the file holds) is an error, not a shorter transcript."""
    from jobs.transcribe import TranscribeConfig, main

    cut = Path(__file__).resolve().parents[1] / "fixtures" / "manifest" / "clips" / "truncated.wav"
    with pytest.raises(UserError, match=r"audio=.*truncated.wav: cannot decode it \(truncated"):
        main(TranscribeConfig(audio=str(cut), model="x"), Env(data_dir=tmp_path))


def test_cli_exit_code_2_for_missing_audio(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jobs.transcribe", f"audio={tmp_path}/none.wav", "model=x"],
                       cwd=ROOT, capture_output=True, text=True, env={"DATA_DIR": str(tmp_path), "PATH": ""})
    assert r.returncode == 2 and "none.wav: no such file" in r.stderr


def test_default_budget_fits_a_full_window_and_a_cut_window_is_logged(tiny_model_dir, tmp_path, caplog):
    """Issue 11 item 1: the default token budget is what a 30-s window can need (444 = 448 - the
    4-token prompt), not 225; a window that still runs out of tokens says so."""
    import logging

    from jobs.transcribe import TranscribeConfig
    from lib.inference import transcribe_long
    from lib.model import load_model, resolve_source

    assert TranscribeConfig(audio="x.wav").max_new_tokens == 444
    model, processor, _ = load_model(resolve_source(Env(data_dir=tmp_path), model=str(tiny_model_dir)))
    with caplog.at_level(logging.WARNING, logger="whisper_ft"):
        transcribe_long(model, processor, tone(31.0, 300), "hi", "transcribe", max_new_tokens=1)
    cut = [r.getMessage() for r in caplog.records if "hit max_new_tokens=1" in r.getMessage()]
    assert len(cut) == 2 and cut[0].startswith("transcribe: window 1 (0-30 s)")
