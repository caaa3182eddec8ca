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
from typing import Literal

from lib import summary
from lib.cli import run_job
from lib.env import Env
from lib.errors import UserError
from lib.whisper import MAX_NEW_TOKENS, SAMPLING_RATE

log = logging.getLogger("whisper_ft")


@dataclass
class TranscribeConfig:
    audio: str | None = None
    """the audio file to transcribe"""
    run: str | None = None
    """run name: DATA_DIR/runs/RUN/adapter on its base"""
    model: str | None = None
    """a base, plain or merged model (folder or Hub id)"""
    adapter: str | None = None
    """a LoRA adapter folder or Hub id"""
    language: str | None = None
    """ISO code forced at generation (default: the run's, else the model's generation_config)"""
    task: Literal["transcribe", "translate"] | None = None
    """default: the run's task, else transcribe"""
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """auto: bf16/fp16 on a GPU, fp32 on the CPU"""
    quantization: Literal["none", "int8"] = "none"
    """int8 through bitsandbytes, only when asked"""
    max_new_tokens: int = MAX_NEW_TOKENS
    """tokens per 30-s window: 444 = 448 positions minus the 4-token prompt, room for a full window
    of Hindi (about 75 words x 5 tokens); a window that still hits it is logged"""
    no_speech_threshold: float | None = 0.6
    """the no-speech gate (lib.inference.NoSpeechGate): a 30-s window whose no-speech
    probability is above this and whose transcript's mean log-probability is below
    logprob_threshold comes out empty (logged); none = off"""
    logprob_threshold: float = 0.0
    """0 = the no-speech probability alone decides; -1.0 = Whisper's rule (also a mean log-probability
    below -1): see eval's flag of the same name"""
    out: str | None = None
    """also write the transcript to this text file"""
    force: bool = False
    """replace an existing out= file"""

    def __post_init__(self):
        if not self.audio:
            raise UserError("which file? set audio=path/to/clip.wav (wav, flac, ogg or mp3)")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise UserError(f"max_new_tokens must be 1..{MAX_NEW_TOKENS}")
        self.gate()  # its checks name the flags

    def gate(self):
        from lib.inference import NoSpeechGate

        return NoSpeechGate.of(self.no_speech_threshold, self.logprob_threshold)


def main(cfg: TranscribeConfig, env: Env) -> str:
    from lib.audio import load_file
    from lib.inference import transcribe_long
    from lib.language import job_language, task_setting
    from lib.model import load_model, resolve_source

    # 1. Inputs first: a missing or broken file should not wait for a model to load.
    audio = load_file(cfg.audio)
    if cfg.out and Path(cfg.out).exists() and not cfg.force:
        raise UserError(f"out={cfg.out} already exists: set force=true to replace it")
    source = resolve_source(env, cfg.run, cfg.model, cfg.adapter)

    # 2. Model, language, task.
    model, processor, info = load_model(source, cfg.precision, cfg.quantization, token=env.hf_token)
    where = dict(run_config=source.run_config, adapter=source.adapter, model=model)
    language = job_language(processor.tokenizer, cfg.language, **where)
    task = task_setting(cfg.task, **where)
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
