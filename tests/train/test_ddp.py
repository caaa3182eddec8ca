"""Multi-GPU training path on CPU: the real train job under torchrun (2 processes, gloo) must end
with the same LoRA weights as one process with the same global batch.

    2 processes x train.batch_size=2  ==  1 process x train.batch_size=4   (same seed, same steps)

Why it can match tightly: the train split holds exactly 4 clips (one global batch), so every
optimizer step sees the same 4 clips whatever order the (distributed) sampler picks; every label
has the same number of tokens, so DDP's mean of the two per-process mean losses equals the
single process's mean over all tokens; lora.dropout=0, fp32, no validation split. What is left
is float summation order (gloo all-reduce vs one bigger matmul): ~1e-9 on these weights.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import EVEN_WORDS as WORDS
from tests.helpers import tone, write_even, write_prepared

ROOT = Path(__file__).resolve().parents[2]
# Optimizer steps of every run here. The 1-process run of the first fixture is also the
# uninterrupted reference of the SIGTERM fixture, so the interrupted run needs room to stop mid-run:
# it is stopped after its second logged step, and stops at the end of the step it is in.
STEPS = 12
# Variables that would make a child think it is already inside a torchrun job (e.g. pytest run
# under one); the single-process run must be a plain `python -m jobs.train`.
DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


def _env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(
        DATA_DIR=str(data_dir),
        CUDA_VISIBLE_DEVICES="",  # CPU + gloo even on a GPU runner: this test is the CPU CI check
        OMP_NUM_THREADS="1",  # 2 processes on a 2-core runner: one thread each, no oversubscription
        MKL_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_VERBOSITY="info",  # Trainer's "Instantaneous batch size per device" lines
        PYTHONUNBUFFERED="1",
    )
    return env


def _flags(model_dir: Path, env_file: Path, run: str, batch_size: int, steps: int = STEPS) -> list[str]:
    flags = {
        "run": run, "data": "toy", "model.base": model_dir, "model.quantization": "none",
        "model.precision": "fp32", "model.gradient_checkpointing": "false",
        "lora.r": 4, "lora.alpha": 8, "lora.dropout": 0,
        "train.batch_size": batch_size, "train.grad_accum": 1, "train.max_steps": steps,
        "train.eval_steps": steps, "train.save_steps": steps, "train.logging_steps": 1,
        "train.warmup_steps": 0, "train.lr": 1e-2, "train.seed": 7, "train.num_workers": 0,
        "train.data_trace": "true",
    }
    # an empty env file, so a developer's ./.env (DATA_DIR, tokens) cannot leak into the runs
    return ["--env-file", str(env_file)] + [f"{k}={v}" for k, v in flags.items()]


def _log_history(run_dir: Path) -> list[dict]:
    return [h for h in json.loads((run_dir / "log_history.json").read_text()) if "loss" in h]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Run the train job twice on the same data: 2 processes under torchrun, and 1 process."""
    from transformers import WhisperTokenizer

    tok = WhisperTokenizer.from_pretrained(tiny_model_dir, language="hi", task="transcribe")
    lengths = {w: len(tok(w).input_ids) for w in WORDS}
    assert len(set(lengths.values())) == 1, f"labels must have equal token counts: {lengths}"

    root = tmp_path_factory.mktemp("ddp")
    data_dir = write_even(root / "data", tiny_model_dir)  # WORDS, train split only
    env_file = root / "empty.env"
    env_file.write_text("")
    env = _env(data_dir)

    logs = root / "torchrun-logs"
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "--log-dir", str(logs), "--redirects", "3",  # per-rank stdout/stderr files
         "-m", "jobs.train", *_flags(tiny_model_dir, env_file, "ddp", batch_size=2)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    single = subprocess.run(
        [sys.executable, "-m", "jobs.train", *_flags(tiny_model_dir, env_file, "single", batch_size=4)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    rank_logs = {}
    for rank in (0, 1):
        found = sorted(logs.glob(f"*/attempt_0/{rank}/stderr.log"))
        rank_logs[rank] = found[-1].read_text() if found else ""
    return {"ddp": ddp, "single": single, "rank_logs": rank_logs, "runs": data_dir / "runs", "root": root}


def test_both_ranks_ran_and_exited_0(runs):
    ddp, logs = runs["ddp"], runs["rank_logs"]
    # torchrun exits 0 only when every worker exited 0; its own output names a failed rank
    assert ddp.returncode == 0, f"torchrun rc={ddp.returncode}\n{ddp.stderr[-3000:]}\n{logs[0][-3000:]}\n{logs[1][-3000:]}"
    assert runs["single"].returncode == 0, runs["single"].stderr[-4000:]
    for rank in (0, 1):
        assert logs[rank], f"no per-rank log for rank {rank}: torchrun did not start 2 workers"
        assert "data: 4 train clips" in logs[rank], f"rank {rank} did not reach the data step"
        assert "Traceback" not in logs[rank], logs[rank][-3000:]


def test_two_processes_really_trained_as_one_ddp_job(runs):
    """Not two independent single-process runs, not one process: the Trainer saw world size 2."""
    ddp_ck = runs["runs"] / "ddp" / "checkpoints" / f"checkpoint-{STEPS}"
    one_ck = runs["runs"] / "single" / "checkpoints" / f"checkpoint-{STEPS}"
    # Trainer writes rng_state.pth when world_size == 1, else one rng_state_<process_index>.pth per rank
    assert {p.name for p in ddp_ck.glob("rng_state*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert {p.name for p in one_ck.glob("rng_state*.pth")} == {"rng_state.pth"}
    log0 = runs["rank_logs"][0]
    assert re.search(r"Instantaneous batch size per device = 2\b", log0), log0[-3000:]
    assert re.search(r"Total train batch size \(w\. parallel, distributed & accumulation\) = 4\b", log0)
    # each optimizer step consumed 4 samples (2 per rank): the stream of STEPS x 4 positions
    # (lib/train/stream.py) is the Trainer's one epoch, and every position was read once, by one rank.
    # A lone process at batch 2 would have read only half of them.
    assert [h["epoch"] for h in _log_history(runs["runs"] / "ddp")] == pytest.approx([(i + 1) / STEPS for i in range(STEPS)])
    read = [int(line.split("\t")[0]) for line in (runs["runs"] / "ddp" / "data_order.tsv").read_text().splitlines()]
    assert sorted(read) == list(range(STEPS * 4))


def test_only_rank_0_wrote_the_adapter_and_metrics(runs):
    run = runs["runs"] / "ddp"
    logs = runs["rank_logs"]
    # the "done:" line is logged right after metrics.json, on the process that wrote the adapter
    assert re.search(rf"done: {STEPS} steps", logs[0]), logs[0][-3000:]
    assert "done:" not in logs[1]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert not (run / "adapter.tmp").exists()
    assert json.loads((run / "metrics.json").read_text())["global_step"] == STEPS
    assert (run / "checkpoints" / f"checkpoint-{STEPS}" / "COMPLETE").is_file()


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    ddp_run, one_run = runs["runs"] / "ddp", runs["runs"] / "single"
    a = load_file(str(ddp_run / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(one_run / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and len(a) == 24  # 12 adapted layers x (lora_A, lora_B)
    # PEFT starts every lora_B at zero: nonzero B means the weights moved, so the check below is not vacuous
    assert min(b[k].abs().max().item() for k in b if "lora_B" in k) > 1e-3
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max abs diff, 2 processes vs 1: {diff:.3e}")
    assert diff < 1e-5, f"max abs diff {diff:.3e} between 2-process and 1-process LoRA weights"
    # the logged loss is the same number too (a per-process loss scaled by the world size is not)
    ha, hb = _log_history(ddp_run), _log_history(one_run)
    assert [h["step"] for h in ha] == [h["step"] for h in hb] == list(range(1, STEPS + 1))
    assert [h["loss"] for h in ha] == pytest.approx([h["loss"] for h in hb], rel=1e-4)
    assert [h["grad_norm"] for h in ha] == pytest.approx([h["grad_norm"] for h in hb], rel=1e-3)


# --- SIGTERM to the launcher of a 2-process job (issue 11: runs that survive) -------------------


def _launch(model_dir, env_file, run, logs):
    return [sys.executable, "-m", "lib.launch", "--standalone", "--nproc_per_node=2",
            "--log-dir", str(logs), "--redirects", "3",
            "-m", "jobs.train", *_flags(model_dir, env_file, run, batch_size=2)]


@pytest.fixture(scope="module")
def stopped(runs, tiny_model_dir):
    """2 gloo processes SIGTERMed mid-run through `python -m lib.launch`, then rerun, on the data
    of `runs`, whose 1-process run (the same global batch and steps, uninterrupted) is the reference."""
    root = runs["root"]
    data_dir = runs["runs"].parent
    env_file = root / "empty.env"
    env = _env(data_dir)
    hist = data_dir / "runs" / "stop" / "log_history.json"
    proc = subprocess.Popen(_launch(tiny_model_dir, env_file, "stop", root / "logs-1"), cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        if hist.is_file() and len(_log_history(hist.parent)) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    first_out, _ = proc.communicate(timeout=240)
    first = {"rc": proc.returncode, "out": first_out,
             "ckpts": sorted(p.name for p in (data_dir / "runs/stop/checkpoints").iterdir()),
             "logs": {r: "".join(p.read_text() for p in (root / "logs-1").glob(f"*/attempt_0/{r}/stderr.log"))
                      for r in (0, 1)}}
    ckpt = data_dir / "runs/stop/checkpoints" / first["ckpts"][0]
    first["rng"] = sorted(p.name for p in ckpt.glob("rng_state*.pth"))
    rerun = subprocess.run(_launch(tiny_model_dir, env_file, "stop", root / "logs-2"), cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=300)
    return {"first": first, "rerun": rerun, "single": runs["single"], "runs": data_dir / "runs"}


def test_sigterm_to_the_launcher_saves_one_step_on_both_ranks_and_exits_3(stopped):
    first = stopped["first"]
    assert first["rc"] == 3, f"rc={first['rc']}\n{first['out'][-3000:]}\n{first['logs'][0][-3000:]}"
    assert len(first["ckpts"]) == 1 and first["ckpts"][0].startswith("checkpoint-"), first["ckpts"]
    step = int(first["ckpts"][0].split("-")[1])
    assert 1 <= step < STEPS, "the SIGTERM landed after the run had finished: raise STEPS"
    assert first["rng"] == ["rng_state_0.pth", "rng_state_1.pth"]  # both ranks saved that step
    for rank in (0, 1):
        stops = re.findall(r"stopping at step (\d+) on every process", first["logs"][rank])
        assert stops == [str(step)], (rank, first["logs"][rank][-3000:])
        assert "preempted: saved checkpoint-" in first["logs"][rank]
    assert "workers reported {'0': '3', '1': '3'}: exit 3" in first["out"]


def test_rerun_resumes_to_the_weights_of_an_uninterrupted_run(stopped):
    rerun, single = stopped["rerun"], stopped["single"]
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]
    metrics = json.loads((stopped["runs"] / "stop" / "metrics.json").read_text())
    assert metrics["resumed_from"] == stopped["first"]["ckpts"][0] and metrics["global_step"] == STEPS
    a = load_file(str(stopped["runs"] / "stop" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(stopped["runs"] / "single" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"max abs diff, interrupted 2 processes vs uninterrupted 1 process: {diff:.3e}")
    assert diff < 1e-5


def test_logged_step_count_accounts_for_the_processes():
    from lib.train.trainer import optimizer_steps

    # 1000 clips, batch 8: 125 steps an epoch alone, 63 on 2 GPUs (500 clips each, last batch short)
    assert optimizer_steps(1000, 8, 1, 1, 1.0, None) == 125
    assert optimizer_steps(1000, 8, 1, 2, 1.0, None) == 63
    assert optimizer_steps(1000, 8, 4, 2, 3.0, None) == 48  # ceil(63 / 4) = 16 an epoch
    assert optimizer_steps(1000, 8, 1, 2, 1.0, 7) == 7
    # and it is the count Trainer runs: the DDP run above logged one epoch per step of its 4 clips
    # (2 processes x batch 2), i.e. 1 step an epoch
    assert optimizer_steps(len(WORDS), 2, 1, 2, float(STEPS), None) == STEPS


def test_launcher_exit_code_from_the_workers_reports():
    from lib.launch import outcome

    assert outcome({"0": "3", "1": "3"}) == 3  # every worker saved and stopped: retry, it resumes
    assert outcome({"0": "3", "1": "started"}) == 1  # one was SIGKILLed before it saved
    assert outcome({"0": "2", "1": "started"}) == 2  # a config error on rank 0: do not retry
    assert outcome({"0": "4", "1": "started"}) == 4  # a full disk: do not retry until space is freed
    assert outcome({"0": "3", "1": "0"}) == 3  # SIGTERM while rank 0 wrote the adapter, rank 1 done
    assert outcome({"0": "0", "1": "started"}) == 1
    assert outcome({"0": "75", "1": "started"}) == 75  # rank 0's bucket did not answer: retry later
    assert outcome({"0": "75", "1": "2"}) == 2
    assert outcome({}) == 1


# --- SIGTERM during an evaluation of a 2-process job ------------------------------------------
EVAL_STEPS = 2  # evaluated and saved at 2 and 4


def _eval_flags(model_dir, env_file, run):
    return [*_flags(model_dir, env_file, run, batch_size=2, steps=2 * EVAL_STEPS),
            f"train.eval_steps={EVAL_STEPS}", f"train.save_steps={EVAL_STEPS}", "train.eval_batch_size=1",
            "train.generation_max_length=8", "train.data_trace=false"]


@pytest.fixture(scope="module")
def eval_stopped(tmp_path_factory, tiny_model_dir):
    """2 gloo processes through lib.launch, with validation: uninterrupted; SIGTERMed while both
    ranks generate the first batch of the eval at step 2 (tests/train/pause.py holds them there),
    then rerun."""
    root = tmp_path_factory.mktemp("ddp-eval")
    data_dir = root / "data"
    clips = [(w, tone(1.0, 200 + 150 * i)) for i, w in enumerate(WORDS)]
    write_prepared(data_dir / "prepared" / "toy", tiny_model_dir, {"train": clips, "validation": clips[:2]},
                   language="hi")
    env_file = root / "empty.env"
    env_file.write_text("")
    env = _env(data_dir)
    launch = [sys.executable, "-m", "lib.launch", "--standalone", "--nproc_per_node=2"]

    straight = subprocess.run([*launch, "-m", "jobs.train", *_eval_flags(tiny_model_dir, env_file, "straight")],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    ready = root / "ready"
    proc = subprocess.Popen([*launch, "--log-dir", str(root / "logs-1"), "--redirects", "3",
                             "-m", "tests.train.pause", "eval", str(ready),
                             "-m", "jobs.train", *_eval_flags(tiny_model_dir, env_file, "stopped")],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        if all(Path(f"{ready}.{r}").exists() for r in (0, 1)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    Path(f"{ready}.go").write_text("")  # let both ranks finish the batch they are in
    first_out, _ = proc.communicate(timeout=300)
    first = {"rc": proc.returncode, "out": first_out,
             "ckpts": sorted(p.name for p in (data_dir / "runs/stopped/checkpoints").iterdir()),
             "hist": json.loads((data_dir / "runs/stopped/log_history.json").read_text())}
    rerun = subprocess.run([*launch, "--log-dir", str(root / "logs-2"), "--redirects", "3",
                            "-m", "jobs.train", *_eval_flags(tiny_model_dir, env_file, "stopped")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    rerun_log = "".join(p.read_text() for p in (root / "logs-2").glob("*/attempt_0/0/stderr.log"))
    return {"straight": straight, "first": first, "rerun": rerun, "rerun_log": rerun_log, "runs": data_dir / "runs"}


def test_sigterm_during_an_evaluation_of_2_processes_ends_as_an_uninterrupted_run(eval_stopped):
    straight, first, rerun, runs = (eval_stopped[k] for k in ("straight", "first", "rerun", "runs"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    best = json.loads((runs / "straight/metrics.json").read_text())["best_checkpoint"]
    # the first eval is the best (a tie goes to the earlier step): a run that never evaluates
    # checkpoint-2 ends with checkpoint-4's weights
    assert best == f"checkpoint-{EVAL_STEPS}"
    assert first["rc"] == 3, f"rc={first['rc']}\n{first['out'][-3000:]}"
    assert first["ckpts"] == [f"checkpoint-{EVAL_STEPS}"]
    assert not [h for h in first["hist"] if "eval_normalized_wer" in h]  # the eval was abandoned
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    metrics = json.loads((runs / "stopped/metrics.json").read_text())
    assert metrics["resumed_from"] == f"checkpoint-{EVAL_STEPS}" and metrics["best_checkpoint"] == best
    assert f"checkpoint-{EVAL_STEPS} was saved without its evaluation" in eval_stopped["rerun_log"]

    def evals(run):
        hist = json.loads((runs / run / "log_history.json").read_text())
        return [(h["step"], h["eval_normalized_wer"]) for h in hist if "eval_normalized_wer" in h]

    assert evals("stopped") == evals("straight")
    a = (runs / "stopped/adapter/adapter_model.safetensors").read_bytes()
    assert a == (runs / "straight/adapter/adapter_model.safetensors").read_bytes()  # max abs difference 0
