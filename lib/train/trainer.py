"""Seq2SeqTrainer wiring for Whisper + LoRA: the checks before loading, the data, the Trainer and
its callbacks, WER while training, run-folder logs, the metrics a finished run writes.

`make train` (jobs/train.py) is these steps in order: open_data, check_setup (what it resolves, the
language and the precision, is a lib.train.config.TrainPlan, passed along; the TrainConfig stays as
given), training_splits, lib.train.lora.build_training_model, build_trainer, train,
lib.train.checkpoint.save_adapter, run_metrics.

Evaluation generates with the language and task forced (generation config), decodes, and
scores two WERs with jiwer: eval_normalized_wer (lib.metrics.normalize, the number `make eval`
calls the one to track) and eval_wer (exact text, where a missing "।" is an error). Both are
logged; the best checkpoint is the one with the lowest normalized WER and is loaded at the end
(load_best_model_at_end, metric_for_best_model=BEST_METRIC).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from transformers import TrainerCallback

from lib import files, summary

log = logging.getLogger("whisper_ft")

BEST_METRIC = "normalized_wer"
"""what picks the best checkpoint (Trainer logs it as eval_normalized_wer; lower is better)"""
COMPILED_LABEL_MULTIPLE = 64
"""with train.compile, label rows are padded to a multiple of this (lib.train.collator.WhisperCollator.label_multiple)"""


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Exact-text WER in percent (the walkthrough's unit), by lib.metrics like `make eval`, on the
    canonical spelling as `make eval` scores it ("२०२४" = "2024"); rows with an empty reference
    are skipped because WER is undefined for them."""
    from lib.metrics import canonical, wer

    pairs = [(canonical(r).strip(), canonical(h).strip())
             for r, h in zip(references, hypotheses, strict=True) if r.strip()]
    if not pairs:
        return float("nan")
    refs, hyps = zip(*pairs, strict=True)
    return 100.0 * wer(list(refs), list(hyps))


def make_compute_metrics(tokenizer):
    """compute_metrics for Seq2SeqTrainer(predict_with_generate=True):
    {'wer': exact-text percent, 'normalized_wer': percent on lib.metrics.normalize'd text,
    'truncated': hypotheses that ran out of tokens (no <|endoftext|>: their end is missing)}."""
    from lib.metrics import normalize

    def compute(pred) -> dict[str, float]:
        preds = np.asarray(pred.predictions)
        labels = np.asarray(pred.label_ids).copy()
        # -100 marks padding in labels (and in generated ids when batches are concatenated)
        preds = np.where(preds < 0, tokenizer.pad_token_id, preds)
        labels = np.where(labels < 0, tokenizer.pad_token_id, labels)
        hyps = tokenizer.batch_decode(preds, skip_special_tokens=True)
        refs = tokenizer.batch_decode(labels, skip_special_tokens=True)
        # A finished row holds <|endoftext|> (padding is the same id for Whisper); one that hit the
        # generation budget has none, and its missing words count as deletions in both WERs.
        cut = int(sum(not (row == tokenizer.eos_token_id).any() for row in preds))
        if cut:
            log.warning("eval: %d of %d hypotheses hit the generation budget and are cut short; raise "
                        "train.generation_max_length", cut, len(hyps))
        return {
            "wer": word_error_rate(refs, hyps),
            "normalized_wer": word_error_rate([normalize(r) for r in refs], [normalize(h) for h in hyps]),
            "truncated": cut,
        }

    return compute


def write_json(path: Path, data: Any) -> None:
    """Atomic (lib.files.write_json); numbers that json cannot write (numpy, tensors) as floats."""
    files.write_json(path, data, default=float)


class LogHistoryWriter(TrainerCallback):
    """Rewrite RUN/log_history.json on every log and eval, so a killed run keeps its curve."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            write_json(self.path, state.log_history)


def format_log(logs: dict[str, Any], step: int, max_steps: int, elapsed: float | None = None,
               left: float | None = None) -> str:
    """One readable line for a Trainer log dict (what LogLines logs in place of the dict itself):

        step 2/4  loss 10.87  lr 1.00e-03  grad norm 0.613  epoch 0.50  elapsed 9.2 s, about 9.2 s left
        eval at step 2/4: normalized WER 355.56 %, exact-text WER 355.56 %, loss 10.86 (6.9 s)
        training done: 4 steps in 37.8 s, 0.21 samples/s, mean loss 10.88

    WERs are compute_metrics' percents; an eval of one corpus of several (eval_<corpus>_*) names it."""
    where = f"{step}/{max_steps}" if max_steps and max_steps > 0 else str(step)
    clock = "" if elapsed is None else f"  elapsed {summary.elapsed(elapsed)}" + (
        f", about {summary.elapsed(left)} left" if left is not None else "")
    if "train_runtime" in logs:
        return (f"training done: {step} steps in {summary.elapsed(float(logs['train_runtime']))}, "
                f"{float(logs.get('train_samples_per_second') or 0):.2f} samples/s, mean loss "
                f"{float(logs.get('train_loss') or 0):.4g}")
    if "loss" in logs:
        parts = [f"step {where}", f"loss {float(logs['loss']):.4g}"]
        if logs.get("learning_rate") is not None:
            parts.append(f"lr {float(logs['learning_rate']):.2e}")
        if logs.get("grad_norm") is not None:
            parts.append(f"grad norm {float(logs['grad_norm']):.3g}")
        if logs.get("epoch") is not None:
            parts.append(f"epoch {float(logs['epoch']):.2f}")
        return "  ".join(parts) + clock
    wer_keys = [k for k in logs if k.startswith("eval_") and k.endswith(BEST_METRIC)]
    if wer_keys:
        prefix = wer_keys[0][: -len(BEST_METRIC)]  # eval_ or eval_<corpus>_
        corpus = prefix[len("eval_"):].rstrip("_")
        parts = [f"normalized WER {summary.percent(logs[prefix + BEST_METRIC])}"]
        if logs.get(prefix + "wer") is not None:
            parts.append(f"exact-text WER {summary.percent(logs[prefix + 'wer'])}")
        if logs.get(prefix + "loss") is not None:
            parts.append(f"loss {float(logs[prefix + 'loss']):.4g}")
        if logs.get(prefix + "truncated"):
            parts.append(f"{int(logs[prefix + 'truncated'])} hypotheses cut at the generation budget")
        runtime = logs.get(prefix + "runtime")
        return (f"eval{' of ' + corpus if corpus else ''} at step {where}: " + ", ".join(parts)
                + (f" ({summary.elapsed(float(runtime))})" if runtime is not None else ""))
    shown = {k: v for k, v in logs.items() if k != "total_flos"}
    return f"step {where}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                         for k, v in shown.items()) + clock


class LogLines(TrainerCallback):
    """Trainer's logs as format_log lines through our logger, on rank 0. Why: Trainer prints each
    log dict raw ({'loss': '10.9', 'grad_norm': '0.5054', ...}) through its progress bar, or through
    PrinterCallback with disable_tqdm; training_arguments turns the bar off and build_trainer removes
    PrinterCallback, so these lines are the only ones."""

    def __init__(self):
        self.started: float | None = None
        self.first_step = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.monotonic(), state.global_step  # a resumed run starts later

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        elapsed = left = None
        if self.started is not None:
            elapsed = time.monotonic() - self.started
            done = state.global_step - self.first_step
            if done > 0 and state.max_steps > state.global_step:
                left = elapsed / done * (state.max_steps - state.global_step)
        log.info("%s", format_log(logs, state.global_step, state.max_steps, elapsed, left))


def training_arguments(cfg, output_dir: Path, precision: str, has_eval: bool,
                       generation_max_length: int | None = None, steps: int | None = None,
                       best: str = BEST_METRIC):
    """Seq2SeqTrainingArguments from lib.train.config.TrainConfig; generation_max_length: the
    decode budget of evaluation (train.generation_max_length, else eval_budget's); steps: the
    optimizer steps (training_splits': the stream holds exactly their samples, read in order);
    best: the metric that picks the best checkpoint (best_metric)."""
    import torch
    from transformers import Seq2SeqTrainingArguments

    t = cfg.train
    on_cpu = not torch.cuda.is_available()
    return Seq2SeqTrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size or t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.lr,
        warmup_steps=t.warmup_steps,
        max_steps=steps if steps is not None else (t.max_steps if t.max_steps is not None else -1),
        num_train_epochs=t.epochs,
        # the stream (lib/train/stream.py) is already shuffled by position: read in order, so that a
        # resume skips consumed batches by index and continues the same order
        train_sampling_strategy="sequential",
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        # checkpointing is already on the model (prepare_for_training); Trainer must not redo it reentrantly
        activation_checkpointing=False,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # lib.train.checkpoint.CompleteMarker rotates, after the COMPLETE marker
        logging_steps=t.logging_steps,
        logging_first_step=True,
        report_to="none",  # TensorBoard (RUN/tb) and train.report_to's tracker are explicit callbacks
        run_name=cfg.run,  # the tracking run's name (MLflow, W&B)
        predict_with_generate=True,
        # Whisper's generate() counts max_length in new tokens: it adds the prompt's length itself
        generation_max_length=generation_max_length or t.generation_max_length,
        load_best_model_at_end=has_eval,
        metric_for_best_model=best if has_eval else None,
        greater_is_better=False if has_eval else None,
        remove_unused_columns=False,  # the collator needs `audio`, which forward() does not take
        label_names=["labels"],  # PeftModel hides forward's signature; say where the labels are
        dataloader_num_workers=0 if on_cpu else t.num_workers,
        # workers live across epochs: a restart costs each epoch a pause of process start-up + first batch
        dataloader_persistent_workers=not on_cpu and t.num_workers > 0,
        seed=t.seed,
        data_seed=t.seed,
        use_cpu=on_cpu,
        ddp_find_unused_parameters=False,  # frozen base + checkpointing: DDP's search would fail
        # no progress bar: it prints each log dict raw; LogLines writes one line per logging step instead
        disable_tqdm=True,
        torch_compile=t.compile == "model",
    )


def oom_message(cfg) -> str:
    t, m = cfg.train, cfg.model
    return (
        f"out of GPU memory at train.batch_size={t.batch_size}. Lower train.batch_size "
        f"(and raise train.grad_accum to keep the effective batch of {t.batch_size * t.grad_accum}), "
        + ("" if m.gradient_checkpointing else "set model.gradient_checkpointing=true, ")
        + ("" if m.quantization == "nf4" else "or use model.quantization=nf4 (int8 -> nf4 halves the base weights)")
    )


def check_same_run(run_dir: Path, cfg, plan) -> list[str]:
    """A rerun resumes; it must not silently mix checkpoints of a different model, LoRA or data
    (lib.train.checkpoint.check_resume refuses those); returns the other settings that changed, logged.
    The config compared is the one config.yaml records (plan.record: the resolved language)."""
    import yaml

    from lib.train import checkpoint

    old_path = run_dir / "config.yaml"
    if not old_path.is_file():
        return []
    return checkpoint.check_resume(yaml.safe_load(old_path.read_text()) or {}, plan.record(cfg), cfg.run, old_path,
                                   run_dir / "checkpoints", world_size())


def world_size() -> int:
    """torchrun's processes (WORLD_SIZE); 1 without it."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_setup(cfg, env, corpora):
    """Checks that cost seconds, before any weights are loaded or GPU time is spent: the base is
    Whisper, the language is one it knows and the one every corpus of `corpora` (open_data) was
    prepared for, each corpus's labels fit the base's tokenizer, the precision, quantization and
    compiler work here. Returns (processor, lib.train.config.TrainPlan: the resolved language code
    and precision); cfg is left as given."""
    from lib import model as M
    from lib.dataset.prepared import check_tokenizer
    from lib.errors import UserError
    from lib.language import job_language, resolve_language
    from lib.train import lora, tracking
    from lib.train.config import TrainPlan

    M.load_base_config(cfg.model.base, env.hf_token)
    processor = M.load_processor(cfg.model.base, token=env.hf_token)
    first_corpus, _, first = corpora[0]
    language = job_language(processor.tokenizer, cfg.language, manifest=first)
    data_lang = first.get("language")
    if data_lang and resolve_language(data_lang, processor.tokenizer) != language:
        raise UserError(
            f"language={cfg.language} but {first_corpus.name} was prepared for '{data_lang}' (its labels carry that "
            f"language token): set language={data_lang} or prepare the data again for {cfg.language}")
    for c, _, manifest in corpora:
        # Other corpora may be other languages (e.g. English clips against forgetting): their rows'
        # labels carry their own language token, and their validation decodes in it (CorpusTrainer).
        if manifest.get("language"):
            resolve_language(manifest["language"], processor.tokenizer, flag=f"data={c.name}: language")
        check_tokenizer(manifest, processor.tokenizer, c.name, cfg.model.base, "model.base")
    others = {c.label: m.get("language") for c, _, m in corpora[1:] if m.get("language") and
              resolve_language(m["language"], processor.tokenizer) != language}
    if others:
        log.info("data: mixing languages: %s (%s) with %s; each corpus's validation decodes in its own language",
                 first_corpus.label, language, ", ".join(f"{k} ({v})" for k, v in others.items()))
    precision = M.resolve_precision(cfg.model.precision)
    M.check_quantization(cfg.model.quantization)
    if cfg.train.compile != "none":
        lora.check_compiler(cfg.train.compile)
    tracking.check(cfg.train.report_to)
    return processor, TrainPlan(language=language, precision=precision)


def config_lines(cfg, plan, config_path: Path, recipe=None) -> list[str]:
    """The resolved config (cfg with the plan's language and precision) in a few log lines (what the
    run is, the model, the schedule) and where
    all of it is: config.yaml, which the job logs whole only at DEBUG (about 60 lines)."""
    m, lo, t = cfg.model, cfg.lora, cfg.train
    length = f"{t.max_steps} steps" if t.max_steps else f"{t.epochs:g} epochs"
    quant = "" if m.quantization == "none" else f"{m.quantization}, "
    return [
        f"config: run {cfg.run}, data {cfg.data}, language {plan.language}, {cfg.task}"
        + (f"; recipe {recipe.name}" if recipe is not None and recipe.name else "; no recipe (defaults + flags)"),
        f"config: base {m.base} ({quant}{plan.precision}, gradient checkpointing "
        f"{'on' if m.gradient_checkpointing else 'off'}); LoRA r {lo.r}, alpha {lo.alpha} on "
        f"{', '.join(lo.target_modules)}",
        f"config: batch {t.batch_size} x {t.grad_accum} accumulated, lr {t.lr:g} after {t.warmup_steps} warm-up "
        f"steps, {length}; steps between evals {t.eval_steps}, saves {t.save_steps}, logs {t.logging_steps}"
        + ("; train.* sample options on (augmentation)" if t.samples_changed() else ""),
        f"config: every setting in {config_path}",
    ]


def training_samples(t, train_ds, tokenizer, total: int, segment_rows: tuple[int, int] = (0, 0)):
    """The train stream through lib.train.augment.TrainingSamples (no-speech clips interleaved by
    position: lib.train.augment.Interleave), with what it adds logged. segment_rows: (train clips with
    a manifest's segments, train clips), from the manifests (segment_counts)."""
    from lib.train.augment import Interleave, TrainingSamples

    samples = TrainingSamples(train_ds, tokenizer, t)
    with_segments, clips = segment_rows
    log.info("train samples: %d clips + %d no-speech clips (train.no_speech_fraction=%g, %s, label %s); timestamps on "
             "%.0f %% (per segment on the %d of %d train clips whose manifest gave segments, one span of the clip on "
             "the rest), previous-text prompt on %.0f %% of clips; audio: speed +-%g, gain +-%g dB, noise %s",
             samples.n, samples.n_no_speech, t.no_speech_fraction,
             f"{len(samples.files)} files of {t.no_speech_dir}" if samples.files else "generated", t.no_speech_label,
             100 * t.timestamp_probability, with_segments, clips, 100 * t.prompt_probability, t.speed_perturb,
             t.gain_db, "off" if t.noise_snr_db is None else f"SNR {t.noise_snr_db:g}-{t.noise_snr_db + 20:g} dB")
    return Interleave(samples, total, t.seed) if samples.n_no_speech else samples


def packed_samples(t, train_ds, tokenizer, total: int, prefix: list[int]):
    """train.pack: raw windows (lib/train/packing.py) -> training samples, no-speech windows
    interleaved by position (lib.train.augment.Interleave: train.no_speech_fraction of the windows)."""
    from lib.train.augment import Interleave
    from lib.train.packing import PackedSamples

    samples = PackedSamples(train_ds, tokenizer, t, prefix)
    log.info("train samples: %d windows + %d no-speech windows (train.no_speech_fraction=%g, %s, label %s); "
             "previous-text prompt on %.0f %% of windows; audio per clip: speed +-%g, gain +-%g dB; per window: "
             "noise %s", samples.n, samples.n_no_speech, t.no_speech_fraction,
             f"{len(samples.files)} files of {t.no_speech_dir}" if samples.files else "generated", t.no_speech_label,
             100 * t.prompt_probability, t.speed_perturb, t.gain_db,
             "off" if t.noise_snr_db is None else f"SNR {t.noise_snr_db:g}-{t.noise_snr_db + 20:g} dB")
    return Interleave(samples, total, t.seed) if samples.n_no_speech else samples


def segment_counts(corpora) -> tuple[int, int]:
    """(train clips with segments, train clips) over `corpora` (open_data), from their manifests:
    a manifest's `segments` column became those rows' ts_labels; folders prepared before that
    have no count, and no segments."""
    info = [m.get("splits", {}).get("train", {}) for _, _, m in corpora]
    return sum(int(i.get("segment_rows") or 0) for i in info), sum(int(i.get("rows") or 0) for i in info)


def open_data(env, corpora) -> list[tuple[Any, Any, dict[str, Any]]]:
    """[(lib.dataset.corpora.Corpus, folder or URL, manifest)] of `corpora` (the config's corpora():
    `data=`, one corpus or a weighted list)."""
    from lib.dataset.prepared import open_prepared

    return [(c, *open_prepared(env, c.name)) for c in corpora]


def training_splits(cfg, corpora, tokenizer=None):
    """(train stream, validation (one dataset, {corpus: dataset} for several, or None), optimizer
    steps) of `corpora` (open_data), logged. The train stream (lib/train/stream.py) holds exactly the
    samples the run reads, steps x batch x grad_accum x processes; train.* sample options wrap it
    in TrainingSamples. With train.pack a sample is a window of clips (lib/train/packing.py: each
    corpus packed on its own, then mixed), so steps count windows. Validation stays as prepared,
    one clip per sample, so eval WER is comparable."""
    import math

    from lib.dataset.prepared import has_split, load_split
    from lib.errors import UserError
    from lib.train.stream import Decoded, Mixture, ShardStream

    t = cfg.train
    streams = [(c.label, ShardStream(root, manifest, "train", t.seed, t.shuffle_buffer, name=c.label))
               for c, root, manifest in corpora]
    rows = sum(s.n for _, s in streams)
    if rows == 0:
        raise UserError(f"data={cfg.data}: the train split is empty; prepare more data")
    # what the run reads by position: clips, or with train.pack windows of clips (s.n: per epoch)
    parts, unit = streams, "clips"
    if t.pack:
        from lib.train.packing import packed_streams

        parts, unit = packed_streams(streams, t, tokenizer), "windows"
        if len(parts) > 1:
            n_windows = sum(p.n for _, p in parts)
            log.info("data: %d clips -> %d windows (mean %.2f clips, %.1f s of audio per window)", rows, n_windows,
                     rows / n_windows, sum(float(p.seconds.sum(dtype=np.float64)) for _, p in parts) / n_windows)
    units = sum(s.n for _, s in parts)
    world = world_size()
    eff = t.batch_size * t.grad_accum * world
    f = t.no_speech_fraction if t.samples_changed() else 0.0
    per_epoch = math.ceil(units / (1 - f)) if f else units
    steps = optimizer_steps(per_epoch, t.batch_size, t.grad_accum, world, t.epochs, t.max_steps)
    total = steps * eff
    data_len = total - round(total * f)
    if len(parts) == 1:
        train_ds = parts[0][1]
        train_ds.length = data_len
    else:
        weights = [c.weight if c.weight is not None else s.n for (c, _, _), (_, s) in zip(corpora, parts, strict=True)]
        train_ds = Mixture(parts, weights, t.seed, length=data_len)
        share = np.asarray(train_ds.counts) / sum(train_ds.counts)
        log.info("data: mixing %s", ", ".join(
            f"{name} {100 * w:.1f} % ({s.n} {unit}, {data_len * w / s.n:.2f} passes)"
            for (name, s), w in zip(parts, share, strict=True)))
    segments = segment_counts(corpora)
    if t.pack:
        train_ds = packed_samples(t, train_ds, tokenizer, total, parts[0][1].prefix)
    elif t.samples_changed():
        train_ds = training_samples(t, train_ds, tokenizer, total, segments)
    if segments[0] and not t.timestamp_probability and not t.pack:  # packed windows use them
        log.info("data: %d of %d train clips have segments (ts_labels), unused with train.timestamp_probability=0; "
                 "set it (e.g. 0.5) to train that share of samples on them", *segments)

    evals = {}
    for c, root, manifest in corpora:
        if not has_split(manifest, "validation"):
            log.warning("%s has no validation split: no WER for it during training (prepare makes one with "
                        "validation_fraction=)", c.name)
            continue
        ds = load_split(root, "validation", manifest, columns=["id", "audio", "labels", "where"])
        if t.max_eval_samples:
            ds = ds.select(range(min(t.max_eval_samples, len(ds))))
        evals[c.label] = Decoded(ds, c.label)
    if not evals:
        eval_ds = None
        log.warning("data=%s: no validation split: the final adapter is the last step", cfg.data)
    elif len(corpora) == 1:
        eval_ds = next(iter(evals.values()))
    else:
        eval_ds = EvalSets(evals)
        eval_ds.languages = {c.label: m.get("language") for c, _, m in corpora if c.label in evals and m.get("language")}
    n_eval = sum(len(d) for d in evals.values())
    log.info(
        "data: %d train clips in %d shards, %d validation clips; %d x %d x %d processes = %d %s per optimizer "
        "step -> %d steps = %d samples (%.2f passes), shuffle buffer %d", rows,
        sum(len(s.shards) for _, s in streams), n_eval, t.batch_size, t.grad_accum, world, eff, unit, steps, total,
        total / max(per_epoch, 1), t.shuffle_buffer,
    )
    return train_ds, eval_ds, steps


class EvalSets(dict):
    """Validation sets by corpus (the Trainer evaluates a dict one by one), and each one's
    language (`languages`), which its generation is forced to."""

    languages: dict[str, str] = {}


def best_metric(eval_ds) -> str:
    """What picks the best checkpoint: normalized WER; of the first corpus when several are
    validated (Trainer names their metrics eval_<corpus>_normalized_wer)."""
    if isinstance(eval_ds, dict):
        return f"{next(iter(eval_ds))}_{BEST_METRIC}"
    return BEST_METRIC


def eval_budget(cfg, eval_ds, tokenizer) -> int | None:
    """Tokens to generate per validation clip: train.generation_max_length, or what the longest
    validation label needs (lib.inference.decode_budget), logged."""
    from lib.inference import decode_budget

    if eval_ds is None:
        return None
    if cfg.train.generation_max_length:
        return cfg.train.generation_max_length
    sets = eval_ds.values() if isinstance(eval_ds, dict) else [eval_ds]
    lengths = [len(x) for d in sets for x in (d.labels if hasattr(d, "labels") else d.with_format(None)["labels"])]
    budget = decode_budget(lengths, len(tokenizer.prefix_tokens))
    log.info("eval during training: up to %d new tokens per clip (longest validation label %d tokens + 25 %% + 8; "
             "train.generation_max_length= sets it)", budget, max(lengths, default=0))
    return budget


class EvaluateLeftOver(TrainerCallback):
    """On resume, before the first step: evaluate each kept checkpoint whose evaluation was due
    but never logged (left_unevaluated), and let it compete for the best checkpoint as Trainer
    would have (evaluate_left_over).

    Why: a SIGTERM during an evaluation saves the step without its WER (checkpoint.save_now).
    Never evaluated after the resume, that checkpoint could not become the best, and the
    preempted run ended with another adapter than an uninterrupted one (checkpoint-8 instead
    of checkpoint-4). build_trainer hands it the trainer."""

    def __init__(self, keep: int):
        self.keep = keep
        self.trainer = None
        self.evaluated: list[str] = []

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is not None and args.metric_for_best_model and state.global_step > 0:
            self.evaluated = evaluate_left_over(self.trainer, self.keep)


def best_key(args) -> str:
    """The log key of Trainer's metric_for_best_model (Trainer prefixes eval_ when it is missing)."""
    m = args.metric_for_best_model
    return m if m.startswith("eval_") else f"eval_{m}"


def left_unevaluated(root: Path, log_history: list[dict], up_to: int, key: str) -> list[Path]:
    """Complete checkpoints up to step `up_to` with no `key` logged at their step although
    their run owed one: every eval_steps, and at its last step (Trainer's DefaultFlowCallback),
    read from the checkpoint's own trainer_state.json. A SIGTERM save at another step owes none."""
    import json

    from lib.train import checkpoint

    done = {h.get("step") for h in log_history if key in h}
    todo = []
    for ck in checkpoint.checkpoints(root):
        n = checkpoint.step_of(ck)
        if n > up_to or n in done or not checkpoint.is_complete(ck):
            continue
        try:
            saved = json.loads((ck / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        every = saved.get("eval_steps") or 0
        if (every and n % every == 0) or n == saved.get("max_steps"):
            todo.append(ck)
    return todo


def evaluate_left_over(trainer, keep: int) -> list[str]:
    """Evaluate left_unevaluated's checkpoints (at Trainer's on_train_begin of a resumed run),
    each with its own LoRA weights at its own step, and update the best as Trainer's
    _determine_best_metric would have when the evaluation ran in order: lower wins, and a
    tie goes to the earlier step. The resumed weights and step are put back after; rank 0
    rotates (train.keep_checkpoints) with the new best, as the save after that evaluation would
    have. Every process runs it (evaluation gathers across them). Returns the names evaluated."""
    import json
    import math

    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from lib.train import checkpoint

    args, state = trainer.args, trainer.state
    root, key = Path(args.output_dir), best_key(args)
    todo = left_unevaluated(root, state.log_history, state.global_step, key)
    if not todo:
        return []
    rank0 = trainer.is_world_process_zero()
    here, resumed_weights = (state.global_step, state.epoch), None
    try:
        for ck in todo:
            n = checkpoint.step_of(ck)
            if rank0:
                log.warning("%s was saved without its evaluation (the run was stopped during it): evaluating it now, "
                            "so that the best checkpoint is chosen as in an uninterrupted run", ck.name)
            if n != here[0]:  # an older one (left so by an earlier version): its own weights and step
                from safetensors.torch import load_file

                if resumed_weights is None:
                    resumed_weights = {k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}
                set_peft_model_state_dict(trainer.model, load_file(str(ck / "adapter_model.safetensors")))
                state.global_step = n
                state.epoch = json.loads((ck / "trainer_state.json").read_text()).get("epoch")
            value = trainer._evaluate(None, None, skip_scheduler=True).get(key)
            best = state.best_metric
            if best is None:
                best = -math.inf if args.greater_is_better else math.inf
            better = value > best if args.greater_is_better else value < best
            if value is not None and (better or (value == best and n < (state.best_global_step or 0))):
                state.best_metric, state.best_global_step = value, n
                state.best_model_checkpoint = str(root / ck.name)
    finally:
        if resumed_weights is not None:
            set_peft_model_state_dict(trainer.model, resumed_weights)
        state.global_step, state.epoch = here
    state.log_history.sort(key=lambda h: h.get("step", 0))  # stable: an entry stays after its step's loss
    if rank0:
        best = Path(state.best_model_checkpoint) if state.best_model_checkpoint else None
        log.info("evaluated %s on resume; best checkpoint: %s (%s %s)", ", ".join(c.name for c in todo),
                 best.name if best else None, key, summary.percent(state.best_metric))
        checkpoint.rotate(root, keep, best)
    return [c.name for c in todo]


@dataclass
class Callbacks:
    """The callbacks train() and run_metrics() read back."""

    stopper: Any
    timer: Any
    profiler: Any = None


def corpus_trainer():
    """Seq2SeqTrainer whose evaluation of each validation corpus decodes in that corpus's language."""
    from transformers import Seq2SeqTrainer

    class CorpusTrainer(Seq2SeqTrainer):
        def __init__(self, *args, eval_languages: dict[str, str] | None = None, counted: dict | None = None,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.eval_languages = eval_languages or {}
            self.counted = counted if counted is not None else {}
            """running totals of the collator's COUNT_KEYS over this process's training batches"""

        def training_step(self, model, inputs, num_items_in_batch=None):
            from lib.train.collator import COUNT_KEYS

            for k in COUNT_KEYS:  # what the batch holds, for the speed metrics; never the model's input
                if k in inputs:
                    self.counted[k] = self.counted.get(k, 0) + inputs.pop(k)
            return super().training_step(model, inputs, num_items_in_batch)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **gen_kwargs):
            from lib.train.collator import COUNT_KEYS

            for k in COUNT_KEYS:
                inputs.pop(k, None)
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **gen_kwargs)

        def _save_checkpoint(self, model, trial):
            # torch.save on a full disk names no file: tag the folder (lib.files.writing)
            with files.writing(Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"):
                super()._save_checkpoint(model, trial)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval", **gen_kwargs):
            from lib.inference import ONE_WINDOW

            gen_kwargs = {**ONE_WINDOW, **gen_kwargs}  # one pass per clip (see ONE_WINDOW: else it can loop)
            corpus = metric_key_prefix[len("eval_"):] if metric_key_prefix.startswith("eval_") else None
            if corpus in self.eval_languages:
                gen_kwargs.setdefault("language", self.eval_languages[corpus])
            return super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix,
                                    **gen_kwargs)

    return CorpusTrainer


def build_trainer(cfg, model, base, processor, train_ds, eval_ds, run_dir: Path, plan, steps: int,
                  env=None):
    """(Seq2SeqTrainer, Callbacks): the run's arguments, collator, WER metric and callbacks (the
    COMPLETE marker and rotation, log_history.json, TensorBoard and train.report_to's tracker on
    rank 0 (lib/train/tracking.py; needs env), SIGTERM, timing, profiling of the last train.profile_steps steps).
    plan: check_setup's lib.train.config.TrainPlan (the language and precision to train in)."""
    from transformers.integrations import TensorBoardCallback

    from lib.train import checkpoint, tracking
    from lib.train.collator import WhisperCollator
    from lib.train.timing import ProfileSteps, StepTimer

    ckpt_root = run_dir / "checkpoints"
    rank0 = int(os.environ.get("RANK", "0")) == 0
    profiler = None
    if cfg.train.profile_steps:
        # the last steps of the run (after warm-up and compilation), left out of the timing
        profiler = ProfileSteps(steps - cfg.train.profile_steps, cfg.train.profile_steps, run_dir / "profile.txt")
    counted: dict[str, float] = {}
    left_over = EvaluateLeftOver(cfg.train.keep_checkpoints)
    cb = Callbacks(stopper=checkpoint.StopOnSigterm(),
                   timer=StepTimer(warmup=cfg.train.timing_warmup, until=profiler.start if profiler else None,
                                   counted=counted),
                   profiler=profiler)
    processor.tokenizer.set_prefix_tokens(language=plan.language, task=cfg.task)
    languages = getattr(eval_ds, "languages", None) or {}
    trainer = corpus_trainer()(
        eval_languages=languages,
        counted=counted,
        model=model,
        args=training_arguments(cfg, ckpt_root, plan.precision, has_eval=eval_ds is not None,
                                generation_max_length=eval_budget(cfg, eval_ds, processor.tokenizer), steps=steps,
                                best=best_metric(eval_ds)),
        data_collator=WhisperCollator(processor.feature_extractor, base.config.decoder_start_token_id,
                                      start_of_prev=processor.tokenizer.convert_tokens_to_ids("<|startofprev|>"),
                                      # prefix_tokens = <|sot|> <|lang|> <|task|> <|notimestamps|>, set just above
                                      mask_language=(processor.tokenizer.prefix_tokens[1]
                                                     if cfg.train.mask_language_token else None),
                                      count=True, label_multiple=COMPILED_LABEL_MULTIPLE
                                      if cfg.train.compile != "none" else 1),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=processor,
        compute_metrics=make_compute_metrics(processor.tokenizer) if eval_ds is not None else None,
        callbacks=[
            left_over,  # first: on_train_begin evaluates before the others start their clocks
            checkpoint.CompleteMarker(ckpt_root, cfg.train.keep_checkpoints),
            LogHistoryWriter(run_dir / "log_history.json"),
            *([TensorBoardCallback(tensorboard_writer(run_dir / "tb"))] if rank0 else []),
            *(tracking.callbacks(cfg.train.report_to, cfg.run, plan.record(cfg), env, run_dir) if rank0 else []),
            cb.stopper,
            cb.timer,
            *([profiler] if profiler else []),
            LogLines(),
        ],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # disable_tqdm's raw dicts; LogLines says the same, readably
    left_over.trainer = trainer
    return trainer, cb


def tensorboard_writer(log_dir: Path):
    """SummaryWriter for RUN/tb; it writes its event file's header at once (a full disk fails here)."""
    from torch.utils.tensorboard import SummaryWriter

    with files.writing(log_dir):
        return SummaryWriter(log_dir=str(log_dir))


def train(trainer, cb: Callbacks, cfg, run_dir: Path, resume_from: Path | None):
    """trainer.train(), resumed from `resume_from`; SIGTERM -> checkpoint at the next step
    boundary -> Preempted (exit 3, a retry resumes); out of GPU memory -> UserError naming the flags."""
    import torch

    from lib.errors import Preempted, UserError

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    cb.stopper.install()
    from lib.train import checkpoint

    result = None
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except checkpoint.EvalInterrupted as e:
        log.warning("%s: evaluation abandoned, saving checkpoint-%d (the rerun evaluates it)", e,
                    trainer.state.global_step)
        checkpoint.save_now(trainer)
    except torch.OutOfMemoryError:
        raise UserError(oom_message(cfg)) from None
    finally:
        cb.stopper.uninstall()
    if trainer.is_world_process_zero():
        write_json(run_dir / "log_history.json", trainer.state.log_history)
    if cb.stopper.requested:
        raise Preempted(
            f"saved checkpoint-{trainer.state.global_step} in {run_dir / 'checkpoints'}; rerun the same command to resume"
        )
    if cb.stopper.signalled:  # after the last step's check: during its save, or loading the best checkpoint
        raise Preempted(
            f"SIGTERM after the last step (while saving checkpoint-{trainer.state.global_step} or loading the best "
            f"checkpoint): the training is done and saved in {run_dir / 'checkpoints'}; rerun the same command to "
            f"resume, it writes the adapter and metrics.json"
        )
    return result


def run_metrics(trainer, result, cb: Callbacks, cfg, model, run_dir: Path, plan,
                resume_from: Path | None, moved: list[Path], recipe=None,
                changed_on_resume: list[str] | None = None) -> dict[str, Any]:
    """metrics.json of a finished run: WER (best by normalized WER, lib/train/trainer.py BEST_METRIC,
    with the exact-text WER of that step beside it), speed, memory, sizes, what was resumed and
    changed on resume, and which recipe (with what --recipe auto chose) built the config."""
    import torch

    from lib.train import checkpoint
    from lib.train.lora import count_parameters

    trainable, total = count_parameters(model)
    return {
        "global_step": trainer.state.global_step,
        **wer_summary(trainer.state, list(trainer.eval_dataset) if isinstance(trainer.eval_dataset, dict) else None),
        "train_loss": result.metrics.get("train_loss"),
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        # steady state (after train.timing_warmup steps, without eval and saves), all processes
        **cb.timer.summary(cfg.train.batch_size * cfg.train.grad_accum * trainer.args.world_size,
                           trainer.args.world_size),
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "profile": cb.profiler.summary if cb.profiler else None,
        "adapter_size_bytes": checkpoint.dir_size(run_dir / "adapter", "adapter_model*"),
        "trainable_params": trainable,
        "total_params": total,
        "precision": plan.precision,
        "quantization": cfg.model.quantization,
        "recipe": recipe.describe() if recipe is not None else None,
        "resumed_from": resume_from.name if resume_from else None,
        "changed_on_resume": changed_on_resume or [],
        "incomplete_checkpoints_moved": [p.name for p in moved],
    }
def wer_summary(state, corpora: list[str] | None = None) -> dict[str, Any]:
    """metrics.json's WER fields from a finished Trainer state: the best checkpoint by
    normalized WER with both WERs at that step, and both WERs of the first and last eval. With
    several validated corpora (`corpora`), the best is by the first one's WER, and `per_corpus`
    gives each corpus's WERs at the best step and at the first and last eval."""
    prefix = f"eval_{corpora[0]}_" if corpora else "eval_"
    evals = [h for h in state.log_history if f"{prefix}{BEST_METRIC}" in h]
    at_best = next((h for h in evals if h.get("step") == state.best_global_step), {})
    out = {
        "best_by": f"{prefix}{BEST_METRIC}",
        "best_checkpoint": Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
        "best_eval_normalized_wer": state.best_metric,
        "best_eval_wer": at_best.get(f"{prefix}wer"),
        "first_eval_normalized_wer": evals[0][f"{prefix}{BEST_METRIC}"] if evals else None,
        "first_eval_wer": evals[0][f"{prefix}wer"] if evals else None,
        "last_eval_normalized_wer": evals[-1][f"{prefix}{BEST_METRIC}"] if evals else None,
        "last_eval_wer": evals[-1][f"{prefix}wer"] if evals else None,
    }
    if corpora:
        out["per_corpus"] = {}
        for c in corpora:
            rows = [h for h in state.log_history if f"eval_{c}_{BEST_METRIC}" in h]
            best = next((h for h in rows if h.get("step") == state.best_global_step), {})
            out["per_corpus"][c] = {
                "at_best_normalized_wer": best.get(f"eval_{c}_{BEST_METRIC}"), "at_best_wer": best.get(f"eval_{c}_wer"),
                "first_eval_normalized_wer": rows[0][f"eval_{c}_{BEST_METRIC}"] if rows else None,
                "last_eval_normalized_wer": rows[-1][f"eval_{c}_{BEST_METRIC}"] if rows else None,
            }
    return out


def optimizer_steps(n_samples: int, batch_size: int, grad_accum: int, world_size: int,
                    epochs: float, max_steps: int | None) -> int:
    """The optimizer steps Trainer will run, as it counts them: each of `world_size` processes
    reads ceil(n / world) samples (the distributed sampler pads) in ceil(that / batch) batches;
    an epoch is ceil(batches / grad_accum) steps. 1000 clips, batch 8, 2 GPUs: 63 steps an
    epoch, not the 125 of one process. A sample is a clip, or with train.pack a window of clips
    (n = the first epoch's windows: later epochs, packed from another order, differ by a few)."""
    import math

    if max_steps:
        return max_steps
    batches = math.ceil(math.ceil(n_samples / world_size) / batch_size)
    return math.ceil(epochs * max(math.ceil(batches / grad_accum), 1))
