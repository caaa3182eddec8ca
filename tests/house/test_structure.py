"""The house's structure, read from the code: lib/ in wings beside the foundations, imports that
run one way (no circle, no wing reaching forward), Whisper's facts and `data=` each in one place."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LIB = ROOT / "lib"

FOUNDATIONS = {"audio", "cli", "config", "decoding", "env", "errors", "files", "hub", "inference", "language",
               "launch", "metrics", "model", "quiet", "runlock", "summary", "whisper"}
"""lib/*.py: what every wing stands on"""
SHARED = {"dataset"}
"""lib/dataset/: the prepared-data contract (manifest, shards, `data=`), a foundation in a folder"""
WINGS = ["prepare", "train", "evaluate", "export", "serve"]
"""lib/<wing>/, in pipeline order: a wing may import the foundations and the wings before it"""


def module_name(py: Path) -> str:
    return ".".join(py.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def imports(py: Path) -> set[str]:
    """The project modules `py` imports, at the top or inside a function (lazy imports count)."""
    out = set()
    for node in ast.walk(ast.parse(py.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:  # `from lib.train import auto` imports the module lib.train.auto
                sub = f"{node.module}.{a.name}"
                out.add(sub if (ROOT / (sub.replace(".", "/") + ".py")).exists() else node.module)
    return {m for m in out if m.split(".")[0] in ("lib", "jobs")}


def project_modules() -> dict[str, Path]:
    files = [*LIB.rglob("*.py"), *(ROOT / "jobs").glob("*.py")]
    return {module_name(py): py for py in files}


def place(module: str) -> str:
    """'foundation', a wing's name, 'tools' or 'jobs'."""
    parts = module.split(".")
    if parts[0] == "jobs":
        return "jobs"
    if len(parts) == 1:
        return "foundation"  # lib/__init__.py
    if parts[1] in SHARED:
        return "foundation"
    return parts[1] if len(parts) > 2 or parts[1] in (*WINGS, "tools") else "foundation"


def test_lib_is_foundations_and_wings():
    top = {p.stem for p in LIB.glob("*.py")} - {"__init__"}
    folders = {p.name for p in LIB.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert top == FOUNDATIONS, f"lib/ top level: new {sorted(top - FOUNDATIONS)}, gone {sorted(FOUNDATIONS - top)}"
    assert folders == {*WINGS, *SHARED, "tools"}
    for wing in [*WINGS, *SHARED, "tools"]:
        init = LIB / wing / "__init__.py"
        assert init.exists() and ast.get_docstring(ast.parse(init.read_text())), f"lib/{wing}/ needs a docstring"


def test_no_import_circle():
    """No module reaches itself through imports, lazy ones included (Tarjan's components)."""
    mods = project_modules()
    graph = {m: {i for i in imports(py) if i in mods and i != m} for m, py in mods.items()}
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_foundations_import_no_wing_and_wings_look_only_back():
    order = {w: i for i, w in enumerate(WINGS)}
    for mod, py in project_modules().items():
        here = place(mod)
        for target in imports(py):
            there = place(target)
            if here in ("jobs", "tools") or there == "foundation" or there == here:
                continue
            assert here != "foundation", f"{mod} (a foundation) imports the {there} wing: {target}"
            assert there != "tools", f"{mod} imports a developer tool: {target}"
            assert order[there] < order[here], f"{mod} ({here}) reaches forward into {target} ({there})"


# Whisper's numbers: the window, its frames and positions, the decoder's positions and budget,
# the start and end tokens, the timestamp grid. Written anywhere but lib/whisper.py they drift.
WHISPER_NUMBERS = {448, 444, 1500, 3000, 16_000, 480_000, 50257, 50258, 223, 220, 0.02}


def test_data_is_parsed_in_one_place():
    """`data=` becomes typed corpora in one place, lib.dataset.corpora.DataFlag.corpora(), which
    every config with a `data=` field inherits and every job reads: parse_data is called nowhere else."""
    calls = []
    for py in project_modules().values():
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
                if name == "parse_data":
                    calls.append(f"{py.relative_to(ROOT)}:{node.lineno}")
    assert len(calls) == 1 and calls[0].startswith("lib/dataset/corpora.py:"), \
        "data= parsed in more than one place (read the config's corpora()):\n" + "\n".join(calls)


def test_whisper_facts_live_in_lib_whisper():
    found = []
    for mod, py in project_modules().items():
        if mod == "lib.whisper":
            continue
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value in WHISPER_NUMBERS:
                if not (node.value == 0.02 and mod in ("jobs.eval", "lib.export.merge")):  # tolerances, not the grid
                    found.append(f"{py.relative_to(ROOT)}:{node.lineno}: {node.value}")
    assert not found, "Whisper's facts written outside lib/whisper.py:\n" + "\n".join(found)


LIGHT_CHECKS = {
    "Whisper's facts": "import lib.whisper",
    "a train config with a mixture": "from lib.config import load_config\nfrom lib.train.config import TrainConfig\n"
                                     "load_config(TrainConfig, None, ['run=r', 'data=a:0.7,b:0.3'])",
    "the prepare sources": "import lib.prepare.sources",
    "the shared decoding flags (eval, export, transcribe, serve)": "from lib.decoding import DecodeConfig, ModelChoice\n"
                                                                   "DecodeConfig(), ModelChoice()",
}


def test_light_checks_import_nothing_heavy():
    """Checking a flag or reading a constant loads neither torch nor transformers (each costs seconds)."""
    import subprocess
    import sys

    for what, code in LIGHT_CHECKS.items():
        probe = code + "\nimport sys\nprint(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
        out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, (what, out.stderr[-2000:])
        assert out.stdout.strip().splitlines()[-1] == "[]", f"{what} imports {out.stdout.strip()}"
