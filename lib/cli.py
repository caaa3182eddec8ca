"""The one way every job starts: parse flags, load env and config, run, map errors to exit codes.

    python -m jobs.train [--recipe FILE] [--env-file FILE] [key=value ...]

A `UserError` prints `error: <message>` and exits 2 (not worth retrying); `Preempted`
exits 3 (retry: the job resumes); a full disk or quota (`DiskFull`, or any error that
lib.files.disk_full recognizes) prints where and how much, and exits 4 (retry only after
freeing space); `Unavailable` (a bucket that did not answer) exits 75 (retry later); anything
else is a crash with a traceback (retry).
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from lib import files, summary
from lib.config import load_config
from lib.env import Env, load_env
from lib.errors import (
    EXIT_DISK_FULL,
    EXIT_PREEMPTED,
    EXIT_UNAVAILABLE,
    EXIT_USER_ERROR,
    DiskFull,
    Preempted,
    Unavailable,
    UserError,
)
from lib.launch import report_exit

T = TypeVar("T")
log = logging.getLogger("whisper_ft")


class _MaskSecrets(logging.Filter):
    """Replace any secret value that reaches a log record with ***."""

    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = [s for s in secrets if len(s) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        for s in self.secrets:
            if s in msg:
                record.msg, record.args = msg.replace(s, "***"), ()
                msg = record.msg
        return True


def setup_logging(env: Env | None = None) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
    if env is not None:
        handler.addFilter(_MaskSecrets(env.secrets()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _module_of(fn: Callable) -> str:
    """The dotted module a job's main lives in (jobs.train, lib.tools.bench), also under -m."""
    module = fn.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else module
    return module


@dataclass
class Recipe:
    """What `--recipe` said, and what the job's config was built from; run_job hands it to the job."""

    given: str | None
    """the --recipe argument: a YAML path, the name of a computed recipe (train: auto), or None"""
    path: Path | None
    """the YAML file layered under the flags (a computed recipe's base file)"""
    choice: dict[str, Any] | None = None
    """what a computed recipe chose on this machine: settings, why, the flags that won over it"""

    @property
    def name(self) -> str | None:
        return self.given if self.path is None or self.given == self.path.name else (
            self.path.name if self.choice is None else f"{self.given} ({self.path.name})")

    def describe(self) -> dict[str, Any]:
        return {"given": self.given, "file": str(self.path) if self.path else None, "choice": self.choice}


# A recipe computed on the machine: its base YAML and fn(config, flags, env) -> (config, choice).
Computed = tuple[Path, Callable[[Any, list[str], Any], tuple[Any, dict[str, Any]]]]


def build_config(cfg_cls: type[T], recipe: str | None, flags: list[str],
                 computed: dict[str, Computed] | None = None, env: Env | None = None) -> tuple[T, Recipe]:
    """The typed config (defaults < recipe YAML < flags) and the Recipe it came from. A computed
    recipe's name (train's `auto`) builds from its base YAML, then applies its choice to the
    built config (given `env`: train's auto reads the label lengths of data=)."""
    if recipe is not None and recipe in (computed or {}):
        base, apply = computed[recipe]
        cfg, choice = apply(load_config(cfg_cls, base, flags), list(flags), env)
        return cfg, Recipe(recipe, Path(base), choice)
    return load_config(cfg_cls, recipe, flags), Recipe(recipe, Path(recipe) if recipe else None)


def check_language_flag(cfg_cls: type, flags: list[str]) -> None:
    """A language= flag no Whisper knows fails first, before the config's other checks and the
    job's data: `make prepare LANG=xx` (no source.path) and `make train LANG=xx` (no cv_xx
    prepared) are told that xx is not a language (lib.language.check_language)."""
    if "language" not in {f.name for f in dataclasses.fields(cfg_cls)}:
        return
    from lib.config import parse_override
    from lib.language import check_language

    for flag in flags:
        value = parse_override(flag).get("language") if "=" in flag else None
        if isinstance(value, (str, int, float)) and str(value).lower() not in ("none", "null", ""):
            check_language(str(value))


EXITS = ((UserError, "error", EXIT_USER_ERROR), (Preempted, "preempted", EXIT_PREEMPTED),
         (Unavailable, "unavailable", EXIT_UNAVAILABLE), (DiskFull, "error", EXIT_DISK_FULL))
"""(exception, the stderr line's prefix, exit code) of the errors a job ends on deliberately
(lib/errors.py); any other exception is a crash, unless lib.files.disk_full recognizes it"""


def run_job(
    name: str, doc: str, cfg_cls: type[T], main: Callable[..., Any], argv: list[str] | None = None,
    computed: dict[str, Computed] | None = None,
) -> int:
    """Parse argv, build the config, call main(cfg, env[, recipe]); return the process exit code.

    main gets the Recipe as a third argument when it takes one (train writes it to metrics.json
    and the model card). computed: recipes made on the machine (train: `--recipe auto`,
    lib/train/auto.py), applied after logging is set up so that their choice is logged.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m {_module_of(main)}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", help="recipe YAML (defaults < recipe < key=value flags)")
    parser.add_argument("--env-file", help="KEY=value file with HF_TOKEN, MDC_API_KEY, HF_HOME, DATA_DIR")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lora.r=16")
    args = parser.parse_args(argv)
    env = None
    try:
        env_file = args.env_file
        if env_file is None:
            env_file = ".env" if Path(".env").is_file() else None
        env = load_env(env_file)
        setup_logging(env)
        summary.mark_start()
        check_language_flag(cfg_cls, args.overrides)
        cfg, recipe = build_config(cfg_cls, args.recipe, args.overrides, computed, env)
        log.info("%s: environment %s", name, env.describe())
        report_exit("started")
        if len(inspect.signature(main).parameters) >= 3:
            main(cfg, env, recipe)
        else:
            main(cfg, env)
        report_exit("0")
        return 0
    except Exception as e:
        hit = next(((f"{prefix}: {e}", code) for kind, prefix, code in EXITS if isinstance(e, kind)), None)
        if hit is None:
            if not files.disk_full(e):
                raise
            # a job that does not describe it itself (train does: lib.train.checkpoint.disk_full_exits)
            where = env.data_dir if env is not None else Path.cwd()
            hit = (f"error: {files.full_message(e, where)}", EXIT_DISK_FULL)
        message, code = hit
        print(message, file=sys.stderr)
        report_exit(str(code))
        return code
