"""Quality table: test WER/CER of every mode `--recipe auto` can pick, against the walkthrough recipe's seed noise.

    python -m lib.tools.bench_quality_table data=synth-hi model=openai/whisper-base   # or a local copy; on a GPU
    python -m lib.tools.bench_quality_table data=synth-hi model=... seeds=5 repeat=nf4/bf16   # the table in docs/results.md
    python -m lib.tools.bench_quality_table data=synth-hi model=... seeds=1 parallel=1 modes=walkthrough,auto

Each row is a fresh `jobs.train` run on the same prepared data (`steps` optimizer steps of
`batch_size`, lr `lr`, warm-up `warmup`), then `jobs.eval` of its adapter on the test split,
once per precision in `eval_precisions` (greedy, max_new_tokens tokens). Rows:

  walkthrough   the walkthrough recipe (int8 base, fp16, checkpointing), seeds 42.. (`seeds`)
  auto          `--recipe auto` on this machine, the same seeds
  pick:...      every other mode lib.train.auto.pickable() finds `choose` returning on some card,
                seed 42 (`repeat` names those to run over `repeat_seeds` seeds)
  excluded:...  measured modes `choose` never picks because they learnt worse (nf4), bf16 and fp16
  diag:...      diagnosis rows: bf16 with an fp32 base, and with a bf16 base not compiled

The walkthrough seeds' spread (max - min) is the noise. Runs go `parallel` at a time (one
GPU holds several whisper-base runs). A run whose eval report exists is reused (resume after
a time limit). Writes DATA_DIR/bench/quality_table.json and prints a Markdown table.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lib.cli import run_job
from lib.env import Env
from lib.errors import UserError
from lib.tools.runner import last_error, run_job_process

log = logging.getLogger("whisper_ft")

HALF_NOCKPT = ["model.quantization=none", "model.precision=bf16", "model.gradient_checkpointing=false",
               "model.base_dtype=compute"]
DIAGNOSE = {
    "diag:bf16 fp32 base, eager": ["model.quantization=none", "model.precision=bf16",
                                   "model.gradient_checkpointing=false", "model.base_dtype=fp32",
                                   "train.compile=none"],
    "diag:bf16 half base, eager": [*HALF_NOCKPT, "train.compile=none"],
}


@dataclass
class QualityTableConfig:
    data: str = ""
    """prepared dataset (DATA_DIR/prepared/NAME) with real speech"""
    model: str = ""
    """real Whisper weights: a local folder or a Hub id"""
    steps: int = 60
    batch_size: int = 8
    lr: float = 1e-3
    warmup: int = 6
    seeds: int = 3
    """seeds 42, 43, ... for the walkthrough and auto rows (the others: seed 42)"""
    modes: str = "walkthrough,auto,pick,excluded,diag"
    """which row groups to run"""
    repeat: str = ""
    """pick rows whose label contains one of these (comma-separated, e.g. nf4/bf16) run over
    repeat_seeds seeds, to tell a mode's loss from seed noise"""
    repeat_seeds: int = 3
    eval_precisions: str = "bf16,fp32"
    """jobs.eval precision= per run (bf16 is what eval's auto uses on such a GPU)"""
    max_new_tokens: int = 225
    parallel: int = 4
    """runs at a time"""

    def __post_init__(self):
        if not self.data or not self.model:
            raise UserError("set data=NAME (a prepared dataset) and model=PATH_OR_HUB_ID (real weights)")
        unknown = set(self.modes.split(",")) - {"walkthrough", "auto", "pick", "excluded", "diag"}
        if unknown:
            raise UserError(f"modes={self.modes}: unknown {sorted(unknown)}; use walkthrough,auto,pick,excluded,diag")
        if min(self.seeds, self.parallel, self.repeat_seeds) < 1:
            raise UserError("seeds, repeat_seeds and parallel must be >= 1")


def rows(cfg: QualityTableConfig, auto_flags: list[str]) -> list[tuple[str, list[str], int]]:
    """(label, train flags, seed); flags == ["auto"] means `--recipe auto`."""
    from lib.train.auto import MEASURED, WALKTHROUGH, Choice, pickable

    groups = cfg.modes.split(",")
    seeds = range(42, 42 + cfg.seeds)
    out = []
    if "walkthrough" in groups:
        out += [("walkthrough int8", [], s) for s in seeds]
    if "auto" in groups:
        out += [("auto", ["auto"], s) for s in seeds]
    repeat = [r for r in cfg.repeat.split(",") if r]

    def add(label: str, flags: list[str]) -> None:
        n = cfg.repeat_seeds if any(r in label for r in repeat) else 1
        out.extend((label, flags, s) for s in range(42, 42 + n))

    if "pick" in groups:
        for c in pickable():
            # auto's own pick is the auto rows; the walkthrough's mode, the walkthrough rows
            if c.flags() != auto_flags and not (c.mode is WALKTHROUGH and c.precision == WALKTHROUGH.precision):
                add(f"pick:{c.mode.label(c.precision)}", c.flags())
    if "excluded" in groups:
        for m in MEASURED:
            if not m.auto:
                for prec in ("bf16", "fp16"):
                    add(f"excluded:{m.label(prec)}", Choice(m, prec, "").flags())
    if "diag" in groups:
        out += [(label, flags, 42) for label, flags in DIAGNOSE.items()]
    return out


def run_one(cfg: QualityTableConfig, env: Env, label: str, flags: list[str], seed: int) -> dict:
    """Train (unless its adapter exists), then eval once per precision (unless reported)."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in label.lower()).strip("-")
    run = f"qt-{slug}-s{seed}"
    run_dir = env.run_dir(run)
    logdir = env.data_dir / "bench" / "quality_table"
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        auto = flags == ["auto"]
        args = [*(["--recipe", "auto"] if auto else []),
                f"run={run}", f"data={cfg.data}", f"model.base={cfg.model}",
                f"train.batch_size={cfg.batch_size}", f"train.max_steps={cfg.steps}", f"train.lr={cfg.lr}",
                f"train.warmup_steps={cfg.warmup}", "train.logging_steps=5", f"train.seed={seed}",
                f"train.eval_steps={10 * cfg.steps}", f"train.save_steps={10 * cfg.steps}",
                # the Trainer generates once at the end: keep it short, the eval job is the measure
                "train.max_eval_samples=8", "train.generation_max_length=48",
                *([] if auto else flags)]
        log.info("quality table %s: jobs.train %s", run, " ".join(args))
        code, output = run_job_process("train", args, env, logdir / f"{run}.train.log")
        if code != 0:
            return {"label": label, "seed": seed, "run": run, "error": f"train exit {code}: {last_error(output)}"}
    result = {"label": label, "seed": seed, "run": run, "flags": flags, "eval": {}}
    for prec in cfg.eval_precisions.split(","):
        out = run_dir / f"eval-{prec}"
        if not (out / "report.json").is_file():
            code, output = run_job_process("eval", [f"run={run}", f"precision={prec}", f"out={out}",
                                                    "compare_base=false", "force=true",
                                                    f"max_new_tokens={cfg.max_new_tokens}"],
                                           env, logdir / f"{run}.eval-{prec}.log")
            if code != 0:
                result["eval"][prec] = {"error": f"eval exit {code}: {last_error(output)}"}
                continue
        rep = json.loads((out / "report.json").read_text())
        m = rep["results"]["adapter"]
        result["eval"][prec] = {k: m[k] for k in ("wer", "cer", "normalized_wer", "normalized_cer",
                                                  "empty", "repetition", "too_long")}
    hist = run_dir / "log_history.json"
    if hist.is_file():
        losses = [h["loss"] for h in json.loads(hist.read_text()) if "loss" in h and "eval_loss" not in h]
        result["last_loss"] = losses[-1] if losses else None
    return result


def main(cfg: QualityTableConfig, env: Env) -> dict:
    import torch

    from lib.train.auto import choose, detect

    if not (env.prepared_dir(cfg.data) / "manifest.json").is_file():
        raise UserError(f"data={cfg.data}: no prepared dataset at {env.prepared_dir(cfg.data)}; run `make prepare`")
    auto_flags = choose(detect(), cfg.batch_size).flags(batch=False)  # the mode; the pick rows hold no batch
    todo = rows(cfg, auto_flags)
    log.info("quality table: %d runs, %d at a time; auto here = %s", len(todo), cfg.parallel, " ".join(auto_flags))
    (env.data_dir / "bench" / "quality_table").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(cfg.parallel) as pool:
        results = list(pool.map(lambda r: run_one(cfg, env, *r), todo))
    precs = cfg.eval_precisions.split(",")
    walk = [r for r in results if r["label"] == "walkthrough int8" and "error" not in r]
    noise = {}
    for p in precs:
        for k in ("normalized_wer", "cer"):
            vals = [r["eval"][p][k] for r in walk if k in r["eval"].get(p, {})]
            noise[f"{p} {k}"] = (min(vals), max(vals)) if vals else None
    summary = {
        "model": cfg.model, "data": cfg.data, "steps": cfg.steps, "batch_size": cfg.batch_size, "lr": cfg.lr,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "auto_here": auto_flags, "walkthrough_range": noise, "results": results,
    }
    out = env.data_dir / "bench" / "quality_table.json"
    out.write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    head = " | ".join(f"{p}: WER / norm. WER / CER / norm. CER % (loops, too long)" for p in precs)
    print(f"\n| run | seed | last loss | {head} |")
    print("|---|---|---|" + "---|" * len(precs))
    for r in results:
        if "error" in r:
            print(f"| {r['label']} | {r['seed']} | {r['error']} |" + " |" * len(precs))
            continue
        cells = []
        for p in precs:
            e = r["eval"].get(p, {})
            cells.append(e.get("error") or (
                f"{100 * e['wer']:.2f} / {100 * e['normalized_wer']:.2f} / {100 * e['cer']:.2f} / "
                f"{100 * e['normalized_cer']:.2f} ({e['repetition']}, {e['too_long']})"))
        loss = f"{r['last_loss']:.4f}" if r.get("last_loss") is not None else ""
        print(f"| {r['label']} | {r['seed']} | {loss} | {' | '.join(cells)} |")
    for k, v in noise.items():
        if v:
            print(f"walkthrough {k}: {100 * v[0]:.2f} .. {100 * v[1]:.2f} % over {len(walk)} seeds")
    print(f"({out})")
    return summary


if __name__ == "__main__":
    raise SystemExit(run_job("bench_quality_table", __doc__, QualityTableConfig, main))
