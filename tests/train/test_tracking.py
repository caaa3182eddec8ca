"""Experiment tracking (lib/train/tracking.py): train.report_to=mlflow into a local MLflow file store, read
back with MLflow's own client; eval logs its report to the same run; wandb's wiring without wandb. And
what train and eval say on the screen: their log lines and closing summaries (lib/summary.py)."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types

import pytest

from jobs.train import main as train_main
from lib.config import load_config
from lib.env import Env, load_env
from lib.errors import UserError
from lib.train import tracking
from lib.train.config import TrainConfig
from tests.helpers import tone, write_prepared

WORDS = ["नमस्ते", "धन्यवाद", "हाँ", "नहीं"]


def _train_cfg(model_dir, run, **extra) -> TrainConfig:
    flags = {
        "run": run, "data": "toy", "model.base": str(model_dir), "model.quantization": "none",
        "model.precision": "auto", "model.gradient_checkpointing": "false", "lora.r": 4, "lora.alpha": 8,
        "train.batch_size": 2, "train.max_steps": 2, "train.eval_steps": 2, "train.save_steps": 2,
        "train.logging_steps": 1, "train.warmup_steps": 0, "train.generation_max_length": 8,
        "train.num_workers": 0, **extra,
    }
    return load_config(TrainConfig, None, [f"{k}={v}" for k, v in flags.items()])


@pytest.fixture
def data_dir(tmp_path, tiny_model_dir, monkeypatch):
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    clips = [(w, tone(1.0, 200 + 150 * i)) for i, w in enumerate(WORDS)]
    write_prepared(tmp_path / "prepared" / "toy", tiny_model_dir, {"train": clips, "validation": clips[:2],
                                                                   "test": clips[:2]}, language="hi")
    return tmp_path


def test_mlflow_run_params_metrics_and_eval_report_in_a_local_file_store(data_dir, tiny_model_dir, capsys):
    from mlflow import MlflowClient

    from jobs.eval import EvalConfig
    from jobs.eval import main as eval_main

    env = Env(data_dir=data_dir, hf_token="hf_secretvalue123")
    train_main(_train_cfg(tiny_model_dir, "tracked", **{"train.report_to": "mlflow"}), env)
    said = capsys.readouterr().err  # the job's closing summary names the tracking run
    assert "== train done" in said and "MLflow run tracked" in said and str(data_dir / "runs" / "tracked") in said

    record = json.loads((data_dir / "runs" / "tracked" / "tracking.json").read_text())
    assert record["tracking_uri"] == f"file:{data_dir / 'mlruns'}"  # the default: offline, on the data volume
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    run = client.get_run(record["run_id"])
    assert run.info.run_name == "tracked" and run.info.status == "FINISHED"
    params = run.data.params
    # the resolved config, flattened; the language is the resolved one; no TrainingArguments noise
    assert params["train.report_to"] == "mlflow" and params["lora.r"] == "4" and params["language"] == "hi"
    assert params["lora.target_modules"] == "q_proj,v_proj" and "per_device_train_batch_size" not in params
    assert not any("hf_secretvalue123" in v for v in params.values())
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval_normalized_wer")]
    assert steps == [2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [1, 2]

    report = eval_main(EvalConfig(run="tracked", split="test", batch_size=2), env)
    run = client.get_run(record["run_id"])
    got = run.data.metrics["test/adapter/normalized_wer"]
    assert got == pytest.approx(100 * report["results"]["adapter"]["normalized_wer"])
    assert "test/base/normalized_wer" in run.data.metrics
    said = capsys.readouterr().err
    assert "== eval done" in said and "report.md" in said and "MLflow run tracked" in said
    files = {a.path for a in client.list_artifacts(record["run_id"], "eval")}
    assert {"eval/report.md", "eval/report.json"} <= files


def test_resumed_train_continues_the_same_mlflow_run(data_dir, tiny_model_dir):
    from mlflow import MlflowClient

    env = Env(data_dir=data_dir)
    train_main(_train_cfg(tiny_model_dir, "again", **{"train.report_to": "mlflow"}), env)
    first = json.loads((data_dir / "runs" / "again" / "tracking.json").read_text())["run_id"]
    # more steps on the same run: a setting resume allows; the parameter becomes a tag
    train_main(_train_cfg(tiny_model_dir, "again", **{"train.report_to": "mlflow", "train.max_steps": 4,
                                                      "train.eval_steps": 2}), env)
    record = json.loads((data_dir / "runs" / "again" / "tracking.json").read_text())
    assert record["run_id"] == first
    client = MlflowClient(tracking_uri=record["tracking_uri"])
    run = client.get_run(first)
    assert run.data.params["train.max_steps"] == "2" and run.data.tags["changed_on_resume.train.max_steps"] == "4"
    assert [m.step for m in client.get_metric_history(first, "eval_normalized_wer")] == [2, 4]
    assert len(client.search_runs([run.info.experiment_id])) == 1


def test_flat_params_flatten_and_mask_secrets():
    got = tracking.flat_params({"run": "r", "model": {"base": "x/hf_abc123/y"}, "lora": {"t": ["q", "v"]}},
                               ["hf_abc123"])
    assert got == {"run": "r", "model.base": "x/***/y", "lora.t": "q,v"}


def test_report_to_without_its_package_names_the_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(UserError, match=r"train.report_to=wandb .*pip install wandb"):
        tracking.check("wandb")
    tracking.check("tensorboard")
    with pytest.raises(UserError, match="report_to"):
        _train_cfg("base", "r", **{"train.report_to": "comet"})


def test_wandb_runs_offline_without_a_key_and_records_its_run(tmp_path, monkeypatch):
    """The wiring through transformers' WandbCallback, with a stand-in wandb module (the real one is
    not in the lock): offline mode without WANDB_API_KEY, run name = RUN, our config, tracking.json."""
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.setenv(var, "")  # restored after the test: tracking.callbacks sets them for the job
        monkeypatch.delenv(var)
    inits = []

    class Config(dict):
        def update(self, d, allow_val_change=False):
            super().update(d)

    class Run:
        id, config = "abc123", Config()

        def _label(self, **kw):
            pass

    fake = types.ModuleType("wandb")
    fake.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    fake.__path__ = []  # a package: WandbCallback imports wandb.sdk.lib.config_util
    fake.run, fake.config = None, Run.config
    for name in ("wandb.sdk", "wandb.sdk.lib", "wandb.sdk.lib.config_util"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    sys.modules["wandb.sdk.lib.config_util"].ConfigError = type("ConfigError", (Exception,), {})

    def init(**kw):
        import os

        inits.append({**kw, "mode": os.environ.get("WANDB_MODE")})
        fake.run = Run()
        return fake.run

    fake.init = init
    fake.define_metric = lambda *a, **k: None
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_API_KEY", "")  # an env file's empty line is "not set"
    env = load_env(None)
    env = Env(data_dir=tmp_path, wandb_api_key=env.wandb_api_key)
    (cb,) = tracking.callbacks("wandb", "my-run", {"run": "my-run", "lora": {"r": 4}}, env, tmp_path)

    from transformers import TrainerControl, TrainerState, TrainingArguments
    from transformers.integrations import WandbCallback

    assert isinstance(cb, WandbCallback)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), run_name="my-run", report_to="none", use_cpu=True)
    cb.on_train_begin(args, TrainerState(), TrainerControl(), model=None)
    assert inits and inits[0]["mode"] == "offline" and inits[0]["name"] == "my-run"
    assert Run.config["config"] == {"run": "my-run", "lora.r": "4"}  # beside TrainingArguments' fields
    record = json.loads((tmp_path / "tracking.json").read_text())
    assert record == {"backend": "wandb", "run_id": "abc123", "run_name": "my-run", "project": "whisper-finetune",
                      "dir": str(tmp_path), "mode": "offline"}


def test_wandb_key_is_a_secret(tmp_path, monkeypatch):
    f = tmp_path / ".env"
    f.write_text("WANDB_API_KEY=wandb_secret_0123456789\nMLFLOW_TRACKING_URI=http://mlflow:5000\n")
    monkeypatch.setenv("WANDB_API_KEY", "")  # empty is "not set", and load_env's export is undone after
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    env = load_env(f)
    assert "wandb_secret" not in repr(env) and "wandb_secret" not in str(env.describe())
    assert env.describe()["WANDB_API_KEY"] == "set" and "wandb_secret_0123456789" in env.secrets()
    assert tracking.mlflow_uri(env) == "http://mlflow:5000"
    assert tracking.wandb_settings(env)["WANDB_MODE"] == "online"


def test_trainer_logs_read_as_lines():
    from lib.train.trainer import format_log

    assert format_log({"loss": 10.87, "grad_norm": 0.6126, "learning_rate": 0.001, "epoch": 0.5}, 2, 4, 9.2, 9.2) == (
        "step 2/4  loss 10.87  lr 1.00e-03  grad norm 0.613  epoch 0.50  elapsed 9.2 s, about 9.2 s left")
    assert format_log({"eval_loss": 10.86, "eval_wer": 355.5555, "eval_normalized_wer": 355.5555, "eval_truncated": 0,
                       "eval_runtime": 6.936, "epoch": 0.5}, 2, 4) == (
        "eval at step 2/4: normalized WER 355.56 %, exact-text WER 355.56 %, loss 10.86 (6.9 s)")
    assert format_log({"eval_en_normalized_wer": 12.345, "eval_en_wer": 20.0, "eval_en_truncated": 3}, 200, 1000) == (
        "eval of en at step 200/1000: normalized WER 12.35 %, exact-text WER 20.00 %, 3 hypotheses cut at the "
        "generation budget")
    assert format_log({"train_runtime": 37.82, "train_samples_per_second": 0.212, "train_loss": 10.88, "epoch": 1.0},
                      4, 4) == "training done: 4 steps in 37.8 s, 0.21 samples/s, mean loss 10.88"


def test_train_and_eval_say_what_happened_readably(data_dir, tiny_model_dir, capsys, caplog):
    """What a newcomer reads: one line per logging step (no Trainer dicts), the config in a few lines
    and where the rest is, WERs as percents, that the base has random weights, and next commands
    that run where the job ran (a job of `make ... RUNNER=local`)."""
    import logging
    import re

    from jobs.eval import EvalConfig
    from jobs.eval import main as eval_main
    from lib.evaluate.longform import LongformConfig

    caplog.set_level(logging.INFO, logger="whisper_ft")
    env = Env(data_dir=data_dir, runner="local")
    train_main(_train_cfg(tiny_model_dir, "readable"), env)
    said = capsys.readouterr()
    logged = [r.getMessage() for r in caplog.records]
    assert "{'loss'" not in said.out + said.err and "'eval_wer'" not in said.out + said.err
    assert [m for m in logged if re.fullmatch(r"step 1/2  loss [\d.]+  lr \S+  grad norm \S+  epoch 0\.50  "
                                              r"elapsed [\d.]+ s, about [\d.]+ s left", m)]
    assert [m for m in logged if re.fullmatch(r"eval at step 2/2: normalized WER \d+\.\d\d %, exact-text WER "
                                              r"\d+\.\d\d %, loss \S+ \([\d.]+ s\)", m)]
    assert [m for m in logged if m.startswith("training done: 2 steps in ")]
    config = [m for m in logged if m.startswith("config:")]
    assert len(config) == 4 and config[-1] == f"config: every setting in {data_dir / 'runs' / 'readable' / 'config.yaml'}"
    assert re.search(r"best normalized WER \d+\.\d\d % \(exact-text \d+\.\d\d %\)",
                     next(m for m in logged if m.startswith("done: ")))
    assert re.search(r"   note +the base has random weights .*: these WERs mean nothing\n", said.err)
    assert f"   next      make eval RUN=readable RUNNER=local DATA_DIR={data_dir}\n" in said.err

    report = eval_main(EvalConfig(run="readable", split="test", batch_size=2, no_speech_clips=0,
                                  longform=LongformConfig(recordings=0)), env)
    said = capsys.readouterr().err
    assert report["random_weights"] is True
    md = (data_dir / "runs" / "readable" / "eval" / "report.md").read_text()
    assert "The base model has random weights" in md and "the WERs below mean nothing" in md
    assert re.search(r"   note +the base has random weights .*: these WERs mean nothing\n", said)
    assert f"make serve RUN=readable RUNNER=local DATA_DIR={data_dir}" in said
    assert f"make export RUN=readable RUNNER=local DATA_DIR={data_dir}" in said
