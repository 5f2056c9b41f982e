"""A study's finished steps, kept on disk so that a killed run resumes where it stopped.

A study at real size runs for hours on a CPU (on SmolLM2 the hesitation study builds two dozen
attribution graphs and generates thousands of replies). :class:`StepStore` keeps each expensive
step's result in a folder, one atomically written file per step, so a rerun with the same settings
loads what is done and computes only the rest. The folder remembers the settings it was made with
(its *fingerprint*); a rerun with other settings stops with the keys that differ instead of
silently mixing results. ``StepStore(None, ...)`` keeps nothing and computes every step.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp()) / "steps"
    >>> calls = []
    >>> def slow():
    ...     calls.append(1)
    ...     return {"accuracy": 0.5}
    >>> StepStore(folder, {"n_problems": 96}).json("behaviour", slow)
    {'accuracy': 0.5}
    >>> StepStore(folder, {"n_problems": 96}).json("behaviour", slow)  # loaded, not recomputed
    {'accuracy': 0.5}
    >>> len(calls)
    1
    >>> StepStore(folder, {"n_problems": 48})
    Traceback (most recent call last):
    ...
    ValueError: ...steps was made with other settings (n_problems: 96 there, 48 now); use another folder or delete it
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mechdiff.atomic import write_json

FINGERPRINT = "fingerprint.json"


class StepStore:
    """Results of named steps under ``folder`` (None: nothing kept), for one ``fingerprint``."""

    def __init__(self, folder: str | Path | None, fingerprint: dict):
        self.folder = None if folder is None else Path(folder)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back from disk
        self.loaded: list[str] = []  # the steps loaded instead of computed, in order
        if self.folder is None:
            return
        path = self.folder / FINGERPRINT
        if path.is_file():
            there = _read(path)
            if there != self.fingerprint:
                raise ValueError(
                    f"{self.folder} was made with other settings ({_differences(there, self.fingerprint)}); "
                    "use another folder or delete it"
                )
        else:
            write_json(path, self.fingerprint)

    def path(self, name: str, suffix: str = ".json") -> Path | None:
        return None if self.folder is None else self.folder / f"{name}{suffix}"

    def json(self, name: str, compute: Callable[[], Any]) -> Any:
        """``compute()``'s JSON-able result, loaded from ``name.json`` when a run before kept it."""
        path = self.path(name)
        if path is not None and path.is_file():
            self.loaded.append(name)
            return _read(path)
        value = compute()
        if path is not None:
            write_json(path, value)
            value = _read(path)  # the same form on the first run as on a resumed one (tuples -> lists)
        return value

    def graph(self, name: str, compute: Callable[[], Any]):
        """An attribution graph (:class:`attribution.graph.Graph`), kept as ``name.{safetensors,json}``."""
        from attribution.graph import Graph

        stem = self.path(name, "")
        if stem is not None and Path(f"{stem}.json").is_file() and Path(f"{stem}.safetensors").is_file():
            self.loaded.append(name)
            return Graph.load(stem)
        graph = compute()
        if stem is not None:
            graph.save(stem)  # tensors first, then the JSON that marks the graph complete
            graph = Graph.load(stem)
        return graph


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err}); delete it to recompute that step") from err


def _differences(there: dict, now: dict) -> str:
    there, now = _flat(there), _flat(now)
    keys = sorted(set(there) | set(now))
    return ", ".join(f"{k}: {there.get(k)!r} there, {now.get(k)!r} now" for k in keys if there.get(k) != now.get(k))


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"config": {"n": 1}}`` -> ``{"config.n": 1}``, so a difference names its own key."""
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out
