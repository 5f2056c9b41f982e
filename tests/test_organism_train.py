"""The organism recipe on a tiny scale: repeatable by seed, loads through models.py, resumes."""

import json

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
    assert recipe["recipe"]["ft_steps"] == TINY.ft_steps
    pair = load_pair("custom", base=str(base_a), target=str(target_a))
    assert pair.n_layers == 2 and pair.d_model == 32
    assert pair.target.to_str_tokens("A 1 2 3 4 B 5 6 7 8 =")[:2] == ["<bos>", "A"]


def test_finished_stage_is_not_redone(tmp_path):
    base, _ = train_organism(tmp_path / "o", tmp_path / "w", TINY, progress=False)
    stamp = (base / "model.safetensors").stat().st_mtime_ns
    train_organism(tmp_path / "o", tmp_path / "w", TINY, progress=False)
    assert (base / "model.safetensors").stat().st_mtime_ns == stamp
