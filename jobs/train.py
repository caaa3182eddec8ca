"""Fine-tune Whisper with LoRA on a prepared dataset; resumable, preemption-safe.

    python -m jobs.train --recipe jobs/recipes/whisper-large-v2_lora-int8_1gpu.yaml run=hi-v1 data=cv_hi
    make train RUN=hi-v1 DATA=cv_hi          # the same, in the image
    make train RUN=hi-v1 DATA=cv_hi RECIPE=auto   # quantization/precision/checkpointing/batch split for this GPU

`--recipe auto` is the recipe above with model.quantization, model.precision,
model.gradient_checkpointing (and the base dtype, compilation, checkpointed share) and the split
of the effective batch into train.batch_size x train.grad_accum chosen from this GPU's memory,
the longest train label and measured speeds (lib/train/auto.py; the figures: lib/train/measured.json,
or on the GPU it measured, DATA_DIR/bench/large-v2/measured.json from `make bench`); the effective
batch stays what you asked. It logs the choice and why; key=value flags still win over it (naming both
train.batch_size and train.grad_accum keeps that split).

Reads DATA_DIR/prepared/DATA (from `make prepare`), writes DATA_DIR/runs/RUN/:
config.yaml, checkpoints/checkpoint-N/ (adapter + optimizer state, COMPLETE marker last),
adapter/ (LoRA adapter of the best checkpoint by normalized WER + processor + generation
config), log_history.json, metrics.json, tb/, and LOCK while it runs (a second writer exits 2).
Rerunning the same RUN resumes from the newest checkpoint whose COMPLETE marker verifies.
Exit codes: 0 done; 2 config/data error (fix the named flag, do not retry);
3 stopped by SIGTERM, at any moment, with the work saved or resumable (retry: it resumes);
4 out of disk space or quota (the message names the filesystem, the path, the free and needed
bytes; retry only after freeing space); other: crash (retry).
Several GPUs: python -m lib.launch --standalone --nproc_per_node=N -m jobs.train ... (torchrun
that keeps exit codes 2, 3 and 4).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml

from lib import files, hub, runlock, summary
from lib.cli import Recipe, run_job
from lib.config import dump_yaml, to_dict
from lib.env import Env
from lib.train import auto, checkpoint, tracking
from lib.train import trainer as T
from lib.train.config import TrainConfig
from lib.train.lora import build_training_model

log = logging.getLogger("whisper_ft")

# The walkthrough's recipe: the Makefile's default, and the base of `--recipe auto`.
DEFAULT_RECIPE = Path(__file__).resolve().parent / "recipes" / "whisper-large-v2_lora-int8_1gpu.yaml"


def main(cfg: TrainConfig, env: Env, recipe: Recipe | None = None) -> dict:
    """The run, holding the run folder's lock (lib/runlock.py): a second writer exits 2. Under
    torchrun rank 0 holds it for the whole job (the other ranks write no run files). A full disk
    anywhere -> exit 4 naming it (checkpoint.DiskGuard); SIGTERM outside the training loop ->
    exit 3 at once, lock released (checkpoint.StopOutsideLoop; inside it, StopOnSigterm saves)."""
    rank0 = int(os.environ.get("RANK", "0")) == 0
    run_dir = env.run_dir(cfg.run)
    with checkpoint.DiskGuard(run_dir, rank0) as disk, checkpoint.StopOutsideLoop() as stop:
        with runlock.hold(run_dir, enabled=rank0):
            try:
                return _train(cfg, env, recipe, disk, stop)
            finally:
                stop.quiet = True  # the lock's release is not cut short; the work is done or already stopping


def _train(cfg: TrainConfig, env: Env, recipe: Recipe | None, disk: checkpoint.DiskGuard,
           stop: checkpoint.StopOutsideLoop) -> dict:
    # 1. Inputs: the prepared dataset, the hub token, the run folder (only rank 0 writes to it
    #    under torchrun: a second writer could hand the first a half-written config.yaml).
    corpora = T.open_data(env, cfg.corpora())  # [(corpus, folder or URL, manifest)]
    hub.require_token(cfg.hub, env.hf_token)
    run_dir = env.run_dir(cfg.run)
    rank0 = int(os.environ.get("RANK", "0")) == 0

    # 2. Checks that cost seconds, before any weights are loaded or GPU time is spent; what they
    #    resolve (language, precision) is the plan, and config.yaml records it with the config.
    #    A volume with less free space than the last checkpoint took stops here (exit 4).
    processor, plan = T.check_setup(cfg, env, corpora)
    changed_on_resume = []
    if rank0:
        changed_on_resume = T.check_same_run(run_dir, cfg, plan)
        disk.check()
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(plan.record(cfg), run_dir / "config.yaml")
    for line in T.config_lines(cfg, plan, run_dir / "config.yaml", recipe):
        log.info("%s", line)
    log.debug("config:\n%s", yaml.safe_dump(plan.record(cfg), sort_keys=False, allow_unicode=True).rstrip())

    # 3. Data: the train stream (shards, shuffled by position, corpora mixed by weight, train.*
    #    sample options applied) and validation per corpus; audio is decoded and log-mel computed
    #    in the loader's workers.
    train_ds, eval_ds, steps = T.training_splits(cfg, corpora, processor.tokenizer)
    if cfg.train.data_trace:  # every process appends the positions its workers read
        from lib.train.stream import Traced

        run_dir.mkdir(parents=True, exist_ok=True)
        train_ds = Traced(train_ds, run_dir / "data_order.tsv")

    # 4. Model: base (quantized per model.quantization), frozen, LoRA on top. A checkpoint holds
    #    its LoRA weights and Adam's two moments (3 x 4 bytes a parameter) and the processor files.
    model, base = build_training_model(cfg, plan, env.hf_token)
    disk.estimate = 12 * sum(p.numel() for p in model.parameters() if p.requires_grad) + 5_000_000

    # 5. Trainer, and where to resume from (the newest COMPLETE checkpoint, never a half-written one).
    trainer, callbacks = T.build_trainer(cfg, model, base, processor, train_ds, eval_ds, run_dir, plan, steps,
                                         env=env)
    resume_from, moved = checkpoint.find_resumable(run_dir / "checkpoints", move=rank0)
    if resume_from:
        log.info("resuming from %s", resume_from)

    # 6. Train. SIGTERM -> checkpoint at the next step boundary -> exit 3 (retry resumes). A
    #    resumed run first evaluates the checkpoints a SIGTERM left without their evaluation.
    stop.at("the end of training", "the training is saved in its checkpoints; the rerun resumes from the newest")
    result = T.train(trainer, callbacks, cfg, run_dir, resume_from)
    if not trainer.is_world_process_zero():
        return {}

    # 7. The final adapter (best by normalized WER when there was a validation split), never half there.
    #    From here a SIGTERM stops at once: the last checkpoint holds the training, a rerun redoes this end.
    stop.at("saving the adapter", f"the training is done and saved (checkpoint-{trainer.state.global_step}); the "
            "rerun resumes from it and writes the adapter and metrics.json")
    with files.writing(run_dir / "adapter"):
        checkpoint.save_adapter(trainer.model, processor, base.generation_config, run_dir / "adapter")

    # 8. Metrics, and the Hub if asked; set-aside checkpoints are not needed any more.
    stop.at("writing metrics.json")
    metrics = T.run_metrics(trainer, result, callbacks, cfg, model, run_dir, plan, resume_from, moved, recipe,
                            changed_on_resume)
    T.write_json(run_dir / "metrics.json", metrics)
    checkpoint.clean_set_aside(run_dir / "checkpoints", upto=None)
    log.info("done: %d steps, best normalized WER %s (exact-text %s), adapter %.1f MB in %s", metrics["global_step"],
             summary.percent(metrics["best_eval_normalized_wer"]), summary.percent(metrics["best_eval_wer"]),
             metrics["adapter_size_bytes"] / 1e6, run_dir / "adapter")
    if cfg.hub.push:
        stop.at("pushing the adapter to the Hub", "the adapter and metrics.json are written; the rerun resumes "
                "from the last checkpoint, writes them again and pushes")
        card = hub.model_card(kind="adapter", repo_id=cfg.hub.repo_id, base=cfg.model.base, data=cfg.data,
                              language=plan.language, task=cfg.task, recipe=recipe.name if recipe else None,
                              metrics=metrics, lora=to_dict(cfg.lora))
        hub.push_folder(run_dir / "adapter", cfg.hub, env.hf_token, card, "LoRA adapter")

    # 9. Where everything is, and the numbers that matter.
    from lib.model import random_weights_note

    summary.done("train", {
        "outputs": f"{run_dir} (adapter/, checkpoints/, metrics.json, log_history.json, tb/)",
        "best WER": f"{summary.percent(metrics['best_eval_normalized_wer'])} normalized, "
                    f"{summary.percent(metrics['best_eval_wer'])} exact text ({metrics['best_checkpoint']})",
        "note": random_weights_note(base),
        **({"WER per corpus": ", ".join(f"{c} {summary.percent(m['at_best_normalized_wer'])}"
                                         for c, m in metrics["per_corpus"].items()) + " normalized, at the best step"}
           if metrics.get("per_corpus") else {}),
        "steps": f"{metrics['global_step']}, {metrics['train_samples_per_second'] or 0:.2f} samples/s",
        "adapter": f"{metrics['adapter_size_bytes'] / 1e6:.1f} MB, {metrics['trainable_params']:,} trainable params",
        "tracking": tracking.describe(run_dir) or f"TensorBoard: tensorboard --logdir {run_dir / 'tb'}",
        "next": summary.make_hint("eval", f"RUN={cfg.run}", env=env),
    })
    return metrics


def cli(argv: list[str] | None = None) -> int:
    """`python -m jobs.train ...`; `--recipe auto` is the walkthrough recipe + lib.train.auto's choice."""
    return run_job("train", __doc__, TrainConfig, main, argv, computed={auto.AUTO: (DEFAULT_RECIPE, auto.apply_auto)})


if __name__ == "__main__":
    raise SystemExit(cli())
