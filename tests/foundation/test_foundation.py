"""The shared core: config layering, env handling, the lib/jobs boundary, and the tiny model."""

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from lib.config import load_config, to_dict
from lib.env import load_env
from lib.errors import UserError

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class _Lora:
    r: int = 32
    """rank"""
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class _Cfg:
    lora: _Lora = field(default_factory=_Lora)
    quantization: Literal["int8", "nf4", "none"] = "int8"
    lr: float = 1e-3

    def __post_init__(self):
        if self.lr <= 0:
            raise UserError("lr must be > 0: set lr=1e-3")


def test_config_layers_defaults_recipe_flags(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("lora:\n  r: 8\nquantization: nf4\n")
    cfg = load_config(_Cfg, recipe, ["lora.r=16", "lora.targets=q_proj,k_proj"])
    assert cfg.lora.r == 16 and cfg.quantization == "nf4" and cfg.lr == 1e-3
    assert cfg.lora.targets == ["q_proj", "k_proj"]
    assert to_dict(cfg)["lora"]["r"] == 16


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["lora.rank=8"], "unknown key 'rank'"),
        (["quantization=int4"], "not one of int8, nf4, none"),
        (["lora.r=big"], "whole number"),
        (["lr=-1"], "lr must be > 0"),
        (["nokey"], "key=value"),
    ],
)
def test_config_errors_name_the_key(flags, needle):
    with pytest.raises(UserError, match=needle):
        load_config(_Cfg, None, flags)


def test_recipe_unknown_key_names_file(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("lora:\n  alpah: 64\n")
    with pytest.raises(UserError, match=r"bad.yaml.*unknown key 'alpah'"):
        load_config(_Cfg, recipe, [])


def test_unknown_key_names_the_nearest_key_and_says_where_once(tmp_path):
    def said(*flags: str, recipe=None) -> str:
        with pytest.raises(UserError) as e:
            load_config(_Cfg, recipe, list(flags))
        return str(e.value)

    assert said("bogus.flag=1") == "flag 'bogus.flag=1': unknown key 'bogus' (known keys here: lora, lr, quantization)"
    assert said("quantisation=nf4").endswith("; did you mean quantization?")
    assert said("lora.rr=8") == ("flag 'lora.rr=8': unknown key 'rr' in lora (known keys in lora: r, targets); "
                                 "did you mean lora.r?")
    assert said("targets=q_proj").endswith("; did you mean lora.targets?")  # a section's key given at the top
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("lora:\n  targts: [q_proj]\n")
    assert said(recipe=recipe) == (f"recipe {recipe}: unknown key 'targts' in lora (known keys in lora: r, targets); "
                                   f"did you mean lora.targets?")
    assert said("lora.r=big") == "flag 'lora.r=big': lora.r: expected a whole number, got 'big'"
    assert said("lora=8") == "flag 'lora=8': 'lora' is a section; give it keys, e.g. lora.<name>=..."
    assert "::" not in said("bogus=1") + said("lr=x")


def test_env_file_secrets_never_shown(tmp_path, monkeypatch):
    for k in ("HF_TOKEN", "MDC_API_KEY", "DATA_DIR", "HF_HOME"):
        monkeypatch.delenv(k, raising=False)
    f = tmp_path / ".env"
    f.write_text(f"HF_TOKEN=hf_secretvalue123\nDATA_DIR={tmp_path}/data\nHF_HOME={tmp_path}/hf\n")
    env = load_env(f)
    assert env.hf_token == "hf_secretvalue123"
    assert "hf_secretvalue123" not in repr(env) and "hf_secretvalue123" not in str(env.describe())
    assert env.prepared_dir("cv_hi") == tmp_path / "data" / "prepared" / "cv_hi"


def test_env_file_quoted_value_is_an_error(tmp_path):
    f = tmp_path / ".env"
    f.write_text('HF_TOKEN="hf_x"\n')
    with pytest.raises(UserError, match="without quotes"):
        load_env(f)


def test_lib_never_imports_jobs():
    for py in (ROOT / "lib").rglob("*.py"):
        tree = ast.parse(py.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n == "jobs" or n.startswith("jobs.") for n in names), f"{py} imports jobs"


def test_tiny_model_loads_through_from_pretrained(tiny_model_dir):
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir)
    proc = WhisperProcessor.from_pretrained(tiny_model_dir)
    assert model.config.d_model == 64
    ids = proc.tokenizer("नमस्ते").input_ids
    assert proc.tokenizer.decode(ids, skip_special_tokens=True) == "नमस्ते"


@dataclass
class _Opt:
    quantization: Literal["int8", "none"] = "int8"
    max_steps: int | None = 10


def test_none_is_a_choice_or_unsets_an_optional():
    cfg = load_config(_Opt, None, ["quantization=none", "max_steps=none"])
    assert cfg.quantization == "none" and cfg.max_steps is None
    assert load_config(_Opt, None, ["max_steps=null"]).max_steps is None
