"""The docs keep step with the code: what the README and docs/ tell a user to type must work.

Checked in README.md and every page under docs/:
  - every `make TARGET` names a target of the Makefile, every `VAR=` on a make line a variable of it;
  - every `key=value` / `section.key=value` next to a job (`python -m jobs.X`, `make X`, a make
    line's ARGS) or a tool (`python -m lib.tools.X`, `make bench`) is a field of its config class;
  - docs/jobs/<job>.md has a flag table naming every field of the job's config, and nothing else;
  - every relative link (and its #anchor) resolves;
  - the README stays a manual (at most 420 lines) and no page cites an issue number.
Commands are read from fenced code blocks and inline code spans, never from prose.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import re
import shlex
import typing
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]
JOBS = ("prepare", "train", "eval", "export", "transcribe", "serve")
README_MAX_LINES = 420
# `make prepare` names its output `data=` (as train and eval read it); `name=` is the older
# spelling of the same field. Either is a flag of prepare while its config has either.
ALIASES = {"jobs.prepare": {"name", "data"}}
FLAG = re.compile(r"^([a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)*)=")


def rel(page: Path) -> str:
    return str(page.relative_to(ROOT))


# --- The Makefile ------------------------------------------------------------------------------


@cache
def makefile() -> str:
    return (ROOT / "Makefile").read_text()


@cache
def make_targets() -> frozenset[str]:
    return frozenset(m.group(1) for m in re.finditer(r"^([a-z][a-z0-9_-]*)\s*:(?!=)", makefile(), re.M))


@cache
def make_variables() -> frozenset[str]:
    """Variables the Makefile sets (`VAR ?= ...`, `VAR := ...`, `target: VAR = ...`), and LANG: the
    Makefile reads a command-line LANG as the target language (see its comment), never sets it."""
    names = set(re.findall(r"^(?:[a-z][\w-]*:\s*)?(?:override\s+)?([A-Za-z_][A-Za-z0-9_]*)\s*(?:\?=|:=|\+=|=)",
                           makefile(), re.M))
    assert "$(origin LANG),command line" in makefile(), "the Makefile no longer treats LANG specially: update this test"
    return frozenset(names | {"LANG"})


@cache
def target_module(target: str) -> str | None:
    """The Python module a target runs (the Makefile's `module` rule): MODULE_<name>, else jobs.<name>."""
    name = target.replace("-", "_")
    tools = dict(re.findall(r"^MODULE_(\w+)\s*:?=\s*(\S+)", makefile(), re.M))
    return tools.get(name) or (f"jobs.{name}" if name in JOBS else None)


# --- Config classes and their fields -----------------------------------------------------------


@cache
def config_class(module: str) -> type:
    """The dataclass `module` hands to lib.cli.run_job, imported from where it is defined (jobs.train
    takes a minute to import; its config, lib/train/config.py, does not)."""
    path = ROOT / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text())
    name = next(node.args[2].id for node in ast.walk(tree) if isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "run_job" and len(node.args) >= 3)
    where = module
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and any(a.name == name for a in node.names):
            where = node.module
    return getattr(importlib.import_module(where), name)


def field_names(cls: type, prefix: str = "") -> set[str]:
    """Every flag of a config: its fields, nested sections as `section.key`."""
    hints = typing.get_type_hints(cls)
    out = set()
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out |= field_names(tp, f"{prefix}{f.name}.")
        else:
            out.add(prefix + f.name)
    return out


@cache
def flags_of(module: str) -> frozenset[str]:
    names = field_names(config_class(module))
    alias = ALIASES.get(module, set())
    return frozenset(names | alias if names & alias else names)


def module_exists(module: str) -> bool:
    return (ROOT / (module.replace(".", "/") + ".py")).is_file()


# --- Commands written in the docs --------------------------------------------------------------


def snippets(page: Path) -> list[tuple[int, str]]:
    """(line, text) of every command a reader could type: each line of a fenced code block (with
    backslash continuations joined) and each inline code span (a span may cross a line break)."""
    out, para, para_start, fenced, pending = [], [], 0, False, ""
    lines = page.read_text().splitlines()

    def flush():
        text = "\n".join(para)
        for m in re.finditer(r"`([^`]+)`", text):
            out.append((para_start + text[:m.start()].count("\n"), m.group(1).replace("\n", " ")))
        para.clear()

    for n, line in enumerate(lines, 1):
        if line.lstrip().startswith("```"):
            flush()
            fenced = not fenced
            continue
        if fenced:
            pending += line[:-1] + " " if line.endswith("\\") else line
            if not line.endswith("\\"):
                out.append((n, pending))
                pending = ""
        elif line.strip():
            if not para:
                para_start = n
            para.append(line)
        else:
            flush()
    flush()
    return out


def words(segment: str) -> list[str]:
    try:
        return shlex.split(segment)
    except ValueError:  # an unbalanced quote (code, not a command): good enough
        return segment.split()


def commands(page: Path):
    """(line, kind, name, tokens) for every `make ...` and `python -m MODULE ...` in the page's code:
    kind "make" with the tokens after make; kind "python" with the module and the tokens after it."""
    for n, text in snippets(page):
        text = re.sub(r"(^|\s)#.*$", "", text)  # a shell comment
        for segment in re.split(r";|&&|\|\||\bdo\b|\bthen\b", text):
            toks = words(segment)
            for i, tok in enumerate(toks):
                if tok == "make":
                    yield n, "make", "make", toks[i + 1:]
                    break
                if tok == "-m" and i + 1 < len(toks):
                    yield n, "python", toks[i + 1], toks[i + 2:]


def job_flags(tokens: list[str]) -> list[str]:
    """The key of every key=value among a job's arguments (options and $VARIABLES skipped)."""
    out, skip = [], False
    for tok in tokens:
        if skip:
            skip = False
        elif tok in ("--recipe", "--env-file"):
            skip = True
        elif tok == "-m":
            break  # another module starts (lib.launch ... -m jobs.train): commands() yields it
        elif m := FLAG.match(tok):
            out.append(m.group(1))
    return out


def make_parts(tokens: list[str]) -> tuple[list[str], list[str], list[str]]:
    """A make line: (targets, VAR names given, job flags in ARGS)."""
    targets, variables, flags = [], [], []
    for tok in tokens:
        if tok.startswith("-"):
            continue
        if m := re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", tok, re.S):
            variables.append(m.group(1))
            if m.group(1) == "ARGS":
                flags += job_flags(words(m.group(2)))
        elif re.fullmatch(r"[a-z][a-z0-9_-]*", tok):
            targets.append(tok)
        else:
            break  # the rest is not make's (a path, $VAR, ...)
    return targets, variables, flags


@cache
def all_commands() -> list[tuple[str, int, str, str, tuple[str, ...]]]:
    return [(rel(page), n, kind, name, tuple(toks)) for page in PAGES for n, kind, name, toks in commands(page)]


# --- The tests ---------------------------------------------------------------------------------


def test_every_make_target_in_the_docs_exists():
    seen, bad = set(), []
    for page, n, kind, _, toks in all_commands():
        if kind == "make":
            for target in make_parts(list(toks))[0]:
                seen.add(target)
                if target not in make_targets():
                    bad.append(f"{page}:{n}: make {target}")
    assert not bad, "targets the Makefile does not have:\n" + "\n".join(bad)
    assert {"setup", "test", "build", "demo", *JOBS} <= seen, "the docs no longer show the main targets"


def test_every_make_variable_in_the_docs_exists():
    seen, bad = set(), []
    for page, n, kind, _, toks in all_commands():
        if kind == "make":
            for var in make_parts(list(toks))[1]:
                seen.add(var)
                if var not in make_variables():
                    bad.append(f"{page}:{n}: {var}=")
    assert not bad, "Make variables the Makefile does not have:\n" + "\n".join(bad)
    assert {"LANG", "DATA", "RUN", "ARGS", "RECIPE"} <= seen


def test_every_flag_next_to_a_job_or_tool_is_a_field_of_its_config():
    checked: dict[str, int] = {}
    bad = []
    for page, n, kind, name, toks in all_commands():
        if kind == "make":
            targets, _, flags = make_parts(list(toks))
            modules = [m for m in map(target_module, targets) if m]
            pairs = [(m, f) for m in modules[:1] for f in flags]
        elif name.startswith(("jobs.", "lib.tools.")) and name == name.lower():  # not lib.tools.NAME
            if not module_exists(name):
                bad.append(f"{page}:{n}: python -m {name}: no such job or tool")
                continue
            pairs = [(name, f) for f in job_flags(list(toks))]
        else:
            continue
        for module, flag in pairs:
            checked[module] = checked.get(module, 0) + 1
            if flag not in flags_of(module):
                bad.append(f"{page}:{n}: {flag}= is not a flag of {module} ({config_class(module).__name__})")
    assert not bad, "flags the code does not have:\n" + "\n".join(bad)
    # the parser found the commands: every job shows at least one flag somewhere
    assert all(checked.get(f"jobs.{job}") for job in JOBS), checked


def flag_table(page: Path) -> list[str]:
    """The first column of the `## Flags` table of a job page."""
    text = page.read_text()
    assert "\n## Flags\n" in text, f"{rel(page)} has no '## Flags' section"
    section = text.split("\n## Flags\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `([^`]+)` \|", section, re.M)


@pytest.mark.parametrize("job", JOBS)
def test_each_job_page_has_a_row_for_every_flag_and_no_other(job):
    page = ROOT / "docs" / "jobs" / f"{job}.md"
    assert page.is_file(), f"docs/jobs/{job}.md is missing: every job has a reference page"
    rows = flag_table(page)
    fields = flags_of(f"jobs.{job}")
    alias = ALIASES.get(f"jobs.{job}", set())
    missing = sorted(f for f in fields if f not in rows and not (f in alias and alias & set(rows)))
    unknown = sorted(r for r in rows if r not in fields)
    assert not missing, f"docs/jobs/{job}.md: no row for {missing} (a flag of {config_class(f'jobs.{job}').__name__})"
    assert not unknown, f"docs/jobs/{job}.md: rows for {unknown}, which are not flags of the job"
    assert len(rows) == len(set(rows)), f"docs/jobs/{job}.md: a flag has two rows"
    for heading in ("## Exit codes", "## Outputs"):
        assert f"\n{heading}\n" in page.read_text(), f"docs/jobs/{job}.md has no '{heading}' section"


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


@cache
def anchors(page: Path) -> frozenset[str]:
    out, fenced, count = set(), False, {}
    for line in page.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"^#{1,6}\s+(.*)$", line)):
            s = slug(m.group(1))
            out.add(s if s not in count else f"{s}-{count[s]}")
            count[s] = count.get(s, 0) + 1
    return frozenset(out)


def links(page: Path) -> list[tuple[int, str]]:
    out, fenced = [], False
    for n, line in enumerate(page.read_text().splitlines(), 1):
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            out += [(n, m.group(1)) for m in re.finditer(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line)]
    return out


def test_every_relative_link_resolves():
    bad, count = [], 0
    for page in PAGES:
        for n, target in links(page):
            if re.match(r"^[a-z]+:", target):  # https:, mailto:
                continue
            count += 1
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            if not dest.exists():
                bad.append(f"{rel(page)}:{n}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                bad.append(f"{rel(page)}:{n}: {target}: no heading with that anchor in {dest.name}")
    assert not bad, "broken links:\n" + "\n".join(bad)
    assert count > 20, "the link parser found almost no links"


def test_the_readme_is_a_manual_not_a_notebook():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): move detail into docs/")
    text = README.read_text()
    assert "make setup" in text and "make test" in text, "the README shows the two set-up commands"
    assert text.count("**the walkthrough**") == 1, "the README says once what 'the walkthrough' is"


def test_no_issue_numbers_in_what_users_read():
    pattern = re.compile(r"(?i)\bissues?[\s#-]*\d+|(?<![\w&/])#\d+\b")
    bad = [f"{rel(page)}:{n}: {m.group(0)!r}" for page in PAGES
           for n, line in enumerate(page.read_text().splitlines(), 1) for m in pattern.finditer(line)]
    assert not bad, "issue numbers belong in commits, not in the docs:\n" + "\n".join(bad)
