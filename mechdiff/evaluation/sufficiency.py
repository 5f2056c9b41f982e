"""Sufficiency tests of a feature set: keep only it, or let a kept-only copy make each
hesitate-or-go-on decision while the full model writes everything else (one batched generation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from datasets import Dataset

from mechdiff.adapters.edits import edit_hooks, keep_only
from mechdiff.evaluation.behaviour import MAX_NEW_TOKENS
from mechdiff.evaluation.feature_sets import Feature
from mechdiff.generation import generate
from mechdiff.organism.task import DEFAULT, TaskSpec


def keep_only_hooks(adapted, features: Sequence[Feature]) -> list[tuple[str, callable]]:
    """Hooks that zero every adapter feature except ``features`` (sufficiency tests), through the
    one edit API (:func:`mechdiff.adapters.edits.keep_only`)."""
    return edit_hooks(adapted, keep_only(list(features)))


def set_decides_generation(
    adapted, tokenizer, problems: Dataset, features: Sequence[Feature], *, spec: TaskSpec = DEFAULT,
    go_on: str = ";", max_new_tokens: int = MAX_NEW_TOKENS,
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
    adapted, tokenizer, problems: Dataset, features: Sequence[Feature], decisions: Sequence[int],
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
        new = generate(adapted.model, rows + rows, max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, fwd_hooks=hooks, batch_size=2 * n,
                       logit_processors=[_decision_from_second_half(n, list(decisions))])
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
