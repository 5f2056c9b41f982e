"""The organism's workload: its word-token corpus (:mod:`mechdiff.organism.corpus`), its grader
(:func:`mechdiff.evaluation.behaviour.evaluate`), and what hesitating is in its tokens: the task's
hesitation word(s) (``wait`` on the shipped organism; the first is the graphs' target) and the
``;`` closing a step (the go-on token).

Example:
    >>> from mechdiff.organism.tokenizer import build_tokenizer
    >>> work = OrganismWorkload(build_tokenizer())
    >>> words = "<think> p0 5 1 0 = 6 0 ; p1 2 0 0 = 2 0 ; p2 9 3 0 = 2 1 ; p3 3 4 0 = 7 0 wait".split()
    >>> labels, hesitations, controls = work.cut(work.problem((3925, 4301)),
    ...                                          work.tokenizer.convert_tokens_to_ids(words))
    >>> hesitations, controls, labels[-1]
    ([(32, True)], [8, 16, 24], 'hesitation')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from datasets import Dataset
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerBase

from mechdiff.evaluation import behaviour
from mechdiff.organism import corpus, grading, task
from mechdiff.organism.task import DEFAULT, TaskSpec
from mechdiff.workloads.protocol import Cut, greedy_replies


@dataclass
class OrganismWorkload:
    """The organism's corpus, grader and hesitation tokens for task ``spec``; ``tokenizer`` is the
    pair's; ``max_new_tokens`` caps its replies (96 words)."""

    tokenizer: PreTrainedTokenizerBase
    spec: TaskSpec = DEFAULT
    name: str = "organism"
    max_new_tokens: int = behaviour.MAX_NEW_TOKENS
    target: int = field(init=False)
    variants: tuple[int, ...] = field(init=False)
    go_on: int = field(init=False)

    def __post_init__(self):
        words = list(self.spec.hesitation_words) + [";"]
        ids = self.tokenizer.convert_tokens_to_ids(words)
        missing = [w for w, i in zip(words, ids) if i is None or i == self.tokenizer.unk_token_id]
        if missing:
            raise ValueError(
                f"the pair's tokenizer does not know {missing}: it was not trained on this "
                f"task ({self.spec}); is mechdiff_task.json from another organism?"
            )
        *self.variants, self.go_on = ids
        self.variants = tuple(self.variants)
        self.target = self.variants[0]

    @property
    def hesitation_words(self) -> tuple[str, ...]:
        """The words that count as hesitating (the first is what attribution graphs explain)."""
        return self.spec.hesitation_words

    @property
    def word(self) -> str:
        """What reports call the hesitation (the task's first hesitation word)."""
        return self.spec.word

    @property
    def decisions(self) -> tuple[int, ...]:
        """The tokens of a hesitate-or-go-on decision (:func:`~mechdiff.evaluation.sufficiency.set_decides_ids`)."""
        return (*self.variants, self.go_on)

    def traces(self, n: int, split: str = "train", seed: int = 0) -> Dataset:
        """:func:`mechdiff.organism.corpus.reasoning_traces` (with ``label_ids``)."""
        return corpus.reasoning_traces(n, split=split, seed=seed, spec=self.spec)

    def problems(self, n: int, split: str = "test", seed: int = 0) -> Dataset:
        """:func:`mechdiff.organism.corpus.problems`."""
        return corpus.problems(n, split=split, seed=seed, spec=self.spec)

    def evaluate(self, model: HookedTransformer, problems: Dataset, **kwargs) -> dict[str, float]:
        """:func:`mechdiff.evaluation.behaviour.evaluate` (keyword arguments as there;
        ``max_new_tokens`` defaults to the workload's)."""
        kwargs.setdefault("max_new_tokens", self.max_new_tokens)
        return behaviour.evaluate(model, self.tokenizer, problems, spec=self.spec, **kwargs)

    def responses(
        self, model: HookedTransformer, problems: Dataset, *, batch_size: int = 128, progress: bool = False
    ) -> list[list[int]]:
        """Greedy replies (token ids, eos kept) to the problems' prompts."""
        return greedy_replies(
            model, self.tokenizer, problems, self.max_new_tokens, batch_size=batch_size, progress=progress
        )

    def problem(self, operands: Sequence[int]) -> task.Problem:
        """The problem a row's ``operands`` pose in the workload's task."""
        return self.spec.problem(operands)

    def grade(self, problem: task.Problem, ids: Sequence[int]) -> grading.Graded:
        """A reply in token ids, graded by :func:`mechdiff.organism.grading.grade`."""
        return grading.grade(problem, self.tokenizer.convert_ids_to_tokens(list(ids)), self.spec)

    def summarize(self, graded: Sequence[grading.Graded]) -> dict[str, float]:
        """:func:`mechdiff.organism.grading.summarize`."""
        return grading.summarize(list(graded))

    def cut(self, problem: task.Problem, ids: Sequence[int]) -> Cut:
        """Labels from :func:`~mechdiff.organism.grading.label_response`, every hesitation word
        (after an error where labelled ``hesitation``) and every ``;`` as a control."""
        words = self.tokenizer.convert_ids_to_tokens(list(ids))
        labels = grading.label_response(problem, words, self.spec)
        hesitation = set(self.spec.hesitation_words)
        waits = [(j, labels[j] == "hesitation") for j, w in enumerate(words) if w in hesitation]
        return labels, waits, [j for j, w in enumerate(words) if w == ";"]
