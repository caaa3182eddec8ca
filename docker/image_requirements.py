"""The image's requirements: requirements.lock less what only development uses.

The lock pins pyproject.toml's dependencies and its `dev` extra (tests, linters: about 400 MB
of Playwright, kubernetes-validate's schemas, moto, hadolint, ruff) so that CI is reproducible;
no job imports the dev tools, so the image leaves them out. A package stays when pyproject.toml
depends on it directly, or when a package that stays needs it (the lock's `# via` lines say who
needs whom). Hashes and versions are copied unchanged.

    python docker/image_requirements.py requirements.lock pyproject.toml [--torch cpu] > requirements.txt

--torch cpu: the CPU build of the same torch (the lock's torch line carries its hash too) and
none of the CUDA wheels (nvidia-*, cuda-*, triton), as `make setup` installs on a CPU machine.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

ROOT_VIA = "whisper-finetune (pyproject.toml)"
CUDA_ONLY = re.compile(r"^(triton|nvidia-.*|cuda-.*)$")


def norm(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one -; extras dropped."""
    return re.sub(r"[-_.]+", "-", name.split("[")[0].strip()).lower()


def blocks(lock: str) -> list[tuple[str, list[str], set[str]]]:
    """(name, the block's lines, the names in its `# via`) for each pinned package."""
    out: list[tuple[str, list[str], set[str]]] = []
    for line in lock.splitlines():
        if re.match(r"^[A-Za-z0-9]", line):
            out.append((norm(line.split("==")[0]), [line], set()))
        elif out:
            out[-1][1].append(line)
            via = re.match(r"^\s*#\s+(?:via\s+)?(\S.*)$", line)
            if via and via[1].strip() != "via":
                out[-1][2].add(ROOT_VIA if via[1].strip() == ROOT_VIA else norm(via[1].strip()))
    return out


def runtime(lock: str, pyproject: str) -> set[str]:
    """Names of pyproject's direct dependencies and of every package they need, transitively."""
    direct = {norm(re.split(r"[<>=!~;\s]", d, maxsplit=1)[0])
              for d in tomllib.loads(pyproject)["project"]["dependencies"]}
    parsed = blocks(lock)
    missing = direct - {name for name, _, _ in parsed}
    if missing:
        raise SystemExit(f"error: pyproject.toml depends on {sorted(missing)}, which requirements.lock "
                         "does not pin: run make lock")
    keep = set(direct)
    grew = True
    while grew:
        grew = False
        for name, _, via in parsed:
            if name not in keep and via & keep:
                keep.add(name)
                grew = True
    return keep


def image_requirements(lock: str, pyproject: str, torch: str = "cuda") -> str:
    keep = runtime(lock, pyproject)
    lines: list[str] = []
    for name, block, _ in blocks(lock):
        if name not in keep or (torch == "cpu" and CUDA_ONLY.match(name)):
            continue
        if torch == "cpu" and name == "torch":
            block = [re.sub(r"^torch==([0-9.]+) ", r"torch==\1+cpu ", block[0]), *block[1:]]
        lines.extend(block)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("lock", type=Path)
    parser.add_argument("pyproject", type=Path)
    parser.add_argument("--torch", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args(argv)
    sys.stdout.write(image_requirements(args.lock.read_text(), args.pyproject.read_text(), args.torch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
