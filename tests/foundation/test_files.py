"""lib/files.py: a full disk told apart from other failures, whatever the writer, and described."""

import errno
import os

from lib import files


def test_full_disk_is_recognized_from_each_writer(tmp_path):
    # Python's open()/write(): OSError 28 (122 for a quota)
    assert files.disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert files.disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    # safetensors and tokenizers (Rust): their own exception types, errno only in the text
    assert files.disk_full(Exception("No space left on device (os error 28)"))
    assert files.disk_full(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    # a writer that wraps it in its own error (even `from None`: the context is still there)
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("save failed") from None
    except RuntimeError as e:
        assert files.disk_full(e)
    # torch.save says only "unexpected pos": a full disk only when the filesystem written to is (nearly) full
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    torch_error.writing = str(tmp_path / "checkpoint-6")
    assert not files.disk_full(torch_error, need=1024)  # this filesystem has far more than 1 kB free
    assert files.disk_full(torch_error, need=files.free_bytes(tmp_path) + (1 << 30))
    # other failures are not
    assert not files.disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not files.disk_full(ValueError("bad value"))


def test_full_message_names_the_filesystem_the_path_and_the_bytes(tmp_path):
    e = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "checkpoint-6" / "optimizer.pt"))
    msg = files.full_message(e, tmp_path, need=4_100_000, need_what="the size of checkpoint-3")
    point, device, fstype = files.mount_of(tmp_path)
    assert os.path.realpath(tmp_path).startswith(point)
    assert f"the disk is full: no space left on the {fstype} filesystem {device} mounted at {point} (" in msg
    assert f"free) while writing {tmp_path / 'run' / 'checkpoint-6' / 'optimizer.pt'}" in msg
    assert "about 4.1 MB is needed (the size of checkpoint-3)" in msg
    assert "retrying before that cannot help" in msg
    quota = files.full_message(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path)
    assert quota.startswith("the disk quota is full") and f"while writing {tmp_path}" in quota
