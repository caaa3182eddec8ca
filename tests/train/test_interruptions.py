"""A train run stopped at a bad moment must end as an uninterrupted one: SIGTERM during an
evaluation (the rerun evaluates what was left), SIGTERM before or after the training loop
(exit 3, lock released, the rerun completes), a full disk (exit 4 naming it, no set-aside
folders left once the run finishes). Every run is compared with one uninterrupted run of the
same settings, to the byte of the final adapter."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.train import cli, main
from lib.env import Env
from lib.errors import EXIT_DISK_FULL, EXIT_PREEMPTED, Preempted
from lib.train import checkpoint
from tests.helpers import sigterm_in_the_first_evaluation
from tests.helpers import train_cfg as cfg
from tests.helpers import train_flags as flags

ROOT = Path(__file__).resolve().parents[2]
# 2 validation clips in 2 generation batches (a SIGTERM can land between them); dropout makes
# the RNG state part of the result
EXTRA = {"train.eval_batch_size": 1, "lora.dropout": 0.1}
ADAPTER = "adapter/adapter_model.safetensors"


@pytest.fixture(scope="module")
def straight(data_dir, tiny_model_dir):
    """The uninterrupted run every test compares with: 6 steps, evaluated and saved at 3 and 6."""
    metrics = main(cfg(tiny_model_dir, "straight", **EXTRA), Env(data_dir=data_dir))
    run = data_dir / "runs" / "straight"
    # What makes the comparisons bite: the first evaluation is the best (the tiny model's WER does
    # not fall in 6 steps, and a tie goes to the earlier step), so a run that never evaluates
    # checkpoint-3 ends with checkpoint-6's weights, another adapter.
    assert metrics["best_checkpoint"] == "checkpoint-3", metrics
    assert (run / ADAPTER).read_bytes() != (run / "checkpoints/checkpoint-6/adapter_model.safetensors").read_bytes()
    return {"metrics": metrics, "run": run, "adapter": (run / ADAPTER).read_bytes()}


def evals(run: Path) -> list[tuple[int, float, float]]:
    hist = json.loads((run / "log_history.json").read_text())
    return [(h["step"], h["eval_normalized_wer"], h["eval_wer"]) for h in hist if "eval_normalized_wer" in h]


def set_aside(run: Path) -> list[str]:
    return sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith(checkpoint.SET_ASIDE))


# --- SIGTERM during an evaluation -----------------------------------------------------------


def test_sigterm_during_evaluation_ends_as_an_uninterrupted_run(data_dir, tiny_model_dir, straight, monkeypatch,
                                                                 caplog):
    """The SIGTERM lands in the first batch of the eval at step 3: checkpoint-3 is saved without
    a WER. The rerun must evaluate it before training on, or it can never be the best."""
    from transformers import Seq2SeqTrainer

    env = Env(data_dir=data_dir)
    real = Seq2SeqTrainer.prediction_step
    calls = sigterm_in_the_first_evaluation(monkeypatch)
    with pytest.raises(Preempted, match="checkpoint-3"):
        main(cfg(tiny_model_dir, "eval-stopped", **EXTRA), env)
    run = data_dir / "runs/eval-stopped"
    assert evals(run) == []  # the eval at step 3 was abandoned
    # A second SIGTERM, during that catch-up evaluation: checkpoint-3 is left as it was
    ck3 = run / "checkpoints/checkpoint-3"
    before = {p.name: p.read_bytes() for p in ck3.iterdir()}
    calls.clear()
    with pytest.raises(Preempted, match="checkpoint-3"):
        main(cfg(tiny_model_dir, "eval-stopped", **EXTRA), env)
    assert calls == [3] and {p.name: p.read_bytes() for p in ck3.iterdir()} == before
    assert "checkpoint-3 is already saved: nothing to write" in caplog.text
    monkeypatch.setattr(Seq2SeqTrainer, "prediction_step", real)
    caplog.clear()
    metrics = main(cfg(tiny_model_dir, "eval-stopped", **EXTRA), env)
    assert metrics["resumed_from"] == "checkpoint-3" and metrics["global_step"] == 6
    assert "checkpoint-3 was saved without its evaluation (the run was stopped during it): evaluating it now" in caplog.text
    assert evals(run) == evals(straight["run"])  # the same evaluations, at the same steps
    assert metrics["best_checkpoint"] == straight["metrics"]["best_checkpoint"] == "checkpoint-3"
    assert (run / ADAPTER).read_bytes() == straight["adapter"]  # max abs difference 0
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]


def test_resume_evaluates_an_older_checkpoint_left_without_its_evaluation(data_dir, tiny_model_dir, straight,
                                                                         caplog):
    """A run resumed by an earlier version trained on past an unevaluated checkpoint-3: the
    log history of checkpoint-6 has no eval at step 3. Resuming (at the last step, no step to
    train) evaluates checkpoint-3 with its own weights and picks the best as the straight run did."""
    run = data_dir / "runs/older-left"
    shutil.copytree(straight["run"], run)
    for name in ("adapter", "metrics.json"):
        shutil.rmtree(run / name) if (run / name).is_dir() else (run / name).unlink()
    ck6 = run / "checkpoints/checkpoint-6"
    state = json.loads((ck6 / "trainer_state.json").read_text())
    state["log_history"] = [h for h in state["log_history"] if not (h["step"] == 3 and "eval_wer" in h)]
    at6 = next(h for h in state["log_history"] if "eval_normalized_wer" in h)
    state.update(best_metric=at6["eval_normalized_wer"], best_global_step=6, best_model_checkpoint=str(ck6))
    (ck6 / "trainer_state.json").write_text(json.dumps(state))
    checkpoint.mark_complete(ck6)

    metrics = main(cfg(tiny_model_dir, "older-left", **EXTRA), Env(data_dir=data_dir))
    assert metrics["resumed_from"] == "checkpoint-6" and metrics["global_step"] == 6
    assert "checkpoint-3 was saved without its evaluation" in caplog.text
    assert [e[:2] for e in evals(run)] == [e[:2] for e in evals(straight["run"])]
    assert metrics["best_checkpoint"] == "checkpoint-3"
    assert (run / ADAPTER).read_bytes() == straight["adapter"]


def test_only_owed_evaluations_are_counted_as_left_over(tmp_path):
    """Due: every eval_steps and at the run's last step; a SIGTERM save at step 4 owes none."""
    from lib.train.trainer import left_unevaluated

    for step, max_steps in ((3, 10), (4, 10), (6, 10), (10, 10)):
        ck = tmp_path / f"checkpoint-{step}"
        ck.mkdir()
        (ck / "trainer_state.json").write_text(json.dumps({"eval_steps": 3, "max_steps": max_steps}))
        (ck / checkpoint.COMPLETE).write_text("{}")
    (tmp_path / "checkpoint-9").mkdir()  # no COMPLETE: never counted
    hist = [{"step": 3, "eval_normalized_wer": 1.0}, {"step": 6, "loss": 1.0}]
    got = left_unevaluated(tmp_path, hist, 10, "eval_normalized_wer")
    assert [p.name for p in got] == ["checkpoint-6", "checkpoint-10"]
    assert [p.name for p in left_unevaluated(tmp_path, hist, 6, "eval_normalized_wer")] == ["checkpoint-6"]


# --- SIGTERM outside the training loop --------------------------------------------------------


@pytest.mark.parametrize("where, doing", [
    ("startup", "SIGTERM during start-up"),
    ("after-loop", "SIGTERM during saving the adapter: the training is done and saved (checkpoint-6)"),
])
def test_sigterm_outside_the_training_loop_exits_3_and_the_rerun_completes(data_dir, tiny_model_dir, straight,
                                                                           tmp_path, where, doing):
    run_name = f"term-{where}"
    run = data_dir / "runs" / run_name
    args = flags(tiny_model_dir, run_name, **EXTRA)
    env_file = tmp_path / "env"
    env_file.write_text(f"DATA_DIR={data_dir}\n")
    job = ["-m", "jobs.train", "--env-file", str(env_file), *args]
    ready = tmp_path / "ready"
    proc = subprocess.Popen([sys.executable, "-m", "tests.train.pause", where, str(ready), *job], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "DATA_DIR": str(data_dir)})
    deadline = time.time() + 300
    while not Path(f"{ready}.0").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, f"rc={proc.returncode}\n{out[-3000:]}"
    said = [line for line in out.splitlines() if line.startswith("preempted:")]
    assert len(said) == 1 and doing in said[0] and "rerun the same command to resume" in said[0], out[-3000:]
    assert "Traceback" not in out
    assert not (run / "LOCK").exists()  # released: the retry starts at once
    assert not (run / "adapter").exists() and not (run / "metrics.json").exists()
    if where == "after-loop":
        assert checkpoint.verify(run / "checkpoints/checkpoint-6") is None

    rerun = subprocess.run([sys.executable, *job], cwd=ROOT, capture_output=True, text=True, timeout=300,
                           env={**os.environ, "DATA_DIR": str(data_dir)})
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 6 and metrics["best_checkpoint"] == "checkpoint-3"
    assert metrics["resumed_from"] == (None if where == "startup" else "checkpoint-6")
    assert (run / ADAPTER).read_bytes() == straight["adapter"]


def test_sigterm_while_loading_the_best_checkpoint_exits_3_and_the_rerun_completes(data_dir, tiny_model_dir,
                                                                                     straight, monkeypatch):
    """After the last step's check, inside trainer.train(): the handler of the loop only notes it."""
    from transformers import Trainer

    real = Trainer._load_best_model

    def load_best_after_sigterm(self):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    env = Env(data_dir=data_dir)
    monkeypatch.setattr(Trainer, "_load_best_model", load_best_after_sigterm)
    with pytest.raises(Preempted, match="SIGTERM after the last step .* rerun the same command to resume"):
        main(cfg(tiny_model_dir, "term-best", **EXTRA), env)
    run = data_dir / "runs/term-best"
    assert not (run / "adapter").exists() and not (run / "LOCK").exists()
    monkeypatch.setattr(Trainer, "_load_best_model", real)
    metrics = main(cfg(tiny_model_dir, "term-best", **EXTRA), env)
    assert metrics["resumed_from"] == "checkpoint-6" and metrics["best_checkpoint"] == "checkpoint-3"
    assert (run / ADAPTER).read_bytes() == straight["adapter"]


# --- a full disk ------------------------------------------------------------------------------


def test_full_disk_at_a_checkpoint_exits_4_naming_it(data_dir, tiny_model_dir, straight, tmp_path, monkeypatch,
                                                     capfd):
    """ENOSPC injected where Python opens a file of checkpoint-3 (the processor's, trainer_state.json):
    exit 4 and one message that says where and how much, the half-written checkpoint deleted, the
    lock released; with space again the rerun completes to the straight run's adapter."""
    import builtins

    real_open = builtins.open

    def full_open(file, mode="r", *a, **k):
        if "checkpoint-3" in str(file) and any(c in mode for c in "wax"):
            raise OSError(28, "No space left on device", str(file))
        return real_open(file, mode, *a, **k)

    env_file = tmp_path / "env"
    env_file.write_text(f"DATA_DIR={data_dir}\n")
    argv = ["--env-file", str(env_file), *flags(tiny_model_dir, "full-injected", **EXTRA)]
    monkeypatch.setattr(builtins, "open", full_open)
    assert cli(argv) == EXIT_DISK_FULL
    monkeypatch.setattr(builtins, "open", real_open)
    err = capfd.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("error: the disk is full")]
    assert len(message) == 1, err[-3000:]
    print(message[0])
    run = data_dir / "runs/full-injected"
    assert f"while writing {run / 'checkpoints/checkpoint-3'}/" in message[0]
    assert "filesystem" in message[0] and " free)" in message[0] and "is needed (one checkpoint" in message[0]
    assert "the half-written checkpoint-3 was deleted" in message[0]
    assert "Traceback" not in err
    assert not (run / "LOCK").exists() and list((run / "checkpoints").iterdir()) == []

    assert cli(argv) == 0
    assert set_aside(run) == []
    assert (run / ADAPTER).read_bytes() == straight["adapter"]


@pytest.fixture
def small_disk():
    """mount(path, bytes): a tmpfs of that size at path; grow(path, bytes). Mounting needs root
    (CAP_SYS_ADMIN); elsewhere the test is skipped and the injected test above still runs."""
    mounted = []

    def mount(path: Path, size: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); "
                        "test_full_disk_at_a_checkpoint_exits_4_naming_it injects ENOSPC instead")
        mounted.append(path)

    def grow(path: Path, size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)

    yield mount, grow
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def test_full_disk_for_real_exits_4_until_space_is_freed(data_dir, tiny_model_dir, straight, tmp_path, small_disk,
                                                         capfd):
    """DATA_DIR/runs on a tmpfs with room for one checkpoint and a half: checkpoint-3 fits,
    checkpoint-6 does not. Exit 4 naming the tmpfs, the path, the free and needed bytes; a retry
    on the still-full disk exits 4 again before loading the model (not a crash in the
    TensorBoard writer); after space is freed the rerun resumes and leaves no set-aside folder."""
    mount, grow = small_disk
    ck3 = straight["run"] / "checkpoints/checkpoint-3"
    pages = sum(-(-p.stat().st_size // 4096) * 4096 for p in ck3.rglob("*") if p.is_file())
    root = tmp_path / "data"
    (root / "prepared").mkdir(parents=True)
    (root / "prepared" / "toy").symlink_to(data_dir / "prepared" / "toy")
    mount(root / "runs", int(pages * 1.5) + 256 * 1024)
    env_file = tmp_path / "env"
    env_file.write_text(f"DATA_DIR={root}\n")
    argv = ["--env-file", str(env_file), *flags(tiny_model_dir, "full", **EXTRA)]
    run = root / "runs" / "full"

    assert cli(argv) == EXIT_DISK_FULL
    err = capfd.readouterr().err
    message = [line for line in err.splitlines() if line.startswith("error: the disk is full")]
    assert len(message) == 1, err[-3000:]
    print(message[0])
    need = checkpoint.checkpoint_bytes(run / "checkpoints/checkpoint-3")
    assert f"tmpfs filesystem tmpfs mounted at {root / 'runs'}" in message[0]
    assert f"while writing {run / 'checkpoints/checkpoint-6'}" in message[0]
    assert f"about {need / 1e6:.1f} MB is needed (the size of checkpoint-3" in message[0]
    assert "it resumes from checkpoint-3" in message[0] and "Traceback" not in err
    assert not (run / "LOCK").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-3"]

    started = time.monotonic()
    assert cli(argv) == EXIT_DISK_FULL  # nobody freed space: the same answer, at once
    err = capfd.readouterr().err
    assert "error: the disk is full" in err and "before writing to" in err and "Traceback" not in err
    print(err.strip().splitlines()[-1])
    assert "tb" not in err.split("error:")[-1].split("before writing to")[1].split()[0]
    print(f"retry on the full disk stopped after {time.monotonic() - started:.1f} s")

    grow(root / "runs", 64 << 20)
    assert cli(argv) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["resumed_from"] == "checkpoint-3" and metrics["best_checkpoint"] == "checkpoint-3"
    assert set_aside(run) == []
    assert (run / ADAPTER).read_bytes() == straight["adapter"]
