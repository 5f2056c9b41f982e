"""Sufficiency tests of a feature set: keep only it, or let a kept-only copy make each
hesitate-or-go-on decision while the full model writes everything else (one batched generation).

"Keep only the set" needs a choice of what every other feature does, and the three choices answer
different questions (:func:`kept_only_next_token`, teacher-forced at given prompts):

* ``zero``: every other adapter feature off. The model is the hybrid plus the set, and the set's
  own activations come from that crippled model: does the set alone, computing itself, suffice?
* ``mean``: every other feature held at its mean activation over ordinary text. The rest of the
  adaptation keeps its average contribution but carries no information about this prompt.
* ``patch``: the hybrid plus the set, with the set's activations copied from the full adapted
  model at the same positions (one batch of two halves: the first runs in full, the second keeps
  only the set at the first half's values). This asks whether the set *carries* the decision once
  its inputs are right, separating "the set does not compute itself" from "the set is not enough".

Example:
    >>> from attribution.synthetic import tiny_adapted
    >>> adapted = tiny_adapted(seed=0)
    >>> prompts = [[2, 5, 9, 11], [2, 7, 3]]
    >>> p_all, _ = kept_only_next_token(adapted, prompts, [], [4], others="patch")
    >>> p_none, _ = kept_only_next_token(adapted, prompts, [], [4], others="zero")
    >>> bool(torch.allclose(p_all, p_none, atol=1e-6))  # an empty set: patching copies nothing
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from datasets import Dataset
from jaxtyping import Float, Int
from torch import Tensor

from mechdiff.adapters.edits import edit_hooks, keep_only
from mechdiff.evaluation.behaviour import MAX_NEW_TOKENS
from mechdiff.evaluation.feature_sets import Feature
from mechdiff.generation import generate
from mechdiff.organism.task import DEFAULT, TaskSpec
from mechdiff.padding import pad

OTHERS = ("zero", "mean", "patch")


def keep_only_hooks(adapted, features: Sequence[Feature]) -> list[tuple[str, callable]]:
    """Hooks that zero every adapter feature except ``features`` (sufficiency tests), through the
    one edit API (:func:`mechdiff.adapters.edits.keep_only`)."""
    return edit_hooks(adapted, keep_only(list(features)))


def set_decides_generation(
    adapted,
    tokenizer,
    problems: Dataset,
    features: Sequence[Feature],
    *,
    spec: TaskSpec = DEFAULT,
    go_on: str = ";",
    max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[list[str]]:
    """Greedy responses (as tokens) in which the full adapted model writes every token except the
    decisions whether to hesitate (any of ``spec``'s hesitation words) or ``go_on``, which a copy
    keeping only ``features`` makes: :func:`set_decides_ids` for an organism.

    Example:
        >>> from mechdiff.models import load_pair
        >>> from mechdiff.adapters.formats import SHIPPED_DIR, load_adapted
        >>> from mechdiff.organism import corpus
        >>> pair = load_pair("organism"); adapted = load_adapted(pair, SHIPPED_DIR)
        >>> words = set_decides_generation(adapted, pair.tokenizer, corpus.problems(4, "test"), [])
        >>> sum(w.count("wait") for w in words)  # with no feature kept, nothing hesitates
        0
    """
    ids = tokenizer.convert_tokens_to_ids([*spec.hesitation_words, go_on])
    rows = set_decides_ids(adapted, tokenizer, problems, features, ids, max_new_tokens)
    return [tokenizer.convert_ids_to_tokens(row) for row in rows]


def set_decides_ids(
    adapted,
    tokenizer,
    problems: Dataset,
    features: Sequence[Feature],
    decisions: Sequence[int],
    max_new_tokens: int,
) -> list[list[int]]:
    """Greedy responses (token ids) in which the full adapted model writes every token except the
    decisions, which a copy keeping only ``features`` makes.

    Why: zeroing every other feature for the whole response (:func:`keep_only_hooks`) also stops
    the model from writing the slips that hesitations answer, so free generation cannot tell "the
    set does not hesitate" from "there was nothing to hesitate about". Here both copies read the
    same tokens; wherever the full copy's greedy token is one of ``decisions`` (the hesitation
    tokens and the go-on token: the workload's ``decisions``, :mod:`mechdiff.workloads`), the
    kept-only copy's preferred one of them is used. Its later states are computed with only ``features`` at every position, as in
    the teacher-forced measurement.
    """
    prompts = [list(p) for p in problems["input_ids"]]
    out: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for group in by_length.values():  # equal lengths: generate() keeps the two halves in order
        n = len(group)
        rows = [prompts[i] for i in group]
        hooks = _second_half_keeps_only(adapted, features, n)
        new = generate(
            adapted.model,
            rows + rows,
            max_new_tokens,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            fwd_hooks=hooks,
            batch_size=2 * n,
            logit_processors=[_decision_from_second_half(n, list(decisions))],
        )
        for i, row in zip(group, new[:n]):
            out[i] = row
    return out


def _second_half_keeps_only(adapted, features: Sequence[Feature], n: int) -> list[tuple[str, callable]]:
    """Hooks that zero every adapter feature outside ``features`` in batch rows ``n:2n`` only."""
    hooks = []
    for name, keep in keep_only_hooks(adapted, features):

        def hook(acts, hook, keep=keep):  # the edit sees the whole batch (its positions), half is kept
            return torch.cat([acts[:n], keep(acts, hook)[n:]])

        hooks.append((name, hook))
    return hooks


def _decision_from_second_half(n: int, ids: Sequence[int]):
    """A logit processor: where the first half's greedy token is one of ``ids``, both halves take
    the second half's preferred one of ``ids``; elsewhere both take the first half's token."""
    ids_t = torch.tensor(ids)

    def process(logits, generated):
        full, kept = logits[:n], logits[n:]
        choice = full.argmax(-1)
        ids_here = ids_t.to(logits.device)
        deciding = torch.isin(choice, ids_here)
        choice = torch.where(deciding, ids_here[kept[:, ids_here].argmax(-1)], choice)
        forced = torch.full_like(logits, float("-inf"))
        forced.scatter_(1, choice.repeat(2)[:, None], 0.0)
        return forced

    return process


def feature_mask(adapted, features: Sequence[Feature]) -> torch.Tensor:
    """``[layer, d_sae]`` booleans, True at ``features``."""
    mask = torch.zeros(adapted.config.n_layers, adapted.config.d_sae, dtype=torch.bool)
    for layer, feature in features:
        mask[int(layer), int(feature)] = True
    return mask


def kept_only_hooks(
    adapted, keep: torch.Tensor, others: str = "zero", means: Float[Tensor, "layer d_sae"] | None = None
) -> list[tuple[str, callable]]:
    """Hooks keeping the features where ``keep`` (``[layer, d_sae]``) is True, every other feature
    zero, at ``means``, or (``patch``) the batch's second half keeping only them at the first half's
    values. See the module doc for what each answers."""
    if others not in OTHERS:
        raise ValueError(f"others must be one of {OTHERS}, not {others!r}")
    if others == "mean" and means is None:
        raise ValueError("others='mean' needs means (mechdiff.adapters.edits.feature_means)")
    hooks = []
    for layer in range(adapted.config.n_layers):

        def hook(acts, hook, layer=layer):
            k = keep[layer].to(acts.device)
            if others == "zero":
                return acts * k
            if others == "mean":
                return torch.where(k, acts, means[layer].to(acts.device, acts.dtype))
            n = acts.shape[0] // 2  # patch: the first half is the full model, untouched
            return torch.cat([acts[:n], acts[:n] * k])

        hooks.append((adapted.acts_name(layer), hook))
    return hooks


@torch.no_grad()
def kept_only_next_token(
    adapted,
    prompts: Sequence[Sequence[int]],
    features: Sequence[Feature],
    token_ids: Sequence[int],
    *,
    others: str = "zero",
    means: Float[Tensor, "layer d_sae"] | None = None,
    batch_size: int = 32,
    pad_id: int = 0,
) -> tuple[Float[Tensor, " n"], Int[Tensor, " n"]]:
    """``(P(any of token_ids) next, the greedy next token)`` after each prompt with only ``features``
    kept (``others``: ``zero`` / ``mean`` / ``patch``, see the module doc); left-padded batches."""
    model = adapted.model
    hooks = kept_only_hooks(adapted, feature_mask(adapted, features), others, means)
    probs, argmax = [], []
    with model.hooks(fwd_hooks=hooks):
        for start in range(0, len(prompts), batch_size):
            tokens, mask = pad([list(p) for p in prompts[start : start + batch_size]], pad_id, "left")
            if others == "patch":
                tokens, mask = torch.cat([tokens, tokens]), torch.cat([mask, mask])
            logits = model(tokens.to(model.cfg.device), attention_mask=mask.long().to(model.cfg.device))
            last = logits[:, -1].float()
            if others == "patch":
                last = last[last.shape[0] // 2 :]
            p = last.softmax(-1)
            probs.append(p[:, list(token_ids)].sum(-1).cpu())
            argmax.append(p.argmax(-1).cpu())
    return torch.cat(probs), torch.cat(argmax)


@torch.no_grad()
def mean_activations(
    adapted,
    traces: Sequence[Sequence[int]],
    batch_size: int = 8,
    pad_id: int = 0,
) -> Float[Tensor, "layer d_sae"]:
    """Every feature's mean activation over all real tokens of ``traces`` (in small batches: a
    real model's ``[batch, pos, layer, d_sae]`` activations do not fit at once)."""
    from mechdiff.adapters.edits import feature_means

    total, count = None, 0
    for start in range(0, len(traces), batch_size):
        tokens, mask = pad([list(t) for t in traces[start : start + batch_size]], pad_id, "right")
        n = int(mask.sum())
        means = feature_means(adapted, tokens.to(adapted.model.cfg.device), mask.to(adapted.model.cfg.device))
        total = means.cpu() * n if total is None else total + means.cpu() * n
        count += n
    return total / max(count, 1)
