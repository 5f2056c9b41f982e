"""Generation and behavioural evaluation split over the ranks of a ``torch.distributed`` group.

Each rank holds a full replica of the model (loaded on its own device, e.g.
``load_pair(..., device=mechdiff.distributed.info().device)``). The prompts are cut into the
*same* length-sorted batches that :func:`mechdiff.generation.generate` would form, batches are dealt
round-robin to the ranks, and the results are gathered on every rank in the original order. So
greedy results are exactly those of a single process, for any number of ranks; without a process
group every function here is the plain single-process one.

Sampling (``temperature > 0``) draws each batch from its own seed (``seed`` and the batch's index),
so samples do not depend on the number of ranks; they differ from the single random stream of
:func:`mechdiff.generation.generate`.

Example (the same script runs alone or under ``torchrun --nproc_per_node 4``)::

    >>> from mechdiff import distributed
    >>> from mechdiff.models import load_pair
    >>> from mechdiff.organism import corpus

    Not run as a doctest: ``distributed.init()`` would start a process group, and 500 problems take
    minutes.
    >>> dist_info = distributed.init()  # doctest: +SKIP
    >>> pair = load_pair("organism", device=dist_info.device)  # doctest: +SKIP
    >>> stats = evaluate(pair.target, pair.tokenizer, corpus.problems(500))  # doctest: +SKIP
    >>> 0.0 <= stats["accuracy"] <= 1.0  # doctest: +SKIP
    True
"""

from __future__ import annotations

from collections.abc import Sequence

from datasets import Dataset
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from mechdiff import distributed
from mechdiff import generation as _generation
from mechdiff.evaluation.behaviour import MAX_NEW_TOKENS, grade_responses, hesitation_ban
from mechdiff.organism.task import DEFAULT, TaskSpec


def batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Prompt indices in the batches :func:`mechdiff.generation.generate` forms (by length).

    >>> batches([[1, 2, 3], [4], [5, 6]], batch_size=2)
    [[1, 2], [0]]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate(
    model: HookedTransformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    batch_size: int = 64,
    temperature: float = 0.0,
    seed: int = 0,
    progress: bool = False,
    **kwargs,
) -> list[list[int]]:
    """:func:`mechdiff.generation.generate` with the batches dealt over the ranks.

    Returns every prompt's new tokens, in the order of ``prompts``, on every rank. ``kwargs``
    (``eos_token_id``, ``pad_token_id``, ``logit_processors``, ``fwd_hooks``) pass through.

    Example:
        Not run as a doctest: it needs a pair and problems from the caller (the module example shows
        them).
        >>> out = generate(pair.target, problems["input_ids"], 96)  # doctest: +SKIP
    """
    if distributed.world_size() == 1 and temperature == 0:
        return _generation.generate(model, prompts, max_new_tokens, batch_size=batch_size, progress=progress, **kwargs)
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (a BOS at least)")
    rank, world = distributed.rank(), distributed.world_size()
    plan = batches(prompts, batch_size)
    local: dict[int, list[int]] = {}
    mine = range(rank, len(plan), world)
    for b in tqdm(mine, desc="generate", disable=not (progress and rank == 0), leave=False):
        chunk = plan[b]
        outs = _generation.generate(
            model,
            [list(prompts[i]) for i in chunk],
            max_new_tokens,
            batch_size=len(chunk),
            temperature=temperature,
            seed=seed * 1_000_003 + b,
            **kwargs,
        )
        local.update(zip(chunk, outs, strict=True))
    merged: dict[int, list[int]] = {}
    for part in distributed.gather(local):
        merged.update(part)
    if len(merged) != len(prompts):
        raise RuntimeError(
            f"gathered {len(merged)} of {len(prompts)} results: did every rank get the same prompts and batch_size?"
        )
    return [merged[i] for i in range(len(prompts))]


def responses(
    model: HookedTransformer,
    tokenizer,
    problems: Dataset,
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    logit_processors=(),
    fwd_hooks=(),
    batch_size: int = 128,
    progress: bool = False,
) -> list[list[str]]:
    """:func:`mechdiff.evaluation.behaviour.responses`, sharded: greedy responses as words."""
    outs = generate(
        model,
        problems["input_ids"],
        max_new_tokens,
        batch_size=batch_size,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        logit_processors=logit_processors,
        fwd_hooks=fwd_hooks,
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
    fwd_hooks=(),
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 128,
    progress: bool = False,
) -> dict[str, float]:
    """:func:`mechdiff.evaluation.behaviour.evaluate`, sharded; the same summary on every rank."""
    words = responses(
        model,
        tokenizer,
        problems,
        max_new_tokens=max_new_tokens,
        logit_processors=hesitation_ban(tokenizer, ban_hesitation, spec),
        fwd_hooks=fwd_hooks,
        batch_size=batch_size,
        progress=progress,
    )
    return grade_responses(problems, words, spec)
