"""Fine-tune Whisper with LoRA on a prepared dataset; resumable, preemption-safe.

    python -m jobs.train --recipe jobs/recipes/whisper-large-v2_lora-int8_1gpu.yaml run=hi-v1 data=cv-hi
    make train RUN=hi-v1 DATA=cv-hi          # the same, in the image
    make train RUN=hi-v1 DATA=cv-hi RECIPE=auto   # quantization/precision/checkpointing for this GPU

`--recipe auto` is the recipe above with model.quantization, model.precision and
model.gradient_checkpointing chosen from this GPU's memory and measured speeds (lib/recipes.py);
it logs the choice and why; key=value flags still win over it.

Reads DATA_DIR/prepared/DATA (from `make prepare`), writes DATA_DIR/runs/RUN/:
config.yaml, checkpoints/checkpoint-N/ (adapter + optimizer state, COMPLETE marker last),
adapter/ (LoRA adapter of the best checkpoint by normalized WER + processor + generation
config), log_history.json, metrics.json, tb/, and LOCK while it runs (a second writer exits 2).
Rerunning the same RUN resumes from the newest checkpoint whose COMPLETE marker verifies.
Exit codes: 0 done; 2 config/data error (fix the named flag, do not retry);
3 stopped by SIGTERM after saving a checkpoint (retry: it resumes); other: crash (retry).
Several GPUs: python -m lib.launch --standalone --nproc_per_node=N -m jobs.train ... (torchrun
that keeps exit codes 2 and 3).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import yaml

from lib import checkpoint, hub, recipes, runlock
from lib import model as M
from lib.benchmark import ProfileSteps, StepTimer
from lib.cli import run_job
from lib.collator import WhisperCollator
from lib.config import dump_yaml, to_dict
from lib.env import Env
from lib.errors import Preempted, UserError
from lib.prepared import list_prepared, load_split, read_manifest
from lib.train_config import TrainConfig
from lib.trainer import (
    LogHistoryWriter,
    make_compute_metrics,
    oom_message,
    optimizer_steps,
    training_arguments,
    wer_summary,
    write_json,
)

log = logging.getLogger("whisper_ft")

# The walkthrough's recipe: the Makefile's default, and the base of `--recipe auto`.
DEFAULT_RECIPE = Path(__file__).resolve().parent / "recipes" / "whisper-large-v2_lora-int8_1gpu.yaml"


def main(cfg: TrainConfig, env: Env) -> dict:
    import torch

    # 1. Inputs: the prepared dataset, the hub token, the run folder.
    data_dir = env.prepared_dir(cfg.data)
    if not (data_dir / "manifest.json").is_file():
        have = list_prepared(data_dir.parent)
        raise UserError(
            f"data={cfg.data}: no prepared dataset at {data_dir}; run `make prepare` first or pick one of: "
            f"{', '.join(have) if have else '(none prepared yet)'}"
        )
    manifest = read_manifest(data_dir)
    hub.require_token(cfg.hub.push, env.hf_token)
    run_dir = env.run_dir(cfg.run)
    ckpt_root = run_dir / "checkpoints"

    # 2. Checks that cost seconds, before any weights are loaded or GPU time is spent.
    M.load_base_config(cfg.model.base, env.hf_token)
    processor = M.load_processor(cfg.model.base, env.hf_token)
    language = M.resolve_language(processor.tokenizer, cfg.language or manifest.get("language", ""))
    data_lang = manifest.get("language")
    if data_lang and cfg.language and M.resolve_language(processor.tokenizer, data_lang) != language:
        raise UserError(
            f"language={cfg.language} but {cfg.data} was prepared for '{data_lang}' (its labels carry that "
            f"language token): set language={data_lang} or prepare the data again for {cfg.language}"
        )
    cfg.language = language
    precision = M.resolve_precision(cfg.model.precision)
    M.check_quantization(cfg.model.quantization)
    if cfg.train.compile != "none":
        M.check_compiler(cfg.train.compile)
    # Under torchrun every process runs this job; only rank 0 owns the run folder's files
    # (a second writer could hand the first a half-written config.yaml).
    rank0 = int(os.environ.get("RANK", "0")) == 0
    changed_on_resume = []
    if rank0:
        changed_on_resume = _check_same_run(run_dir, cfg)
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, run_dir / "config.yaml")
    log.info("config:\n%s", yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True).rstrip())

    # 3. Data: train and validation splits; log-mel is computed per batch by the collator.
    train_ds = _columns(load_split(data_dir, "train"))
    eval_ds = None
    if (data_dir / "validation").is_dir():
        eval_ds = _columns(load_split(data_dir, "validation"))
        if cfg.train.max_eval_samples:
            eval_ds = eval_ds.select(range(min(cfg.train.max_eval_samples, len(eval_ds))))
    else:
        log.warning("%s has no validation split: no WER during training, the final adapter is the last step", cfg.data)
    if len(train_ds) == 0:
        raise UserError(f"data={cfg.data}: the train split is empty; prepare more data")
    world = int(os.environ.get("WORLD_SIZE", "1"))  # torchrun's processes; 1 without it
    eff = cfg.train.batch_size * cfg.train.grad_accum * world
    steps = optimizer_steps(len(train_ds), cfg.train.batch_size, cfg.train.grad_accum, world,
                            cfg.train.epochs, cfg.train.max_steps)
    log.info(
        "data: %d train clips, %d validation clips; %d x %d x %d processes = %d clips per optimizer step "
        "-> %d steps", len(train_ds), len(eval_ds) if eval_ds is not None else 0,
        cfg.train.batch_size, cfg.train.grad_accum, world, eff, steps,
    )

    # 4. Model: base (quantized per model.quantization), frozen, LoRA on top. Seeded first:
    # lora_A's random init must not depend on whatever ran before in this process.
    from transformers import set_seed

    set_seed(cfg.train.seed)
    t0 = time.time()
    base = M.load_base_model(cfg.model.base, cfg.model.quantization, precision, env.hf_token, cfg.model.base_dtype)
    M.set_generation_language(base, language, cfg.task)
    base = M.prepare_for_training(base, cfg.model.quantization, cfg.model.gradient_checkpointing,
                                  cfg.model.checkpoint_fraction)
    model = M.apply_lora(base, cfg.lora)
    if cfg.train.compile == "layers":
        log.info("compile: %d encoder/decoder layers with torch.compile (compiled on their first step)",
                 M.compile_layers(model))
    trainable, total = M.count_parameters(model)
    log.info(
        "model: %s, %s, %s, checkpointing %s, loaded in %.0f s; trainable params: %s of %s (%.2f%%)",
        cfg.model.base, cfg.model.quantization, precision,
        "on" if cfg.model.gradient_checkpointing else "off", time.time() - t0,
        f"{trainable:,}", f"{total:,}", 100 * trainable / total,
    )
    processor.tokenizer.set_prefix_tokens(language=language, task=cfg.task)

    # 5. Trainer, and where to resume from (the newest COMPLETE checkpoint, never a half-written one).
    from torch.utils.tensorboard import SummaryWriter
    from transformers import Seq2SeqTrainer
    from transformers.integrations import TensorBoardCallback

    resume_from, moved = checkpoint.find_resumable(ckpt_root, move=rank0)
    if resume_from:
        log.info("resuming from %s", resume_from)
    stopper = checkpoint.StopOnSigterm()
    profiler = None
    if cfg.train.profile_steps:
        # the last steps of the run (after warm-up and compilation), left out of the timing
        start = steps - cfg.train.profile_steps
        profiler = ProfileSteps(start, cfg.train.profile_steps, run_dir / "profile.txt")
    timer = StepTimer(warmup=cfg.train.timing_warmup, until=start if profiler else None)
    trainer = Seq2SeqTrainer(
        model=model,
        args=training_arguments(cfg, ckpt_root, precision, has_eval=eval_ds is not None),
        data_collator=WhisperCollator(processor.feature_extractor, base.config.decoder_start_token_id),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=processor,
        compute_metrics=make_compute_metrics(processor.tokenizer) if eval_ds is not None else None,
        callbacks=[
            checkpoint.CompleteMarker(ckpt_root, cfg.train.keep_checkpoints),
            LogHistoryWriter(run_dir / "log_history.json"),
            *([TensorBoardCallback(SummaryWriter(log_dir=str(run_dir / "tb")))] if rank0 else []),
            stopper,
            timer,
            *([profiler] if profiler else []),
        ],
    )

    # 6. Train. SIGTERM -> checkpoint at the next step boundary -> exit 3 (retry resumes).
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    stopper.install()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except checkpoint.EvalInterrupted as e:
        log.warning("%s: evaluation abandoned, saving checkpoint-%d", e, trainer.state.global_step)
        checkpoint.save_now(trainer)
    except torch.OutOfMemoryError:
        raise UserError(oom_message(cfg)) from None
    finally:
        stopper.uninstall()
    if trainer.is_world_process_zero():
        write_json(run_dir / "log_history.json", trainer.state.log_history)
    if stopper.requested:
        raise Preempted(
            f"saved checkpoint-{trainer.state.global_step} in {ckpt_root}; rerun the same command to resume"
        )

    if not trainer.is_world_process_zero():
        return {}

    # 7. The final adapter (best by WER when there was a validation split): weights, processor,
    # generation config with language and task. Written aside, then renamed: never half there.
    tmp = run_dir / "adapter.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    trainer.model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    base.generation_config.save_pretrained(tmp)
    shutil.rmtree(run_dir / "adapter", ignore_errors=True)
    tmp.rename(run_dir / "adapter")

    # 8. Metrics, and the Hub if asked.
    metrics = {
        "global_step": trainer.state.global_step,
        # best by normalized WER (lib/trainer.py BEST_METRIC); the exact-text WER of that step beside it
        **wer_summary(trainer.state),
        "train_loss": result.metrics.get("train_loss"),
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_samples_per_second": result.metrics.get("train_samples_per_second"),
        # steady state (after train.timing_warmup steps, without eval and saves), all processes
        **timer.summary(cfg.train.batch_size * cfg.train.grad_accum * trainer.args.world_size),
        "peak_gpu_memory_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "profile": profiler.summary if profiler else None,
        "adapter_size_bytes": checkpoint.dir_size(run_dir / "adapter", "adapter_model*"),
        "trainable_params": trainable,
        "total_params": total,
        "precision": precision,
        "quantization": cfg.model.quantization,
        "resumed_from": resume_from.name if resume_from else None,
        "changed_on_resume": changed_on_resume,
        "incomplete_checkpoints_moved": [p.name for p in moved],
    }
    write_json(run_dir / "metrics.json", metrics)
    log.info(
        "done: %d steps, best normalized WER %s (exact-text %s), adapter %.1f MB in %s",
        metrics["global_step"], metrics["best_eval_normalized_wer"], metrics["best_eval_wer"],
        metrics["adapter_size_bytes"] / 1e6, run_dir / "adapter",
    )
    if cfg.hub.push:
        (run_dir / "adapter" / "README.md").write_text(hub.model_card(
            repo_id=cfg.hub.repo_id, base=cfg.model.base, data=cfg.data, language=language, task=cfg.task,
            recipe=_recipe_name(), metrics=metrics, lora=to_dict(cfg.lora),
        ))
        hub.push_adapter(run_dir / "adapter", cfg.hub.repo_id, env.hf_token, cfg.hub.private)
    return metrics


def _recipe_name() -> str | None:
    """The --recipe file this process was started with, for the model card (run_job does not pass it)."""
    argv = sys.argv
    for i, a in enumerate(argv):
        if a == "--recipe" and i + 1 < len(argv):
            return Path(argv[i + 1]).name
        if a.startswith("--recipe="):
            return Path(a.split("=", 1)[1]).name
    return None


def _columns(ds):
    """Only what the collator reads, as numpy (no per-sample Python float lists)."""
    return ds.select_columns(["audio", "labels"]).with_format("numpy")


def _check_same_run(run_dir: Path, cfg: TrainConfig) -> list[str]:
    """A rerun resumes; it must not silently mix checkpoints of a different model, LoRA or data."""
    old_path = run_dir / "config.yaml"
    if not old_path.is_file():
        return []
    return checkpoint.check_resume(yaml.safe_load(old_path.read_text()) or {}, to_dict(cfg), cfg.run, old_path,
                                   run_dir / "checkpoints", int(os.environ.get("WORLD_SIZE", "1")))


def locked_main(cfg: TrainConfig, env: Env) -> dict:
    """main() holding the run folder's lock (lib/runlock.py): a second writer exits 2.
    Under torchrun rank 0 holds it for the whole job (the other ranks write no run files)."""
    with runlock.hold(env.run_dir(cfg.run), enabled=int(os.environ.get("RANK", "0")) == 0):
        return main(cfg, env)


def cli(argv: list[str] | None = None) -> int:
    """`python -m jobs.train ...`; `--recipe auto` is read by lib.recipes.expand_auto."""
    hook = functools.partial(recipes.expand_auto, DEFAULT_RECIPE)
    return run_job("train", __doc__, TrainConfig, locked_main, argv, recipe_hook=hook)


if __name__ == "__main__":
    raise SystemExit(cli())
