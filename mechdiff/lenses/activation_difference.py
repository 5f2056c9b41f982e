"""The activation-difference lens: the mean target-minus-base residual at the hesitation slot.

Per layer ``l``, ``delta_l`` = mean over the validation hesitation prompts of the target's minus
the base's ``blocks.l.hook_resid_post`` at the last token (the slot where the target writes the
hesitation). The lens names one unit, ``delta`` at one layer: the layer where subtracting it from
the target (every position) lowers P(hesitation) at those same validation prompts the most.

Read: through the logit lens (the final norm's weight, the demeaned unembedding;
:func:`mechdiff.features.classify.logit_lens`), and as a direction per token, the projection of the
target-minus-base difference on ``delta / |delta|`` (its activation for the label rule and the
agreement). Necessity: the target generates with ``delta`` subtracted at every position, against
random directions of the same norm. Steering: the base at the test hesitation prompts with
``delta`` added at the last position.

Example:
    >>> result = activation_difference_lens(ctx)  # doctest: +SKIP
    >>> result.extra["logit_lens_top"][:3]  # doctest: +SKIP
    ['wait', ...]
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor

from mechdiff.evaluation import hesitation as H
from mechdiff.features.classify import logit_lens
from mechdiff.lenses import scoring
from mechdiff.lenses.context import LensContext, cached, last_position
from mechdiff.lenses.cost import measure


def site(layer: int) -> str:
    return f"blocks.{layer}.hook_resid_post"


def mean_differences(pair, prompts) -> Float[Tensor, "layer d_model"]:
    """``delta_l`` for every layer: mean target-minus-base residual at the prompts' last token."""
    names = [site(layer) for layer in range(pair.n_layers)]
    t, b = last_position(pair.target, prompts, names), last_position(pair.base, prompts, names)
    return torch.stack([(t[n] - b[n]).mean(0) for n in names])


def shift_hooks(layer: int, vec: Tensor, last_only: bool = False) -> list[tuple]:
    """Add ``vec`` to the residual after ``layer`` (every position, or the last only)."""

    def hook(x, hook):
        if not last_only:
            return x + vec.to(x.dtype)
        x = x.clone()
        x[:, -1] += vec.to(x.dtype)
        return x

    return [(site(layer), hook)]


def activation_difference_lens(ctx: LensContext) -> scoring.LensResult:
    """Compute ``delta`` (validation), pick its layer (validation), then score it."""
    pair, spec, s = ctx.pair, ctx.spec, ctx.settings
    with measure() as train:
        deltas = mean_differences(pair, ctx.hes.tokens)
    with measure() as score:
        p_val = [
            float(
                H.next_token_probability(
                    pair.target, ctx.hes.tokens, spec.variants, fwd_hooks=shift_hooks(la, -deltas[la])
                ).mean()
            )
            for la in range(pair.n_layers)
        ]
        layer = min(range(pair.n_layers), key=p_val.__getitem__)
        delta = deltas[layer]
        lens = logit_lens(pair.target, delta[None], k=5)
        rank = _rank_of(pair.target, delta, spec.target)
    name = site(layer)
    diff = (
        cached(pair.target, ctx.tokens.sequences, [name])[name] - cached(pair.base, ctx.tokens.sequences, [name])[name]
    )
    acts = (diff @ (delta / delta.norm()))[:, None]

    gen = torch.Generator().manual_seed(s.seed)
    randoms = [torch.randn(delta.shape, generator=gen) for _ in range(s.random_draws)]
    pool = [delta] + [r * delta.norm() / r.norm() for r in randoms]

    def rate(units):
        return spec.evaluate(pair.target, ctx.problems, fwd_hooks=shift_hooks(layer, -pool[units[0]]))[
            "hesitations_per_response"
        ]

    before = spec.evaluate(pair.target, ctx.problems)["hesitations_per_response"]
    need = scoring.necessity(before, rate([0]), [rate([i]) for i in range(1, len(pool))])
    ids, prompts = spec.variants, ctx.hes_test.tokens
    p = {
        k: float(H.next_token_probability(m, prompts, ids, fwd_hooks=h).mean())
        for k, m, h in (
            ("before", pair.base, []),
            ("after", pair.base, shift_hooks(layer, delta, last_only=True)),
            ("reference", pair.target, []),
        )
    }
    steering = {
        **p,
        "gain": scoring.steering_gain(p["before"], p["after"], p["reference"]),
        "how": "base + delta at the last position; reference: target",
    }
    tokens = spec.tokenizer.convert_ids_to_tokens
    return scoring.LensResult(
        "activation_difference",
        [f"delta@L{layer}"],
        acts,
        necessity=need,
        steering=steering,
        train=train,
        score=score,
        extra={
            "layer": layer,
            "p_hesitation_validation_by_layer_when_subtracted": p_val,
            "delta_norm_by_layer": deltas.norm(dim=-1).tolist(),
            "logit_lens_top": tokens(lens["lens_top_ids"][0].tolist()),
            "logit_lens_bottom": tokens(lens["lens_bottom_ids"][0].tolist()),
            "hesitation_rank_in_logit_lens": rank,
        },
    )


def _rank_of(model, direction: Tensor, token_id: int) -> int:
    """How many tokens the logit lens of ``direction`` promotes more than ``token_id`` (0: the top)."""
    w_u = model.W_U.detach().float()
    logits = (direction * model.ln_final.w.detach().float()) @ (w_u - w_u.mean(1, keepdim=True))
    return int((logits > logits[token_id]).sum())
