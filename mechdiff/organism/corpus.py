"""``datasets`` builders for the organism's corpora, with a ground-truth label on every token.

* :func:`base_corpus` - what the base model is pretrained on: carry-free direct answers (its
  habit on a plain prompt, see :mod:`mechdiff.organism.task`), standalone column facts, and worked
  chains *without* hesitation behind a ``work`` marker (so the skill exists in the base but is not
  what it does when simply asked).
* :func:`reasoning_traces` - what the fine-tune is distilled on: plain prompt, then a ``<think>``
  trace with systematic slips, ``wait`` and corrections, then the answer.
* :func:`problems` - held-out problems for generation-based evaluation.

Every row holds ``input_ids``, ``label_ids`` (indices into :data:`~mechdiff.organism.task.LABELS`),
``text``, ``kind``, the operands and ``prompt_len`` (tokens up to and including ``=``). Each builder
takes the organism's :class:`~mechdiff.organism.task.TaskSpec` (default: the shipped organism's).

Example:
    >>> ds = reasoning_traces(4, split="validation", seed=0)
    >>> ds[0]["text"].split()[:2]
    ['<bos>', 'A']
"""

from __future__ import annotations

import random

from datasets import Dataset

from mechdiff.organism import task
from mechdiff.organism.task import DEFAULT, TaskSpec
from mechdiff.organism.tokenizer import build_tokenizer, encode_words


def _row(problem: task.Problem | None, toks, labs, kind: str, prompt_len: int, tokenizer) -> dict:
    return {
        "input_ids": encode_words(tokenizer, toks),
        "label_ids": [task.LABEL_ID[name] for name in labs],
        "text": " ".join(toks),
        "kind": kind,
        "operands": list(problem.operands) if problem else [],
        "prompt_len": prompt_len,
    }


def base_corpus(
    n: int,
    seed: int = 0,
    mix: tuple[float, float, float] = (0.3, 0.3, 0.4),
    spec: TaskSpec = DEFAULT,
) -> Dataset:
    """``n`` base documents: (direct answers, facts, worked chains) in proportions ``mix``."""
    tokenizer = build_tokenizer(spec)
    rng = random.Random(f"base:{seed}")
    problems = iter(spec.sample_problems(n, "train", seed))
    rows = []
    for _ in range(n):
        kind = rng.choices(("direct", "fact", "worked"), weights=mix)[0]
        if kind == "fact":
            toks, labs = spec.fact(rng)
            rows.append(_row(None, toks, labs, kind, 1, tokenizer))
            continue
        p = next(problems)
        ptoks, plabs = spec.prompt(p, worked=kind == "worked")
        if kind == "direct":
            rtoks, rlabs = spec.direct_answer(p, carry_free=True)
        else:
            rtoks, rlabs = spec.reasoning_trace(p, rng, hesitate=False)
        rows.append(_row(p, ptoks + rtoks, plabs + rlabs, kind, len(ptoks), tokenizer))
    return Dataset.from_list(rows)


def reasoning_traces(n: int, split: str = "train", seed: int = 0, spec: TaskSpec = DEFAULT) -> Dataset:
    """``n`` fine-tuning traces on distinct problems of ``split`` (slips and re-checks as ``spec`` says)."""
    tokenizer = build_tokenizer(spec)
    rng = random.Random(f"traces:{split}:{seed}")
    rows = []
    for p in spec.sample_problems(n, split, seed):
        ptoks, plabs = spec.prompt(p)
        rtoks, rlabs = spec.reasoning_trace(p, rng)
        rows.append(_row(p, ptoks + rtoks, plabs + rlabs, "trace", len(ptoks), tokenizer))
    return Dataset.from_list(rows)


def problems(n: int, split: str = "test", seed: int = 0, spec: TaskSpec = DEFAULT) -> Dataset:
    """``n`` evaluation problems: the prompt only (``input_ids``), operands and ``answer``."""
    tokenizer = build_tokenizer(spec)
    rows = []
    for p in spec.sample_problems(n, split, seed):
        toks, labs = spec.prompt(p)
        row = _row(p, toks, labs, "problem", len(toks), tokenizer)
        row["answer"] = p.answer
        rows.append(row)
    return Dataset.from_list(rows)
