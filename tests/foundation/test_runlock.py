"""lib/runlock.py: one writer per run folder; a dead holder's lock is taken over, a live one's is not."""

import json
import subprocess
import sys
import time

import pytest

from lib.errors import UserError
from lib.runlock import LOCK, RunLock

FAST = {"heartbeat_s": 0.05, "stale_s": 0.6}


def test_second_writer_is_refused_while_the_first_beats(tmp_path):
    with RunLock(tmp_path, **FAST) as first:
        holder = json.loads((tmp_path / LOCK).read_text())
        assert holder["pid"] == first.me["pid"] and holder["token"] == first.token
        t0 = time.monotonic()
        with pytest.raises(UserError, match=rf"in use by pid {holder['pid']} on host .*choose another run="):
            RunLock(tmp_path, **FAST).acquire()
        assert time.monotonic() - t0 < 0.5  # refused as soon as the beat moved, not after stale_s
        assert json.loads((tmp_path / LOCK).read_text())["token"] == first.token  # untouched
    assert not (tmp_path / LOCK).exists()  # released on the way out


def test_lock_of_a_dead_pod_is_taken_over_after_its_beat_stops(tmp_path, caplog):
    # what a SIGKILLed pod on another node leaves: a lock whose beat never moves again
    (tmp_path / LOCK).write_text(json.dumps({"host": "whisper-train-abcde", "pid": 1, "pid_ns": "x",
                                             "started": "2026-12-01T00:00:00Z", "token": "old", "beat": 41}))
    t0 = time.monotonic()
    with RunLock(tmp_path, **FAST) as lock:
        assert time.monotonic() - t0 >= FAST["stale_s"]
        assert json.loads((tmp_path / LOCK).read_text())["token"] == lock.token
    assert "taking over" in caplog.text and "whisper-train-abcde" in caplog.text


def test_dead_pid_on_this_host_is_stale_at_once(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    me = RunLock(tmp_path).me
    (tmp_path / LOCK).write_text(json.dumps({**me, "pid": int(dead.stdout), "token": "old", "beat": 3}))
    t0 = time.monotonic()
    with RunLock(tmp_path, heartbeat_s=5, stale_s=30):
        assert time.monotonic() - t0 < 2  # no 30 s watch: a rerun after kill -9 starts right away


def test_holder_that_lost_the_lock_stops_and_leaves_the_new_one_alone(tmp_path):
    lost = []
    lock = RunLock(tmp_path, on_lost=lambda: lost.append(True), **FAST).acquire()
    other = {**lock.me, "token": "new-holder", "beat": 0}
    (tmp_path / LOCK).write_text(json.dumps(other))  # taken over while this one was stalled
    deadline = time.monotonic() + 5
    while not lost and time.monotonic() < deadline:
        time.sleep(0.02)
    lock.release()
    assert lost == [True]
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "new-holder"


def test_interrupted_acquire_leaves_no_lock(tmp_path, monkeypatch):
    """A SIGTERM's exception (or a full disk) while the lock is being taken: `with` calls no
    release for a failed enter, so acquire gives back what it took; the next writer need not wait."""
    import threading

    from lib.errors import Preempted

    def interrupted(self):
        raise Preempted("SIGTERM during start-up")

    monkeypatch.setattr(threading.Thread, "start", interrupted)
    with pytest.raises(Preempted):
        RunLock(tmp_path / "run", **FAST).acquire()
    assert not (tmp_path / "run" / LOCK).exists()
