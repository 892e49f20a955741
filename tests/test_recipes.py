"""configs/sop_*.yaml: one recipe per objective, each valid, each naming where its values come from."""

import sys

import pytest

from config import load_config
from conftest import REPO_ROOT
from objective import LOSSES, resolve_objective_config

sys.path.insert(0, str(REPO_ROOT / "bench"))
from recipe_bench import recipe_overrides  # noqa: E402

RECIPES = sorted((REPO_ROOT / "configs").glob("sop_*.yaml"))


def test_every_loss_has_a_recipe():
    assert sorted(path.stem.removeprefix("sop_") for path in RECIPES) == sorted(LOSSES)


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.stem)
def test_a_recipe_is_valid_and_says_where_its_values_come_from(path):
    config = resolve_objective_config(load_config(path))  # unknown loss or miner parameters would raise here
    assert config.train.loss == path.stem.removeprefix("sop_")
    assert config.model.backbone == "microsoft/swinv2-base-patch4-window16-256" and config.data.format == "sop"
    header = path.read_text().split("\ndata:")[0]
    assert "et al." in header or "OML" in header, "the first comment names the paper or code the values come from"


@pytest.mark.parametrize("path", RECIPES, ids=lambda path: path.stem)
def test_the_bench_adapts_a_recipe_to_the_tiny_model_keeping_its_objective(path):
    recipe = resolve_objective_config(load_config(path))
    adapted = resolve_objective_config(load_config(REPO_ROOT / "configs" / "demo.yaml", recipe_overrides(path, 64)))
    for key in ("loss", "loss_params", "miner", "miner_params", "margin", "contrastive_pos_margin",
                "contrastive_neg_margin", "loss_lr"):
        if recipe.is_explicit(f"train.{key}"):
            assert getattr(adapted.train, key) == getattr(recipe.train, key), key
    assert adapted.data.sampler == recipe.data.sampler
    assert adapted.data.images_per_class == recipe.data.images_per_class
    assert adapted.data.classes_per_batch * adapted.data.images_per_class <= 64
    assert adapted.model.backbone == "tiny"
