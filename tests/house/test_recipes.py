"""Every shipped recipe (found recursively) loads into its job's config and says how to run it."""

from pathlib import Path

import pytest

from lib.config import load_config
from lib.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
TRAIN_RECIPES = sorted(
    p for p in (ROOT / "jobs" / "recipes").rglob("*.yaml") if p.name.startswith("whisper-")
)


def test_train_recipes_are_found():
    names = {p.name for p in TRAIN_RECIPES}
    assert "whisper-large-v2_lora-int8_1gpu.yaml" in names and len(names) >= 3


@pytest.mark.parametrize("recipe", TRAIN_RECIPES, ids=lambda p: p.name)
def test_train_recipe_loads_and_documents_itself(recipe):
    cfg = load_config(TrainConfig, recipe, ["run=x", "data=y"])
    assert cfg.model.base.startswith("openai/whisper-")
    assert len(recipe.stem.split("_")) == 3, "name recipes <model>_<method>_<hardware>.yaml"
    head = recipe.read_text().split("\n\n")[0]
    assert head.startswith("# ") and "python -m jobs.train --recipe" in head and "override" in head


def test_default_recipe_is_the_walkthrough():
    cfg = load_config(TrainConfig, ROOT / "jobs/recipes/whisper-large-v2_lora-int8_1gpu.yaml", ["run=x", "data=y"])
    assert (cfg.model.base, cfg.model.quantization, cfg.model.precision) == ("openai/whisper-large-v2", "int8", "fp16")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (32, 64, 0.05, ["q_proj", "v_proj"])
    assert (cfg.train.lr, cfg.train.warmup_steps, cfg.train.batch_size) == (1e-3, 50, 8)
    # and the dataclass defaults agree with it
    d = load_config(TrainConfig, None, ["run=x", "data=y"])
    assert (d.model, d.lora) == (cfg.model, cfg.lora)
