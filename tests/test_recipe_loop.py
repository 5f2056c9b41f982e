"""Recipes nest the loop's settings (:mod:`mechdiff.training.recipe_loop`): the files saved before
the nesting (flat) and after (nested) load to the same recipe, keyword construction reads as
before, and the checkpoint folder a recipe keys stays where old runs left it."""

import json
import re
from dataclasses import replace
from pathlib import Path

import pytest

from mechdiff.config_checks import ConfigError
from mechdiff.lora import TrainConfig
from mechdiff.organism.train import Recipe as OrganismRecipe
from mechdiff.real.finetune import Recipe
from mechdiff.training.adapter_objective import AdapterRecipe
from mechdiff.training.loop import LoopConfig

ROOT = Path(__file__).resolve().parents[1]
SHIPPED_ADAPTERS = sorted(ROOT.glob("mechdiff/**/adapters.json"))
SHIPPED_LORAS = sorted(ROOT.glob("mechdiff/**/lora_r*/training.json"))


@pytest.mark.parametrize("path", SHIPPED_ADAPTERS, ids=lambda p: str(p.parent.relative_to(ROOT)))
def test_shipped_adapter_recipes_load_flat_and_nested(path):
    flat = json.loads(path.read_text())["recipe"]
    assert "steps" in flat and "loop" not in flat  # saved before the nesting
    recipe = AdapterRecipe.from_dict(flat)
    assert (recipe.loop.steps, recipe.loop.lr, recipe.batch_size) == (flat["steps"], flat["lr"], flat["batch_size"])
    again = recipe.flat_dict()  # what keys a checkpoint folder: unchanged, so old runs resume
    assert {k: again[k] for k in flat} == flat and set(again) - set(flat) <= {
        "autocast",
        "checkpoint",
        "bridge_rows",
    }  # newer
    nested = json.loads(json.dumps(recipe.to_dict()))
    assert nested["loop"]["steps"] == flat["steps"] and "steps" not in nested
    assert AdapterRecipe.from_dict(nested) == recipe


@pytest.mark.parametrize("path", SHIPPED_LORAS, ids=lambda p: str(p.parent.relative_to(ROOT)))
def test_shipped_lora_configs_load_flat_and_nested(path):
    flat = json.loads(path.read_text())["config"]
    cfg = TrainConfig.from_dict(flat)
    assert (cfg.steps, cfg.loop.lr, cfg.loop.checkpoint_every) == (flat["steps"], flat["lr"], flat["checkpoint_every"])
    again = cfg.flat_dict()
    assert {k: again[k] for k in flat} == flat and set(again) - set(flat) <= {"checkpoint"}  # newer
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_keywords_go_into_the_loop_and_its_defaults_are_the_old_ones():
    r = AdapterRecipe(d_sae=512, steps=3, batch_size=4, progress=False)
    assert (r.d_sae, r.batch_size, r.loop.steps, r.loop.progress, r.steps) == (512, 4, 3, False, 3)
    assert r.loop == LoopConfig(steps=3, lr=1e-3, progress=False)
    assert replace(r, lr=2e-3).loop.lr == 2e-3 and replace(r, lr=2e-3).loop.steps == 3
    lora, real = TrainConfig(), Recipe()
    assert (lora.loop.steps, lora.loop.lr, lora.loop.checkpoint_every, lora.loop.log_every) == (1000, 1e-2, 100, 10)
    assert (real.loop.steps, real.loop.lr, real.loop.checkpoint_every, real.loop.log_every) == (360, 3e-5, 30, 1)
    assert Recipe.from_dict({"steps": 5, "lr": 1e-4, "batch_size": 2}) == Recipe(
        loop=replace(Recipe().loop, steps=5, lr=1e-4), batch_size=2
    )
    with pytest.raises(AttributeError):
        r.no_such_setting  # noqa: B018


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: AdapterRecipe(steps=0), "AdapterRecipe.steps = 0: must be >= 1"),
        (lambda: TrainConfig(lr=0.0), "TrainConfig.lr = 0.0: must be a number > 0"),
        (lambda: Recipe(warmup_frac=2.0), "Recipe.warmup_frac = 2.0"),
        (lambda: AdapterRecipe.from_dict({"loop": {"steps": -1, "lr": 1e-3}}), "AdapterRecipe.steps = -1"),
    ],
)
def test_loop_settings_are_checked_and_named_as_the_recipe(make, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        make()


# --------------------------------------------------------------------------- the organism: two loops

SHIPPED_ORGANISMS = sorted(ROOT.glob("mechdiff/organism/**/mechdiff_recipe.json"))


def test_every_shipped_organism_recipe_is_found():
    assert len(SHIPPED_ORGANISMS) >= 6  # shipped/ and the family's errdet/, hmm/: base and target each


@pytest.mark.parametrize("path", SHIPPED_ORGANISMS, ids=lambda p: str(p.parent.relative_to(ROOT)))
def test_shipped_organism_recipes_load_flat_and_nested(path):
    flat = json.loads(path.read_text())["recipe"]
    assert "base_steps" in flat and "base_loop" not in flat  # saved before the nesting
    recipe = OrganismRecipe.from_dict(flat)
    for stage, loop in (("base", recipe.base_loop), ("ft", recipe.ft_loop)):
        assert (loop.steps, loop.lr) == (flat[f"{stage}_steps"], flat[f"{stage}_lr"])
        assert (loop.seed, loop.weight_decay, loop.checkpoint_every) == (flat["seed"], flat["weight_decay"], 100)
    again = json.loads(json.dumps(recipe.flat_dict()))
    assert {k: again[k] for k in flat} == flat and set(again) - set(flat) <= {"task"}  # task: newer
    nested = json.loads(json.dumps(recipe.to_dict()))
    assert nested["ft_loop"]["steps"] == flat["ft_steps"] and "ft_steps" not in nested
    assert OrganismRecipe.from_dict(nested) == recipe


def test_the_organism_stages_train_with_the_loops_they_trained_with_before_the_nesting():
    """What each stage's checkpoint records as its loop (``config``) is what the flat recipe gave."""
    r = OrganismRecipe(seed=3, weight_decay=0.1, base_steps=50, ft_lr=2e-4)
    assert r.base_loop == LoopConfig(steps=50, lr=1e-3, weight_decay=0.1, seed=3, checkpoint_every=100)
    assert r.ft_loop == LoopConfig(steps=700, lr=2e-4, weight_decay=0.1, seed=3, checkpoint_every=100)
    assert (r.base_steps, r.ft_lr, r.seed, r.weight_decay) == (50, 2e-4, 3, 0.1)
    short = r.scaled(0.1)
    assert (short.base_loop.steps, short.ft_loop.steps, short.ft_loop.lr, short.seed) == (5, 70, 2e-4, 3)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: OrganismRecipe(base_steps=0), "Recipe.base_steps = 0: must be >= 1"),
        (lambda: OrganismRecipe(ft_lr=-1.0), "Recipe.ft_lr = -1.0"),
        (lambda: OrganismRecipe(weight_decay=-1.0), "Recipe.weight_decay = -1.0"),
        (lambda: OrganismRecipe(base_seed=1), "Recipe.seed = (1, 0): the stages share one seed"),
        (lambda: OrganismRecipe.from_dict({"ft_loop": {"steps": 0, "lr": 1e-3}}), "Recipe.ft_steps = 0"),
    ],
)
def test_organism_loop_settings_are_checked_and_named_as_the_recipe(make, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make()
