"""Ablate or steer adapter features, in one forward pass or throughout generation, on the true or
the linearized adapted model.

The edits are :mod:`mechdiff.adapters.edits` (re-exported here: :class:`Edit`, :func:`ablate`,
:func:`steer`, :func:`keep_only`, :func:`mean_ablate`, :func:`patch`, :func:`edit_hooks`):
features at absolute positions (0 = BOS), or at every position (``positions=None``; during
generation that includes every generated token). On the linearized model (``linearized=True``)
the norm scales, attention patterns, MLP gates and all other feature activations are held at
their values in the clean (unedited) run, so an edit shows its direct, linear effect: zeroing a
feature changes a target by minus its graph edge.

Example:
    >>> import torch
    >>> from attribution.synthetic import tiny_adapted
    >>> adapted = tiny_adapted(seed=0)
    >>> tokens = torch.tensor([2, 5, 9, 11, 7, 20])
    >>> edits = ablate([(0, 3), (1, 7)], positions=[4])
    >>> clean, edited = intervene(adapted, tokens, []), intervene(adapted, tokens, edits)
    >>> torch.equal(clean[:4], edited[:4])  # positions before the edit are untouched
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attribution.linearize import _as_prompt, linearized_logits, record_frozen
from mechdiff.adapters.edits import Edit, ablate, edit_hooks, keep_only, mean_ablate, patch, steer
from mechdiff.adapters.transcoder import AdaptedModel
from mechdiff.generation import generate

__all__ = [
    "Edit",
    "ablate",
    "steer",
    "keep_only",
    "mean_ablate",
    "patch",
    "edit_hooks",
    "intervene",
    "generate_with_edits",
]


def intervene(
    adapted: AdaptedModel, tokens: Int[Tensor, " pos"], edits: Sequence[Edit], *, linearized: bool = False
) -> Float[Tensor, "pos vocab"]:
    """Logits of one prompt with ``edits`` applied, on the true or the linearized model.

    Example:
        >>> from attribution.synthetic import tiny_adapted
        >>> adapted, tokens = tiny_adapted(seed=0), torch.tensor([2, 5, 9, 11])
        >>> intervene(adapted, tokens, ablate([(1, 7)]), linearized=True).shape[0]
        4
    """
    tokens = _as_prompt(adapted, tokens)
    _check_positions(edits, int(tokens.shape[0]))
    hooks = edit_hooks(adapted, edits)
    if linearized:
        return linearized_logits(adapted, tokens, record_frozen(adapted, tokens), fwd_hooks=hooks)
    with torch.no_grad():
        return adapted.model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0]


def generate_with_edits(
    adapted: AdaptedModel,
    prompts: Sequence[Sequence[int]],
    edits: Sequence[Edit],
    max_new_tokens: int,
    *,
    linearized: bool = False,
    **generate_kwargs,
) -> list[list[int]]:
    """Continue each prompt with ``edits`` active throughout (see :func:`mechdiff.generation.generate`).

    On the linearized model decoding is greedy and re-linearizes at every step around the clean
    run of the current context (no KV cache: for small models). Positioned edits are absolute
    positions in each prompt + continuation (prompts of any lengths batch together).

    Example:
        >>> from attribution.synthetic import tiny_adapted
        >>> outs = generate_with_edits(tiny_adapted(seed=0), [[2, 5, 9]], ablate([(1, 3)]), 4)
        >>> len(outs[0]) <= 4
        True
    """
    if linearized:
        return [_generate_linearized(adapted, list(p), edits, max_new_tokens, **generate_kwargs) for p in prompts]
    return generate(adapted.model, prompts, max_new_tokens, fwd_hooks=edit_hooks(adapted, edits), **generate_kwargs)


def _generate_linearized(
    adapted, prompt, edits, max_new_tokens, eos_token_id=None, temperature: float = 0.0, **ignored
) -> list[int]:
    if temperature != 0.0:
        raise ValueError("generation on the linearized model is greedy only (temperature=0)")
    eos = eos_token_id if eos_token_id is not None else getattr(adapted.model.tokenizer, "eos_token_id", None)
    seq, out = list(prompt), []
    for _ in range(max_new_tokens):
        tokens = _as_prompt(adapted, torch.tensor(seq))
        logits = linearized_logits(
            adapted, tokens, record_frozen(adapted, tokens), fwd_hooks=edit_hooks(adapted, edits)
        )
        nxt = int(logits[-1].argmax())
        out.append(nxt)
        seq.append(nxt)
        if nxt == eos or len(seq) >= adapted.model.cfg.n_ctx:
            break
    return out


def _check_positions(edits: Sequence[Edit], n_pos: int) -> None:
    for e in edits:
        for p in e.positions or ():
            if not 0 <= p < n_pos:
                raise IndexError(f"edit position {p} is out of range for a prompt of {n_pos} tokens")
