"""Start a job as its own process, the way a user does, and read what it says.

The tools measure the real jobs (`python -m jobs.train ...`, `python -m jobs.prepare ...`),
each in a fresh process: one measurement's allocations, compiled graphs and loader workers
never leak into the next, and no tool imports a job.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lib.env import Env

ROOT = Path(__file__).resolve().parents[2]
"""the repository root: where `python -m jobs.NAME` finds the jobs"""


def run_job_process(job: str, args: list[str], env: Env, logf: Path,
                    timeout: float | None = None) -> tuple[int | None, str]:
    """`python -m jobs.JOB ARGS` in a fresh process with DATA_DIR = env.data_dir; its output is
    written to `logf`. Returns (exit code, output); the exit code is None when it was stopped
    after `timeout` seconds."""
    return run_module_process(f"jobs.{job}", args, env, logf, timeout)


def run_module_process(module: str, args: list[str], env: Env, logf: Path,
                       timeout: float | None = None) -> tuple[int | None, str]:
    """`python -m MODULE ARGS`, as run_job_process (a tool's reference program, say)."""
    cmd = [sys.executable, "-m", module, *args]
    logf.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "DATA_DIR": str(env.data_dir)},
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = _text(e.stdout) + _text(e.stderr)
        logf.write_text(out)
        return None, out
    logf.write_text(proc.stdout + proc.stderr)
    return proc.returncode, proc.stdout + proc.stderr


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def last_error(output: str) -> str:
    """The line of a failed job's output that says why (its `error:` line, else the last
    exception line, else its last line), without progress bars."""
    lines = [ln for ln in output.splitlines() if ln.strip() and "it/s]" not in ln and "s/it]" not in ln]
    errors = [ln for ln in lines if ln.startswith(("error:", "preempted:")) or "Error" in ln]
    return (errors or lines or ["?"])[-1][:200]
