"""Behaviour on held-out problems: accuracy, response length and hesitation, by generation.

One call generates for every problem (greedy, or sampled with a seed; batched, KV-cached, with any
hooks or logit processors active) and grades the responses with the organism's ground-truth
grader, for the organism's :class:`~mechdiff.organism.task.TaskSpec` (its hesitation words and
operand shape).

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
from mechdiff.organism import grading
from mechdiff.organism.task import DEFAULT, TaskSpec

MAX_NEW_TOKENS = 96  # the longest organism trace is ~75 tokens: room for rambling, not for runaways


def responses(
    model: HookedTransformer,
    tokenizer,
    problems: Dataset,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    logit_processors: Sequence[LogitProcessor] = (),
    fwd_hooks: Sequence[tuple] = (),
    batch_size: int = 128,
    progress: bool = False,
    temperature: float = 0.0,
    seed: int = 0,
) -> list[list[str]]:
    """Responses to each problem's prompt, as words: greedy, or sampled at ``temperature``."""
    outs = generate(
        model,
        problems["input_ids"],
        max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        logit_processors=logit_processors,
        fwd_hooks=fwd_hooks,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    return [tokenizer.convert_ids_to_tokens(row) for row in outs]


def evaluate(
    model: HookedTransformer,
    tokenizer,
    problems: Dataset,
    *,
    spec: TaskSpec = DEFAULT,
    ban_hesitation: bool = False,
    fwd_hooks: Sequence[tuple] = (),
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 128,
    progress: bool = False,
    temperature: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Generate and grade; the summary of :func:`mechdiff.organism.grading.summarize`."""
    words = responses(
        model,
        tokenizer,
        problems,
        max_new_tokens=max_new_tokens,
        logit_processors=hesitation_ban(tokenizer, ban_hesitation, spec),
        fwd_hooks=fwd_hooks,
        batch_size=batch_size,
        progress=progress,
        temperature=temperature,
        seed=seed,
    )
    return grade_responses(problems, words, spec)


def hesitation_ban(tokenizer, ban: bool, spec: TaskSpec = DEFAULT) -> list:
    """The logit processors that ban every hesitation word of ``spec`` when ``ban`` (none otherwise)."""
    return [ban_tokens(tokenizer.convert_tokens_to_ids(list(spec.hesitation_words)))] if ban else []


def grade_responses(
    problems: Dataset,
    words: Sequence[Sequence[str]],
    spec: TaskSpec = DEFAULT,
) -> dict[str, float]:
    """Grade each problem's response (words) and summarize (:func:`mechdiff.organism.grading.summarize`)."""
    graded = [grading.grade(spec.problem(r["operands"]), w, spec) for r, w in zip(problems, words)]
    return grading.summarize(graded)


def behaviour_report(
    workload,
    model: HookedTransformer,
    problems: Dataset,
    *,
    samples: int = 1,
    temperature: float = 0.0,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Greedy behaviour, accuracy with the hesitation banned, and (``temperature > 0``) the same
    statistics over ``samples`` seeded sampled replies per problem, under ``"sampled"``.

    Sampling is what measures error detection on an organism that slips at random: greedy decoding
    always takes the likelier branch, sampling writes both the slips and the correct hard steps.
    """
    stats = workload.evaluate(model, problems, progress=progress)
    stats["accuracy_hesitation_banned"] = workload.evaluate(model, problems, ban_hesitation=True)["accuracy"]
    if temperature > 0:
        many = Dataset.from_dict({k: [v for v in problems[k] for _ in range(samples)] for k in problems.column_names})
        sampled = workload.evaluate(model, many, temperature=temperature, seed=seed)
        stats["sampled"] = {**sampled, "temperature": temperature, "samples_per_problem": samples}
    return stats


def gain_recovered(acc: float, acc_base: float, acc_target: float) -> float:
    """Share of the base -> target accuracy gain that a model recovers: (acc - base) / (target - base)."""
    gap = acc_target - acc_base
    return float("nan") if abs(gap) < 1e-9 else (acc - acc_base) / gap
