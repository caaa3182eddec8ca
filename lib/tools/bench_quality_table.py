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
  unpacked      `--recipe auto` with train.pack=false, the same seeds (group `pack`)
  packed        `--recipe auto` with train.pack=true, `pack_steps` steps (windows of several clips:
                0.28 x the steps, about 0.3 x the GPU time) at the lr auto gives a packed run
                (`pack_lr`), the same seeds (group `pack`)
  packed ...    the packed rows with another share of single-clip windows (group `packmix`): 20 %
                and 5 %; the default is 10 %

Each row also reports the eval's long-form WER (test clips joined into recordings, decoded with
timestamps), the share of valid timestamped segments, how many no-speech clips got text, and
the train job's own run time (train_runtime_s in metrics.json: the GPU time of the training).
With `longer_minutes`, the pack rows are evaluated once more on one recording that long, and the
table gets a line per label: mean and range over its seeds.

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

PACK_STEP_SHARE = 0.28
"""packed rows' steps against the others' (pack_steps=0): a window's step costs about 1.1x an
unpacked one, so 0.28 x the steps is about 0.3 of the GPU time; on a corpus of 2-s clips (a window
holds about 10) those steps see about 3x the clips of the unpacked run"""

PACK_MIXES = {
    "packed 20 % single": ["train.pack_plain_fraction=0", "train.pack_single_fraction=0.2"],
    "packed 5 % single": ["train.pack_plain_fraction=0", "train.pack_single_fraction=0.05"],
}
"""group packmix: the packed rows with other shares of single-clip windows than the default 10 %
(what share costs nothing: each single-clip window carries one clip's speech, a packed one about
five). Measured on the CPU (docs/results.md): 20 % plain windows in place of single-clip ones, clip
WER 24 % (lr 1e-3); at 2e-3, 10 % as good as 20 % over 5 seeds, 5 % worse on 2 seeds of 3"""

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
    """which row groups to run (also: pack, the unpacked and packed rows; packmix, packed with other window mixes)"""
    pack_steps: int = 0
    """optimizer steps of the packed rows; 0 = steps x PACK_STEP_SHARE x batch_size / pack_batch"""
    pack_batch: int = 0
    """windows per step of the packed rows; 0 = batch_size. On whisper-base 17 steps of 8 windows were
    too few steps to learn (clip WER 78 %), 68 of 2 learnt (docs/results.md): try pack_batch=2"""
    pack_lr: float = 0.0
    """learning rate of the packed rows; 0 = lr x lib.train.auto.PACK_LR_FACTOR, what `--recipe auto`
    gives a packed run (on whisper-base lr 2e-3 packed learnt where 1e-3 lagged: docs/results.md)"""
    repeat: str = ""
    """pick rows whose label contains one of these (comma-separated, e.g. nf4/bf16) run over
    repeat_seeds seeds, to tell a mode's loss from seed noise"""
    repeat_seeds: int = 3
    eval_precisions: str = "bf16,fp32"
    """jobs.eval precision= per run (bf16 is what eval's auto uses on such a GPU)"""
    max_new_tokens: int = 225
    longer_minutes: float = 0.0
    """pack and packmix rows: also evaluate long-form on one recording this long (0.5-5 minutes; 0 = no)"""
    parallel: int = 4
    """runs at a time"""

    def __post_init__(self):
        if not self.data or not self.model:
            raise UserError("set data=NAME (a prepared dataset) and model=PATH_OR_HUB_ID (real weights)")
        unknown = set(self.modes.split(",")) - {"walkthrough", "auto", "pick", "excluded", "diag", "pack", "packmix"}
        if unknown:
            raise UserError(f"modes={self.modes}: unknown {sorted(unknown)}; use walkthrough,auto,pick,excluded,diag,"
                            f"pack,packmix")
        if self.longer_minutes and not 0.5 <= self.longer_minutes <= 5:
            raise UserError(f"longer_minutes={self.longer_minutes}: must be 0.5..5 (or 0 for none)")
        if self.pack_batch < 0:
            raise UserError(f"pack_batch={self.pack_batch}: must be >= 0 (0 = batch_size)")
        if self.pack_lr < 0:
            raise UserError(f"pack_lr={self.pack_lr}: must be >= 0 (0 = lr x auto's PACK_LR_FACTOR)")
        if self.pack_steps < 0:
            raise UserError(f"pack_steps={self.pack_steps}: must be >= 0 (0 = steps x {PACK_STEP_SHARE})")
        if min(self.seeds, self.parallel, self.repeat_seeds) < 1:
            raise UserError("seeds, repeat_seeds and parallel must be >= 1")


def rows(cfg: QualityTableConfig, auto_flags: list[str]) -> list[tuple[str, list[str], int]]:
    """(label, train flags, seed); flags == ["auto"] means `--recipe auto`."""
    from lib.train.auto import MEASURED, PACK_LR_FACTOR, WALKTHROUGH, Choice, pickable

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
    batch = cfg.pack_batch or cfg.batch_size
    steps = cfg.pack_steps or max(1, round(cfg.steps * PACK_STEP_SHARE * cfg.batch_size / batch))
    # the warm-up the same share of the run (6 of 60 -> 2 of 17), not a third of it
    packed = ["auto", "train.pack=true", f"train.max_steps={steps}",
              f"train.warmup_steps={round(cfg.warmup * steps / cfg.steps)}",
              *([f"train.batch_size={batch}"] if cfg.pack_batch else []),
              f"train.lr={cfg.pack_lr or cfg.lr * PACK_LR_FACTOR:g}"]
    if "pack" in groups:
        out += [("unpacked", ["auto", "train.pack=false"], s) for s in seeds]
        out += [("packed", packed, s) for s in seeds]
    if "packmix" in groups:
        for label, flags in PACK_MIXES.items():
            out += [(label, [*packed, *flags], s) for s in seeds]
    return out


def run_one(cfg: QualityTableConfig, env: Env, label: str, flags: list[str], seed: int) -> dict:
    """Train (unless its adapter exists), then eval once per precision (unless reported)."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in label.lower()).strip("-")
    run = f"qt-{slug}-s{seed}"
    run_dir = env.run_dir(run)
    logdir = env.data_dir / "bench" / "quality_table"
    auto = flags[:1] == ["auto"]
    if not (run_dir / "adapter" / "adapter_config.json").is_file():
        args = [*(["--recipe", "auto"] if auto else []),
                f"run={run}", f"data={cfg.data}", f"model.base={cfg.model}",
                f"train.batch_size={cfg.batch_size}", f"train.max_steps={cfg.steps}", f"train.lr={cfg.lr}",
                f"train.warmup_steps={cfg.warmup}", "train.logging_steps=5", f"train.seed={seed}",
                f"train.eval_steps={10 * cfg.steps}", f"train.save_steps={10 * cfg.steps}",
                # the Trainer generates once at the end: keep it short, the eval job is the measure
                "train.max_eval_samples=8", "train.generation_max_length=48",
                *(flags[1:] if auto else flags)]  # later flags win (a row's own train.max_steps)
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
        if cfg.longer_minutes and label.split()[0] in ("unpacked", "packed"):
            longer(cfg, env, run, prec, result, logdir)
        m = rep["results"]["adapter"]
        result["eval"][prec] = {k: m[k] for k in ("wer", "cer", "normalized_wer", "normalized_cer",
                                                  "empty", "repetition", "too_long")}
        lf = ((rep.get("longform") or {}).get("results") or {}).get("adapter")
        if lf:
            result["eval"][prec]["longform_wer"] = lf["normalized_wer"]
            result["eval"][prec]["longform_valid"] = lf["timestamps"]["valid_share"]
            result["eval"][prec]["longform_segments"] = lf["timestamps"]["segments"]
        hal = ((rep.get("hallucination") or {}).get("results") or {}).get("adapter")
        if hal:
            result["eval"][prec]["no_speech_with_text"] = f"{hal['with_text']}/{hal['clips']}"
    mfile = run_dir / "metrics.json"
    if mfile.is_file():
        m = json.loads(mfile.read_text())
        result["train_s"] = m.get("train_runtime_s")
        result["steps"] = m.get("global_step")
    hist = run_dir / "log_history.json"
    if hist.is_file():
        losses = [h["loss"] for h in json.loads(hist.read_text()) if "loss" in h and "eval_loss" not in h]
        result["last_loss"] = losses[-1] if losses else None
    return result


def longer(cfg: QualityTableConfig, env: Env, run: str, prec: str, result: dict, logdir) -> None:
    """result["longer"][prec]: long-form WER, valid share and segments on one recording of
    cfg.longer_minutes (an eval with no-speech clips off; its clip scores are the main eval's)."""
    out = env.run_dir(run) / f"eval-{prec}-long{cfg.longer_minutes:g}"
    if not (out / "report.json").is_file():
        code, output = run_job_process("eval", [f"run={run}", f"precision={prec}", f"out={out}", "compare_base=false",
                                                "force=true", f"max_new_tokens={cfg.max_new_tokens}",
                                                f"longform.minutes={cfg.longer_minutes:g}", "longform.recordings=1",
                                                "no_speech_clips=0"],
                                       env, logdir / f"{run}.eval-{prec}-long.log")
        if code != 0:
            result.setdefault("longer", {})[prec] = {"error": f"eval exit {code}: {last_error(output)}"}
            return
    lf = json.loads((out / "report.json").read_text())["longform"]["results"]["adapter"]
    result.setdefault("longer", {})[prec] = {"minutes": cfg.longer_minutes, "longform_wer": lf["normalized_wer"],
                                             "longform_valid": lf["timestamps"]["valid_share"],
                                             "longform_segments": lf["timestamps"]["segments"]}


def label_summary(results: list[dict], prec: str) -> list[str]:
    """One line per label: mean (min..max) over its seeds of normalized WER and CER, long-form WER
    (and the longer recording's), and the train seconds."""
    lines = []
    for label in dict.fromkeys(r["label"] for r in results):
        rs = [r for r in results if r["label"] == label and "error" not in r and "error" not in r["eval"].get(prec, {})]
        if not rs:
            continue

        def stat(values, pct=True):
            v = [x for x in values if x is not None]
            if not v:
                return "-"
            k = 100 if pct else 1
            return f"{k * sum(v) / len(v):.2f} ({k * min(v):.2f}..{k * max(v):.2f})"

        e = [r["eval"][prec] for r in rs]
        longer = [(r.get("longer") or {}).get(prec, {}).get("longform_wer") for r in rs]
        lines.append(f"{label} ({prec}, {len(rs)} seeds): norm. WER {stat(x['normalized_wer'] for x in e)}, "
                     f"norm. CER {stat(x['normalized_cer'] for x in e)}, long-form WER "
                     f"{stat(x.get('longform_wer') for x in e)}, longer {stat(longer)}, train s "
                     f"{stat((r.get('train_s') for r in rs), pct=False)}")
    return lines


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
    head = " | ".join(f"{p}: WER / norm. WER / CER / norm. CER % (loops, too long); long-form norm. WER %, "
                      f"valid segments, no-speech clips with text" for p in precs)
    print(f"\n| run | seed | steps | train s | last loss | {head} |")
    print("|---|---|---|---|---|" + "---|" * len(precs))
    for r in results:
        if "error" in r:
            print(f"| {r['label']} | {r['seed']} | | | {r['error']} |" + " |" * len(precs))
            continue
        cells = []
        for p in precs:
            e = r["eval"].get(p, {})
            cells.append(e.get("error") or (
                f"{100 * e['wer']:.2f} / {100 * e['normalized_wer']:.2f} / {100 * e['cer']:.2f} / "
                f"{100 * e['normalized_cer']:.2f} ({e['repetition']}, {e['too_long']})"
                + (f"; {100 * e['longform_wer']:.2f}, {100 * e['longform_valid']:.0f} % of {e['longform_segments']}"
                   if "longform_wer" in e else "")
                + (f", {e['no_speech_with_text']}" if "no_speech_with_text" in e else "")))
        loss = f"{r['last_loss']:.4f}" if r.get("last_loss") is not None else ""
        train_s = f"{r['train_s']:.0f}" if r.get("train_s") else ""
        print(f"| {r['label']} | {r['seed']} | {r.get('steps', '')} | {train_s} | {loss} | {' | '.join(cells)} |")
    for p in precs:
        for line in label_summary(results, p):
            print(line)
    for k, v in noise.items():
        if v:
            print(f"walkthrough {k}: {100 * v[0]:.2f} .. {100 * v[1]:.2f} % over {len(walk)} seeds")
    print(f"({out})")
    return summary


if __name__ == "__main__":
    raise SystemExit(run_job("bench_quality_table", __doc__, QualityTableConfig, main))
