"""Files that a reader, a kill or a second process never sees half-written.

`write_json` writes beside the target under a name unique to this process, then renames over
it (atomic on one filesystem): metrics.json, log_history.json, prepare's sidecars, the
prepared manifest and the tracking record all go through it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_json(path: str | Path, data: Any, *, indent: int | None = 2,
               default: Callable[[Any], Any] | None = None) -> None:
    """Atomic JSON: `path` holds the old content or the new, never a part (non-ASCII kept as is)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=indent, ensure_ascii=False, default=default))
    os.replace(tmp, path)
