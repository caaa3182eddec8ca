"""The one way every job starts: parse flags, load env and config, run, map errors to exit codes.

    python -m jobs.train [--recipe FILE] [--env-file FILE] [key=value ...]

A `UserError` prints `error: <message>` and exits 2 (not worth retrying); `Preempted`
exits 3 (retry: the job resumes); anything else is a crash with a traceback (retry).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from lib.config import load_config
from lib.env import Env, load_env
from lib.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, Preempted, UserError
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


def run_job(
    name: str, doc: str, cfg_cls: type[T], main: Callable[[T, Env], Any], argv: list[str] | None = None,
    recipe_hook: Callable[[str | None, list[str]], tuple[str | None, list[str]]] | None = None,
) -> int:
    """Parse argv, build the config, call main(cfg, env); return the process exit code.

    recipe_hook(recipe, flags) -> (recipe, flags): a job's own reading of --recipe before the
    config is built (train: `--recipe auto`, lib/recipes.py); called after logging is set up.
    """
    parser = argparse.ArgumentParser(
        prog=f"python -m jobs.{name}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipe", help="recipe YAML (defaults < recipe < key=value flags)")
    parser.add_argument("--env-file", help="KEY=value file with HF_TOKEN, MDC_API_KEY, HF_HOME, DATA_DIR")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lora.r=16")
    args = parser.parse_args(argv)
    try:
        env_file = args.env_file
        if env_file is None:
            from pathlib import Path

            env_file = ".env" if Path(".env").is_file() else None
        env = load_env(env_file)
        setup_logging(env)
        recipe, overrides = args.recipe, args.overrides
        if recipe_hook is not None:
            recipe, overrides = recipe_hook(recipe, overrides)
        cfg = load_config(cfg_cls, recipe, overrides)
        log.info("%s: environment %s", name, env.describe())
        report_exit("started")
        main(cfg, env)
        report_exit("0")
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        report_exit(str(EXIT_USER_ERROR))
        return EXIT_USER_ERROR
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        report_exit(str(EXIT_PREEMPTED))
        return EXIT_PREEMPTED
