"""Evaluate a fine-tuned run (and its base, zero-shot) or any Whisper on a prepared split.

    python -m jobs.eval run=hi-small                       # DATA_DIR/runs/hi-small/adapter + its base
    python -m jobs.eval model=openai/whisper-small data=cv_hi language=hi
    python -m jobs.eval adapter=DIR model=BASE data=cv_hi language=hi limit=200
    python -m jobs.eval run=hi-small also=en-clips longform.minutes=3   # + English, 3-min recordings

Writes OUT (default DATA_DIR/runs/RUN/eval/, or DATA_DIR/evals/<model>-<data>-<split>/):
report.json, report.md, predictions.tsv, eval_config.yaml and, for a run,
training_curves.png. The report also holds long-form WER and timestamp validity (lib/evaluate/longform.py)
and, for also= datasets, WER and language-ID accuracy with forgetting flags (lib/evaluate/forgetting.py).
An OUT that already holds a report is kept unless force=true.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lib import summary
from lib.cli import run_job
from lib.config import dump_yaml, to_dict
from lib.dataset.corpora import DataFlag
from lib.decoding import DecodeConfig, ModelChoice, load_for_decoding
from lib.env import Env
from lib.errors import UserError
from lib.evaluate.longform import LongformConfig

log = logging.getLogger("whisper_ft")


@dataclass
class EvalConfig(DecodeConfig, ModelChoice, DataFlag):
    """`make eval`: run= / model= / adapter= (lib.decoding.ModelChoice), language=, task=, precision=,
    quantization=, max_new_tokens= and the no-speech gate (lib.decoding.DecodeConfig), then these."""

    max_new_tokens: int | None = None
    """tokens per transcript; default: the split's longest label + 25 % + 8 (lib.inference.decode_budget),
    at most 444 (448 positions minus the 4-token prompt); a hypothesis that hits it is flagged truncated"""
    data: str | None = None
    """prepared dataset name under DATA_DIR/prepared (default: the run's config.yaml data)"""
    split: str = "test"
    """which prepared split to score"""
    batch_size: int = 16
    """clips per generate() call; 16 x 30-s clips of whisper-small fit in ~6 GB fp16"""
    num_beams: int = 1
    """1 = greedy (what the walkthrough reports); 5 is slower and usually a little better"""
    cache: Literal["dynamic", "static"] = "dynamic"
    """the decoder's key/value cache for the split: static lets generate() compile the decoding step
    (a compilation per batch shape first; see docs/results.md "Eval speed" for what it gains)"""
    limit: int | None = None
    """score only the first N clips (quick checks)"""
    compare_base: bool = True
    """with an adapter, also score the base zero-shot in the same run (before/after)"""
    out: str | None = None
    """output folder (see the docstring for the default)"""
    force: bool = False
    """replace an existing report in OUT"""
    speed_compare: bool = False
    """also time our settings vs the walkthrough loop (int8, batch 8, autocast) on speed_clips clips"""
    speed_clips: int = 32
    """clips for speed_compare"""
    longform: LongformConfig = field(default_factory=LongformConfig)
    """long-form evaluation (lib/evaluate/longform.py): longform.recordings=0 turns it off"""
    also: list[str] = field(default_factory=list)
    """more prepared datasets (e.g. also=en-clips): WER with their language forced and language-ID accuracy"""
    also_split: str = "test"
    """which split of each also= dataset to score"""
    forgetting_max_drop: float = 0.02
    """flag an also= dataset whose language-ID accuracy falls more than this (absolute) below the base's"""
    forgetting_max_wer_rise: float = 0.05
    """flag an also= dataset whose normalized WER rises more than this (absolute) above the base's"""
    no_speech_clips: int = 16
    """silence/noise clips scored for hallucination (the share that produce text), model and base; 0 = off"""
    no_speech_dir: str | None = None
    """a folder of audio without speech to cut those clips from; default: generated silence, white/pink noise"""
    track: bool = True
    """with run=: log the WERs and the report to the run's tracking run (RUN/tracking.json, written
    by train.report_to=mlflow or wandb); nothing to do for a run tracked by TensorBoard only"""

    def __post_init__(self):
        if self.batch_size < 1:
            raise UserError("batch_size must be >= 1: set batch_size=16")
        if self.limit is not None and self.limit < 1:
            raise UserError("limit must be >= 1 (or leave it unset for the whole split)")
        if self.speed_clips < 1:
            raise UserError("speed_clips must be >= 1")
        if not 0 <= self.forgetting_max_drop <= 1 or not 0 <= self.forgetting_max_wer_rise:
            raise UserError("forgetting_max_drop must be 0..1 and forgetting_max_wer_rise >= 0 (fractions, "
                            "e.g. forgetting_max_drop=0.02 for 2 points)")
        if self.no_speech_clips < 0:
            raise UserError("no_speech_clips must be >= 0 (0 turns the hallucination check off)")
        if self.data:
            self.corpora()  # a malformed list or weight fails here, before anything loads
        super().__post_init__()  # max_new_tokens and the no-speech gate (lib.decoding.DecodeConfig)


@dataclass
class Resolved:
    """What eval scores, resolved from data= (else the run's) and also=; the EvalConfig stays as given."""

    data: str
    """the dataset whose split is scored: data=, else the run's; a run on several corpora: the first"""
    also: list[str]
    """also=, after a run's other corpora that have also_split (scored as also= datasets)"""

    def record(self, cfg: EvalConfig) -> dict:
        """The config as eval records it (eval_config.yaml, report.json's config): yours, with also= as scored."""
        return {**to_dict(cfg), "also": self.also}


def resolve_data(cfg: EvalConfig, env: Env, source) -> Resolved:
    """The dataset to score and the also= list: a run on several corpora (data=a:0.7,b:0.3) scores
    the first as the main split and the others, where they have also_split, as also= datasets."""
    from lib.dataset.prepared import has_split, open_prepared

    data = cfg.data or source.run_config.get("data")
    if not data:
        raise UserError("which dataset? set data=<prepared name> (see DATA_DIR/prepared)")
    corpora = [c.name for c in cfg.corpora(default=source.run_config.get("data"))]
    if len(corpora) == 1:
        return Resolved(data, list(cfg.also))
    scored = [c for c in corpora[1:] if has_split(open_prepared(env, c)[1], cfg.also_split)]
    for c in corpora[1:]:
        if c not in scored:
            log.warning("eval: %s (a corpus of the run) has no '%s' split: not scored (also_split= picks "
                        "another split)", c, cfg.also_split)
    log.info("eval: data=%s: %s is the main dataset; %s scored with also= (WER and language ID each)", data,
             corpora[0], ", ".join(scored) or "no other corpus")
    return Resolved(corpora[0], [*scored, *[a for a in cfg.also if a not in corpora]])


def main(cfg: EvalConfig, env: Env) -> dict:
    from lib.dataset.prepared import check_tokenizer, load_split, open_prepared
    from lib.evaluate.report import (
        device_description,
        package_versions,
        plot_training_curves,
        worst,
        write_predictions,
        write_report,
    )
    from lib.inference import decode_budget, speed_compare, transcribe_dataset
    from lib.metrics import score
    from lib.model import random_weights_note
    from lib.train.tracking import log_eval
    from lib.whisper import PROMPT_TOKENS

    # 1. What to evaluate, on what (a run on several corpora: the first is the main split, the
    #    others are scored as also=), and where the report goes.
    source = cfg.source(env)
    resolved = resolve_data(cfg, env, source)
    data = resolved.data
    data_path, manifest = open_prepared(env, data)
    if cfg.out:
        out = Path(cfg.out)
    elif source.run_dir is not None:
        out = source.run_dir / "eval"
    else:
        out = env.data_dir / "evals" / f"{Path(source.base).name}-{Path(str(data_path)).name}-{cfg.split}"
    if (out / "report.json").exists() and not cfg.force:
        raise UserError(f"{out} already holds an evaluation report: set force=true to replace it, or out=")
    log.info("eval: %s on %s/%s -> %s", source.describe(), data_path, cfg.split, out)

    # 2. The split (first `limit` clips when asked).
    ds = load_split(data_path, cfg.split, manifest)
    if cfg.limit:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    if len(ds) == 0:
        raise UserError(f"{data_path}/{cfg.split} has no rows to evaluate")
    ids, refs, durations = ds["id"], ds["text"], [float(d) for d in ds["duration"]]
    log.info("eval: %d clips, %.2f h of audio", len(ds), sum(durations) / 3600)
    # Long-form recordings and also= datasets are opened now, so that a broken longform.manifest=
    # or a misspelt also= name fails before any decoding.
    from lib.evaluate import forgetting, longform

    recordings, lf_source = longform.recordings_for(cfg.longform, ds, cfg.split) if cfg.longform.recordings else ([], "")
    also_sets = forgetting.open_also(env, resolved.also)

    # 3. The model (adapter attached, base reachable through disable_adapter()), its language and task.
    model, processor, info, language, task = load_for_decoding(cfg, source, env.hf_token, manifest)
    check_tokenizer(manifest, processor.tokenizer, data, source.base, "model")
    log.info("eval: language %s, task %s, %s", language, task, info)

    # 4. Transcribe: the model as given, then the base zero-shot on the same clips, with a token
    #    budget that fits the split's longest reference (lib.inference.decode_budget).
    prompt = len((manifest.get("tokenizer_signature") or {}).get("prefix") or []) or PROMPT_TOKENS
    max_new = cfg.max_new_tokens or decode_budget([len(x) for x in ds.with_format(None)["labels"]], prompt)
    log.info("eval: up to %d new tokens per clip%s", max_new, "" if cfg.max_new_tokens else
             " (the split's longest label + 25 % + 8; set max_new_tokens= to change it)")
    gate = cfg.gate()
    gen = dict(language=language, task=task, batch_size=cfg.batch_size, max_new_tokens=max_new,
               num_beams=cfg.num_beams, gate=gate)
    label = "adapter" if source.adapter else "model"
    hyps = {label: transcribe_dataset(model, processor, ds, desc=label, cache=cfg.cache, **gen)}
    if source.adapter and cfg.compare_base:
        with model.disable_adapter():
            hyps["base"] = transcribe_dataset(model, processor, ds, desc="base zero-shot", cache=cfg.cache, **gen)

    # 5. Score.
    out.mkdir(parents=True, exist_ok=True)
    results, utts = {}, {}
    for name, (decoded, _) in hyps.items():
        results[name], utts[name] = score(refs, decoded.texts, ids, truncated=decoded.truncated)
        # clips the no-speech gate emptied: a deletion each in the WER; more than a few on real speech
        # means the thresholds are wrong for this model
        results[name]["judged_no_speech"] = sum(decoded.silent)
        if any(decoded.silent):
            log.warning("eval: %s: the no-speech gate emptied %d of %d clips of %s/%s (no-speech probability > %g "
                        "and mean log-probability < %g); no_speech_threshold=none keeps their text", name,
                        sum(decoded.silent), len(ds), data, cfg.split, cfg.no_speech_threshold, cfg.logprob_threshold)
        if results[name]["truncated"]:
            log.warning("eval: %s: %d of %d hypotheses hit max_new_tokens=%d and are cut short (flag "
                        "'truncated' in predictions.tsv); raise max_new_tokens", name, results[name]["truncated"],
                        len(ds), max_new)
    write_predictions(out / "predictions.tsv", utts[label], durations, utts.get("base"))
    curves = None
    if source.run_dir is not None and (source.run_dir / "log_history.json").is_file():
        if plot_training_curves(source.run_dir / "log_history.json", out / "training_curves.png"):
            curves = "training_curves.png"
    seconds = hyps[label][1]
    random_note = random_weights_note(model)
    report = {
        "model": source.base,
        "adapter": source.adapter,
        "run": cfg.run,
        "data": str(data_path),
        "split": cfg.split,
        "language": language,
        "task": task,
        # the demo's and the bench's bases (lib/tools/models.py): report.md and the summary say the WER means nothing
        "random_weights": random_note is not None,
        "device": device_description(),
        "precision": info["dtype"],
        "quantization": info["quantization"],
        "batch_size": cfg.batch_size,
        "num_beams": cfg.num_beams,
        "max_new_tokens": max_new,
        "counts": {"utterances": len(ds), "audio_hours": sum(durations) / 3600, "limited_to": cfg.limit,
                   **{k: results[label][k] for k in ("empty", "repetition", "too_long", "truncated",
                                                      "judged_no_speech")}},
        "no_speech_gate": vars(gate) if gate else None,
        "results": results,
        "speed": {"seconds": seconds, "clips_per_s": len(ds) / max(seconds, 1e-9)},
        "worst": [vars(u) for u in worst(utts[label])],
        "training_curves": curves,
        "versions": package_versions(),
        "config": resolved.record(cfg),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }

    # 6. Hallucination: the same silence/noise clips through the model and the base.
    if cfg.no_speech_clips:
        report["hallucination"] = no_speech_section(cfg, model, processor, label, bool(source.adapter), gen)

    # 7. Long-form: joined test clips (or longform.manifest=) through sequential decoding with timestamps.
    from lib.inference import model_legs

    legs = model_legs(model, label, bool(source.adapter and cfg.compare_base))
    if recordings:
        report["longform"] = longform.evaluate(legs, model, processor, recordings, language, task, cfg.longform,
                                               lf_source, cfg.max_new_tokens)

    # 8. Other languages (also=): WER with their language forced, language ID left to the model.
    if also_sets:
        report["also"], report["forgetting_flags"] = forgetting.evaluate_also(
            also_sets, cfg.also_split, cfg.limit, legs, model, processor, task, cfg.batch_size,
            cfg.max_new_tokens, cfg.num_beams, cfg.forgetting_max_drop, cfg.forgetting_max_wer_rise, gate)

    # 9. Optional: time our settings against the walkthrough's loop on the same clips.
    if cfg.speed_compare:
        del model
        from lib.dataset.prepared import audio_arrays

        clips = audio_arrays(ds, 0, cfg.speed_clips)
        report["speed_compare"] = speed_compare(source, clips, language, task, cfg.batch_size, cfg.precision,
                                                max_new)
        log.info("eval: speed_compare %s", report["speed_compare"])

    write_report(out, report)
    dump_yaml(resolved.record(cfg), out / "eval_config.yaml")
    for name, m in results.items():
        log.info("eval: %-7s normalized WER %.2f %%  WER %.2f %%  CER %.2f %%  (empty %d, loops %d)",
                 name, 100 * m["normalized_wer"], 100 * m["wer"], 100 * m["cer"], m["empty"], m["repetition"])
    log.info("eval: wrote %s", out / "report.md")

    # 10. The tracking run train recorded (train.report_to=mlflow|wandb): WERs and the report files.
    where = None
    if cfg.track and source.run_dir is not None:
        where = log_eval(source.run_dir, report, [out / "report.md", out / "report.json", out / "training_curves.png"],
                         env)
        if where:
            log.info("eval: logged the report to %s", where)

    # 11. Where the report is, and the numbers.
    summary.done("eval", {"report": out / "report.md", "clips": f"{len(ds)} of {data}/{cfg.split}",
                          **{name: f"normalized WER {summary.percent(m['normalized_wer'], 100)}, WER "
                                   f"{summary.percent(m['wer'], 100)}, CER {summary.percent(m['cer'], 100)}"
                             for name, m in results.items()},
                          "note": random_note,
                          "tracking": where, **next_steps(cfg, env)})
    return report


def next_steps(cfg: EvalConfig, env: Env) -> dict[str, str]:
    """The summary's commands to copy after evaluating a run: its page, then its merged model."""
    if not cfg.run:
        return {}
    return {"next": summary.make_hint("serve", f"RUN={cfg.run}", env=env) + "   # base vs fine-tune on your clips",
            "then": summary.make_hint("export", f"RUN={cfg.run}", env=env) + "   # one merged model to deploy"}


def no_speech_section(cfg: EvalConfig, model, processor, label: str, has_adapter: bool, gen: dict) -> dict:
    """report.json's `hallucination`: lib.inference.hallucination_check on eval_no_speech_clips."""
    from lib.inference import hallucination_check
    from lib.train.augment import eval_no_speech_clips

    clips = eval_no_speech_clips(cfg.no_speech_clips, cfg.no_speech_dir)
    out = hallucination_check(model, processor, clips, label, has_adapter and cfg.compare_base, **gen)
    for name, r in out["results"].items():
        raw = (out.get("ungated") or {}).get(name)
        log.info("eval: %-7s writes text on %d of %d clips without speech (%.0f %%)%s", name, r["with_text"],
                 r["clips"], 100 * r["rate"], f"; {raw['with_text']} before the no-speech gate, mean no-speech "
                 f"probability {out['no_speech_prob'][name]:.2f}" if raw else "")
    return out


if __name__ == "__main__":
    raise SystemExit(run_job("eval", __doc__, EvalConfig, main))
