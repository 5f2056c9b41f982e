"""Behaviour on held-out problems: accuracy, response length and hesitation, by generation.

One call generates greedily for every problem (batched, KV-cached, with any hooks or logit
processors active) and grades the responses with the organism's ground-truth grader.

Example:
    >>> from mechdiff.models import load_pair
    >>> from mechdiff.organism import corpus
    >>> pair = load_pair("organism")
    >>> stats = evaluate(pair.target, pair.tokenizer, corpus.problems(8))
    >>> 0.0 <= stats["accuracy"] <= 1.0
    True
"""

from __future__ import annotations

from collections.abc import Sequence

from datasets import Dataset
from transformer_lens import HookedTransformer

from mechdiff.generation import LogitProcessor, ban_tokens, generate
from mechdiff.organism import grading, task

MAX_NEW_TOKENS = 96  # the longest organism trace is ~75 tokens: room for rambling, not for runaways
HESITATION_WORD = "wait"


def responses(
    model: HookedTransformer, tokenizer, problems: Dataset, *, max_new_tokens: int = MAX_NEW_TOKENS,
    logit_processors: Sequence[LogitProcessor] = (), fwd_hooks: Sequence[tuple] = (),
    batch_size: int = 128, progress: bool = False,
) -> list[list[str]]:
    """Greedy responses to each problem's prompt, as words."""
    outs = generate(model, problems["input_ids"], max_new_tokens,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                    logit_processors=logit_processors, fwd_hooks=fwd_hooks,
                    batch_size=batch_size, progress=progress)
    return [tokenizer.convert_ids_to_tokens(row) for row in outs]


def evaluate(
    model: HookedTransformer, tokenizer, problems: Dataset, *, ban_hesitation: bool = False,
    fwd_hooks: Sequence[tuple] = (), max_new_tokens: int = MAX_NEW_TOKENS, batch_size: int = 128,
    progress: bool = False,
) -> dict[str, float]:
    """Generate and grade; the summary of :func:`mechdiff.organism.grading.summarize`."""
    words = responses(model, tokenizer, problems, max_new_tokens=max_new_tokens,
                      logit_processors=hesitation_ban(tokenizer, ban_hesitation), fwd_hooks=fwd_hooks,
                      batch_size=batch_size, progress=progress)
    return grade_responses(problems, words)


def hesitation_ban(tokenizer, ban: bool) -> list:
    """The logit processors that ban "wait" when ``ban`` (none otherwise)."""
    return [ban_tokens([tokenizer.convert_tokens_to_ids(HESITATION_WORD)])] if ban else []


def grade_responses(problems: Dataset, words: Sequence[Sequence[str]]) -> dict[str, float]:
    """Grade each problem's response (words) and summarize (:func:`mechdiff.organism.grading.summarize`)."""
    graded = [grading.grade(task.Problem(tuple(r["operands"])), w) for r, w in zip(problems, words)]
    return grading.summarize(graded)


def gain_recovered(acc: float, acc_base: float, acc_target: float) -> float:
    """Share of the base -> target accuracy gain that a model recovers: (acc - base) / (target - base)."""
    gap = acc_target - acc_base
    return float("nan") if abs(gap) < 1e-9 else (acc - acc_base) / gap
