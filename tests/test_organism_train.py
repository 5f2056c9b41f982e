"""The organism recipe on a tiny scale: repeatable by seed, loads through models.py, resumes."""

import json

import pytest
import torch
from safetensors.torch import load_file

from mechdiff.models import load_pair
from mechdiff.organism.train import Recipe, train_organism

TINY = Recipe(d_model=32, d_mlp=64, n_layers=2, n_heads=2, batch_size=16).scaled(0.004)


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def test_recipe_is_repeatable_and_loads(tmp_path):
    base_a, target_a = train_organism(tmp_path / "a", tmp_path / "wa", TINY, progress=False)
    base_b, target_b = train_organism(tmp_path / "b", tmp_path / "wb", TINY, progress=False)
    for x, y in ((base_a, base_b), (target_a, target_b)):
        wx, wy = _weights(x), _weights(y)
        assert wx.keys() == wy.keys()
        assert all(torch.equal(wx[k], wy[k]) for k in wx)
    assert not all(torch.equal(_weights(base_a)[k], _weights(target_a)[k]) for k in _weights(base_a))
    recipe = json.loads((target_a / "mechdiff_recipe.json").read_text())
    assert recipe["recipe"]["ft_loop"]["steps"] == TINY.ft_loop.steps and Recipe.from_dict(recipe["recipe"]) == TINY
    pair = load_pair("custom", base=str(base_a), target=str(target_a))
    assert pair.n_layers == 2 and pair.d_model == 32
    assert pair.target.to_str_tokens("A 1 2 3 4 B 5 6 7 8 =")[:2] == ["<bos>", "A"]


def test_finished_stage_is_not_redone(tmp_path):
    base, _ = train_organism(tmp_path / "o", tmp_path / "w", TINY, progress=False)
    stamp = (base / "model.safetensors").stat().st_mtime_ns
    train_organism(tmp_path / "o", tmp_path / "w", TINY, progress=False)
    assert (base / "model.safetensors").stat().st_mtime_ns == stamp


class _Kill(Exception):
    pass


def test_a_killed_run_resumes_in_each_stage_to_the_uninterrupted_weights(tmp_path):
    recipe = Recipe.from_dict(
        {**TINY.flat_dict(), "base_steps": 6, "ft_steps": 4, "base_checkpoint_every": 2, "ft_checkpoint_every": 2}
    )
    assert (recipe.base_loop.checkpoint_every, recipe.ft_loop.steps) == (2, 4)
    full = train_organism(tmp_path / "full", tmp_path / "wfull", recipe, progress=False)

    seen = []

    def kill_at(stage):
        def on_step(at, step):
            seen.append((at, step))
            if (at, step) == (stage, 2):  # the checkpoint of step 2 is on disk; step 3 ran, unsaved
                raise _Kill

        return on_step

    for stage in ("base", "target"):
        with pytest.raises(_Kill):
            train_organism(tmp_path / "run", tmp_path / "wrun", recipe, progress=False, on_step=kill_at(stage))
        assert (tmp_path / "wrun" / stage / "checkpoint").is_dir()
    resumed = train_organism(tmp_path / "run", tmp_path / "wrun", recipe, progress=False, on_step=kill_at(None))
    # each stage went on from its checkpoint (step 2), never from the start
    base_runs = [s for s in seen if s[0] == "base"]
    target_runs = [s for s in seen if s[0] == "target"]
    assert [s for _, s in base_runs] == [0, 1, 2, 2, 3, 4, 5]
    assert [s for _, s in target_runs] == [0, 1, 2, 2, 3]
    for a, b in zip(full, resumed, strict=True):
        wa, wb = _weights(a), _weights(b)
        assert all(torch.equal(wa[k], wb[k]) for k in wa), a.name
