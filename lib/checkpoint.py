"""Checkpoints a restarted job can trust, and a SIGTERM that saves before it stops.

    DATA_DIR/runs/RUN/checkpoints/checkpoint-N/
      adapter_model.safetensors, adapter_config.json   LoRA weights only, never the base
      optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json
      COMPLETE                                          written last: the save finished

A kill -9 (OOM killer, node loss) in the middle of a save leaves a folder without COMPLETE.
transformers' resume_from_checkpoint=True takes the highest-numbered folder whatever its
state and then crashes on the truncated file, every retry. Here the newest folder *with*
COMPLETE is resumed and unfinished ones are renamed aside (incomplete-checkpoint-N) and
reported, so they are neither loaded nor rotated into place.
"""

from __future__ import annotations

import logging
import re
import shutil
import signal
from pathlib import Path

from transformers import TrainerCallback

log = logging.getLogger("whisper_ft")

COMPLETE = "COMPLETE"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def step_of(path: Path) -> int:
    m = _CKPT.match(path.name)
    return int(m.group(1)) if m else -1


def checkpoints(root: Path) -> list[Path]:
    """checkpoint-N folders under root, oldest step first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and _CKPT.match(p.name)), key=step_of)


def is_complete(path: Path) -> bool:
    return (path / COMPLETE).is_file()


def mark_complete(path: Path) -> None:
    """Write the marker atomically, after every other file of the checkpoint."""
    tmp = path / (COMPLETE + ".tmp")
    tmp.write_text("ok\n")
    tmp.replace(path / COMPLETE)


def find_resumable(root: Path, move: bool = True) -> tuple[Path | None, list[Path]]:
    """(newest complete checkpoint or None, unfinished ones renamed aside).

    Unfinished ones are renamed to incomplete-checkpoint-N (suffix -2, -3... if taken);
    they are kept, not deleted, so a person can look at what was lost. With move=False
    (every torchrun process but rank 0) nothing is renamed, the answer is the same.
    """
    moved: list[Path] = []
    if not move:
        complete = [c for c in checkpoints(root) if is_complete(c)]
        return (complete[-1] if complete else None), moved
    for ck in checkpoints(root):
        if is_complete(ck):
            continue
        target = root / f"incomplete-{ck.name}"
        k = 2
        while target.exists():
            target = root / f"incomplete-{ck.name}-{k}"
            k += 1
        ck.rename(target)
        moved.append(target)
        log.warning(
            "checkpoint %s has no %s marker (the job was killed while saving it): "
            "not resuming from it; moved to %s", ck.name, COMPLETE, target.name,
        )
    complete = checkpoints(root)
    return (complete[-1] if complete else None), moved


def rotate(root: Path, keep: int, best: Path | None) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep`, never the best one."""
    done = [c for c in checkpoints(root) if is_complete(c)]
    best_name = Path(best).name if best else None
    deleted = []
    for ck in done[:-keep] if keep > 0 else []:
        if ck.name == best_name:
            continue
        shutil.rmtree(ck, ignore_errors=True)
        deleted.append(ck)
    return deleted


def dir_size(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern) if p.is_file())


class CompleteMarker(TrainerCallback):
    """After Trainer saved checkpoint-N: write COMPLETE, then rotate old ones.

    Rotation happens here, after the marker, rather than inside Trainer (save_total_limit),
    which deletes older checkpoints *before* the new one is known to be whole.
    """

    def __init__(self, root: Path, keep: int):
        self.root, self.keep = Path(root), keep

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        ck = self.root / f"checkpoint-{state.global_step}"
        if ck.is_dir():
            mark_complete(ck)
            log.info("saved %s (%.1f MB adapter)", ck.name, dir_size(ck, "adapter_model*") / 1e6)
        best = Path(state.best_model_checkpoint) if state.best_model_checkpoint else None
        rotate(self.root, self.keep, best)


class StopOnSigterm(TrainerCallback):
    """SIGTERM -> finish the current step, save a checkpoint, stop; the job then exits 3.

    Why not Trainer's own handling: a stopped Trainer returns normally and the process
    exits 0, which Kubernetes / Batch count as success, so the run is never retried.
    The handler only sets a flag: saving from inside a signal handler could interleave
    with a half-done optimizer step.
    """

    def __init__(self):
        self.requested = False
        self._previous = None

    def install(self) -> StopOnSigterm:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        if not self.requested:
            log.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping (exit 3)")
        self.requested = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control


def save_adapter(model, processor, generation_config, dest: Path) -> Path:
    """The final adapter: LoRA weights, processor, generation config (language and task), written
    aside (DEST.tmp) and then renamed, so DEST is never half there, not even after a kill."""
    dest = Path(dest)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    generation_config.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest
