"""What a model pair is trained, probed and judged on: its traces, held-out problems and grader.

Both pairs study the same task (two 4-digit operands, :mod:`mechdiff.organism.task`) and the same
splits, in two renderings:

* :class:`~mechdiff.workloads.organism.OrganismWorkload` - the organism's word tokens
  (:mod:`mechdiff.organism.corpus`) and its grader (:func:`mechdiff.evaluation.behaviour.evaluate`),
  for the pair's :class:`~mechdiff.organism.task.TaskSpec` (hesitation words, operand shape, slip policy).
* :class:`~mechdiff.workloads.chat.ChatWorkload` - the natural-language chat of
  :mod:`mechdiff.real.chat` for an instruct model (SmolLM2): traces in words with "Wait,", prompts
  rendered with the tokenizer's chat template, and the chat grader. Its module (and with it
  :mod:`mechdiff.real`) is imported only when a chat workload is asked for.

Every workload gives the same things, so trainers and reports need not know which it is:

* ``traces(n, split, seed)`` - rows with ``input_ids`` and ``prompt_len`` (the loss and the
  faithfulness metrics use no more; ``label_ids`` is the organism's alone), plus ``operands``;
* ``problems(n, split, seed)`` - prompt-only rows: ``input_ids``, ``prompt_len``, ``operands``,
  ``answer``;
* ``evaluate(model, problems, *, fwd_hooks=(), ban_hesitation=False, progress=False)`` - greedy
  generation and grading: ``accuracy``, ``mean_response_tokens``, ``hesitations_per_response``,
  ``frac_responses_with_hesitation``, ``frac_hesitations_after_error``, ``n_problems`` (the chat
  grader adds ``frac_answer_line``);
* what hesitating is in its tokens and how a reply is cut before each hesitation
  (:class:`~mechdiff.workloads.protocol.Workload`: ``target``, ``variants``, ``go_on``, ``word``,
  ``max_new_tokens``, ``responses``, ``grade``, ``cut``), which the hesitation measurements
  (:mod:`mechdiff.evaluation.hesitation`) and the studies ask for.

:func:`for_pair` picks a pair's workload from ``pair.meta["workload"]`` (set by
``load_pair("smollm2")``; absent, i.e. the organism, for every other pair) and an organism's task
from ``pair.meta["task"]`` (read from ``mechdiff_task.json`` beside the weights);
``max_new_tokens`` overrides the workload's reply cap.

Example:
    >>> from mechdiff.organism.tokenizer import build_tokenizer
    >>> work = get("organism", build_tokenizer())
    >>> rows = work.traces(2, "validation", seed=0)
    >>> rows[0]["prompt_len"] < len(rows[0]["input_ids"]), sorted(work.problems(1).column_names)[:2]
    (True, ['answer', 'input_ids'])
"""

from __future__ import annotations

import importlib

from transformers import PreTrainedTokenizerBase

from mechdiff.organism.task import DEFAULT, TaskSpec
from mechdiff.workloads.organism import OrganismWorkload
from mechdiff.workloads.protocol import Cut, Workload

__all__ = ["WORKLOADS", "ChatWorkload", "Cut", "OrganismWorkload", "Workload", "for_pair", "get"]

WORKLOADS = {
    "organism": "mechdiff.workloads.organism:OrganismWorkload",
    "chat": "mechdiff.workloads.chat:ChatWorkload",
}  # name -> "module:class", imported when asked


def workload_class(name: str) -> type:
    """The class of workload ``name`` (a :data:`WORKLOADS` key), its module imported now."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {list(WORKLOADS)}")
    module, cls = WORKLOADS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def get(
    name: str, tokenizer: PreTrainedTokenizerBase, spec: TaskSpec | None = None, max_new_tokens: int | None = None
) -> Workload:
    """The workload ``name`` (a :data:`WORKLOADS` key) over ``tokenizer``; ``spec``: an organism's
    task; ``max_new_tokens``: its reply cap (default: the workload's, 96 organism words or 256 chat tokens)."""
    cls = workload_class(name)
    kwargs = {} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}
    if name == "organism":
        return cls(tokenizer, spec or DEFAULT, **kwargs)
    return cls(tokenizer, **kwargs)


def for_pair(pair, max_new_tokens: int | None = None) -> Workload:
    """The workload of a :class:`~mechdiff.models.ModelPair`: ``pair.meta["workload"]``, else the
    organism's (every pair but ``load_pair("smollm2")`` is judged as the organism was before).

    Not run by the tests: it needs SmolLM2 (the optional [real] extra).
    >>> for_pair(load_pair("smollm2")).name  # doctest: +SKIP
    'chat'
    """
    return get(pair.meta.get("workload", "organism"), pair.tokenizer, TaskSpec.of_pair(pair), max_new_tokens)


def __getattr__(name: str):
    """``ChatWorkload`` on first use, so importing this package does not import :mod:`mechdiff.real`."""
    if name == "ChatWorkload":
        return workload_class("chat")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
