"""What every workload gives (:class:`Workload`), and the greedy replies they share.

Besides its data and grader, a workload says what *hesitating* is in its tokens, so the hesitation
measurements (:mod:`mechdiff.evaluation.hesitation`) and the studies ask the workload and never
which one it is:

* ``target``: the token attribution graphs explain; ``variants``: every token counted as a
  hesitation (``target`` first); ``go_on``: the token written in the same slot when the model does
  not hesitate; ``decisions``: ``(*variants, go_on)``; ``word``: what reports call the hesitation;
* ``max_new_tokens``: the reply cap of its generation (:meth:`Workload.evaluate`, :meth:`Workload.responses`);
* ``problem(operands)``, ``grade(problem, ids)``, ``summarize(graded)``: a reply in token ids graded;
* ``cut(problem, ids)``: a label per reply token, the hesitations ``(position, after an error)``
  and the positions of the go-on tokens that may serve as controls (a :data:`Cut`).

Example:
    >>> from mechdiff.organism.tokenizer import build_tokenizer
    >>> from mechdiff.workloads import get
    >>> work = get("organism", build_tokenizer())
    >>> isinstance(work, Workload), work.tokenizer.convert_ids_to_tokens(list(work.decisions))
    (True, ['wait', ';'])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from datasets import Dataset
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerBase

from mechdiff.generation import generate
from mechdiff.organism import grading, task

Cut = tuple[list[str], list[tuple[int, bool]], list[int]]  # labels, (hesitation, after error), controls


@runtime_checkable
class Workload(Protocol):
    """The interface :class:`~mechdiff.workloads.organism.OrganismWorkload` and
    :class:`~mechdiff.workloads.chat.ChatWorkload` share."""

    name: str
    tokenizer: PreTrainedTokenizerBase
    word: str
    target: int
    variants: tuple[int, ...]
    go_on: int
    max_new_tokens: int

    @property
    def decisions(self) -> tuple[int, ...]: ...

    def traces(self, n: int, split: str = "train", seed: int = 0) -> Dataset: ...

    def problems(self, n: int, split: str = "test", seed: int = 0) -> Dataset: ...

    def evaluate(self, model: HookedTransformer, problems: Dataset, **kwargs) -> dict[str, float]: ...

    def responses(
        self, model: HookedTransformer, problems: Dataset, *, batch_size: int = 128, progress: bool = False
    ) -> list[list[int]]: ...

    def problem(self, operands: Sequence[int]) -> task.Problem: ...

    def grade(self, problem: task.Problem, ids: Sequence[int]) -> grading.Graded: ...

    def summarize(self, graded: Sequence[grading.Graded]) -> dict[str, float]: ...

    def cut(self, problem: task.Problem, ids: Sequence[int]) -> Cut: ...


def greedy_replies(
    model: HookedTransformer,
    tokenizer,
    problems: Dataset,
    max_new_tokens: int,
    *,
    batch_size: int = 128,
    progress: bool = False,
) -> list[list[int]]:
    """Greedy replies (token ids, eos kept) to the problems' prompts: every workload's ``responses``."""
    return generate(
        model,
        problems["input_ids"],
        max_new_tokens,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        batch_size=batch_size,
        progress=progress,
    )
