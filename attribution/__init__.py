"""Attribution graphs on a transcoder-adapted model, exact for its linearized forward.

* :mod:`attribution.linearize` - the frozen / linearized forward (a context manager of hooks);
* :mod:`attribution.targets` - what a graph explains (top logits, a token, a logit difference, a
  direction, a feature);
* :mod:`attribution.build` - :func:`attribute`, batched backward passes into a graph;
* :mod:`attribution.gradient` - :func:`feature_attribution`, activation x gradient of a target for
  every feature at once (a cheap ranking where a graph per prompt is too costly);
* :mod:`attribution.graph` - :class:`Graph`: influence, pruning, scores, rankings, save/load;
* :mod:`attribution.interventions` - ablate / steer features, one pass or through generation;
* :mod:`attribution.export` - circuit-tracer's graph JSON; :mod:`attribution.plot` - figures;
* :mod:`attribution.synthetic` - non-trivial random adapters for tests and benchmarks.

Example:
    >>> import torch
    >>> from attribution import attribute
    >>> from attribution.synthetic import tiny_adapted
    >>> graph = attribute(tiny_adapted(seed=0), torch.tensor([2, 5, 9, 11, 7, 20]), target="w3")
    >>> graph.targets[0]["label"]
    'w3'
"""

import importlib

# Loaded on first use (PEP 562), so that ``python -m attribution serve`` starts without torch.
_EXPORTS = {
    "attribute": "attribution.build",
    "feature_attribution": "attribution.gradient",
    "Graph": "attribution.graph",
    "ablate": "attribution.interventions",
    "steer": "attribution.interventions",
    "intervene": "attribution.interventions",
    "generate_with_edits": "attribution.interventions",
    "linearized": "attribution.linearize",
    "record_frozen": "attribution.linearize",
    "TopLogits": "attribution.targets",
    "Token": "attribution.targets",
    "LogitDiff": "attribution.targets",
    "Direction": "attribution.targets",
    "FeatureTarget": "attribution.targets",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'attribution' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
