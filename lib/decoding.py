"""The flags eval, export, transcribe and serve share, and the one way they load a model to decode with.

    ModelChoice     run= / model= / adapter=: which Whisper (eval, export, transcribe)
    DecodeConfig    language=, task=, precision=, quantization=, max_new_tokens=, and the no-speech
                    gate's no_speech_threshold= / logprob_threshold= (eval, transcribe, serve)
    load_for_decoding(cfg, source, token)   the model, its processor, the language and the task

A job's config inherits these fields-only dataclasses (`class TranscribeConfig(DecodeConfig,
ModelChoice)`), so the flags stay flat and typed as before: lib.config reads an inherited field
like one of the job's own. Their fields come first in the job's config, ModelChoice's before
DecodeConfig's. A job that means one of them differently declares it again (dataclasses keep its
place): eval's max_new_tokens defaults to a budget from the split.

Nothing here imports torch: a flag check is free; load_for_decoding imports the model code when it runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lib.errors import UserError
from lib.whisper import MAX_NEW_TOKENS, MAX_POSITIONS, PROMPT_TOKENS


@dataclass
class ModelChoice:
    """Which Whisper a job loads (lib.model.resolve_source): a run's adapter on its base, an adapter, or a model."""

    run: str | None = None
    """run name: DATA_DIR/runs/RUN/adapter on its base (eval also scores the base zero-shot; export
    merges the two)"""
    model: str | None = None
    """a Whisper folder or Hub id: the base for run= or adapter= (default: the adapter's
    base_model_name_or_path), or alone a plain or merged model (eval evaluates it alone)"""
    adapter: str | None = None
    """a LoRA adapter folder or Hub id (instead of run=)"""

    def source(self, env):
        """The lib.model.ModelSource these flags name (errors name the flag to fix)."""
        from lib.model import resolve_source

        return resolve_source(env, self.run, self.model, self.adapter)


@dataclass
class DecodeConfig:
    """How a job decodes: language and task forced at generation, weights, tokens, the no-speech gate."""

    language: str | None = None
    """ISO code forced at generation (default: the run's, else the adapter's, else the prepared
    dataset's manifest (eval), else the model's generation_config)"""
    task: Literal["transcribe", "translate"] | None = None
    """default: the run's task, else transcribe"""
    precision: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """auto: bf16/fp16 on a GPU, fp32 on the CPU"""
    quantization: Literal["none", "int8"] = "none"
    """int8 through bitsandbytes, only when asked: less GPU memory (large-v2), but it is slower to
    generate and can shift WER"""
    max_new_tokens: int = MAX_NEW_TOKENS
    """tokens per 30-s window: 444 = 448 positions minus the 4-token prompt, room for a full window
    of Hindi (about 75 words x 5 tokens); a window that still hits it is logged"""
    no_speech_threshold: float | None = 0.6
    """the no-speech gate (lib.inference.NoSpeechGate): a clip (transcribe and serve: a 30-s window)
    whose no-speech probability is above this and whose transcript's mean log-probability is below
    logprob_threshold comes out empty (logged); none = off. Eval gates clips only: long-form
    decoding is not gated (docs/results.md: it skipped speech windows)"""
    logprob_threshold: float = 0.0
    """0 = the no-speech probability alone decides (every mean log-probability is below 0); -1.0 =
    Whisper's own rule (also a mean log-probability below -1), which let 32 of 32 confident loops
    on silence through (docs/results.md)"""

    def __post_init__(self):
        if self.max_new_tokens is not None and not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise UserError(f"max_new_tokens must be 1..{MAX_NEW_TOKENS} ({MAX_POSITIONS} positions minus the "
                            f"{PROMPT_TOKENS}-token prompt)")
        self.gate()  # its checks name the flags

    def gate(self):
        """The lib.inference.NoSpeechGate these flags ask for; None when no_speech_threshold is unset."""
        from lib.inference import NoSpeechGate

        return NoSpeechGate.of(self.no_speech_threshold, self.logprob_threshold)


def load_for_decoding(cfg: DecodeConfig, source, token: str | None = None,
                      manifest: dict[str, Any] | None = None):
    """(model, processor, info, language, task): `source` (a lib.model.ModelSource) loaded in
    cfg.precision / cfg.quantization (lib.model.load_model), then the language and task it decodes
    in: the flag, else the run's config.yaml, the adapter's generation config, `manifest` (a
    prepared dataset's, for eval), the model's generation config (lib.language)."""
    from lib.language import job_language, task_setting
    from lib.model import load_model

    model, processor, info = load_model(source, cfg.precision, cfg.quantization, token=token)
    where = dict(run_config=source.run_config, adapter=source.adapter, manifest=manifest, model=model)
    language = job_language(processor.tokenizer, cfg.language, **where)
    task = task_setting(cfg.task, **where)
    return model, processor, info, language, task
