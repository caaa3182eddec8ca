"""Transcribe one audio file (wav, flac, ogg, mp3) with a run, an adapter, or any Whisper.

    python -m jobs.transcribe audio=clip.wav run=hi-small
    python -m jobs.transcribe audio=talk.mp3 model=DATA_DIR/runs/hi-small/merged
    python -m jobs.transcribe audio=clip.flac model=openai/whisper-small language=hi out=clip.txt

Prints the transcript on stdout (logs go to stderr); out= also writes it to a file
(an existing file is kept unless force=true). Files longer than 30 s are cut into
30-s windows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from lib import summary
from lib.cli import run_job
from lib.decoding import DecodeConfig, ModelChoice, load_for_decoding
from lib.env import Env
from lib.errors import UserError
from lib.whisper import SAMPLING_RATE

log = logging.getLogger("whisper_ft")


@dataclass
class TranscribeConfig(DecodeConfig, ModelChoice):
    """`make transcribe`: run= / model= / adapter= (lib.decoding.ModelChoice), language=, task=,
    precision=, quantization=, max_new_tokens= and the no-speech gate (lib.decoding.DecodeConfig), then these."""

    audio: str | None = None
    """the audio file to transcribe"""
    out: str | None = None
    """also write the transcript to this text file"""
    force: bool = False
    """replace an existing out= file"""

    def __post_init__(self):
        if not self.audio:
            raise UserError("which file? set audio=path/to/clip.wav (wav, flac, ogg or mp3)")
        super().__post_init__()  # max_new_tokens and the no-speech gate (lib.decoding.DecodeConfig)


def main(cfg: TranscribeConfig, env: Env) -> str:
    from lib.audio import load_file
    from lib.inference import transcribe_long

    # 1. Inputs first: a missing or broken file should not wait for a model to load.
    audio = load_file(cfg.audio)
    if cfg.out and Path(cfg.out).exists() and not cfg.force:
        raise UserError(f"out={cfg.out} already exists: set force=true to replace it")
    source = cfg.source(env)

    # 2. Model, language, task.
    model, processor, info, language, task = load_for_decoding(cfg, source, env.hf_token)
    log.info("transcribe: %s (%.1f s) with %s, language %s, %s", cfg.audio, len(audio) / SAMPLING_RATE,
             source.describe(), language, info)

    # 3. Transcribe and print.
    text = transcribe_long(model, processor, audio, language, task, cfg.max_new_tokens, gate=cfg.gate())
    print(text, flush=True)
    if cfg.out:
        Path(cfg.out).write_text(text + "\n", encoding="utf-8")
        log.info("transcribe: wrote %s", cfg.out)
    summary.done("transcribe", {"audio": f"{cfg.audio} ({len(audio) / SAMPLING_RATE:.1f} s)",
                                "model": source.describe(), "words": len(text.split()), "written to": cfg.out})
    return text


if __name__ == "__main__":
    raise SystemExit(run_job("transcribe", __doc__, TranscribeConfig, main))
