"""lib/train/checkpoint.py: only COMPLETE checkpoints that verify are resumed, others are set aside."""

import json
import os
import shutil
import signal

import pytest

from lib.train import checkpoint
from lib.train.checkpoint import (
    COMPLETE,
    REQUIRED,
    StopOnSigterm,
    clean_set_aside,
    find_resumable,
    mark_complete,
    rotate,
    verify,
)


def _ckpt(root, step, complete=True):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for name in REQUIRED:
        (d / name).write_bytes(name.encode() * 10)
    (d / "adapter_model.safetensors").write_bytes(b"x" * 100)
    if complete:
        mark_complete(d)
    return d


def _real_ckpt(root, step, complete=True):
    """A checkpoint folder with every file a resume reads, each a real file of its format (an
    old-style marker is trusted only as far as the files' own structure says)."""
    import torch
    from safetensors.torch import save_file

    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    for name in REQUIRED:
        if name.endswith(".json"):
            (d / name).write_text(json.dumps({"name": name, "step": step}))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        torch.save({"name": name, "state": torch.arange(64, dtype=torch.float32) * step}, d / name)
    save_file({"lora_A": torch.ones(4, 4) * step}, str(d / "adapter_model.safetensors"))
    if complete:
        mark_complete(d)
    return d


def test_newest_complete_is_resumed_and_partial_is_moved_aside(tmp_path, caplog):
    _ckpt(tmp_path, 100)
    _ckpt(tmp_path, 200)
    partial = _ckpt(tmp_path, 300, complete=False)
    (partial / "adapter_model.safetensors").write_bytes(b"x" * 7)  # truncated by kill -9
    resume, moved = find_resumable(tmp_path)
    assert resume == tmp_path / "checkpoint-200"
    assert moved == [tmp_path / "incomplete-checkpoint-300"] and moved[0].is_dir()
    assert not (tmp_path / "checkpoint-300").exists()
    assert "checkpoint-300 has no COMPLETE marker" in caplog.text
    # the next partial with the same step does not overwrite the first one set aside
    _ckpt(tmp_path, 300, complete=False)
    assert find_resumable(tmp_path)[1] == [tmp_path / "incomplete-checkpoint-300-2"]


def test_nothing_to_resume(tmp_path):
    assert find_resumable(tmp_path / "missing") == (None, [])
    _ckpt(tmp_path, 5, complete=False)
    assert find_resumable(tmp_path)[0] is None


def test_rotate_keeps_newest_and_best(tmp_path):
    for s in (1, 2, 3, 4):
        _ckpt(tmp_path, s)
    _ckpt(tmp_path, 5, complete=False)  # never counted nor deleted by rotation
    rotate(tmp_path, keep=2, best=tmp_path / "checkpoint-1")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == ["checkpoint-1", "checkpoint-3", "checkpoint-4", "checkpoint-5"]
    assert (tmp_path / "checkpoint-4" / COMPLETE).is_file()


def test_sigterm_asks_trainer_to_save_and_stop():
    from transformers import TrainerControl

    stop = StopOnSigterm().install()
    try:
        control = stop.on_step_end(None, None, TrainerControl())
        assert not control.should_save and not control.should_training_stop
        os.kill(os.getpid(), signal.SIGTERM)  # handled: sets a flag, the process lives on
        control = stop.on_step_end(None, None, TrainerControl())
        assert stop.requested and control.should_save and control.should_training_stop
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


def test_complete_lists_every_file_with_size_and_hash(tmp_path):
    d = _ckpt(tmp_path, 1)
    listed = json.loads((d / COMPLETE).read_text())["files"]
    assert set(listed) == set(REQUIRED)
    assert listed["adapter_model.safetensors"]["size"] == 100
    assert len(listed["optimizer.pt"]["sha256"]) == 64
    assert verify(d) is None


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
@pytest.mark.parametrize("name", ["optimizer.pt", "trainer_state.json", "adapter_model.safetensors"])
def test_damaged_newest_falls_back_to_the_previous_good_one(tmp_path, caplog, name, damage):
    _ckpt(tmp_path, 100)
    bad = _ckpt(tmp_path, 200)
    f = bad / name
    if damage == "truncate":  # the disk filled up, or the node died before the page cache was written
        f.write_bytes(f.read_bytes()[:5])
    elif damage == "flip":  # same size, other bytes
        f.write_bytes(b"?" + f.read_bytes()[1:])
    else:  # e.g. a missing optimizer.pt: Trainer would restart Adam and the LR warm-up, exit 0
        f.unlink()
    resume, moved = find_resumable(tmp_path)
    assert resume == tmp_path / "checkpoint-100"
    assert moved == [tmp_path / "damaged-checkpoint-200"]
    assert f"checkpoint-200 is damaged: {name}" in caplog.text
    assert "resuming from checkpoint-100, the newest checkpoint that verifies" in caplog.text


def test_other_ranks_get_the_same_answer_without_renaming(tmp_path):
    _ckpt(tmp_path, 1)
    (_ckpt(tmp_path, 2) / "scheduler.pt").write_bytes(b"")
    _ckpt(tmp_path, 3, complete=False)
    assert find_resumable(tmp_path, move=False) == (tmp_path / "checkpoint-1", [])
    assert {p.name for p in tmp_path.iterdir()} == {"checkpoint-1", "checkpoint-2", "checkpoint-3"}


def test_marker_without_the_optimizer_is_refused(tmp_path):
    d = _ckpt(tmp_path, 1, complete=False)
    (d / "optimizer.pt").unlink()
    mark_complete(d)  # lists what is there, which lacks optimizer.pt
    assert "optimizer.pt never saved" in verify(d)


def test_old_style_marker_is_accepted_when_the_files_are_there(tmp_path):
    d = _real_ckpt(tmp_path, 1, complete=False)
    (d / COMPLETE).write_text("ok\n")
    assert verify(d) is None
    (d / "scheduler.pt").unlink()
    assert verify(d).startswith("scheduler.pt missing")


def test_old_style_marker_with_a_truncated_optimizer_is_refused(tmp_path, caplog):
    """A kill during an old version's save could leave optimizer.pt cut short beside an `ok` marker:
    every retry crashed loading it. Now it is found, set aside, and the older checkpoint resumes."""
    _real_ckpt(tmp_path, 1, complete=False)
    (tmp_path / "checkpoint-1" / COMPLETE).write_text("ok\n")
    d = _real_ckpt(tmp_path, 2, complete=False)
    (d / COMPLETE).write_text("ok\n")
    data = (d / "optimizer.pt").read_bytes()
    (d / "optimizer.pt").write_bytes(data[: len(data) // 2])
    assert "optimizer.pt is not a whole torch file" in verify(d)
    assert find_resumable(tmp_path)[0] == tmp_path / "checkpoint-1"
    assert "checkpoint-2 is damaged: optimizer.pt" in caplog.text


def test_old_style_marker_without_the_random_state_is_refused(tmp_path):
    """Without rng_state.pth Trainer resumes with other random draws, to other weights."""
    d = _real_ckpt(tmp_path, 1, complete=False)
    (d / COMPLETE).write_text("ok\n")
    (d / "rng_state.pth").unlink()
    assert "rng_state.pth missing" in verify(d)


@pytest.mark.parametrize("damage", ["truncate_safetensors", "bad_json"])
def test_old_style_marker_checks_each_files_own_structure(tmp_path, damage):
    d = _real_ckpt(tmp_path, 1, complete=False)
    (d / COMPLETE).write_text("ok\n")
    if damage == "truncate_safetensors":
        f = d / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:-10])
        assert "adapter_model.safetensors is" in verify(d) and "truncated" in verify(d)
    else:
        (d / "trainer_state.json").write_text('{"global_step": 4')
        assert "trainer_state.json is unreadable" in verify(d)


def test_when_no_checkpoint_is_usable_the_log_says_so(tmp_path, caplog):
    (_real_ckpt(tmp_path, 1) / "optimizer.pt").write_bytes(b"")
    (_real_ckpt(tmp_path, 2) / "scheduler.pt").write_bytes(b"")
    assert find_resumable(tmp_path) == (None, [tmp_path / "damaged-checkpoint-2", tmp_path / "damaged-checkpoint-1"])
    assert "none of the 2 checkpoints" in caplog.text and "starts again from step 0" in caplog.text


def test_files_and_folder_are_fsynced_before_the_marker(tmp_path, monkeypatch):
    d = _ckpt(tmp_path, 1, complete=False)
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(type(d), "replace", lambda self, target: (events.append(("marker", str(target))),
                                                                  real_replace(self, target))[1])
    mark_complete(d)
    marker_at = events.index(("marker", str(d / COMPLETE)))
    synced_before = {p for kind, p in events[:marker_at] if kind == "fsync"}
    assert {str(d / n) for n in REQUIRED} | {str(d)} <= synced_before
    assert ("fsync", str(d)) in events[marker_at:]  # the rename itself reaches the disk


def test_rotation_removes_the_marker_first(tmp_path, monkeypatch):
    for s in (1, 2, 3):
        _ckpt(tmp_path, s)
    seen = []

    def rmtree_killed_halfway(path, ignore_errors=False):
        seen.append((path.name, (path / COMPLETE).exists()))
        (path / "optimizer.pt").unlink()  # a kill -9 after deleting one file

    monkeypatch.setattr(shutil, "rmtree", rmtree_killed_halfway)
    rotate(tmp_path, keep=2, best=None)
    assert seen == [("checkpoint-1", False)]
    monkeypatch.undo()
    resume, moved = find_resumable(tmp_path)
    assert resume == tmp_path / "checkpoint-3" and moved == [tmp_path / "incomplete-checkpoint-1"]


def test_set_aside_folders_are_deleted_once_a_newer_checkpoint_is_complete(tmp_path):
    _ckpt(tmp_path, 3)
    _ckpt(tmp_path, 6, complete=False)
    (_ckpt(tmp_path, 5) / "optimizer.pt").write_bytes(b"")
    _, moved = find_resumable(tmp_path)
    assert sorted(p.name for p in moved) == ["damaged-checkpoint-5", "incomplete-checkpoint-6"]
    _ckpt(tmp_path, 6, complete=False)  # the retry gets to step 6 again, a second partial
    find_resumable(tmp_path)
    assert (tmp_path / "incomplete-checkpoint-6-2").is_dir()
    # the retry saved checkpoint-6 whole: everything set aside at or below step 6 is gone (a
    # partial checkpoint-6 too: its steps are redone), newer stays
    _ckpt(tmp_path, 9, complete=False)
    find_resumable(tmp_path)
    clean_set_aside(tmp_path, upto=6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "incomplete-checkpoint-9"]
    # the run finished (e.g. with fewer steps than before): nothing set aside stays behind
    clean_set_aside(tmp_path, upto=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]


def test_complete_marker_callback_cleans_up(tmp_path):
    from transformers import TrainerControl, TrainerState

    _ckpt(tmp_path, 1, complete=False)
    find_resumable(tmp_path)
    _ckpt(tmp_path, 2, complete=False)  # Trainer just wrote it
    state = TrainerState()
    state.global_step = 2
    checkpoint.CompleteMarker(tmp_path, keep=2).on_save(None, state, TrainerControl())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    assert verify(tmp_path / "checkpoint-2") is None
