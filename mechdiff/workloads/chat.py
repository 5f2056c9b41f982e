"""The task as chat (:mod:`mechdiff.real.chat`) for an instruct model (SmolLM2): traces in words
with "Wait,", prompts rendered with the tokenizer's chat template, the chat grader, and what
hesitating is in its tokens, read off a chat trace:

* the first token of the " Wait" written after a step (``ĠWait`` on SmolLM2; the other spellings,
  e.g. ``Ġwait``, count as hesitations too) (:func:`written_slot_tokens`);
* the go-on token: the first token holding the newline after a step's ``carry N.`` where no "Wait"
  follows.

Token labels are coarse, from the text (:func:`chat_char_labels`): a step is ``slip`` (wrong, a
"Wait" right after), ``correction`` / ``recheck_step`` (the step a "Wait" brought), ``error``
(wrong, left standing) or ``step``; the "Wait" itself ``hesitation`` (after a wrong step, as the
grader judges) or ``recheck``; the ``Answer:`` line ``answer``; everything else ``text``. A step's
label covers its closing punctuation and the spaces up to the next word ("carry 1." and the space
before " Wait"), as the organism labels a slipped step's separator ``slip``: that is where a model
reads the whole wrong step before it hesitates, so the role rule's ``slip`` mass counts it.

This module imports :mod:`mechdiff.real.chat`; :func:`mechdiff.workloads.get` imports it only
when a chat workload is asked for.

Example:
    >>> p = task.Problem((1234, 5678))
    >>> text = "Units: 4 + 8 = 12, write 2, carry 1.\\nTens: 3 + 7 = 10, write 0, carry 1. Wait, I forgot."
    >>> labels, words = chat_char_labels(p, text)
    >>> labels[0], labels[text.index("Tens")], [(text[a:b], labels[a], after) for a, b, after in words]
    ('step', 'slip', [('Wait', 'hesitation', True)])
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

from datasets import Dataset
from transformer_lens import HookedTransformer
from transformers import PreTrainedTokenizerBase

from mechdiff.organism import grading, task
from mechdiff.real import chat
from mechdiff.workloads.protocol import Cut, greedy_replies


@dataclass
class ChatWorkload:
    """The task as chat for a tokenizer with a chat template; ``max_new_tokens`` caps its replies
    (256 tokens).

    Example:
        Not run by the tests: it needs a tokenizer with a chat template (SmolLM2's: the optional
        [real] extra).
        >>> work = ChatWorkload(pair.tokenizer)  # doctest: +SKIP
        >>> row = work.problems(1)[0]  # doctest: +SKIP
        >>> row["input_ids"] == chat.encode(pair.tokenizer, task.Problem(tuple(row["operands"])))["input_ids"]  # doctest: +SKIP
        True
    """

    tokenizer: PreTrainedTokenizerBase
    system: str | None = chat.SYSTEM
    name: str = "chat"
    max_new_tokens: int = chat.MAX_NEW_TOKENS
    word: str = chat.HESITATION

    @cached_property
    def _slot_tokens(self) -> tuple[int, int]:
        return written_slot_tokens(self.tokenizer)  # read when first asked: it decodes a trace

    @property
    def target(self) -> int:
        """The first token of the " Wait" written after a step (:func:`written_slot_tokens`)."""
        return self._slot_tokens[0]

    @property
    def go_on(self) -> int:
        """The first token holding the newline after a step no "Wait" follows."""
        return self._slot_tokens[1]

    @cached_property
    def variants(self) -> tuple[int, ...]:
        """Every token that reads "wait" (:func:`mechdiff.real.chat.hesitation_token_ids`), ``target`` first."""
        return (self.target, *[i for i in chat.hesitation_token_ids(self.tokenizer) if i != self.target])

    @property
    def decisions(self) -> tuple[int, ...]:
        """The tokens of a hesitate-or-go-on decision (:func:`~mechdiff.evaluation.sufficiency.set_decides_ids`)."""
        return (*self.variants, self.go_on)

    def traces(self, n: int, split: str = "train", seed: int = 0) -> Dataset:
        """:func:`mechdiff.real.chat.traces`: what ``python -m mechdiff.real train`` fine-tunes on."""
        return chat.traces(self.tokenizer, n, split, seed, system=self.system)

    def problems(self, n: int, split: str = "test", seed: int = 0) -> Dataset:
        """The templated prompts (ending in the assistant header) of ``n`` problems of ``split``."""
        rows = [
            {**chat.encode(self.tokenizer, p, None, self.system), "operands": list(p.operands), "answer": p.answer}
            for p in chat.TASK.sample_problems(n, split, seed)
        ]
        return Dataset.from_list(rows)

    def evaluate(self, model: HookedTransformer, problems: Dataset, **kwargs) -> dict[str, float]:
        """:func:`mechdiff.real.chat.evaluate` on the rows' operands (keyword arguments as there;
        ``max_new_tokens`` defaults to the workload's)."""
        kwargs.setdefault("max_new_tokens", self.max_new_tokens)
        return chat.evaluate(
            model,
            [self.problem(o) for o in problems["operands"]],
            system=self.system,
            tokenizer=self.tokenizer,
            **kwargs,
        )

    def responses(
        self, model: HookedTransformer, problems: Dataset, *, batch_size: int = 128, progress: bool = False
    ) -> list[list[int]]:
        """Greedy replies (token ids, eos kept) to the problems' prompts."""
        return greedy_replies(
            model, self.tokenizer, problems, self.max_new_tokens, batch_size=batch_size, progress=progress
        )

    def problem(self, operands: Sequence[int]) -> task.Problem:
        """The problem a row's ``operands`` pose (the chat renders :data:`mechdiff.real.chat.TASK`)."""
        return chat.TASK.problem(operands)

    def text(self, ids: Sequence[int]) -> str:
        """The reply as :func:`mechdiff.real.chat.respond` decodes it."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def grade(self, problem: task.Problem, ids: Sequence[int]) -> chat.ChatGraded:
        """The decoded reply graded by :func:`mechdiff.real.chat.grade`."""
        return chat.grade(problem, self.text(ids), len(ids))

    def summarize(self, graded: Sequence[grading.Graded]) -> dict[str, float]:
        """:func:`mechdiff.real.chat.summarize`."""
        return chat.summarize(graded)

    def cut(self, problem: task.Problem, ids: Sequence[int]) -> Cut:
        """Token labels from :func:`chat_char_labels`; a hesitation is a ``variants`` token on a
        "wait" word the grader counts; a control, a go-on token right after a step."""
        text, spans = decoded_spans(self.tokenizer, ids)
        char_labels, waits = chat_char_labels(problem, text)
        labels = [_span_label(char_labels, text, a, b) for a, b in spans]
        hesitations = []
        for j, (a, b) in enumerate(spans):  # a hesitation token the grader counts: on a "wait" word
            word = next((w for w in waits if w[0] < b and a < w[1]), None)
            if ids[j] in self.variants and word is not None:
                hesitations.append((j, word[2]))
        steps = [m.end() for m in chat._STEP.finditer(text)]
        controls = [j for j, (a, _) in enumerate(spans) if ids[j] == self.go_on and _right_after(text, steps, a)]
        return labels, hesitations, controls


def written_slot_tokens(tokenizer) -> tuple[int, int]:
    """``(hesitation, go_on)`` as a chat trace tokenizes them: the first token of the "Wait" after
    a slipped step, and the first token holding the newline after a step no "Wait" follows.

    Read off a trace, not guessed: "Wait" after a step is " Wait" (``ĠWait`` on SmolLM2, not
    ``Wait``), and the newline may or may not merge with what precedes it.
    """
    problem = task.Problem((1234, 5678))  # units carry into the tens: the tens step slips
    text = chat.reasoning_response(problem, random.Random(0), slip_prob=1.0, recheck_prob=0.0)
    row = chat.encode(tokenizer, problem, text)
    ids = row["input_ids"][row["prompt_len"] :]
    _, spans = decoded_spans(tokenizer, ids)
    variants = set(chat.hesitation_token_ids(tokenizer))
    hesitation = next((i for i in ids if i in variants), None)
    units_end = next(chat._STEP.finditer(text)).end()  # the units step: no carry in, no slip
    go_on = next((ids[j] for j, (a, b) in enumerate(spans) if a >= units_end and "\n" in text[a:b]), None)
    if hesitation is None or go_on is None:
        raise ValueError("the tokenizer writes no 'Wait' token or no newline after a step in a chat trace")
    return hesitation, go_on


def decoded_spans(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text (special tokens skipped) and each token's ``[start, end)`` in it, from
    the decoded prefixes (a byte-level token alone may not decode to its share of the text)."""
    ids = list(ids)
    decode = lambda n: tokenizer.decode(
        ids[:n],
        skip_special_tokens=True,  # noqa: E731
        clean_up_tokenization_spaces=False,
    )
    ends = [len(decode(n)) for n in range(1, len(ids) + 1)]
    return decode(len(ids)), list(zip([0, *ends[:-1]], ends))


def chat_char_labels(problem: task.Problem, text: str) -> tuple[list[str], list[tuple[int, int, bool]]]:
    """A label per character of a chat reply (see the module's docstring), and each "wait" word
    as ``(start, end, after_error)``, after an error exactly as :func:`mechdiff.real.chat.grade`
    judges it."""
    labels = ["text"] * len(text)

    def paint(a, b, name):
        labels[a:b] = [name] * (b - a)

    words = [
        (m.start(), m.end(), after)
        for m, after in zip(chat._WAIT.finditer(text), chat.grade(problem, text).hesitation_after_error)
    ]
    for a, b, after in words:
        paint(a, b, "hesitation" if after else "recheck")
    steps = list(chat._STEP.finditer(text))
    for i, step in enumerate(steps):
        since = steps[i - 1].end() if i else 0
        brought = [w for w in words if since <= w[0] and w[1] <= step.start()]  # the "Wait" before it
        judged = any(chat._BETWEEN.fullmatch(text, step.end(), w[0]) for w in words if w[0] >= step.end())
        right = chat.step_is_right(problem, step)
        name = (
            "slip"
            if judged and not right
            else ("correction" if brought[-1][2] else "recheck_step")
            if brought
            else "step"
            if right
            else "error"
        )
        end = chat._BETWEEN.match(text, step.end()).end()  # its closing "." and spaces, as the organism's separator
        paint(step.start(), end, name)
    for m in chat._ANSWER_LINE.finditer(text):
        paint(*m.span(), "answer")
    return labels, words


def _span_label(char_labels: list[str], text: str, a: int, b: int) -> str:
    """A token's label: its first non-space character's (a token of spaces: its first's)."""
    if a >= b:
        return "text"  # decodes to nothing (eos)
    first = next((i for i in range(a, b) if not text[i].isspace()), a)
    return char_labels[first]


def _right_after(text: str, step_ends: Sequence[int], pos: int) -> bool:
    """Whether only punctuation and spaces stand between a step's end and ``pos``."""
    return any(end <= pos and chat._BETWEEN.fullmatch(text, end, pos) for end in step_ends)
