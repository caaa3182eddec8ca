"""torchrun with the jobs' exit codes: `python -m lib.launch [torchrun options] -m jobs.train ...`

    python -m lib.launch --standalone --nproc_per_node=4 -m jobs.train run=hi-4gpu data=cv_hi
    make train GPUS=4 ...            # the same (Makefile job_torchrun)

Plain torchrun (torch 2.13) breaks the contract of lib/errors.py in two ways:
  - on SIGTERM its elastic agent forwards the signal to the workers, SIGKILLs them
    `--shutdown-timeout` seconds later (default 30: TORCH_ELASTIC_SHUTDOWN_TIMEOUT), and
    exits 1 even when every worker saved its checkpoint and exited 3;
  - a worker's exit 2 (a config error: do not retry) comes out as 1 (retry), so Kubernetes
    retried a bad flag backoffLimit times.
This runs torchrun's own main in this process (all its options, PET_* variables included)
with the shutdown timeout raised to GRACE_S unless set, and maps the outcome: every worker
exited 3 (or 0) -> 3; any worker exited 2 -> 2, 4 (disk full) -> 4, 75 (a bucket unreachable)
-> 75; other failures -> 1. Workers report their exit
code in a file under $WHISPER_FT_EXIT_DIR (lib/cli.py calls report_exit), because after a
SIGTERM torchrun returns no worker exit codes at all.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

from lib.errors import EXIT_DISK_FULL, EXIT_PREEMPTED, EXIT_UNAVAILABLE, EXIT_USER_ERROR

EXIT_DIR_ENV = "WHISPER_FT_EXIT_DIR"
GRACE_S = 270
"""seconds torchrun waits for its workers to checkpoint after SIGTERM before SIGKILL: within
Kubernetes' terminationGracePeriodSeconds (300 in docker/k8s), with 30 s for the rest"""


def report_exit(status: str) -> None:
    """Called by every job process: 'started' at start, then its exit code. A no-op outside lib.launch."""
    d = os.environ.get(EXIT_DIR_ENV)
    if not d:
        return
    rank = os.environ.get("RANK", "0")
    try:
        tmp = Path(d) / f".{rank}.tmp"
        tmp.write_text(status)
        tmp.replace(Path(d) / rank)
    except OSError:
        pass  # the launcher then counts this worker as failed: exit 1, retried


def outcome(statuses: dict[str, str]) -> int:
    """The launcher's exit code from the workers' reports (rank -> 'started' or an exit code):
    any 2 -> 2 and any 4 (disk full) -> 4, neither worth a retry; all 3, or 3 beside workers that
    finished (0: a SIGTERM after the loop reaches rank 0 writing the adapter after the others
    are done) -> 3; any 75 (a bucket did not answer) -> 75, retried later; anything else (a worker
    killed before it reported) -> 1."""
    codes = set(statuses.values())
    if str(EXIT_USER_ERROR) in codes:
        return EXIT_USER_ERROR
    if str(EXIT_DISK_FULL) in codes:
        return EXIT_DISK_FULL
    if str(EXIT_UNAVAILABLE) in codes:
        return EXIT_UNAVAILABLE
    if str(EXIT_PREEMPTED) in codes and codes <= {str(EXIT_PREEMPTED), "0"}:
        return EXIT_PREEMPTED
    return 1


def main(argv: list[str]) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(GRACE_S))
    exit_dir = tempfile.mkdtemp(prefix="whisper-ft-exit-")
    os.environ[EXIT_DIR_ENV] = exit_dir  # the workers inherit the agent's environment
    try:
        torchrun(argv)
        return 0
    except (SignalException, ChildFailedError) as e:
        statuses = {p.name: p.read_text() for p in Path(exit_dir).iterdir() if not p.name.startswith(".")}
        code = outcome(statuses)
        print(f"lib.launch: {type(e).__name__}; workers reported {dict(sorted(statuses.items()))}: exit {code}",
              file=sys.stderr)
        return code
    finally:
        shutil.rmtree(exit_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
