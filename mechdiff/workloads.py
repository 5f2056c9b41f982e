"""What a model pair is trained, probed and judged on: its traces, held-out problems and grader.

Both pairs study the same task (two 4-digit operands, :mod:`mechdiff.organism.task`) and the same
splits, in two renderings:

* :class:`OrganismWorkload` - the organism's word tokens (:mod:`mechdiff.organism.corpus`) and its
  grader (:func:`mechdiff.evaluation.behaviour.evaluate`), for the pair's
  :class:`~mechdiff.organism.task.TaskSpec` (hesitation words, operand shape, slip policy).
* :class:`ChatWorkload` - the natural-language chat of :mod:`mechdiff.real.chat` for an instruct
  model (SmolLM2): traces in words with "Wait,", prompts rendered with the tokenizer's chat template,
  and the chat grader.

Every workload gives the same three things, so trainers and reports need not know which it is:

* ``traces(n, split, seed)`` - rows with ``input_ids`` and ``prompt_len`` (the loss and the
  faithfulness metrics use no more; ``label_ids`` is the organism's alone), plus ``operands``;
* ``problems(n, split, seed)`` - prompt-only rows: ``input_ids``, ``prompt_len``, ``operands``,
  ``answer``;
* ``evaluate(model, problems, *, fwd_hooks=(), ban_hesitation=False, progress=False)`` - greedy
  generation and grading: ``accuracy``, ``mean_response_tokens``, ``hesitations_per_response``,
  ``frac_responses_with_hesitation``, ``frac_hesitations_after_error``, ``n_problems`` (the chat
  grader adds ``frac_answer_line``).

:func:`for_pair` picks a pair's workload from ``pair.meta["workload"]`` (set by
``load_pair("smollm2")``; absent, i.e. the organism, for every other pair) and an organism's task
from ``pair.meta["task"]`` (read from ``mechdiff_task.json`` beside the weights).

Example:
    >>> from mechdiff.organism.tokenizer import build_tokenizer
    >>> work = get("organism", build_tokenizer())
    >>> rows = work.traces(2, "validation", seed=0)
    >>> rows[0]["prompt_len"] < len(rows[0]["input_ids"]), sorted(work.problems(1).column_names)[:2]
    (True, ['answer', 'input_ids'])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from datasets import Dataset
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerBase

from mechdiff.evaluation import behaviour
from mechdiff.organism import corpus, task
from mechdiff.organism.task import DEFAULT, TaskSpec
from mechdiff.real import chat


class Workload(Protocol):
    """The interface :class:`OrganismWorkload` and :class:`ChatWorkload` share."""

    name: str
    tokenizer: PreTrainedTokenizerBase

    def traces(self, n: int, split: str = "train", seed: int = 0) -> Dataset: ...

    def problems(self, n: int, split: str = "test", seed: int = 0) -> Dataset: ...

    def evaluate(self, model: HookedTransformer, problems: Dataset, **kwargs) -> dict[str, float]: ...


@dataclass
class OrganismWorkload:
    """The organism's corpus and grader for task ``spec``; ``tokenizer`` is the pair's."""

    tokenizer: PreTrainedTokenizerBase
    spec: TaskSpec = DEFAULT
    name: str = "organism"

    def __post_init__(self):
        words = list(self.spec.hesitation_words) + [";"]
        ids = self.tokenizer.convert_tokens_to_ids(words)
        missing = [w for w, i in zip(words, ids) if i is None or i == self.tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"the pair's tokenizer does not know {missing}: it was not trained on this "
                             f"task ({self.spec}); is mechdiff_task.json from another organism?")

    @property
    def hesitation_words(self) -> tuple[str, ...]:
        """The words that count as hesitating (the first is what attribution graphs explain)."""
        return self.spec.hesitation_words

    def traces(self, n: int, split: str = "train", seed: int = 0) -> Dataset:
        """:func:`mechdiff.organism.corpus.reasoning_traces` (with ``label_ids``)."""
        return corpus.reasoning_traces(n, split=split, seed=seed, spec=self.spec)

    def problems(self, n: int, split: str = "test", seed: int = 0) -> Dataset:
        """:func:`mechdiff.organism.corpus.problems`."""
        return corpus.problems(n, split=split, seed=seed, spec=self.spec)

    def evaluate(self, model: HookedTransformer, problems: Dataset, **kwargs) -> dict[str, float]:
        """:func:`mechdiff.evaluation.behaviour.evaluate` (keyword arguments as there)."""
        return behaviour.evaluate(model, self.tokenizer, problems, spec=self.spec, **kwargs)


@dataclass
class ChatWorkload:
    """The task as chat (:mod:`mechdiff.real.chat`) for a tokenizer with a chat template.

    Example:
        >>> work = ChatWorkload(pair.tokenizer)  # doctest: +SKIP
        >>> row = work.problems(1)[0]  # doctest: +SKIP
        >>> row["input_ids"] == chat.encode(pair.tokenizer, task.Problem(tuple(row["operands"])))["input_ids"]  # doctest: +SKIP
        True
    """

    tokenizer: PreTrainedTokenizerBase
    system: str | None = chat.SYSTEM
    name: str = "chat"

    def traces(self, n: int, split: str = "train", seed: int = 0) -> Dataset:
        """:func:`mechdiff.real.chat.traces`: what ``python -m mechdiff.real train`` fine-tunes on."""
        return chat.traces(self.tokenizer, n, split, seed, system=self.system)

    def problems(self, n: int, split: str = "test", seed: int = 0) -> Dataset:
        """The templated prompts (ending in the assistant header) of ``n`` problems of ``split``."""
        rows = [{**chat.encode(self.tokenizer, p, None, self.system), "operands": list(p.operands),
                 "answer": p.answer} for p in chat.TASK.sample_problems(n, split, seed)]
        return Dataset.from_list(rows)

    def evaluate(self, model: HookedTransformer, problems: Dataset, **kwargs) -> dict[str, float]:
        """:func:`mechdiff.real.chat.evaluate` on the rows' operands (keyword arguments as there)."""
        return chat.evaluate(model, _problems(problems["operands"]), system=self.system,
                             tokenizer=self.tokenizer, **kwargs)


WORKLOADS = {"organism": OrganismWorkload, "chat": ChatWorkload}


def get(name: str, tokenizer: PreTrainedTokenizerBase, spec: TaskSpec | None = None) -> Workload:
    """The workload ``name`` (a :data:`WORKLOADS` key) over ``tokenizer``; ``spec``: an organism's task."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose one of {list(WORKLOADS)}")
    if name == "organism":
        return OrganismWorkload(tokenizer, spec or DEFAULT)
    return WORKLOADS[name](tokenizer)


def for_pair(pair) -> Workload:
    """The workload of a :class:`~mechdiff.models.ModelPair`: ``pair.meta["workload"]``, else the
    organism's (every pair but ``load_pair("smollm2")`` is judged as the organism was before).

    >>> for_pair(load_pair("smollm2")).name  # doctest: +SKIP
    'chat'
    """
    return get(pair.meta.get("workload", "organism"), pair.tokenizer, TaskSpec.of_pair(pair))


def _problems(operands: Sequence[Sequence[int]]) -> list[task.Problem]:
    return [chat.TASK.problem(o) for o in operands]
