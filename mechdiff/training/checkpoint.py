"""Atomic, pickle-free training checkpoints: safetensors for tensors, JSON for the rest.

A checkpoint is a folder ``checkpoint/`` holding ``model.safetensors`` (the module's state dict),
``optimizer.safetensors`` (flattened optimizer state) and ``state.json`` (step, history, param
groups). It is written to a uniquely named temporary folder and swapped in with renames
(:func:`mechdiff.atomic.atomic_folder`), so a kill at any moment leaves either the previous or the
new checkpoint, never half of one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mechdiff.atomic import OLD_SUFFIX, atomic_folder, is_temporary

CHECKPOINT = "checkpoint"


def _flatten_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            name = f"{idx}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value.detach().contiguous().cpu()
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save(directory: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> Path:
    """Write ``directory/checkpoint`` atomically; returns its path."""
    directory = Path(directory)
    final = directory / CHECKPOINT
    with atomic_folder(final) as tmp:
        weights = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "state.json").write_text(json.dumps({**state, "optimizer": opt_meta}))
    return final


def load(directory: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """Restore the latest checkpoint under ``directory`` into ``module`` and ``optimizer``.

    Returns the saved state (``step``, ``history``...) or ``None`` when there is no checkpoint.
    A checkpoint that fails to read raises with its path rather than silently restarting.
    """
    directory = Path(directory)
    final = directory / CHECKPOINT
    if not final.exists() and directory.is_dir():  # killed between moving the old one aside and
        olds = [
            p
            for p in directory.iterdir()  # renaming the new one in: the old one is whole
            if is_temporary(p, CHECKPOINT) and p.name.endswith(OLD_SUFFIX)
        ]
        if olds:
            max(olds, key=lambda p: p.stat().st_mtime).rename(final)
    for leftover in directory.glob(f"{CHECKPOINT}.*"):  # half-written temporaries of a kill
        if is_temporary(leftover, CHECKPOINT):
            shutil.rmtree(leftover, ignore_errors=True)
    if not (final / "state.json").exists():
        return None
    try:
        state = json.loads((final / "state.json").read_text())
        module.load_state_dict(load_file(str(final / "model.safetensors")))
        opt = _unflatten_optimizer(load_file(str(final / "optimizer.safetensors")), state.pop("optimizer"))
        optimizer.load_state_dict(opt)
    except Exception as err:  # corrupt or foreign checkpoint: say where, lose nothing
        raise RuntimeError(f"could not resume from {final}: {err}. Move it away to start afresh.") from err
    return state
