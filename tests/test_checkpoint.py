"""lib/checkpoint.py: only COMPLETE checkpoints are resumed, partial ones are set aside."""

import os
import signal

from lib.checkpoint import COMPLETE, StopOnSigterm, find_resumable, mark_complete, rotate


def _ckpt(root, step, complete=True):
    d = root / f"checkpoint-{step}"
    d.mkdir(parents=True)
    (d / "adapter_model.safetensors").write_bytes(b"x" * 100)
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
