"""Seq2SeqTrainer wiring for Whisper + LoRA: arguments, WER while training, run-folder logs.

Evaluation generates with the language and task forced (generation config), decodes, and
scores two WERs with jiwer: eval_normalized_wer (lib.metrics.normalize, the number `make eval`
calls the one to track) and eval_wer (exact text, where a missing "।" is an error). Both are
logged; the best checkpoint is the one with the lowest normalized WER and is loaded at the end
(load_best_model_at_end, metric_for_best_model=BEST_METRIC).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from transformers import TrainerCallback

log = logging.getLogger("whisper_ft")

BEST_METRIC = "normalized_wer"
"""what picks the best checkpoint (Trainer logs it as eval_normalized_wer; lower is better)"""


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Exact-text WER in percent (the walkthrough's unit), by lib.metrics like `make eval`;
    rows with an empty reference are skipped because WER is undefined for them."""
    from lib.metrics import wer

    pairs = [(r.strip(), h.strip()) for r, h in zip(references, hypotheses, strict=True) if r.strip()]
    if not pairs:
        return float("nan")
    refs, hyps = zip(*pairs, strict=True)
    return 100.0 * wer(list(refs), list(hyps))


def make_compute_metrics(tokenizer):
    """compute_metrics for Seq2SeqTrainer(predict_with_generate=True):
    {'wer': exact-text percent, 'normalized_wer': percent on lib.metrics.normalize'd text}."""
    from lib.metrics import normalize

    def compute(pred) -> dict[str, float]:
        preds = np.asarray(pred.predictions)
        labels = np.asarray(pred.label_ids).copy()
        # -100 marks padding in labels (and in generated ids when batches are concatenated)
        preds = np.where(preds < 0, tokenizer.pad_token_id, preds)
        labels = np.where(labels < 0, tokenizer.pad_token_id, labels)
        hyps = tokenizer.batch_decode(preds, skip_special_tokens=True)
        refs = tokenizer.batch_decode(labels, skip_special_tokens=True)
        return {
            "wer": word_error_rate(refs, hyps),
            "normalized_wer": word_error_rate([normalize(r) for r in refs], [normalize(h) for h in hyps]),
        }

    return compute


def write_json(path: Path, data: Any) -> None:
    """Atomic: a reader (or a kill) never sees half a file."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=float))
    os.replace(tmp, path)


class LogHistoryWriter(TrainerCallback):
    """Rewrite RUN/log_history.json on every log and eval, so a killed run keeps its curve."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero:
            write_json(self.path, state.log_history)


def training_arguments(cfg, output_dir: Path, precision: str, has_eval: bool):
    """Seq2SeqTrainingArguments from lib.train_config.TrainConfig."""
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
        max_steps=t.max_steps if t.max_steps is not None else -1,
        num_train_epochs=t.epochs,
        fp16=precision == "fp16",
        bf16=precision == "bf16",
        # checkpointing is already on the model (prepare_for_training); Trainer must not redo it reentrantly
        activation_checkpointing=False,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=None,  # lib.checkpoint.CompleteMarker rotates, after the COMPLETE marker
        logging_steps=t.logging_steps,
        logging_first_step=True,
        report_to="none",  # TensorBoard is added as an explicit callback writing to RUN/tb
        predict_with_generate=True,
        generation_max_length=t.generation_max_length,
        load_best_model_at_end=has_eval,
        metric_for_best_model=BEST_METRIC if has_eval else None,
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
        disable_tqdm=False,
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


def wer_summary(state) -> dict[str, Any]:
    """metrics.json's WER fields from a finished Trainer state: the best checkpoint by
    normalized WER with both WERs at that step, and both WERs of the first and last eval."""
    evals = [h for h in state.log_history if f"eval_{BEST_METRIC}" in h]
    at_best = next((h for h in evals if h.get("step") == state.best_global_step), {})
    return {
        "best_by": f"eval_{BEST_METRIC}",
        "best_checkpoint": Path(state.best_model_checkpoint).name if state.best_model_checkpoint else None,
        "best_eval_normalized_wer": state.best_metric,
        "best_eval_wer": at_best.get("eval_wer"),
        "first_eval_normalized_wer": evals[0][f"eval_{BEST_METRIC}"] if evals else None,
        "first_eval_wer": evals[0]["eval_wer"] if evals else None,
        "last_eval_normalized_wer": evals[-1][f"eval_{BEST_METRIC}"] if evals else None,
        "last_eval_wer": evals[-1]["eval_wer"] if evals else None,
    }


def optimizer_steps(n_clips: int, batch_size: int, grad_accum: int, world_size: int,
                    epochs: float, max_steps: int | None) -> int:
    """The optimizer steps Trainer will run, as it counts them: each of `world_size` processes
    reads ceil(n / world) clips (the distributed sampler pads) in ceil(that / batch) batches;
    an epoch is ceil(batches / grad_accum) steps. 1000 clips, batch 8, 2 GPUs: 63 steps an
    epoch, not the 125 of one process."""
    import math

    if max_steps:
        return max_steps
    batches = math.ceil(math.ceil(n_clips / world_size) / batch_size)
    return math.ceil(epochs * max(math.ceil(batches / grad_accum), 1))
