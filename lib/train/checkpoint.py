"""Checkpoints a restarted job can trust, and a SIGTERM that saves before it stops.

    DATA_DIR/runs/RUN/checkpoints/checkpoint-N/
      adapter_model.safetensors, adapter_config.json   LoRA weights only, never the base
      optimizer.pt, scheduler.pt, rng_state.pth, trainer_state.json
      COMPLETE                                          written last: JSON, every other file
                                                        of the folder with its size and sha256

A kill -9 (OOM killer, node loss) in the middle of a save leaves a folder without COMPLETE.
transformers' resume_from_checkpoint=True takes the highest-numbered folder whatever its
state and then crashes on the truncated file, every retry. Here the newest folder whose
COMPLETE marker *verifies* (each listed file there, same size, same sha256; the files
resuming needs among them) is resumed. Unfinished ones are renamed aside
(incomplete-checkpoint-N), damaged ones too (damaged-checkpoint-N: a truncated optimizer.pt
would crash every retry; a missing one would silently restart the optimizer and the LR
warm-up), each reported, so they are neither loaded nor rotated into place. A set-aside
folder is deleted once a checkpoint of its step or a later one is COMPLETE (the lost steps
are redone by then; each is ~190 MB for large-v2), and all of them when the run finishes.

Durability: every file and the folder are fsynced before COMPLETE is written (and the folder
again after), so losing the node cannot leave COMPLETE beside files still in its page cache.
Rotation deletes COMPLETE first (and fsyncs), so a deletion cut short leaves an unmarked
folder, never a marked half one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path

from transformers import TrainerCallback

from lib.errors import Preempted, UserError

log = logging.getLogger("whisper_ft")

COMPLETE = "COMPLETE"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
SET_ASIDE = ("incomplete-", "damaged-")
"""prefixes of checkpoint folders renamed aside by find_resumable"""
# Files a resume needs: without optimizer.pt / scheduler.pt Trainer restarts Adam's moments
# and the LR warm-up without a word; without trainer_state.json it cannot resume at all.
REQUIRED = ("adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
            "trainer_state.json")
_HASH_CHUNK = 1 << 20


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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _fsync(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list: the names of the files just written)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def mark_complete(path: Path) -> dict:
    """Write the marker atomically, after every other file of the checkpoint is on disk.

    COMPLETE lists each file (relative path -> size, sha256): 15 MB adapter + 30 MB optimizer
    for large-v2 r=32 hash in about 0.1 s, nothing next to a save.
    """
    path = Path(path)
    files = {}
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = f.relative_to(path).as_posix()
        if rel in (COMPLETE, COMPLETE + ".tmp"):
            continue
        _fsync(f)
        files[rel] = {"size": f.stat().st_size, "sha256": _sha256(f)}
    for d in sorted({f.parent for f in path.rglob("*") if f.is_file()}, reverse=True):
        _fsync(d)
    marker = {"files": files}
    tmp = path / (COMPLETE + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1) + "\n")
    _fsync(tmp)
    tmp.replace(path / COMPLETE)
    _fsync(path)
    return marker


def verify(path: Path) -> str | None:
    """None when the checkpoint can be resumed from, else what is wrong with it (for the log)."""
    path = Path(path)
    try:
        text = (path / COMPLETE).read_text()
    except OSError as e:
        return f"{COMPLETE} unreadable ({e.strerror or e})"
    if text.strip() == "ok":
        return _verify_unlisted(path)
    try:
        files = json.loads(text)["files"]
    except (ValueError, KeyError, TypeError):
        return f"{COMPLETE} is not a file list (damaged marker)"
    missing = [f for f in REQUIRED if f not in files]
    if missing:
        return f"{', '.join(missing)} never saved ({COMPLETE} does not list it)"
    for rel, want in files.items():
        f = path / rel
        try:
            size = f.stat().st_size
        except OSError:
            return f"{rel} missing"
        if size != want["size"]:
            return f"{rel} is {size} bytes, {COMPLETE} says {want['size']} (truncated?)"
        if _sha256(f) != want["sha256"]:
            return f"{rel} does not match its sha256 in {COMPLETE} (corrupted)"
    return None


def _set_aside(root: Path, ck: Path, prefix: str) -> Path:
    target = root / f"{prefix}{ck.name}"
    k = 2
    while target.exists():
        target = root / f"{prefix}{ck.name}-{k}"
        k += 1
    ck.rename(target)
    return target


def _verify_unlisted(path: Path) -> str | None:
    """The `ok` marker of earlier versions lists no files, sizes or hashes: check what the files
    themselves can tell. Every file a resume reads must be there, the random-number state too
    (without it the resumed run draws other dropout masks and samples: other weights); torch's
    files are zip archives whose CRCs catch a truncated or corrupted optimizer.pt without
    unpickling it; a safetensors file's header says how long it must be; JSON must parse."""
    missing = [f for f in REQUIRED if not (path / f).is_file()]
    if not any(path.glob("rng_state*.pth")):
        missing.append("rng_state.pth")
    if missing:
        return f"{', '.join(missing)} missing (old-style {COMPLETE} marker)"
    for f in sorted(path.iterdir()):
        problem = _file_problem(f)
        if problem:
            return f"{f.name} {problem} (old-style {COMPLETE} marker, checked file by file)"
    log.warning("%s has an old-style %s marker (no file list): resuming after checking each file's own "
                "structure (no hashes to compare)", path.name, COMPLETE)
    return None


def _file_problem(f: Path) -> str | None:
    """What is wrong with one checkpoint file judged by its format alone, or None."""
    import zipfile

    try:
        if f.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
            return f"is corrupted (member {bad} fails its CRC)" if bad else None
        if f.suffix == ".safetensors":
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            size = f.stat().st_size
            return None if size == 8 + n + end else f"is {size} bytes, its header needs {8 + n + end} (truncated?)"
        if f.suffix == ".json":
            json.loads(f.read_text())
    except (zipfile.BadZipFile, EOFError) as e:
        return f"is not a whole torch file ({e}: truncated?)"
    except (ValueError, KeyError, TypeError, OSError) as e:
        return f"is unreadable ({type(e).__name__}: {e})"
    return None


def find_resumable(root: Path, move: bool = True) -> tuple[Path | None, list[Path]]:
    """(newest checkpoint that verifies, or None; the ones set aside).

    Unfinished ones are renamed to incomplete-checkpoint-N, damaged ones (COMPLETE present,
    verify() fails) to damaged-checkpoint-N (suffix -2, -3... if taken); kept until a checkpoint
    of that step or a later one is COMPLETE (clean_set_aside), so a person can look at what was lost.
    Only the newest checkpoints are hashed, down to the first that verifies.
    With move=False (every torchrun process but rank 0) nothing is renamed, the answer is the same.
    """
    moved: list[Path] = []
    for ck in checkpoints(root):
        if is_complete(ck):
            continue
        if move:
            moved.append(_set_aside(root, ck, "incomplete-"))
        log.warning(
            "checkpoint %s has no %s marker (the job was killed while saving or deleting it): "
            "not resuming from it%s", ck.name, COMPLETE, f"; moved to {moved[-1].name}" if move else "",
        )
    found = None
    for ck in reversed([c for c in checkpoints(root) if is_complete(c)]):
        problem = verify(ck)
        if problem is None:
            found = ck
            break
        if move:
            moved.append(_set_aside(root, ck, "damaged-"))
        log.warning(
            "checkpoint %s is damaged: %s; not resuming from it, falling back to an older one%s",
            ck.name, problem, f" ({ck.name} moved to {moved[-1].name})" if move else "",
        )
    if found is not None and any(p.name.startswith("damaged-") for p in moved):
        log.warning("resuming from %s, the newest checkpoint that verifies", found.name)
    if found is None and moved:
        log.error("none of the %d checkpoints in %s can be resumed from (%s): training starts again from step 0",
                  len(moved), root, ", ".join(p.name for p in moved))
    elif found is None and not move and any(checkpoints(root)):
        log.error("no checkpoint in %s can be resumed from: training starts again from step 0", root)
    return found, moved


def clean_set_aside(root: Path, upto: int | None) -> list[Path]:
    """Delete incomplete-/damaged- folders of steps up to `upto` (a COMPLETE checkpoint's step:
    their steps are redone), or all of them with upto=None (the run finished)."""
    root = Path(root)
    deleted = []
    if not root.is_dir():
        return deleted
    for p in sorted(root.iterdir()):
        if not p.is_dir() or not p.name.startswith(SET_ASIDE):
            continue
        m = re.match(r"^(?:incomplete|damaged)-checkpoint-(\d+)(?:-\d+)?$", p.name)
        if m and (upto is None or int(m.group(1)) <= upto):
            shutil.rmtree(p, ignore_errors=True)
            deleted.append(p)
            log.info("deleted %s (%s)", p.name, "the run is finished" if upto is None else f"checkpoint-{upto} is complete")
    return deleted


def remove_checkpoint(ck: Path) -> None:
    """COMPLETE first (and on disk), then the rest: a cut-short deletion leaves no marked half folder."""
    marker = ck / COMPLETE
    if marker.exists():
        marker.unlink()
        _fsync(ck)
    shutil.rmtree(ck, ignore_errors=True)


def rotate(root: Path, keep: int, best: Path | None) -> list[Path]:
    """Delete complete checkpoints beyond the newest `keep`, never the best one."""
    done = [c for c in checkpoints(root) if is_complete(c)]
    best_name = Path(best).name if best else None
    deleted = []
    for ck in done[:-keep] if keep > 0 else []:
        if ck.name == best_name:
            continue
        remove_checkpoint(ck)
        deleted.append(ck)
    return deleted


def dir_size(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(path).glob(pattern) if p.is_file())


class CompleteMarker(TrainerCallback):
    """After Trainer saved checkpoint-N: write COMPLETE, then rotate old ones and delete the
    checkpoints set aside before it.

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
            clean_set_aside(self.root, upto=state.global_step)
        best = Path(state.best_model_checkpoint) if state.best_model_checkpoint else None
        rotate(self.root, self.keep, best)


class EvalInterrupted(Exception):
    """SIGTERM during evaluation inside training: the generation pass is abandoned (it can
    outlast the pod's grace period); the job saves a checkpoint (save_now) and exits 3."""


def agree(flag: bool) -> bool:
    """True on every process when it is True on any (one all_reduce of a flag; a no-op
    without torch.distributed). Each rank gets SIGTERM at its own moment: deciding alone, one
    rank stops at step N and waits at the checkpoint barrier while another runs step N+1 and
    waits in its gradient all-reduce, and both hang until the SIGKILL."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    # nccl reduces CUDA tensors only; gloo CPU ones. One byte, every step: microseconds.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


class StopOnSigterm(TrainerCallback):
    """SIGTERM -> finish the current step, save a checkpoint, stop; the job then exits 3.

    Why not Trainer's own handling: a stopped Trainer returns normally and the process
    exits 0, which Kubernetes / Batch count as success, so the run is never retried.
    The handler only sets a flag: saving from inside a signal handler could interleave
    with a half-done optimizer step. Under torchrun the flag is agreed across processes at
    every step end and every evaluation batch (agree()), so all ranks stop at the same step.
    During evaluation the agreed flag raises EvalInterrupted: generating the rest of the
    validation split can take longer than the grace period.
    """

    def __init__(self):
        self.requested = False
        self.signalled = False
        self._previous = None

    def install(self) -> StopOnSigterm:
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame):
        if not self.signalled:
            log.warning("SIGTERM: saving a checkpoint at the end of this step, then stopping (exit 3)")
        self.signalled = True

    def _agreed(self, state) -> bool:
        if not self.requested and agree(self.signalled):
            self.requested = True
            log.warning("stopping at step %d on every process (SIGTERM)", state.global_step if state else -1)
        return self.requested

    def on_step_end(self, args, state, control, **kwargs):
        if self._agreed(state):
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_prediction_step(self, args, state, control, **kwargs):
        if self._agreed(state):
            raise EvalInterrupted(f"SIGTERM during the evaluation at step {state.global_step}")
        return control


def save_now(trainer) -> None:
    """Checkpoint the trainer's current step outside its loop (after EvalInterrupted): the same
    files as a scheduled save, then the on_save callbacks (COMPLETE marker, rotation). The eval
    of this step is lost: the checkpoint has no WER until the resumed run evaluates it
    (lib.train.trainer.EvaluateLeftOver). Nothing is written when the step is already saved
    (the SIGTERM came during that catch-up evaluation): rewriting it could only damage it."""
    ck = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
    if is_complete(ck):
        log.warning("%s is already saved: nothing to write", ck.name)
        return
    trainer._save_checkpoint(trainer.model, trial=None)
    trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)


class StopOutsideLoop:
    """SIGTERM outside the training loop -> Preempted (exit 3) at once, naming what it interrupted.

    Before the loop (start-up: the config checks, the data, loading the model) this attempt has
    nothing worth saving; after it (loading the best checkpoint, saving the adapter, writing
    metrics.json) the last checkpoint holds the whole training and a rerun resumes from it,
    redoing only that end. Without a handler SIGTERM killed the process (143): no message, no
    adapter, and RUN/LOCK left for the next pod to wait out. The handler raises, so the job's
    `with` blocks unwind: the run lock is released, half-written outputs (adapter.tmp) are
    cleaned by the rerun. Inside the loop StopOnSigterm takes SIGTERM over (the step must
    finish and be saved) and hands it back after. at() names the phase as the job moves on."""

    def __init__(self):
        self.doing = "start-up (checking the config, reading the data, loading the model)"
        self.state = "nothing of this attempt needed saving"
        self.fired = False
        self.quiet = False
        """set on the way out: a SIGTERM then is noted, not raised (the run lock is being released)"""
        self._previous = None

    def message(self) -> str:
        return f"SIGTERM during {self.doing}: {self.state}; rerun the same command to resume"

    def at(self, doing: str, state: str | None = None) -> None:
        """Now doing `doing`; `state`: what is saved and where a rerun resumes, if that changed.
        Raises Preempted when a SIGTERM came earlier and its exception was swallowed on the way
        (a library's broad `except Exception`)."""
        if self.fired:
            raise Preempted(self.message())
        self.doing = doing
        if state is not None:
            self.state = state

    def _handle(self, signum, frame):
        if self.fired or self.quiet:
            return
        self.fired = True
        raise Preempted(self.message())

    def __enter__(self) -> StopOutsideLoop:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (a caller's own thread): its SIGTERM is not ours
            self._previous = None
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def checkpoint_bytes(ck: Path) -> int:
    """Every file of a checkpoint folder, subfolders included."""
    return sum(p.stat().st_size for p in Path(ck).rglob("*") if p.is_file())


class DiskGuard:
    """A full disk or quota anywhere in the train job -> DiskFull (exit 4) with one message: the
    filesystem and where it is mounted, the path being written, the free bytes and the bytes
    needed (the size of the newest checkpoint: what the next save writes before rotation frees
    anything; before the first one, `estimate`). Retrying on the same full volume cannot help,
    so this is not exit 1 (a Job would retry it backoffLimit times, each time crashing in
    another writer). The checkpoint being written when the disk filled is deleted at once (no
    COMPLETE: it was never resumable) to give its space back; the rerun then needs no clean-up.

    check(): the same message before any weights load, when the volume already has less free
    than a checkpoint (a retry on a disk nobody freed)."""

    def __init__(self, run_dir: Path, rank0: bool = True):
        self.run_dir, self.root, self.rank0 = Path(run_dir), Path(run_dir) / "checkpoints", rank0
        self.estimate: int | None = None
        """bytes of one checkpoint before any exists (the job sets it once the model is built)"""

    def need(self) -> tuple[int | None, str]:
        done = [c for c in checkpoints(self.root) if is_complete(c)]
        if done:
            return checkpoint_bytes(done[-1]), f"the size of {done[-1].name}, what the next checkpoint writes"
        if self.estimate:
            return self.estimate, "one checkpoint: LoRA weights, Adam's two moments, processor files"
        return None, ""

    def resume_hint(self) -> str:
        done = [c for c in checkpoints(self.root) if is_complete(c)]
        return ("then rerun the same command (it resumes from "
                + (f"{done[-1].name})" if done else "the start: no checkpoint is complete yet)"))

    def check(self) -> None:
        from lib import files
        from lib.errors import DiskFull

        need, what = self.need()
        free = files.free_bytes(self.run_dir)
        if need and free is not None and free < need:
            raise DiskFull(files.full_message(None, self.root, need, what, then=self.resume_hint(),
                                              doing="before writing to"))

    def __enter__(self) -> DiskGuard:
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        from lib import files
        from lib.errors import DiskFull

        if not isinstance(exc, Exception) or isinstance(exc, (DiskFull, UserError)):
            return False
        need, what = self.need()
        if not files.disk_full(exc, need):
            return False
        gone = self._remove_partial(files.written_path(exc))
        raise DiskFull(files.full_message(exc, self.run_dir, need, what, then=self.resume_hint(), done=gone)) from exc

    def _remove_partial(self, path: str | None) -> str:
        """Delete the checkpoint (no COMPLETE) or adapter.tmp that `path` is in; what was done, for the message."""
        if not path or not self.rank0:
            return ""
        p = Path(path).absolute()
        for folder in (p, *p.parents):
            partial_ckpt = folder.parent == self.root.absolute() and _CKPT.match(folder.name) and not is_complete(folder)
            if partial_ckpt or folder == (self.run_dir / "adapter.tmp").absolute():
                shutil.rmtree(folder, ignore_errors=True)
                return f"; the half-written {folder.name} was deleted to give its space back"
        return ""


# What a resumed run must share with the run that wrote its checkpoints: what the adapter
# is (base model, every LoRA field: its shape, scaling and dropout) and what it learns
# (data, language, task). Everything else only changes how fast it gets there, or is a
# train.* choice the user may revise (more steps) - allowed, and logged. Quantization is
# among the allowed ones, on purpose: `RECIPE=auto` picks it from the GPU's memory, so a spot
# job rescheduled on a smaller card comes back with nf4 instead of int8; refusing it (exit 2)
# failed the Job for good. The LoRA tensors and optimizer state have the same shapes over an
# int8, nf4 or float base; the base's rounding differs, like fp16 vs bf16 does.
RESULT_KEYS = ("data", "language", "task", "model.base", "lora")


def _get(d: dict, dotted: str):
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def world_size_of(ck: Path) -> int:
    """Processes that wrote a checkpoint: Trainer saves rng_state.pth alone, else rng_state_<rank>.pth each."""
    return max(len(list(Path(ck).glob("rng_state_*.pth"))), 1)


def check_resume(old: dict, new: dict, run: str, config_path: Path, ckpt_root: Path, world_size: int) -> list[str]:
    """Refuse (UserError) a rerun that would change the result; return the other changes, logged.

    old/new: config dicts (config.yaml of the run / this invocation). The effective batch
    (batch_size x grad_accum x processes) must stay once a checkpoint exists: Trainer resumes
    by skipping global_step x that many clips; batch_size and grad_accum may trade places.
    """
    refused = [k for k in RESULT_KEYS if _get(old, k) != _get(new, k)]
    if refused:
        raise UserError(
            f"run={run} already exists with different {', '.join(refused)} settings (see {config_path}): "
            f"choose a new run= name, or use the same settings to resume"
        )
    fo, fn = _flat(old), _flat(new)
    changed = [f"{k}: {fo.get(k)!r} -> {fn.get(k)!r}" for k in sorted(set(fo) | set(fn))
               if fo.get(k) != fn.get(k) and k != "run"]
    done = [c for c in checkpoints(ckpt_root) if is_complete(c)]
    if done:
        old_world = world_size_of(done[-1])
        t_old, t_new = old.get("train", {}), new.get("train", {})
        e_old = t_old.get("batch_size", 0) * t_old.get("grad_accum", 0) * old_world
        e_new = t_new.get("batch_size", 0) * t_new.get("grad_accum", 0) * world_size
        if e_old != e_new:
            raise UserError(
                f"run={run} was trained with {e_old} clips per optimizer step (train.batch_size="
                f"{t_old.get('batch_size')} x train.grad_accum={t_old.get('grad_accum')} x {old_world} processes); "
                f"this resume would use {e_new} (x {world_size} processes): set train.batch_size and "
                f"train.grad_accum so that their product x processes is {e_old}, or choose a new run= name"
            )
        if old_world != world_size:
            changed.append(f"processes: {old_world} -> {world_size}")
    for c in changed:
        log.warning("resuming run=%s with a changed setting: %s", run, c)
    return changed


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
