"""The measured training figures `--recipe auto` chooses by (lib/train/auto.py), as data.

Two files, one format (FORMAT):
  lib/train/measured.json                 shipped: the H100 runs of README "GPU benchmarks"
  DATA_DIR/bench/large-v2/measured.json   written by `make bench` (lib/tools/bench.py) on your GPU

Each figure is a `Point` (samples/s and peak GPU memory at one per-device batch) of a `Setting`
(the mode: quantization, precision, checkpointing, base dtype, compilation) and names its `Run`:
the GPU as the driver reports it, its memory, the date and the command that measured it. auto
reads the shipped file, and the bench's file where one exists: for the GPU it was measured on,
its figures replace the shipped ones mode by mode (`for_gpu`). `load` refuses a file it cannot
trust with a message naming the file and the entry; unknown keys are errors.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from lib.errors import UserError

FORMAT = 1
SHIPPED = Path(__file__).with_name("measured.json")
ROOT = Path(__file__).resolve().parents[2]
MODEL = "large-v2"
"""the Whisper size auto's figures are for (and its fixed parts: lib/train/auto.py FIXED_GIB); a
bench of another size measures another model"""


def user_file(data_dir: Path) -> Path:
    """Where `make bench` (its default arch, MODEL) leaves the figures it measured on this machine."""
    return Path(data_dir) / "bench" / MODEL / "measured.json"


def shown(path: Path) -> str:
    """A path as the log shows it: inside the repository relative to it, else as it is."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


@dataclass(frozen=True)
class Run:
    """One command that measured figures: the machine, the date, what was run."""

    gpu: str
    """device name as the driver reports it (torch.cuda.get_device_name), e.g. NVIDIA H100 80GB HBM3"""
    gpu_memory_gib: float | None
    """the card's total memory as torch reports it, GiB; None where the run did not record it"""
    date: str
    """YYYY-MM-DD"""
    command: str
    """the command line that produced the figures (or, for old runs, what the README says of it)"""
    versions: dict[str, str] = field(default_factory=dict)
    """torch, transformers, peft, bitsandbytes"""
    notes: str = ""
    """where this was found, and anything that makes its figures differ from another run's"""


@dataclass(frozen=True)
class Point:
    """One measured figure: a mode at one per-device batch."""

    batch: int
    """train.batch_size (clips per device per step)"""
    samples_per_s: float
    """steady training samples/s (the untimed warm-up steps left out)"""
    peak_gib: float | None
    """torch.cuda.max_memory_allocated over the run, GiB; None without a GPU (auto cannot use it)"""
    run: str
    """the key in `runs` of the command that measured it"""
    bench_mode: str = ""
    """the bench's name for the settings (lib/tools/bench.py MODES)"""
    notes: str = ""


@dataclass(frozen=True)
class Setting:
    """A training mode's settings (the train config keys auto sets) and its measured points."""

    quantization: Literal["none", "int8", "nf4"]
    """model.quantization"""
    precision: Literal["fp32", "fp16", "bf16"]
    """model.precision"""
    gradient_checkpointing: bool
    """model.gradient_checkpointing"""
    points: tuple[Point, ...]
    checkpoint_fraction: float = 1.0
    """model.checkpoint_fraction"""
    base_dtype: Literal["fp32", "compute"] = "fp32"
    """model.base_dtype"""
    compile: Literal["none", "layers", "model"] = "none"
    """train.compile"""
    notes: str = ""

    def identity(self) -> tuple:
        """What tells two modes apart (precision included): two entries with one identity are one mode."""
        return (self.quantization, self.precision, self.gradient_checkpointing, self.checkpoint_fraction,
                self.base_dtype, self.compile)

    def describe(self) -> str:
        ckpt = f"checkpointing {self.checkpoint_fraction:g}" if self.gradient_checkpointing else "no checkpointing"
        return f"{self.quantization}/{self.precision}/base {self.base_dtype}/compile {self.compile}/{ckpt}"


@dataclass(frozen=True)
class Measured:
    """One file of figures."""

    path: Path
    model: str
    """the Whisper size measured (lib/tools/models.py ARCHS), e.g. large-v2"""
    label_tokens: int
    """tokens per label row of the measured runs (auto's memory rule starts from 40)"""
    summary: str
    """one line for the log: the machine and the shapes"""
    about: str
    """how the figures were measured"""
    runs: dict[str, Run]
    modes: tuple[Setting, ...]

    def origin(self, points: tuple[Point, ...] | list[Point]) -> str:
        """Where figures came from, for the log: the file, then per batch the GPU, date and run."""
        def one(p: Point) -> str:
            run = self.runs[p.run]
            return f"batch {p.batch} on {run.gpu} {run.date} ({p.run})"

        return f"figures: {shown(self.path)}, {', '.join(one(p) for p in points)}"


# ---- reading ---------------------------------------------------------------------------------------


def _closed() -> dict[str, tuple[str, ...]]:
    """The closed choices of the settings, from the train config's own types (lib/train/config.py),
    less what a run resolves before it measures (precision auto, quantization None)."""
    from lib.train.config import ModelConfig, TrainSection

    def choices(section: type, name: str) -> tuple[str, ...]:
        hint = get_type_hints(section)[name]
        parts = get_args(hint) if get_origin(hint) in (Union, UnionType) else (hint,)
        return tuple(v for part in parts for v in get_args(part) if v not in (None, "auto"))

    return {"quantization": choices(ModelConfig, "quantization"), "precision": choices(ModelConfig, "precision"),
            "base_dtype": choices(ModelConfig, "base_dtype"), "compile": choices(TrainSection, "compile")}


class _Reader:
    """Checks JSON objects against the dataclasses above; every message names the file and the entry."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, where: str, what: str) -> UserError:
        return UserError(f"{shown(self.path)}: {where}: {what} (the format: lib/train/measured.py; a file "
                         f"`make bench` wrote is written again by running it again)")

    def object(self, value: Any, cls: type, where: str) -> dict[str, Any]:
        """The keys of `value` checked against `cls`'s fields: none unknown, none required missing,
        scalars of the field's type (nested lists and objects are left to the caller)."""
        if not isinstance(value, dict):
            raise self.fail(where, f"expected an object, got {type(value).__name__}")
        known = {f.name: f for f in fields(cls) if f.name != "path"}
        unknown = sorted(set(value) - set(known))
        if unknown:
            raise self.fail(where, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(known)}")
        missing = [n for n, f in known.items() if n not in value and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise self.fail(where, f"missing {', '.join(missing)}")
        hints = get_type_hints(cls)
        return {n: self.value(v, hints[n], f"{where}.{n}") for n, v in value.items()}

    def value(self, v: Any, hint: Any, where: str) -> Any:
        origin, args = get_origin(hint), get_args(hint)
        if origin in (Union, UnionType) and type(None) in args:
            return None if v is None else self.value(v, next(a for a in args if a is not type(None)), where)
        number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if hint is bool:
            ok, name = isinstance(v, bool), "true or false"
        elif hint is int:
            ok, name = number and float(v).is_integer(), "whole number"
            v = int(v) if ok else v
        elif hint is float:
            ok, name = number, "number"
            v = float(v) if ok else v
        elif hint is str or origin is Literal:
            ok, name = isinstance(v, str), "string"
        elif origin is dict and args == (str, str):
            ok, name = isinstance(v, dict) and all(isinstance(x, str) for x in v.values()), "object of strings"
        else:
            return v  # a nested list or object: the caller checks it
        if not ok:
            raise self.fail(where, f"{v!r} is not a {name}")
        return v


def load(path: str | Path) -> Measured:
    """A measured file, checked: the format, every key, types, closed choices, that each point's run
    exists, and one entry per mode and batch."""
    path = Path(path)
    r = _Reader(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{shown(path)}: not found") from None
    except json.JSONDecodeError as e:
        raise r.fail(f"line {e.lineno}", f"not JSON ({e.msg})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise r.fail("format", f"expected {FORMAT}, got {got!r}")
    top = r.object({k: v for k, v in data.items() if k != "format"}, Measured, "top level")
    if top["label_tokens"] < 1:
        raise r.fail("label_tokens", f"{top['label_tokens']} must be >= 1")
    if not isinstance(top["runs"], dict) or not top["runs"]:
        raise r.fail("runs", "expected a non-empty object of run name -> run")
    runs = {}
    for name, run in top["runs"].items():
        kw = r.object(run, Run, f"runs[{name!r}]")
        try:
            datetime.date.fromisoformat(kw["date"])
        except ValueError:
            raise r.fail(f"runs[{name!r}].date", f"{kw['date']!r} is not YYYY-MM-DD") from None
        if kw.get("gpu_memory_gib") is not None and kw["gpu_memory_gib"] <= 0:
            raise r.fail(f"runs[{name!r}].gpu_memory_gib", f"{kw['gpu_memory_gib']} must be > 0")
        runs[name] = Run(**kw)
    if not isinstance(top["modes"], list):
        raise r.fail("modes", "expected a list of modes")
    closed = _closed()
    modes, seen = [], {}
    for i, entry in enumerate(top["modes"]):
        kw = r.object(entry, Setting, f"modes[{i}]")
        for key, allowed in closed.items():
            if key in kw and kw[key] not in allowed:
                raise r.fail(f"modes[{i}].{key}", f"{kw[key]!r}: choose one of {', '.join(allowed)}")
        if not 0 < kw.get("checkpoint_fraction", 1.0) <= 1:
            raise r.fail(f"modes[{i}].checkpoint_fraction", f"{kw['checkpoint_fraction']} must be in (0, 1]")
        if not isinstance(kw["points"], list) or not kw["points"]:
            raise r.fail(f"modes[{i}].points", "expected a non-empty list of points")
        points, batches = [], set()
        for j, p in enumerate(kw["points"]):
            where = f"modes[{i}].points[{j}]"
            pk = r.object(p, Point, where)
            if pk["batch"] < 1 or pk["samples_per_s"] <= 0 or (pk["peak_gib"] is not None and pk["peak_gib"] <= 0):
                raise r.fail(where, "batch >= 1, samples_per_s > 0 and peak_gib > 0 (or null) expected, got "
                                    f"{pk['batch']}, {pk['samples_per_s']}, {pk['peak_gib']}")
            if pk["run"] not in runs:
                raise r.fail(f"{where}.run", f"{pk['run']!r} is not in runs ({', '.join(runs)})")
            if pk["batch"] in batches:
                raise r.fail(where, f"a second point at batch {pk['batch']} (one figure per mode and batch)")
            batches.add(pk["batch"])
            points.append(Point(**pk))
        setting = Setting(**{**kw, "points": tuple(points)})
        if setting.identity() in seen:
            raise r.fail(f"modes[{i}]", f"the same mode as modes[{seen[setting.identity()]}] "
                                        f"({setting.describe()}): put its points in one entry")
        seen[setting.identity()] = i
        modes.append(setting)
    return Measured(path=path, model=top["model"], label_tokens=top["label_tokens"], summary=top["summary"],
                    about=top["about"], runs=runs, modes=tuple(modes))


def to_json(m: Measured) -> dict[str, Any]:
    """The file's content (what `load` reads back); optional keys at their default are left out."""
    def plain(obj) -> dict[str, Any]:
        out = {}
        for f in fields(obj):
            v = getattr(obj, f.name)
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            if f.name == "points":
                out[f.name] = [plain(p) for p in v]
            elif default is MISSING or v != default:
                out[f.name] = v
        return out

    return {"format": FORMAT, "model": m.model, "label_tokens": m.label_tokens, "summary": m.summary, "about": m.about,
            "runs": {k: plain(v) for k, v in m.runs.items()}, "modes": [plain(s) for s in m.modes]}


def write(m: Measured) -> None:
    from lib.files import write_json

    write_json(m.path, to_json(m))
    load(m.path)  # what was written reads back


# ---- which figures apply -------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """The modes auto chooses among on one GPU, each with the file it comes from, and what was left out."""

    modes: tuple[tuple[Setting, Measured], ...]
    files: tuple[Measured, ...]
    """the files read, shipped first"""
    notes: tuple[str, ...] = ()
    """what of the bench's file was not used, and why"""


def shipped() -> Measured:
    return _SHIPPED


def for_gpu(gpu_name: str | None, data_dir: Path | None) -> Figures:
    """The shipped figures, with the bench's (DATA_DIR/bench/large-v2/measured.json) in their place,
    mode by mode, where the bench measured this GPU: a mode's points all come from one file (one
    machine's speed curve). Figures of other GPUs, without a peak (a CPU run) or at other label
    lengths are left out, and said."""
    base = shipped()
    if gpu_name is None or data_dir is None or not user_file(data_dir).is_file():
        return Figures(tuple((s, base) for s in base.modes), (base,))
    own = load(user_file(data_dir))
    where = shown(own.path)
    if own.model != base.model or own.label_tokens != base.label_tokens:
        return Figures(tuple((s, base) for s in base.modes), (base,), (
            f"{where} measured whisper-{own.model} at {own.label_tokens}-token labels; auto's figures are "
            f"whisper-{base.model} at {base.label_tokens}: not used (run `make bench` with its defaults)",))
    mine, skipped = {}, 0
    for s in own.modes:
        here = tuple(p for p in s.points if own.runs[p.run].gpu == gpu_name and p.peak_gib is not None)
        skipped += len(s.points) - len(here)
        if here:
            mine[s.identity()] = replace(s, points=here)
    if not mine:
        gpus = ", ".join(sorted({r.gpu for r in own.runs.values()}))
        return Figures(tuple((s, base) for s in base.modes), (base,), (
            f"{where} holds figures of {gpus}, none with a peak on {gpu_name}: the shipped figures stand",))
    notes = [f"{where}: {skipped} figure(s) measured on another GPU or without a peak: not used"] if skipped else []
    modes = [(mine.pop(s.identity()), own) if s.identity() in mine else (s, base) for s in base.modes]
    modes += [(s, own) for s in mine.values()]
    return Figures(tuple(modes), (base, own), tuple(notes))


_SHIPPED = load(SHIPPED)
