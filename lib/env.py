"""Secrets and machine facts from the environment or an env file; read in this one place.

The env file is plain KEY=value lines (no quotes: `docker run --env-file` keeps them
literally). Values already in the environment win over the file, so a Kubernetes Secret
mounted as variables overrides a stale file. Tokens are never printed: `Env.__repr__`
and `describe()` show only whether each one is set.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import dotenv_values

from lib.errors import UserError

SECRET_KEYS = ("HF_TOKEN", "MDC_API_KEY", "WANDB_API_KEY")
# Object storage (data=s3://..., prepare's out=s3://...: lib/dataset/bucket.py). The drivers (s3fs,
# gcsfs) read these from the process environment, so a value from the env file is put there.
STORAGE_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
STORAGE_KEYS = STORAGE_SECRET_KEYS + ("AWS_DEFAULT_REGION", "AWS_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
                                      "GOOGLE_APPLICATION_CREDENTIALS")
# MLFLOW_TRACKING_URI / WANDB_MODE: where train.report_to=mlflow / wandb log (lib/train/tracking.py)
KNOWN_KEYS = SECRET_KEYS + ("HF_HOME", "DATA_DIR", "MLFLOW_TRACKING_URI", "WANDB_MODE") + STORAGE_KEYS


@dataclass(frozen=True)
class Env:
    """What the jobs read from the environment."""

    data_dir: Path
    hf_home: Path | None = None
    hf_token: str | None = field(default=None, repr=False)
    mdc_api_key: str | None = field(default=None, repr=False)
    mlflow_tracking_uri: str | None = None
    wandb_api_key: str | None = field(default=None, repr=False)
    wandb_mode: str | None = None
    job_completion_index: int | None = None
    """JOB_COMPLETION_INDEX: this pod's index in a Kubernetes Indexed Job (prepare's shard_index)"""
    storage: dict[str, str] = field(default_factory=dict, repr=False)
    """the STORAGE_KEYS that are set (AWS_*, GOOGLE_APPLICATION_CREDENTIALS): for the drivers, never printed"""
    runner: str | None = None
    """WHISPER_FT_RUNNER: `local` when `make ... RUNNER=local` started the job (the Makefile's LOCAL_ENV
    sets it); unset in the image, under Kubernetes and for `python -m jobs...`"""

    def describe(self) -> dict[str, str]:
        """A loggable view: paths as they are, secrets only as set / not set."""
        return {
            "DATA_DIR": str(self.data_dir),
            "HF_HOME": str(self.hf_home) if self.hf_home else "(default)",
            "HF_TOKEN": "set" if self.hf_token else "not set",
            "MDC_API_KEY": "set" if self.mdc_api_key else "not set",
            "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri or "(default)",
            "WANDB_API_KEY": "set" if self.wandb_api_key else "not set",
            "bucket credentials": self.describe_storage(),
        }

    def describe_storage(self) -> str:
        """Which object-storage keys are set (never their values); the endpoint without credentials."""
        have = [k for k in STORAGE_KEYS if self.storage.get(k) and "ENDPOINT" not in k]
        ends = [f"{k}={_bare(self.storage[k])}" for k in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
                if self.storage.get(k)]
        return ", ".join([*(f"{k} set" for k in have), *ends]) or "none set"

    def prepared_dir(self, name: str) -> Path:
        """Where `make prepare` writes dataset NAME and `make train` finds it."""
        return self.data_dir / "prepared" / name

    def run_dir(self, run: str) -> Path:
        """Where `make train` writes run RUN and `make eval` / `make export` find it."""
        return self.data_dir / "runs" / run

    def make_flags(self) -> list[str]:
        """What a `make` command a job suggests needs to run where this job ran: RUNNER=local for a
        job of `make ... RUNNER=local` (the Makefile's default is docker), with DATA_DIR= when it is
        not the Makefile's default (`data` in the repository, where make starts the job); nothing
        for a job in the image, whose make runs on the host with the defaults."""
        if self.runner != "local":
            return []
        flags = ["RUNNER=local"]
        if self.data_dir != Path("data").resolve():
            flags.append(f"DATA_DIR={shlex.quote(str(self.data_dir))}")
        return flags

    def secrets(self) -> list[str]:
        """The secret values, so that log filters can mask them."""
        return [s for s in (self.hf_token, self.mdc_api_key, self.wandb_api_key,
                            *(self.storage.get(k) for k in STORAGE_SECRET_KEYS)) if s]


def _bare(url: str) -> str:
    """An endpoint URL without user:password@ (lib.dataset.bucket.redact, which a foundation cannot import)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rsplit('@', 1)[-1]}{parts.path}" if parts.scheme else url


def load_env(env_file: str | Path | None = None) -> Env:
    """Read the env file (if any) under the process environment, and set HF_HOME for the Hub.

    A named env file that does not exist is an error; the default `.env` is optional.
    """
    values: dict[str, str | None] = {}
    if env_file is not None:
        path = Path(env_file)
        if not path.is_file():
            raise UserError(f"env file {path} not found: copy env.example to {path} or pass --env-file")
        values = dotenv_values(path)
        for n, line in enumerate(path.read_text().splitlines(), 1):
            key, sep, value = line.strip().partition("=")
            value = value.strip()
            if sep and not key.startswith("#") and value[:1] in "\"'" and value[-1:] == value[:1]:
                raise UserError(
                    f"{path} line {n}: {key} is quoted; docker --env-file keeps quotes literally, "
                    f"write {key}=value without quotes"
                )
    merged = {k: v for k, v in values.items() if v}
    merged.update({k: os.environ[k] for k in KNOWN_KEYS if os.environ.get(k)})
    hf_home = merged.get("HF_HOME")
    if hf_home:
        # huggingface_hub reads HF_HOME from the environment; keep caches on the data volume.
        os.environ["HF_HOME"] = hf_home
    if merged.get("HF_TOKEN"):
        os.environ["HF_TOKEN"] = merged["HF_TOKEN"]
    index = os.environ.get("JOB_COMPLETION_INDEX", "").strip()  # set by Kubernetes, never in the env file
    if index and not index.isdigit():
        raise UserError(f"JOB_COMPLETION_INDEX={index!r}: expected a whole number (Kubernetes sets it in an "
                        f"Indexed Job's pods)")
    for key in STORAGE_KEYS:
        if merged.get(key):
            os.environ[key] = merged[key]  # where s3fs / gcsfs look; the environment already won over the file
    if merged.get("WANDB_API_KEY"):
        # wandb reads its key from the environment only; it never reaches a config or a log line
        os.environ["WANDB_API_KEY"] = merged["WANDB_API_KEY"]
    return Env(
        data_dir=Path(merged.get("DATA_DIR") or "data").resolve(),
        hf_home=Path(hf_home) if hf_home else None,
        hf_token=merged.get("HF_TOKEN"),
        mdc_api_key=merged.get("MDC_API_KEY"),
        mlflow_tracking_uri=merged.get("MLFLOW_TRACKING_URI"),
        wandb_api_key=merged.get("WANDB_API_KEY"),
        wandb_mode=merged.get("WANDB_MODE"),
        job_completion_index=int(index) if index else None,
        storage={k: merged[k] for k in STORAGE_KEYS if merged.get(k)},
        # set by the Makefile on the command line of a local job, never in the env file
        runner=os.environ.get("WHISPER_FT_RUNNER", "").strip() or None,
    )
