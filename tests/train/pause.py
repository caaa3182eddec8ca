"""A job with a wait point, for tests that signal it at a chosen moment (no hook in lib/):

    python -m tests.train.pause WHERE READY -m jobs.train key=value ...

WHERE names a function that is wrapped to stop before it runs:
  startup     lib.train.lora.build_training_model (start-up, before the model is loaded)
  after-loop  lib.train.checkpoint.save_adapter (the training loop is over)
  eval        Seq2SeqTrainer.prediction_step, its first call (the first evaluation's first batch)
There the process writes READY.<rank> (RANK, 0 without torchrun) and waits, at most 120 s, for
READY.go, then goes on. The test signals it in between. Runs under lib.launch too (`-m tests.train.pause`).
"""

from __future__ import annotations

import functools
import os
import runpy
import sys
import time
from pathlib import Path


def _waiting(fn, ready: Path, once: bool = True):
    done = []

    @functools.wraps(fn)
    def wrapper(*a, **k):
        if not (once and done):
            done.append(1)
            Path(f"{ready}.{os.environ.get('RANK', '0')}").write_text(str(os.getpid()))
            go, deadline = Path(f"{ready}.go"), time.monotonic() + 120
            while not go.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
        return fn(*a, **k)

    return wrapper


def main(argv: list[str]) -> None:
    where, ready, dash_m, module, *rest = argv
    assert dash_m == "-m", "usage: python -m tests.train.pause WHERE READY -m MODULE ARGS..."
    ready = Path(ready)
    if where == "startup":  # patched where it lives: the job imports it by name when it runs
        from lib.train import lora

        lora.build_training_model = _waiting(lora.build_training_model, ready)
    elif where == "after-loop":
        from lib.train import checkpoint

        checkpoint.save_adapter = _waiting(checkpoint.save_adapter, ready)
    elif where == "eval":
        from transformers import Seq2SeqTrainer

        Seq2SeqTrainer.prediction_step = _waiting(Seq2SeqTrainer.prediction_step, ready)
    else:
        raise SystemExit(f"unknown wait point {where!r}")
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
