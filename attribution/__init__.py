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

from attribution.build import attribute
from attribution.gradient import feature_attribution
from attribution.graph import Graph
from attribution.interventions import ablate, generate_with_edits, intervene, steer
from attribution.linearize import linearized, record_frozen
from attribution.targets import Direction, FeatureTarget, LogitDiff, Token, TopLogits

__all__ = ["attribute", "feature_attribution", "Graph", "ablate", "steer", "intervene", "generate_with_edits", "linearized",
           "record_frozen", "TopLogits", "Token", "LogitDiff", "Direction", "FeatureTarget"]
