"""Merge a run's LoRA adapter into its base and save a standalone model; optionally CTranslate2 and the Hub.

    python -m jobs.export run=hi-small                        # -> DATA_DIR/runs/hi-small/merged
    python -m jobs.export run=hi-small ctranslate2=int8 hub.push=true hub.repo_id=me/whisper-small-hi
    python -m jobs.export run=hi-small ggml=q8_0             # + DATA_DIR/runs/hi-small/merged-ggml-q8_0 (whisper.cpp)
    python -m jobs.export adapter=DIR model=openai/whisper-small language=hi data=cv_hi out=DIR

The merged model is checked before it is moved into OUT: on verify_clips clips of the
prepared split, its transcripts and logits must match base + adapter; a CTranslate2 or
whisper.cpp copy must transcribe them like the merged model in its own runtime. An OUT that
holds another model is kept unless force=true.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lib import summary
from lib.cli import run_job
from lib.config import to_dict
from lib.dataset.corpora import DataFlag
from lib.decoding import ModelChoice
from lib.env import Env
from lib.errors import UserError
from lib.hub import HubConfig
from lib.whisper import MAX_NEW_TOKENS

log = logging.getLogger("whisper_ft")


@dataclass
class ExportConfig(ModelChoice, DataFlag):
    """`make export`: run= / adapter= / model= (the base; lib.decoding.ModelChoice), then these."""

    out: str | None = None
    """output folder (default DATA_DIR/runs/RUN/merged, or ADAPTER-merged)"""
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """weights of the merged model: fp16 halves the size of fp32 and is what GPUs serve"""
    language: str | None = None
    """written into generation_config.json (default: the run's language)"""
    task: Literal["transcribe", "translate"] | None = None
    """written into generation_config.json (default: the run's task, else transcribe)"""
    data: str | None = None
    """prepared dataset for the verification clips (default: the run's)"""
    split: str = "test"
    """split for the verification clips"""
    verify_clips: int = 4
    """clips to compare merged vs base + adapter; 0 skips the check (not recommended)"""
    verify_tokens: int = 64
    """tokens generated per verification clip (each costs a decoder step on both models)"""
    verify_max_wer: float = 0.05
    """WER allowed between merged and adapter transcripts (fp16/bf16 rounding can flip a rare token)"""
    ctranslate2: Literal["none", "float16", "int8", "int8_float16"] = "none"
    """also write OUT-ct2-<type> for faster-whisper / CTranslate2"""
    ct2_max_wer: float = 0.25
    """WER allowed between CTranslate2 and merged transcripts (int8 drifts more than float16)"""
    ggml: Literal["none", "f16", "q8_0", "q5_0"] = "none"
    """also write OUT-ggml-<type>/ggml-model-<type>.bin for whisper.cpp (q8_0 ~ half, q5_0 ~ a third of f16)"""
    ggml_max_wer: float = 0.25
    """WER allowed between whisper.cpp and merged transcripts: its own log-mel front end alone flips
    fragile words (whisper-base, 6 short clips: 13-20 %, as a 2.5 ms shift does in transformers)"""
    force: bool = False
    """replace an OUT that holds a different model"""
    hub: HubConfig = field(default_factory=HubConfig)

    def __post_init__(self):
        if self.verify_clips < 0:
            raise UserError("verify_clips must be >= 0")
        if not 1 <= self.verify_tokens <= MAX_NEW_TOKENS:
            raise UserError(f"verify_tokens must be 1..{MAX_NEW_TOKENS}")
        if not all(0 <= w <= 1 for w in (self.verify_max_wer, self.ct2_max_wer, self.ggml_max_wer)):
            raise UserError("verify_max_wer, ct2_max_wer and ggml_max_wer are fractions in 0..1 (0.05 = 5 %)")
        if self.data:
            self.corpora()  # a malformed list or weight fails here, before anything loads


def main(cfg: ExportConfig, env: Env) -> dict:

    from lib import hub
    from lib.dataset.prepared import load_split, open_prepared
    from lib.evaluate.report import package_versions
    from lib.export import merge as ex
    from lib.language import job_language, task_setting
    from lib.model import load_base, load_processor

    # 1. What to merge, where to; a push without a token fails here, before any work.
    hub.require_token(cfg.hub, env.hf_token)
    source = cfg.source(env)
    if not source.adapter:
        raise UserError("export merges an adapter: give run=NAME or adapter=DIR (model= is only the base)")
    out = Path(cfg.out) if cfg.out else (
        source.run_dir / "merged" if source.run_dir else Path(f"{source.adapter.rstrip('/')}-merged"))
    fp = ex.fingerprint(source, cfg.dtype)
    ex.check_destination(out, fp, cfg.force)
    ct2_out = out.parent / f"{out.name}-ct2-{cfg.ctranslate2}"
    if cfg.ctranslate2 != "none":
        ex.check_destination(ct2_out, fp, cfg.force)
    ggml_out = out.parent / f"{out.name}-ggml-{cfg.ggml}"
    if cfg.ggml != "none":
        ex.check_destination(ggml_out, fp, cfg.force)
    task = task_setting(cfg.task, run_config=source.run_config, adapter=source.adapter)
    log.info("export: %s -> %s (%s)", source.describe(), out, cfg.dtype)

    # 2. Verification clips from the prepared split (first verify_clips rows).
    clips: list = []
    if cfg.verify_clips:
        if not (cfg.data or source.run_config.get("data")):
            raise UserError("verification needs clips: set data=<prepared name> (or verify_clips=0 to skip)")
        from lib.dataset.prepared import audio_arrays

        first = cfg.corpora(default=source.run_config.get("data"))[0]  # a run's first corpus
        data_path, manifest = open_prepared(env, first.name)
        clips = audio_arrays(load_split(data_path, cfg.split, manifest), 0, cfg.verify_clips)
    else:
        log.warning("export: verify_clips=0: the merged model is NOT checked against base + adapter")

    # 3. Merge into a float base (never 8-bit: see lib.export.merge.load_float_base) and save to staging.
    merged = ex.merge(source, cfg.dtype)
    processor = load_processor(source.adapter, source.base)
    language = job_language(processor.tokenizer, cfg.language, run_config=source.run_config, adapter=source.adapter,
                            model=merged)
    staging = out.parent / f".{out.name}.incomplete"
    if staging.exists():
        import shutil

        shutil.rmtree(staging)
    ex.save_merged(merged, processor, staging, language, task)
    del merged

    # 4. Verify the saved model against base + adapter, then move it into place.
    manifest = {"source": {"base": source.base, "adapter": source.adapter, "run": cfg.run},
                "dtype": cfg.dtype, "language": language, "task": task, "fingerprint": fp,
                "versions": package_versions(), "config": to_dict(cfg),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if clips:
        v = ex.verify_merged(source, staging, clips, language, task, cfg.dtype, cfg.verify_max_wer,
                             max_new_tokens=cfg.verify_tokens)
        manifest["verify"] = {k: v[k] for k in v if not k.endswith("_texts")}
    (staging / ex.MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    ex.move_into_place(staging, out)
    log.info("export: merged model in %s", out)

    # 5. Optional CTranslate2 conversion, checked the same way on the CPU.
    if cfg.ctranslate2 != "none":
        ct2_staging = out.parent / f".{ct2_out.name}.incomplete"
        ex.convert_ctranslate2(out, ct2_staging, cfg.ctranslate2)
        ct2_manifest = {**manifest, "ctranslate2": cfg.ctranslate2, "merged_from": str(out)}
        if clips:
            merged = load_base(str(out), "none", "fp32", base_dtype="compute").eval()
            ct2_manifest["verify_ct2"] = ex.verify_ct2(ct2_staging, merged, processor, clips,
                                                       language, task, cfg.ctranslate2, cfg.ct2_max_wer,
                                                       cfg.verify_tokens)
        (ct2_staging / ex.MANIFEST).write_text(json.dumps(ct2_manifest, indent=2, ensure_ascii=False))
        ex.move_into_place(ct2_staging, ct2_out)
        manifest["ctranslate2"] = {"path": str(ct2_out), **ct2_manifest.get("verify_ct2", {})}
        (out / ex.MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        log.info("export: CTranslate2 %s model in %s", cfg.ctranslate2, ct2_out)

    # 6. Optional whisper.cpp file, checked in whisper.cpp's own runtime (lib/export/ggml.py).
    if cfg.ggml != "none":
        from lib.export import ggml

        ggml_staging = out.parent / f".{ggml_out.name}.incomplete"
        if ggml_staging.exists():  # left by a failed check: never reuse an unverified file
            import shutil

            shutil.rmtree(ggml_staging)
        merged = load_base(str(out), "none", "fp32", base_dtype="compute").eval()
        ggml_manifest = {**manifest, "ggml": ggml.write_ggml(merged, processor, ggml_staging / ggml.file_name(cfg.ggml),
                                                             cfg.ggml), "merged_from": str(out)}
        if clips:
            ggml_manifest["verify_ggml"] = ggml.verify_ggml(ggml_staging / ggml.file_name(cfg.ggml), merged, processor,
                                                            clips, language, task, cfg.ggml_max_wer, cfg.verify_tokens)
        ggml_manifest["ggml"]["path"] = str(ggml_out / ggml.file_name(cfg.ggml))
        (ggml_staging / ex.MANIFEST).write_text(json.dumps(ggml_manifest, indent=2, ensure_ascii=False))
        ex.move_into_place(ggml_staging, ggml_out)
        manifest["ggml"] = {**ggml_manifest["ggml"], **ggml_manifest.get("verify_ggml", {})}
        (out / ex.MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        log.info("export: whisper.cpp %s model in %s", cfg.ggml, ggml_out)

    # 7. Optional Hub push with a model card carrying the eval report.
    if cfg.hub.push:
        report = source.run_dir / "eval" / "report.md" if source.run_dir else None
        card = hub.model_card(kind="merged", repo_id=cfg.hub.repo_id, base=source.base, language=language,
                              task=task, report_md=report.read_text() if report and report.is_file() else None,
                              verify=manifest.get("verify"), dtype=cfg.dtype)
        manifest["hub"] = hub.push_folder(out, cfg.hub, env.hf_token, card, "merged model")
        (out / ex.MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
        log.info("export: pushed to %s", manifest["hub"])

    # 7. Where the models are, and how closely they match base + adapter.
    summary.done("export", summary.export_summary(out, manifest, env))
    return manifest


if __name__ == "__main__":
    raise SystemExit(run_job("export", __doc__, ExportConfig, main))
