"""Experiment tracking: `train.report_to=` tensorboard (default), mlflow or wandb, through
Trainer's own integrations (transformers.integrations MLflowCallback / WandbCallback).

RUN/tb (TensorBoard) is always written: it is local, small, and what `tensorboard --logdir`
users expect. mlflow and wandb are added on top of it.

One tracking run per RUN: train records it in RUN/tracking.json, a resumed train continues it,
and `make eval RUN=...` logs its WERs and report.md/report.json to it (log_eval). The tracking
run's name is RUN; its parameters are the resolved config, flattened (train.lr, lora.r, ...),
never TrainingArguments' hundred fields. Configs hold no secrets (lib/env.py reads those), and
a value that contains one is masked anyway.

Offline by default, so a run on a machine without network still tracks:
- mlflow: MLFLOW_TRACKING_URI from the env file, else the file store file:DATA_DIR/mlruns
  (`mlflow ui --backend-store-uri data/mlruns` shows every run of the data volume);
- wandb: WANDB_MODE=offline unless WANDB_API_KEY is set; files under DATA_DIR/wandb
  (`wandb sync data/wandb/offline-run-*` uploads them later).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Any

from lib.errors import UserError

log = logging.getLogger("whisper_ft")

BACKENDS = ("tensorboard", "mlflow", "wandb")
RECORD = "tracking.json"
"""RUN/tracking.json: which tracking run this RUN logs to (backend, run id, where)"""
EXPERIMENT = "whisper-finetune"
"""MLflow experiment / W&B project when MLFLOW_EXPERIMENT_NAME / WANDB_PROJECT are unset"""
# Package to import, and what to install when it is missing (mlflow-skinny is in the lock; wandb is
# not: its 20 MB wheel bundles a Go service that a run tracked with MLflow or TensorBoard never needs).
_PACKAGES = {"mlflow": ("mlflow", "pip install mlflow-skinny"), "wandb": ("wandb", "pip install wandb")}
# MLflow refuses a parameter value longer than this (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
# is 6000 in 3.x; 500 in 2.x): cut, rather than lose the parameter or the run.
_MAX_PARAM_LEN = 500


def check(report_to: str) -> None:
    """Before any weights load: the package the backend needs is importable."""
    if report_to not in _PACKAGES:
        return
    module, install = _PACKAGES[report_to]
    if importlib.util.find_spec(module) is None:
        raise UserError(f"train.report_to={report_to} needs the {module} package, which is not installed: "
                        f"{install} (or train.report_to=tensorboard)")


def flat_params(config: dict[str, Any], secrets: list[str] = ()) -> dict[str, str]:
    """{'train.lr': '0.001', 'lora.target_modules': 'q_proj,v_proj', ...}: the resolved config as
    tracking parameters (strings), with any secret value masked as ***."""
    out: dict[str, str] = {}

    def walk(prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(f"{prefix}.{k}" if prefix else str(k), x)
            return
        s = ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)
        for secret in secrets:
            if secret:
                s = s.replace(secret, "***")
        out[prefix] = s[:_MAX_PARAM_LEN]

    walk("", config)
    return out


def read_record(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else {}


def describe(run_dir: Path) -> str | None:
    """Where RUN's tracking run is, for the job summaries; None when only TensorBoard tracks it."""
    r = read_record(run_dir)
    if r.get("backend") == "mlflow":
        return f"MLflow run {r['run_name']} ({r['run_id'][:8]}) in {r['tracking_uri']}"
    if r.get("backend") == "wandb":
        return f"W&B run {r['run_name']} ({r['run_id']}, {r.get('mode', 'online')}) in project {r['project']}"
    return None


def _write_record(run_dir: Path, record: dict[str, Any]) -> None:
    from lib.files import write_json

    write_json(Path(run_dir) / RECORD, record)


def mlflow_uri(env) -> str:
    """MLFLOW_TRACKING_URI (env file or environment), else the file store on the data volume."""
    uri = getattr(env, "mlflow_tracking_uri", None) or f"file:{Path(env.data_dir) / 'mlruns'}"
    if uri.startswith("file:"):
        # MLflow 3 keeps the file store in maintenance mode and refuses it unless asked; it is the
        # one backend that needs no server and no database, which an offline batch job wants.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return uri


def wandb_settings(env) -> dict[str, str]:
    """The W&B environment train and eval run under: offline unless there is an API key."""
    mode = getattr(env, "wandb_mode", None) or ("online" if getattr(env, "wandb_api_key", None) else "offline")
    return {"WANDB_MODE": mode, "WANDB_DIR": str(Path(env.data_dir)),
            "WANDB_PROJECT": os.environ.get("WANDB_PROJECT") or EXPERIMENT}


def callbacks(report_to: str, run: str, config: dict[str, Any], env, run_dir: Path) -> list:
    """The Trainer callbacks for train.report_to (none for tensorboard: build_trainer adds RUN/tb)."""
    if report_to not in _PACKAGES:
        return []
    check(report_to)
    params = flat_params(config, env.secrets())
    if report_to == "mlflow":
        return [_mlflow_callback(run, params, mlflow_uri(env), run_dir)]
    if report_to == "wandb":
        os.environ.update(wandb_settings(env))
        previous = read_record(run_dir)
        if previous.get("backend") == "wandb":
            # a resumed train continues the same W&B run rather than starting a second one
            os.environ["WANDB_RUN_ID"] = previous["run_id"]
            os.environ["WANDB_RESUME"] = "allow"
        return [_wandb_callback(params, run_dir)]
    return []


def _mlflow_callback(run: str, params: dict[str, str], uri: str, run_dir: Path):
    from transformers.integrations import MLflowCallback

    class MlflowTracker(MLflowCallback):
        """MLflowCallback with our run: named RUN, the resolved config as parameters, and the same
        tracking run again when train resumes (RUN/tracking.json)."""

        def setup(self, args, state, model):
            self._initialized = True
            # synchronous: a kill between steps leaves no metric queued in a background thread
            self._async_log = False
            if not state.is_world_process_zero:
                return
            ml = self._ml_flow
            ml.set_tracking_uri(uri)
            experiment = ml.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT)
            previous = read_record(run_dir)
            active = None
            if previous.get("backend") == "mlflow" and previous.get("tracking_uri") == uri:
                try:
                    active = ml.start_run(run_id=previous["run_id"])
                except Exception as e:  # the store was moved or wiped: track from here in a new run
                    log.warning("tracking: cannot continue MLflow run %s (%s); starting a new one",
                                previous["run_id"], e)
            if active is None:
                active = ml.start_run(run_name=run, experiment_id=experiment.experiment_id)
            self._auto_end_run = True
            run_id = active.info.run_id
            _write_record(run_dir, {"backend": "mlflow", "tracking_uri": uri, "run_id": run_id,
                                    "experiment_id": experiment.experiment_id, "run_name": run})
            # A parameter, once logged, cannot change: a resume with other (allowed) settings
            # records the new values as tags instead of failing the run.
            logged = ml.get_run(run_id).data.params
            new = {k: v for k, v in params.items() if k not in logged}
            changed = {f"changed_on_resume.{k}": v for k, v in params.items() if k in logged and logged[k] != v}
            items = list(new.items())
            for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per call
                ml.log_params(dict(items[i:i + 100]))
            if changed:
                ml.set_tags(changed)
            log.info("tracking: MLflow run %s (%s) in %s", run, run_id, uri)

    return MlflowTracker()


def _wandb_callback(params: dict[str, str], run_dir: Path):
    from transformers.integrations import WandbCallback

    class WandbTracker(WandbCallback):
        """WandbCallback (run name = TrainingArguments.run_name = RUN) plus the resolved config
        under `config`, and the run id in RUN/tracking.json for eval and a resumed train."""

        def setup(self, args, state, model, **kwargs):
            super().setup(args, state, model, **kwargs)
            run = self._wandb.run
            if state.is_world_process_zero and run is not None:
                run.config.update({"config": params}, allow_val_change=True)
                _write_record(run_dir, {"backend": "wandb", "run_id": run.id, "run_name": args.run_name,
                                        "project": os.environ["WANDB_PROJECT"], "dir": os.environ["WANDB_DIR"],
                                        "mode": os.environ["WANDB_MODE"]})
                log.info("tracking: W&B run %s (%s, %s)", args.run_name, run.id, os.environ["WANDB_MODE"])

    return WandbTracker()


def eval_metrics(report: dict[str, Any]) -> dict[str, float]:
    """`make eval`'s numbers as tracking metrics: {split}/{adapter|base|model}/{normalized_wer,...}, in %."""
    out = {}
    for name, result in report.get("results", {}).items():
        for key in ("normalized_wer", "wer", "cer"):
            if isinstance(result.get(key), (int, float)):
                out[f"{report['split']}/{name}/{key}"] = 100.0 * result[key]
    return out


def log_eval(run_dir: Path, report: dict[str, Any], files: list[Path], env) -> str | None:
    """Log an eval report (its WERs as metrics, report.md/json and curves as files) to the tracking
    run that train recorded in RUN/tracking.json; returns where, or None when the run was untracked."""
    record = read_record(run_dir)
    metrics, files = eval_metrics(report), [f for f in files if Path(f).is_file()]
    if record.get("backend") == "mlflow":
        check("mlflow")
        from mlflow import MlflowClient

        mlflow_uri(env)  # the file store's opt-in
        client = MlflowClient(tracking_uri=record["tracking_uri"])
        for key, value in metrics.items():
            client.log_metric(record["run_id"], key, value)
        for f in files:
            client.log_artifact(record["run_id"], str(f), artifact_path="eval")
        return describe(run_dir)
    if record.get("backend") == "wandb":
        check("wandb")
        import wandb

        run = wandb.init(id=record["run_id"], resume="allow", project=record["project"], dir=record["dir"],
                         mode=wandb_settings(env)["WANDB_MODE"])
        run.summary.update(metrics)
        artifact = wandb.Artifact(f"eval-{report['split']}", type="eval-report")
        for f in files:
            artifact.add_file(str(f))
        run.log_artifact(artifact)
        run.finish()
        return describe(run_dir)
    return None
