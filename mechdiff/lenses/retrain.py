"""What training a reused artefact costs, measured by training it again in the run.

The transcoder lenses read trained adapters and the LoRA-SAE lens a trained LoRA: the lens
comparison scores those given artefacts (the shipped ones for the shipped organism), which were
trained before the run and recorded only the *wall* seconds of their loop beside them
(:mod:`mechdiff.lenses.cost`). To give their training cost in CPU seconds and memory, as every
other lens's, :func:`retrain_adapters` and :func:`retrain_lora` read the recipe saved with the
artefact (``adapters.json``'s ``recipe``, ``training.json``'s ``config``), train once more with the
library's own training function (:func:`~mechdiff.training.adapter_objective.train_adapters`,
:func:`~mechdiff.lora.train_lora`) into a temporary folder, and measure that phase
(:func:`~mechdiff.lenses.cost.measure`: CPU seconds, peak memory rise), drawing the training data
included. The retrained copy is then compared with the given one (its final logged metrics beside
the recorded ones, and the cosine of the two weight vectors) so a reader sees it is the same
recipe, and discarded: it never feeds a score. The random state (torch, ``random``, numpy) is
restored afterwards, so retraining leaves the run's later draws as they were.

``overrides`` (e.g. ``{"steps": 2, "n_traces": 64}``) shrink the recipe for smoke tests; they are
reported beside the cost, and the comparison then says only how far a shorter run lands.

Example:
    >>> from mechdiff.models import load_pair
    >>> r = retrain_lora(load_pair("organism"), "mechdiff/adapters/shipped/lora_r1",
    ...                  overrides={"steps": 2, "n_traces": 16, "batch_size": 8})
    >>> r.kind, r.cost.cpu_s > 0, r.overrides["steps"]
    ('lora', True, 2)
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from mechdiff.lenses.cost import Cost, measure
from mechdiff.models import ModelPair


@dataclass
class Retrained:
    """One artefact trained again: what it cost, with which recipe, and how close it came.

    ``closeness`` holds ``weight_cosine`` (the retrained weights against the given ones, all
    tensors flattened into one vector) and ``metrics`` (``{name: {"given", "retrained"}}``, the
    final logged values of both runs).
    """

    kind: str
    folder: str
    recipe: dict
    overrides: dict
    cost: Cost
    closeness: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {**asdict(self), "cost": self.cost.to_dict()}


@contextmanager
def kept_random_state() -> Iterator[None]:
    """Run the block and restore torch's (CPU), Python's and numpy's random states after it."""
    py, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(np_state)


def weight_cosine(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Cosine of two state dicts with the same keys, each flattened into one vector.

    Example:
        >>> round(weight_cosine({"w": torch.ones(3)}, {"w": torch.tensor([1.0, 1.0, -1.0])}), 4)
        0.3333
    """
    if set(a) != set(b):
        raise ValueError(f"different tensors: {sorted(set(a) ^ set(b))}")
    keys = sorted(a)
    x = torch.cat([a[k].detach().float().flatten().cpu() for k in keys])
    y = torch.cat([b[k].detach().float().flatten().cpu() for k in keys])
    return float(torch.nn.functional.cosine_similarity(x, y, dim=0))


def _metrics(given: dict, retrained: dict, keys) -> dict:
    return {
        k: {"given": given[k], "retrained": retrained[k]}
        for k in keys
        if isinstance(given.get(k), (int, float)) and isinstance(retrained.get(k), (int, float))
    }


def retrain_adapters(pair: ModelPair, folder: str | Path, overrides: dict | None = None) -> Retrained:
    """Train transcoder adapters for ``pair`` with the recipe saved in ``folder/adapters.json``
    (``overrides`` replacing some of its fields), measured; compared with ``folder``'s adapters
    (final validation metrics, weight cosine).

    Example:
        Not run by the tests: the shipped recipe trains for minutes.
        >>> r = retrain_adapters(pair, "mechdiff/adapters/shipped/organism")  # doctest: +SKIP
        >>> r.closeness["weight_cosine"]  # doctest: +SKIP
        0.999...
    """
    from mechdiff.adapters.formats import load_adapted, read_config
    from mechdiff.training.adapter_objective import AdapterRecipe, train_adapters

    meta = read_config(folder)
    if not meta.get("recipe"):
        raise ValueError(f"{folder}/adapters.json holds no recipe to train again")
    overrides = dict(overrides or {})
    recipe = replace(AdapterRecipe.from_dict(meta["recipe"]), **overrides, progress=False)
    with kept_random_state(), tempfile.TemporaryDirectory(prefix="retrain-adapters-") as tmp:
        with measure() as cost:
            adapted, history = train_adapters(pair, recipe, out_dir=tmp)
        given = load_adapted(pair, folder)
    last = history[-1] if history else {}
    recorded = (meta.get("metrics") or {}).get("train_last") or {}
    keys = [k for k in recorded if k.startswith("val_")] + ["loss", "step"]
    closeness = {
        "weight_cosine": weight_cosine(adapted.adapters.state_dict(), given.adapters.state_dict()),
        "metrics": _metrics(recorded, last, keys),
    }
    return Retrained("adapters", str(folder), recipe.to_dict(), overrides, cost, closeness)


def retrain_lora(pair: ModelPair, folder: str | Path, overrides: dict | None = None) -> Retrained:
    """Train a LoRA on ``pair`` with the config saved in ``folder/training.json`` (``overrides``
    replacing some of its fields), measured; compared with ``folder``'s LoRA (the final logged
    training metrics, weight cosine)."""
    from mechdiff.lora import TrainConfig, load_lora, train_lora

    path = Path(folder) / "training.json"
    if not path.is_file():
        raise ValueError(f"{folder}: no training.json, so no recipe to train again")
    info = json.loads(path.read_text())
    overrides = dict(overrides or {})
    cfg = replace(TrainConfig.from_dict(info["config"]), **overrides)
    with kept_random_state(), tempfile.TemporaryDirectory(prefix="retrain-lora-") as tmp:
        with measure() as cost:
            lora, history = train_lora(pair, cfg, tmp, progress=False, resume=False)
        given = load_lora(folder, pair)  # seeds torch while it builds the adapters: inside the kept state
    last = history[-1] if history else {}
    recorded = (info.get("history") or [{}])[-1]
    closeness = {
        "weight_cosine": weight_cosine(lora.layers.state_dict(), given.layers.state_dict()),
        "metrics": _metrics(recorded, last, ("step", "loss", "ce", "token_acc")),
    }
    return Retrained("lora", str(folder), cfg.to_dict(), overrides, cost, closeness)
