"""Sets of adapter features: rank them by influence, take the fewest that cover a share of it, or
the fewest whose ablation removes a share of a measured behaviour.

Example:
    >>> covering_set({(0, 1): 5.0, (1, 2): 3.0, (2, 3): 2.0}, share=0.8)
    [(0, 1), (1, 2)]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechdiff.evaluation.hesitation import next_token_probability

Feature = tuple[int, int]  # (layer, feature index)


def aggregate_influence(rankings: Sequence[Sequence[dict]]) -> dict[Feature, float]:
    """Sum per-prompt feature influence, each prompt normalised to total 1 so all count equally.

    ``rankings`` are :meth:`attribution.graph.Graph.feature_ranking` outputs with
    ``aggregate=True`` (dicts with ``layer``, ``feature``, ``score``).
    """
    total: dict[Feature, float] = {}
    for ranking in rankings:
        norm = sum(max(r["score"], 0.0) for r in ranking)
        if norm <= 0:
            continue
        for r in ranking:
            key = (int(r["layer"]), int(r["feature"]))
            total[key] = total.get(key, 0.0) + max(r["score"], 0.0) / norm
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def covering_set(scores: dict[Feature, float], share: float = 0.8) -> list[Feature]:
    """The fewest features (highest scores first) whose scores cover ``share`` of the total.

    >>> covering_set({(0, 1): 5.0, (1, 2): 3.0, (2, 3): 2.0}, share=0.8)
    [(0, 1), (1, 2)]
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], not {share}")
    items = sorted(scores.items(), key=lambda kv: -kv[1])
    total, running, chosen = sum(v for _, v in items), 0.0, []
    for key, value in items:
        if running >= share * total - 1e-12:
            break
        chosen.append(key)
        running += value
    return chosen


def normalized_positive(scores: Float[Tensor, "prompt layer d_sae"]) -> dict[Feature, float]:
    """Per-prompt feature scores (e.g. :func:`attribution.gradient.feature_attribution`) summed
    over prompts, each prompt's positive part normalised to total 1 (as :func:`aggregate_influence`
    does for graphs); features with a positive total only, highest first."""
    pos = scores.clamp(min=0)
    total = pos.flatten(1).sum(1).clamp(min=torch.finfo(pos.dtype).tiny)
    agg = (pos / total[:, None, None]).sum(0)
    idx = torch.argsort(agg.flatten(), descending=True)
    idx = idx[agg.flatten()[idx] > 0]
    d_sae = scores.shape[-1]
    return {(int(i) // d_sae, int(i) % d_sae): float(agg.flatten()[i]) for i in idx}


def smallest_ablating_prefix(
    adapted,
    ranked: Sequence[Feature],
    prompts: Sequence[Sequence[int]],
    token_ids: int | Sequence[int],
    share: float = 0.8,
    batch_size: int = 32,
    greedy: bool = False,
) -> tuple[int, dict[int, float]]:
    """The fewest top features of ``ranked`` whose ablation (at every position) removes ``share``
    of the part of the mean P(next token in ``token_ids``) at ``prompts`` (teacher-forced) that the
    ranked features carry: the goal is ``floor + (1 - share) * (P(0) - floor)``, with ``floor`` the
    probability left when every ranked feature is ablated (what attention and the base MLPs give
    on their own; near zero on the shipped organism, about 0.2 on the ``hmm`` one). ``greedy``:
    the curve is the share of prompts at which greedy decoding would still write the token
    (:func:`next_token_probability` with ``greedy=True``), what generation-time necessity turns on.

    Doubles k until the goal is met, then bisects (assuming the curve falls with k, as it does
    when the ranking is any good). Returns k (``len(ranked)`` when even all of them fall short)
    and every mean probability measured, ``{k: P}``, with k = 0 the unablated model and
    k = ``len(ranked)`` the floor.

    Example:
        Not run as a doctest: it needs a feature ranking and hesitation prompts from the study
        (:func:`mechdiff.studies.hesitation.run`).
        >>> k, curve = smallest_ablating_prefix(adapted, ranked, hes.tokens, spec.variants)  # doctest: +SKIP
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], not {share}")
    measured: dict[int, float] = {}

    def prob(k: int) -> float:
        if k not in measured:
            hooks = adapted.ablation_hooks(list(ranked[:k])) if k else []
            measured[k] = float(
                next_token_probability(
                    adapted.model, prompts, token_ids, fwd_hooks=hooks, batch_size=batch_size, greedy=greedy
                ).mean()
            )
        return measured[k]

    if not ranked:
        return 0, {0: prob(0)}
    floor = min(prob(len(ranked)), prob(0))
    goal = floor + (1 - share) * (prob(0) - floor)
    lo, hi = 0, 1
    while hi < len(ranked) and prob(hi) > goal:
        lo, hi = hi, 2 * hi
    hi = min(hi, len(ranked))
    if prob(hi) > goal:
        return len(ranked), dict(sorted(measured.items()))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if prob(mid) <= goal else (mid, hi)
    return hi, dict(sorted(measured.items()))
