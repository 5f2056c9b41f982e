"""Scores every lens gets, by one rule: label precision and recall, necessity, agreement.

**The label rule** (:data:`RULE`, the same for every lens). A unit *fires strongly* on a token when
its activation there is at least ``theta`` (0.5) times its largest activation over the labelled
tokens. A unit's precision is the share of its strong tokens that carry a ground-truth label in
:data:`~mechdiff.lenses.context.TRUTH` (hesitation, slip, correction); a lens's precision is the
mean over its named units; its recall is the share of truth-labelled tokens on which at least one
named unit fires strongly. A unit that never fires has precision 0.

**Necessity**: ``cut = 1 - after / before`` of hesitations per response when the units are ablated
while generating; ``random_cut`` the same for random units of the same count (mean of draws).

**Agreement** between two lenses: per unit of lens A, the largest |Pearson correlation| over lens
B's units of their activations on the same tokens; the mean over A's units (not symmetric).

Example:
    >>> acts = torch.tensor([[2.0, 0.0], [1.9, 1.0], [0.1, 2.0], [0.0, 0.0]])
    >>> truth = torch.tensor([True, True, False, True])
    >>> s = label_scores(acts, truth)
    >>> s["unit_precision"], round(s["recall"], 4)
    ([1.0, 0.5], 0.6667)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from mechdiff.lenses.context import TRUTH
from mechdiff.lenses.cost import Cost

THETA = 0.5
RULE = (
    f"a unit fires strongly on a token where its activation is >= {THETA} x its maximum over the "
    f"labelled tokens (the target's validation replies); precision = mean over the named units of the "
    f"share of their strong tokens labelled {'/'.join(TRUTH)}; recall = share of the tokens so labelled "
    "on which at least one named unit fires strongly"
)


@dataclass
class LensResult:
    """One lens on one organism: its units, their activations on the labelled tokens, its scores."""

    name: str
    units: list[str] | None  # None: the lens names tokens, not units
    acts: Float[Tensor, "n_tokens n_units"] | None
    necessity: dict | None = None
    steering: dict | None = None
    train: Cost | None = None  # measured in this run (None: nothing trained here)
    score: Cost | None = None  # the lens's own ranking, measured in this run
    extra: dict = field(default_factory=dict)

    @property
    def train_cpu_s(self) -> float | None:
        return None if self.train is None else self.train.cpu_s

    @property
    def score_cpu_s(self) -> float | None:
        return None if self.score is None else self.score.cpu_s


def label_scores(
    acts: Float[Tensor, "n_tokens n_units"], truth: Bool[Tensor, " n_tokens"], theta: float = THETA
) -> dict:
    """Precision per unit and of the set, recall of the set, by :data:`RULE`."""
    if acts.ndim != 2 or acts.shape[0] != truth.shape[0]:
        raise ValueError(
            f"acts must be [n_tokens, n_units] matching truth; got {tuple(acts.shape)}, {tuple(truth.shape)}"
        )
    if acts.shape[1] == 0:
        return {"precision": None, "recall": 0.0, "unit_precision": [], "n_truth_units": 0}
    top = acts.max(0).values
    strong = (acts >= theta * top) & (top > 0)
    n = strong.sum(0)
    unit = torch.where(n > 0, (strong & truth[:, None]).sum(0) / n.clamp(min=1), torch.zeros(()))
    recall = float((strong.any(1) & truth).sum() / truth.sum().clamp(min=1))
    return {
        "precision": float(unit.mean()),
        "recall": recall,
        "unit_precision": unit.tolist(),
        "n_truth_units": int((unit >= 0.5).sum()),
    }


def cut(before: float, after: float) -> float | None:
    """``1 - after / before`` (None when there was nothing to cut)."""
    return None if before == 0 else 1 - after / before


def necessity(before: float, after: float, random_after: list[float]) -> dict:
    """The necessity record: hesitations per response before / after / after random sets, and cuts."""
    mean_random = sum(random_after) / len(random_after) if random_after else None
    return {
        "before": before,
        "after": after,
        "random_after": random_after,
        "cut": cut(before, after),
        "random_cut": None if mean_random is None else cut(before, mean_random),
    }


def ablation_necessity(
    rate: Callable[[list], float], named: Sequence, pool: Sequence, before: float, draws: int = 5, seed: int = 0
) -> dict:
    """:func:`necessity` of ablating ``named`` against ``draws`` random sets of as many units from
    ``pool`` (seeded); ``rate(units)`` generates with ``units`` ablated and returns hesitations per response."""
    rng = random.Random(seed)
    named = list(named)
    randoms = [rate(rng.sample(list(pool), min(len(named), len(pool)))) for _ in range(draws)]
    return necessity(before, rate(named), randoms)


def steering_gain(before: float, after: float, reference: float) -> float | None:
    """Share of the gap from ``before`` to ``reference`` that an intervention closes."""
    return None if reference == before else (after - before) / (reference - before)


def correlations(a: Float[Tensor, "n_tokens m"], b: Float[Tensor, "n_tokens n"]) -> Float[Tensor, "m n"]:
    """Pearson correlation of every column of ``a`` with every column of ``b`` (0 for constant columns)."""
    za, zb = a - a.mean(0), b - b.mean(0)
    na, nb = za.norm(dim=0), zb.norm(dim=0)
    corr = (za.T @ zb) / (na[:, None] * nb[None]).clamp(min=1e-12)
    return corr * ((na[:, None] > 0) & (nb[None] > 0))


def agreement(
    acts: dict[str, Tensor],
    names: dict[str, list[str]],
    same: float = 0.7,
    top: int = 12,
    family: dict[str, str] | None = None,
) -> dict:
    """``matrix[A][B]``: mean over A's units of the best |correlation| with a unit of B;
    ``same_mechanism``: unit pairs correlated at least ``same`` (strongest first) between lenses of
    different ``family`` (default: each lens its own; two rankings of one dictionary are one family,
    whose units co-fire by construction); ``shared_units``: how many units two lenses both name."""
    family = family or {}
    lenses = [k for k, v in acts.items() if v is not None and v.shape[1] > 0]
    matrix: dict[str, dict[str, float | None]] = {a: {} for a in acts}
    pairs, shared = [], {}
    for i, a in enumerate(lenses):
        for b in lenses:
            if a == b:
                continue
            corr = correlations(acts[a].double(), acts[b].double()).float()
            matrix[a][b] = float(corr.abs().max(1).values.mean())
            if lenses.index(b) > i:
                if common := set(names[a]) & set(names[b]):
                    shared[f"{a}~{b}"] = len(common)
                if family.get(a, a) == family.get(b, b):
                    continue
                for u, v in (corr.abs() >= same).nonzero().tolist():
                    pairs.append(
                        {"a": f"{a}:{names[a][u]}", "b": f"{b}:{names[b][v]}", "correlation": float(corr[u, v])}
                    )
    pairs.sort(key=lambda p: -abs(p["correlation"]))
    return {
        "matrix": matrix,
        "same_mechanism": pairs[:top],
        "shared_units": shared,
        "threshold": same,
        "rule": "best |Pearson correlation| over the other lens's units on the labelled tokens, "
        "averaged over this lens's units",
    }
