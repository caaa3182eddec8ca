"""The house: jobs/ holds the user's jobs, tools live apart, and every job loads models through lib/model.py."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import soundfile as sf

from lib.env import Env
from tests.helpers import make_run, tone, write_prepared

ROOT = Path(__file__).resolve().parents[2]
USER_JOBS = {"prepare", "train", "eval", "export", "transcribe", "serve"}


def imported_modules(py: Path) -> list[str]:
    names = []
    for node in ast.walk(ast.parse(py.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names.append(node.module or "")
    return names


def test_jobs_lists_only_the_users_jobs():
    entries = {p.name for p in (ROOT / "jobs").iterdir() if p.name != "__pycache__"}
    assert entries == {"__init__.py", "recipes", *(f"{j}.py" for j in USER_JOBS)}


def test_no_job_or_tool_imports_a_job():
    """Jobs share lib/, never each other; the tools run jobs as processes (lib/tools/runner.py)."""
    for py in [*(ROOT / "jobs").glob("*.py"), *(ROOT / "lib" / "tools").glob("*.py")]:
        bad = [m for m in imported_modules(py) if m == "jobs" or m.startswith("jobs.")]
        assert not bad, f"{py.relative_to(ROOT)} imports {bad}"


def library_files() -> list[Path]:
    """Every module of lib/ but the developer tools: the foundations and the wings."""
    return [py for py in sorted((ROOT / "lib").rglob("*.py")) if "tools" not in py.relative_to(ROOT / "lib").parts]


def test_the_library_does_not_depend_on_the_tools():
    for py in library_files():
        bad = [m for m in imported_modules(py) if m.startswith("lib.tools")]
        assert not bad, f"{py.relative_to(ROOT)} imports {bad}"


def test_tools_start_through_run_job():
    for py in (ROOT / "lib" / "tools").glob("*.py"):
        text = py.read_text()
        if '__name__ == "__main__"' in text:
            assert "run_job(" in text, f"{py.relative_to(ROOT)} has a __main__ that does not use lib.cli.run_job"


def test_models_are_loaded_in_lib_model_only():
    """No job or library module but lib/model.py calls a model's or processor's from_pretrained
    (prepare's tokenizer and config reads in lib/prepare/workers.py are not models)."""
    allowed = {"lib/model.py": None, "lib/prepare/workers.py": {"WhisperTokenizer", "AutoConfig"}}
    for py in [*(ROOT / "jobs").glob("*.py"), *library_files()]:
        rel = str(py.relative_to(ROOT))
        for node in ast.walk(ast.parse(py.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr == "from_pretrained":
                owner = ast.unparse(node.func.value)
                ok = rel in allowed and (allowed[rel] is None or owner in allowed[rel])
                assert ok, f"{rel}:{node.lineno} loads {owner}.from_pretrained outside lib/model.py"


@pytest.fixture
def loads(monkeypatch):
    """Record which module every WhisperForConditionalGeneration / WhisperProcessor / PeftModel
    from_pretrained call comes from, while the real loading goes on."""
    import peft
    import transformers

    calls: list[tuple[str, str]] = []
    for cls in (transformers.WhisperForConditionalGeneration, transformers.WhisperProcessor, peft.PeftModel):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, _name=cls.__name__, **kwargs):
            caller = inspect.stack()[1].frame.f_globals.get("__name__", "?")
            calls.append((_name, caller))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


def test_train_eval_export_transcribe_and_serve_load_through_lib_model(tiny_model_dir, tmp_path, loads,
                                                                      monkeypatch):
    from jobs import eval as eval_job
    from jobs import export, serve, train, transcribe
    from lib.config import load_config
    from lib.train.config import TrainConfig

    data = tmp_path / "data"
    env = Env(data_dir=data)
    clips = [(w, tone(1.0, 200 + 150 * i)) for i, w in enumerate(["नमस्ते", "धन्यवाद", "पानी"])]
    write_prepared(data / "prepared" / "toy", tiny_model_dir, {"train": clips, "validation": clips[:1]})
    make_run(data, tiny_model_dir)  # runs/tiny-run on prepared/tiny-hi, as train writes it
    wav = tmp_path / "clip.wav"
    sf.write(wav, tone(1.0, 300), 16_000)

    jobs = {
        "train": lambda: train.main(load_config(TrainConfig, None, [
            "run=r", "data=toy", f"model.base={tiny_model_dir}", "model.quantization=none",
            "model.precision=fp32", "model.gradient_checkpointing=false", "train.batch_size=2",
            "train.max_steps=1", "train.eval_steps=1", "train.save_steps=1", "train.num_workers=0",
            "train.generation_max_length=4", "train.max_eval_samples=1"]), env),
        "eval": lambda: eval_job.main(eval_job.EvalConfig(run="tiny-run", max_new_tokens=4, limit=1,
                                                          compare_base=False), env),
        "export": lambda: export.main(export.ExportConfig(run="tiny-run", dtype="fp32", verify_clips=1,
                                                          verify_tokens=4), env),
        "transcribe": lambda: transcribe.main(transcribe.TranscribeConfig(audio=str(wav), run="tiny-run",
                                                                          max_new_tokens=4), env),
        "serve": lambda: serve.main(serve.ServeConfig(run="tiny-run", max_new_tokens=4), env),
    }
    monkeypatch.setattr("lib.serve.page.launch", lambda page, host, port: None)  # build the page, do not serve it
    for name, run in jobs.items():
        loads.clear()
        run()
        kinds = {k for k, _ in loads}
        assert "WhisperForConditionalGeneration" in kinds and "WhisperProcessor" in kinds, (name, loads)
        if name != "train":
            assert "PeftModel" in kinds, (name, loads)  # base + adapter
        assert {caller for _, caller in loads} == {"lib.model"}, (name, loads)


def test_layout_page_names_every_module():
    """docs/layout.md matches the tree: every job, every module of lib/ (foundations, every wing, the
    tools) is named there by its path, and it names none that is gone."""
    import re

    page = ROOT / "docs" / "layout.md"
    named = set(re.findall(r"`((?:jobs|lib)/[\w/]+\.py)`", page.read_text()))
    actual = {str(py.relative_to(ROOT)) for folder in ("jobs", "lib") for py in (ROOT / folder).rglob("*.py")
              if py.name != "__init__.py" and "__pycache__" not in py.parts}
    assert not actual - named, f"docs/layout.md does not name {sorted(actual - named)}"
    assert not named - actual, f"docs/layout.md names {sorted(named - actual)}, which do not exist"


@pytest.mark.parametrize("job, flags", [
    ("train", ["--recipe", "jobs/recipes/whisper-large-v2_lora-int8_1gpu.yaml", "run=whisper-large-v2-lora-xx",
               "data=cv_xx"]),
    ("prepare", ["name=cv_xx"]),
    ("eval", ["run=whisper-large-v2-lora-xx", "data=cv_xx"]),
])
def test_an_unknown_language_is_named_before_missing_data(job, flags, tmp_path, monkeypatch, capsys):
    """`make train LANG=xx` with nothing prepared (the flags `make JOB LANG=xx` passes): the error is the
    language, not the missing cv_xx, source.path or run."""
    import importlib

    from lib.cli import run_job

    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    module = importlib.import_module(f"jobs.{job}")
    cfg_cls = getattr(module, {"train": "TrainConfig", "prepare": "PrepareConfig", "eval": "EvalConfig"}[job])
    code = run_job(job, "", cfg_cls, module.main, [*flags, "language=xx"])
    err = capsys.readouterr().err
    assert code == 2
    assert "error: language='xx' is not a language Whisper knows" in err, err
    assert "with make: LANG=hi" in err and "prepared" not in err and "source.path" not in err


# Dataset names: one spelling, the Makefile's default cv_$(LANG) (prepare's name=, train's data=).
DASHED_DATASET = re.compile(r"\bcv-[a-z]{2,3}\b")  # cv-hi, cv-hi-small; not cv-corpus-17.0


def dashed_dataset_names(paths) -> list[str]:
    found = []
    for path in paths:
        try:
            text = (ROOT / path).read_text(encoding="utf-8")
        except (UnicodeDecodeError, IsADirectoryError, FileNotFoundError):
            continue
        found += [f"{path}:{n}: {line.strip()}" for n, line in enumerate(text.splitlines(), 1)
                  if DASHED_DATASET.search(line)]
    return found


def tracked_files() -> list[str]:
    import subprocess

    return subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.splitlines()


def test_dataset_names_have_one_spelling():
    here = str(Path(__file__).relative_to(ROOT))  # names the spelling it looks for
    found = dashed_dataset_names(p for p in tracked_files() if p not in ("README.md", here))
    assert not found, "write cv_hi (the Makefile's cv_$(LANG)), not cv-hi:\n" + "\n".join(found)


def test_readme_dataset_names_have_one_spelling():
    found = dashed_dataset_names(["README.md"])
    assert not found, "write cv_hi (the Makefile's cv_$(LANG)), not cv-hi:\n" + "\n".join(found)
