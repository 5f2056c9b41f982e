"""Gradient attribution (attribution patching): activation x gradient of a target, per feature.

For an adapter feature ``i`` of layer ``L`` with activations ``a[p]`` over the positions of a
prompt, its score is ``sum_p a[p] * dM / da[p]``, where ``M`` is the log-odds of the next token
being one of ``target_ids`` after the prompt, ``log P(target) - log(1 - P(target))`` (log-odds,
not the log-probability, whose gradient vanishes where the model is sure, as at most hesitations). That is the first-order change of ``M`` when
the feature is scaled by ``1 + eps`` at every position, divided by ``eps``; ``-score`` estimates
the effect of ablating it. Gradients flow through the *real* adapted model (attention patterns,
norms, downstream encoders), so the score is a total effect, not the direct edge of an
attribution graph (:mod:`attribution.build`, exact for the linearized model).

One forward and one backward per batch of prompts give every feature's score at once, where a
graph needs a backward pass per visited node: on SmolLM2-135M a graph of a 111-token prompt took
187 s on 2 cores, a batch of 8 prompts takes seconds. Use it to rank features when graphs are
too costly to build on enough prompts; the ranking is only as good as the linear approximation,
so check it by ablation (:func:`mechdiff.evaluation.hesitation.smallest_ablating_prefix`).

Example:
    >>> import torch
    >>> from attribution.synthetic import tiny_adapted
    >>> adapted = tiny_adapted(seed=0)
    >>> scores = feature_attribution(adapted, [[2, 5, 9, 11], [2, 7, 20]], target_ids=[12])
    >>> scores.shape == (2, adapted.model.cfg.n_layers, adapted.config.d_sae)
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechdiff.adapters.transcoder import AdaptedModel
from mechdiff.padding import pad


def feature_attribution(
    adapted: AdaptedModel,
    prompts: Sequence[Sequence[int]],
    target_ids: int | Sequence[int],
    *,
    batch_size: int = 8,
    zero_bos: bool = True,
    pad_id: int = 0,
    fwd_hooks: Sequence[tuple] = (),
) -> Float[Tensor, "prompt layer d_sae"]:
    """Activation x gradient of the log-odds of the next token being in ``target_ids``, for every adapter feature,
    summed over each prompt's positions (the first token's excluded when ``zero_bos``).

    Prompts are batched with left padding and an attention mask (padded positions score 0).
    ``fwd_hooks`` run during the forward (e.g. an ablation, to rank what is left).

    Example:
        Not run as a doctest: it needs the target's hesitation prompts
        (:func:`mechdiff.evaluation.hesitation.hesitation_prompts`) and trained adapters.
        >>> scores = feature_attribution(adapted, hes.tokens, spec.variants)  # doctest: +SKIP
        >>> top = torch.topk(scores.sum(0).flatten(), 10).indices  # doctest: +SKIP
    """
    ids = [target_ids] if isinstance(target_ids, int) else list(target_ids)
    if not ids:
        raise ValueError("target_ids is empty: nothing to attribute")
    vocab = adapted.model.cfg.d_vocab
    if bad := [t for t in ids if not 0 <= int(t) < vocab]:
        raise ValueError(f"target ids {bad} are outside the model's vocabulary (d_vocab {vocab})")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("an empty prompt has no next token to attribute")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_layers, n_ctx = adapted.model.cfg.n_layers, adapted.model.cfg.n_ctx
    if (longest := max((len(p) for p in prompts), default=0)) > n_ctx:
        raise ValueError(f"a prompt of {longest} tokens is longer than the model's context ({n_ctx} tokens)")
    out = torch.zeros(len(prompts), n_layers, adapted.config.d_sae)
    for start in range(0, len(prompts), batch_size):
        chunk = [list(p) for p in prompts[start : start + batch_size]]
        out[start : start + len(chunk)] = _batch_scores(adapted, chunk, ids, zero_bos, pad_id, fwd_hooks)
    return out


def _batch_scores(adapted, prompts, ids, zero_bos, pad_id, fwd_hooks) -> Tensor:
    model, n_layers = adapted.model, adapted.model.cfg.n_layers
    device = model.cfg.device
    tokens, mask = pad(prompts, pad_id, "left")
    tokens, mask = tokens.to(device), mask.to(device)
    acts: list[Tensor] = [None] * n_layers

    def grad_from_input(embed, hook):  # frozen weights still need a graph from the input onwards
        return embed if embed.requires_grad else embed.detach().requires_grad_(True)

    def keep(value, hook, layer):
        acts[layer] = value
        return value

    hooks = [("hook_embed", grad_from_input)]
    hooks += [(adapted.acts_name(la), lambda v, hook, la=la: keep(v, hook, la)) for la in range(n_layers)]
    with torch.enable_grad(), model.hooks(fwd_hooks=list(fwd_hooks) + hooks):
        logits = model(tokens, attention_mask=mask.long())
        metric = log_odds(logits[:, -1], ids)
        # prompts are independent, so the gradient of the sum is each prompt's own gradient
        grads = torch.autograd.grad(metric.sum(), acts, allow_unused=True)
    weight = mask.to(torch.float32)
    if zero_bos:  # the first real token of each row (left padding: after the pads)
        first = mask.long().argmax(1)
        weight[torch.arange(len(prompts), device=device), first] = 0
    scores = torch.stack(
        [
            torch.zeros(a.shape[0], a.shape[-1])
            if g is None
            else (a.detach().float() * g.float() * weight[..., None]).sum(1).cpu()
            for a, g in zip(acts, grads)
        ],
        1,
    )
    return scores.cpu()


def log_odds(logits: Float[Tensor, "batch d_vocab"], ids: Sequence[int]) -> Float[Tensor, " batch"]:
    """``log P(ids) - log(1 - P(ids))`` of a next-token distribution, stable at both ends."""
    logp = logits.float().log_softmax(-1)
    inside = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
    inside[list(ids)] = True
    return logp[:, inside].logsumexp(-1) - logp[:, ~inside].logsumexp(-1)
