"""The transcoder-adapter lens, with its two rankings of adapter features for the hesitation token.

* ``graph``: an attribution graph per hesitation prompt (:func:`attribution.build.attribute`),
  influence on the hesitation token aggregated over prompts; the set = the fewest features
  covering ``share`` of it (:func:`~mechdiff.evaluation.hesitation.covering_set`);
* ``gradient``: activation x gradient of the hesitation log-odds (:mod:`attribution.gradient`);
  the set = the fewest top features whose ablation removes ``share`` of P(hesitation) at the
  prompts (:func:`~mechdiff.evaluation.hesitation.smallest_ablating_prefix`).

The adapters are the trained ones given (the shipped organism's by default); nothing is retrained.
Necessity ablates the set in the adapted model while generating (random alive features as
control); steering adds the set's decoder outputs, at their mean activation on the validation
hesitation prompts, to the *hybrid* (the adapted model without adapters) at the last position.

Example:
    >>> from mechdiff.adapters.formats import load_adapted
    >>> adapted = load_adapted(ctx.pair)  # doctest: +SKIP
    >>> result = transcoder_lens(ctx, adapted, "gradient")  # doctest: +SKIP
    >>> result.units[:2]  # doctest: +SKIP
    ['L2/F417', 'L1/F88']
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from attribution.build import attribute
from attribution.gradient import feature_attribution
from mechdiff.evaluation import feature_roles, feature_sets
from mechdiff.evaluation import hesitation as H
from mechdiff.lenses import scoring
from mechdiff.lenses.context import LensContext
from mechdiff.lenses.cost import measure
from mechdiff.models import hybrid

RANKINGS = ("graph", "gradient")


def rank_features(ctx: LensContext, adapted, ranking: str, max_feature_nodes: int = 256) -> list[feature_sets.Feature]:
    """The hesitation set by ``ranking`` (see the module docstring), from the validation prompts."""
    spec, prompts = ctx.spec, ctx.hes.tokens
    if ranking == "graph":
        rankings = [
            attribute(
                adapted, torch.tensor(t), target=spec.target, max_feature_nodes=max_feature_nodes
            ).feature_ranking(0, aggregate=True)
            for t in tqdm(prompts, desc="graphs", leave=False)
        ]
        return feature_sets.covering_set(feature_sets.aggregate_influence(rankings), ctx.settings.share)
    if ranking == "gradient":
        ranked = list(feature_sets.normalized_positive(feature_attribution(adapted, prompts, spec.variants)))
        k, _ = feature_sets.smallest_ablating_prefix(adapted, ranked, prompts, spec.variants, ctx.settings.share)
        return ranked[:k]
    raise ValueError(f"ranking must be one of {RANKINGS}, not {ranking!r}")


def flat_acts(adapted, sequences) -> torch.Tensor:
    """``[n_tokens layer d_sae]`` adapter activations on every token but each sequence's first."""
    return torch.cat([a[1:] for a in feature_roles.feature_activations(adapted, sequences)])


def transcoder_lens(
    ctx: LensContext,
    adapted,
    ranking: str,
    *,
    acts: torch.Tensor | None = None,
    before: float | None = None,
    max_feature_nodes: int = 256,
) -> scoring.LensResult:
    """Rank, then score: label precision/recall, necessity in generation, steering the hybrid.
    ``acts`` (:func:`flat_acts` on ``ctx.tokens``) and ``before`` (the adapted model's hesitations
    per response) may be passed to share them between the two rankings."""
    spec, s = ctx.spec, ctx.settings
    with measure() as score:
        features = rank_features(ctx, adapted, ranking, max_feature_nodes)
    acts = flat_acts(adapted, ctx.tokens.sequences) if acts is None else acts
    idx_l = torch.tensor([f[0] for f in features], dtype=torch.long)
    idx_f = torch.tensor([f[1] for f in features], dtype=torch.long)
    alive = [tuple(map(int, ij)) for ij in (acts.amax(0) > 0).nonzero()]

    def rate(units):
        return spec.evaluate(adapted.model, ctx.problems, fwd_hooks=adapted.ablation_hooks(units))[
            "hesitations_per_response"
        ]

    before = spec.evaluate(adapted.model, ctx.problems)["hesitations_per_response"] if before is None else before
    need = scoring.ablation_necessity(rate, features, alive, before, s.random_draws, s.seed)
    return scoring.LensResult(
        f"transcoder_{ranking}",
        [f"L{la}/F{fe}" for la, fe in features],
        acts[:, idx_l, idx_f],
        necessity=need,
        steering=steer_hybrid(ctx, adapted, features),
        score=score,
        extra={"ranking": ranking, "n_features_total": adapted.n_features, "n_alive": len(alive)},
    )


def steer_hybrid(ctx: LensContext, adapted, features) -> dict:
    """P(hesitation) at the test hesitation prompts: hybrid, hybrid + the set's mean decoder output
    at the last position, and the adapted model."""
    ids, prompts = ctx.spec.variants, ctx.hes_test.tokens
    model = hybrid(ctx.pair, adapted.config.backbone)
    last = torch.stack([a[-1] for a in feature_roles.feature_activations(adapted, ctx.hes.tokens)]).mean(
        0
    )  # [layer d_sae]
    hooks = []
    for layer in sorted({f[0] for f in features}):
        feats = [f[1] for f in features if f[0] == layer]
        vec = last[layer, feats] @ adapted.adapters[layer].W_dec.detach()[feats]

        def add(out, hook, vec=vec):
            out = out.clone()
            out[:, -1] += vec.to(out.dtype)
            return out

        hooks.append((f"blocks.{layer}.hook_mlp_out", add))
    p = {
        name: float(H.next_token_probability(m, prompts, ids, fwd_hooks=h).mean())
        for name, m, h in (("before", model, []), ("after", model, hooks), ("reference", adapted.model, []))
    }
    return {
        **p,
        "gain": scoring.steering_gain(p["before"], p["after"], p["reference"]),
        "how": "hybrid + the set's mean decoder output at the last position; reference: adapted",
    }
