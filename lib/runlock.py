"""One writer per run folder: DATA_DIR/runs/RUN/LOCK, a heartbeat file rather than an OS lock.

Why not fcntl/flock: the run folder lives on a shared volume (an RWX PVC: NFS, EFS,
Filestore, CephFS). flock is not passed to the server on many NFS mounts (two pods both
"get" it), and where POSIX locks do reach the server, a lock held by a pod on a lost node
stays until the server's lease runs out, with nothing that tells the replacement pod why.

The file names its holder (host, pid, pid namespace, start time) and a token, and the
holder rewrites it every HEARTBEAT_S seconds with a growing beat counter. A second writer:
  - no LOCK: creates it with O_CREAT|O_EXCL (one of two racing writers wins; the other sees
    the winner's file and goes on below);
  - a LOCK whose holder is on this host, in this pid namespace, with a pid that is gone:
    stale at once (a `make train` rerun after kill -9 does not wait);
  - otherwise it watches the beat for up to STALE_S seconds. The beat moves: the holder
    lives, exit 2 naming it. It does not move: the holder is dead (a SIGKILLed pod, a lost
    node), take the lock over with a warning. Only the *change* of the beat is compared,
    never clocks of two machines, so clock skew between nodes does not matter.

Kubernetes: a Job with podFailurePolicy replaces a pod only once it has terminated
(podReplacementPolicy: Failed), so the replacement meets either no LOCK (the old pod
stopped cleanly and removed it) or a dead holder's LOCK, which it takes over after at most
STALE_S seconds. A pod on a node that lost the volume but still runs stops beating; when
it comes back it sees another token in LOCK and stops itself at once (exit 2) rather than
write beside the new holder.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from lib.errors import EXIT_USER_ERROR, UserError

log = logging.getLogger("whisper_ft")

LOCK = "LOCK"
HEARTBEAT_S = 10.0
"""seconds between beats of a live holder"""
STALE_S = 60.0
"""a LOCK whose beat has not moved for this long belongs to a dead process (6 missed beats:
a slow network volume can stall one write, not six)"""


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half written by its holder at this instant, or damaged: judged by its beat


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class RunLock:
    """Take with acquire(); release() on the way out (also on exit 2, 3 and 4)."""

    def __init__(self, run_dir: Path, heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
                 on_lost=None):
        self.path = Path(run_dir) / LOCK
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.on_lost = on_lost or _exit_at_once
        """called from the heartbeat thread when another process took the lock over"""
        self.token = uuid.uuid4().hex
        self.me = {"host": socket.gethostname(), "pid": os.getpid(), "pid_ns": _pid_namespace(),
                   "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "token": self.token}
        self.beat = 0
        self.lost: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- taking the lock ------------------------------------------------------------------
    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            while True:
                if self._create():
                    break
                holder = _read(self.path)
                if holder is None:
                    continue  # released between our two looks: try again
                if self._holder_is_dead(holder):
                    log.warning(
                        "taking over %s from %s (its process is gone: killed, or its pod or node lost)",
                        self.path, _describe(holder),
                    )
                    self._write()
                    break
            self._thread = threading.Thread(target=self._beat_loop, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
        except BaseException:
            # interrupted while taking it (a SIGTERM while watching a holder's beat, a full disk):
            # `with` calls no release for a failed enter, so give back what was taken here
            self.release()
            raise
        return self

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({**self.me, "beat": 0}))
        except BaseException:  # a full disk: no empty LOCK for the next writer to wait out
            self.path.unlink(missing_ok=True)
            raise
        return True

    def _holder_is_dead(self, holder: dict) -> bool:
        same_ns = holder.get("host") == self.me["host"] and holder.get("pid_ns") == self.me["pid_ns"]
        if same_ns and isinstance(holder.get("pid"), int) and _pid_gone(holder["pid"]):
            return True
        first = holder.get("beat"), holder.get("token")
        log.info("%s is held by %s: watching its heartbeat for up to %.0f s", self.path, _describe(holder), self.stale_s)
        deadline = time.monotonic() + self.stale_s
        while time.monotonic() < deadline:
            time.sleep(min(self.heartbeat_s / 2, max(deadline - time.monotonic(), 0)))
            now = _read(self.path)
            if now is None:
                return False  # released: the caller creates it
            if (now.get("beat"), now.get("token")) != first:
                raise UserError(
                    f"run folder {self.path.parent} is in use by {_describe(now)} (its lock {self.path} "
                    f"is beating): two writers would mix their checkpoints. Wait for that job to end, "
                    f"or choose another run= name"
                )
        return True

    # -- holding it -----------------------------------------------------------------------
    def _write(self) -> None:
        tmp = self.path.with_name(f"{LOCK}.{self.token}.tmp")
        tmp.write_text(json.dumps({**self.me, "beat": self.beat}))
        os.replace(tmp, self.path)

    def _beat_loop(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                holder = _read(self.path)
                if holder and holder.get("token") != self.token:
                    # Someone took over while we were not beating (a stalled volume, a paused
                    # VM): stop before writing one more file beside the new holder's.
                    self.lost = holder
                    log.error(
                        "%s took over the run lock %s while this process could not beat for %.0f s: "
                        "stopping without writing; that process continues the run",
                        _describe(holder), self.path, self.stale_s,
                    )
                    self.on_lost()
                    return
                self.beat += 1
                self._write()
            except OSError as e:  # a volume hiccup: the next beat tries again
                log.warning("run lock heartbeat failed (%s), retrying in %.0f s", e, self.heartbeat_s)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            if self._thread.is_alive():  # never started when acquire was cut short
                self._thread.join()
            self._thread = None
        if self.lost is None and (_read(self.path) or {}).get("token") == self.token:
            self.path.unlink(missing_ok=True)
            try:  # a job refused before it wrote anything leaves no empty run folder behind
                self.path.parent.rmdir()
            except OSError:
                pass

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _exit_at_once() -> None:
    # Not an exception: it would surface in the main thread only at some later point, and not
    # SIGTERM: that would save a checkpoint, i.e. write. Exit 2: this process must not be
    # retried, the new holder is the run.
    os._exit(EXIT_USER_ERROR)


def hold(run_dir: Path, enabled: bool = True):
    """`with hold(run_dir):` the lock for the block; enabled=False (torchrun ranks > 0): nothing."""
    return RunLock(run_dir) if enabled else contextlib.nullcontext()


def _describe(holder: dict) -> str:
    if not holder:
        return "another process (unreadable lock file)"
    return f"pid {holder.get('pid')} on host {holder.get('host')} (started {holder.get('started')})"
