"""Files that a reader, a kill or a second process never sees half-written.

`write_json` writes beside the target under a name unique to this process, then renames over
it (atomic on one filesystem): metrics.json, log_history.json, prepare's sidecars, the
prepared manifest and the tracking record all go through it.

A full disk (ENOSPC) or quota (EDQUOT) is told apart from other failures (`disk_full`) and
described (`full_message`: the filesystem and where it is mounted, the path being written, the
free bytes and the bytes needed), so a job can stop with exit 4 (lib/errors.py) instead of a
traceback that an orchestrator retries forever. Writers do not all say it the same way:
Python's open()/write() raise OSError 28 (only open() names the file), safetensors and
tokenizers (Rust) raise their own errors whose text ends "(os error 28)", and torch.save says
only "unexpected pos" or "file write failed"; `writing(path)` tags what a block was writing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("No space left on device", "Disk quota exceeded", f"os error {errno.ENOSPC})",
              f"os error {errno.EDQUOT})")
# torch.save (its C++ zip writer) on a full disk: no errno, only these
_TORCH_WRITE_FAILED = ("unexpected pos", "file write failed", "PytorchStreamWriter failed writing")


def write_json(path: str | Path, data: Any, *, indent: int | None = 2,
               default: Callable[[Any], Any] | None = None) -> None:
    """Atomic JSON: `path` holds the old content or the new, never a part (non-ASCII kept as is)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=indent, ensure_ascii=False, default=default))
    os.replace(tmp, path)


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Tag an exception raised in the block with the path being written (the innermost tag
    wins): the writer's own error often names no file."""
    try:
        yield
    except BaseException as e:
        if getattr(e, "writing", None) is None:
            with contextlib.suppress(AttributeError, TypeError):
                e.writing = str(path)
        raise


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def written_path(exc: BaseException) -> str | None:
    """The path an exception (or one it came from) was writing: an OSError's filename, else
    writing()'s tag."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.filename:
            return str(e.filename)
    for e in _chain(exc):
        if getattr(e, "writing", None):
            return e.writing
    return None


def free_bytes(path: str | Path) -> int | None:
    """Free bytes (for this user) on the filesystem of `path`, or of its nearest existing parent."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def disk_full(exc: BaseException, need: int | None = None) -> bool:
    """True when `exc` (or an exception it came from) is a full disk or quota: an OSError
    ENOSPC/EDQUOT, a Rust writer's "(os error 28)", or torch.save's "unexpected pos" / "file
    write failed" while the filesystem of the path being written has less than `need` bytes
    (1 MiB when unknown) free."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in FULL_ERRNOS:
            return True
        if any(t in str(e) for t in _FULL_TEXT):
            return True
    path = written_path(exc)
    if path and any(t in str(e) for e in _chain(exc) for t in _TORCH_WRITE_FAILED):
        free = free_bytes(path)
        return free is not None and free < max(need or 0, 1 << 20)
    return False


def mount_of(path: str | Path) -> tuple[str, str, str]:
    """(mount point, device, filesystem type) holding `path`: the longest mount point of
    /proc/self/mounts above it; on a system without that file, the nearest os.path.ismount parent."""
    real = os.path.realpath(Path(path).absolute())
    best = ("/", "?", "?")
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                # the file writes space, tab, newline and backslash in octal (\040 ...)
                point = parts[1].encode().decode("unicode_escape")
                inside = real == point or real.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best[0]):
                    best = (point, parts[0], parts[2])
        return best
    except OSError:
        p = Path(real)
        while not os.path.ismount(p) and p != p.parent:
            p = p.parent
        return str(p), "?", "?"


def size_text(n: int | None) -> str:
    if n is None:
        return "an unknown number of bytes"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def full_message(exc: BaseException | None, fallback: str | Path, need: int | None = None, need_what: str = "",
                 then: str = "then rerun the same command", doing: str = "while writing", done: str = "") -> str:
    """What is full, where, how much is free and needed, and what to do: the DiskFull message.
    exc: the failed write (None: a check before writing); fallback: the path to report when the
    error names none (e.g. the job's output folder); done: what the job already did about it."""
    chain = list(_chain(exc)) if exc is not None else []
    path = (written_path(exc) if exc is not None else None) or str(fallback)
    point, device, fstype = mount_of(path)
    free = free_bytes(path)
    quota = any((isinstance(e, OSError) and e.errno == errno.EDQUOT) or "quota" in str(e).lower() for e in chain)
    what = "the disk quota" if quota else "the disk"
    needed = (f"; about {size_text(need)} is needed{' (' + need_what + ')' if need_what else ''}"
              if need else "")
    return (f"{what} is full: no space left on the {fstype} filesystem {device} mounted at {point} "
            f"({size_text(free)} free) {doing} {path}{needed}{done}. Free space there (or give the job a "
            f"bigger volume or quota), {then}; retrying before that cannot help")
