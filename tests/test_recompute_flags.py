"""``--recompute`` on the three training command lines reaches the library's ``checkpoint`` setting,
and an adapter run keeps its checkpoint folder with or without it (the gradients are the same)."""

import types

import pytest

from mechdiff.adapters import __main__ as adapters_cli
from mechdiff.real import __main__ as real_cli


class _Stop(Exception):
    pass


def _capture(monkeypatch, module, name):
    seen = []

    def fake(args):
        seen.append(args)
        raise _Stop

    monkeypatch.setattr(module, name, fake)
    return seen


@pytest.mark.parametrize("flags", [[], ["--recompute"]])
def test_adapters_cli(monkeypatch, tmp_path, flags):
    seen = _capture(monkeypatch, adapters_cli, "_train")
    with pytest.raises(_Stop):
        adapters_cli.main(["train", "--out", str(tmp_path / "out"), "--steps", "3", *flags])
    recipe = seen[0].checked_recipe
    assert recipe.checkpoint is bool(flags) and recipe.steps == 3
    pair = types.SimpleNamespace(meta={"base_name": "b", "target_name": "t"})
    plain = adapters_cli._recipe(types.SimpleNamespace(**{**vars(seen[0]), "checkpoint": None}))
    assert plain.checkpoint is False
    assert adapters_cli._work_dir(seen[0], recipe, tmp_path / "out", pair) == adapters_cli._work_dir(
        seen[0], plain, tmp_path / "out", pair
    )


@pytest.mark.parametrize("flags", [[], ["--recompute"]])
def test_lora_cli(monkeypatch, tmp_path, flags):
    import mechdiff.lora

    seen = []

    def fake_train(pair, cfg, out, **kwargs):
        seen.append(cfg)
        raise _Stop

    monkeypatch.setattr(mechdiff.lora, "train_lora", fake_train)
    from mechdiff.lora.__main__ import main

    with pytest.raises(_Stop):
        main(["train", "--out", str(tmp_path / "out"), "--steps", "2", *flags])
    assert seen[0].checkpoint is bool(flags) and seen[0].steps == 2


@pytest.mark.parametrize("flags", [[], ["--recompute"]])
def test_smollm2_finetune_cli(monkeypatch, flags):
    seen = _capture(monkeypatch, real_cli, "_train")
    with pytest.raises(_Stop):
        real_cli.main(["train", "--steps", "2", *flags])
    assert seen[0].recipe.checkpoint is bool(flags) and seen[0].recipe.steps == 2
