"""Hesitation prompts and the measurements the hesitation study makes with them.

*Hesitation prompts* are the target's own greedy responses cut right before each ``wait``. Each
gets a *control* cut from the same response before a ``;`` that closes a step (the slot where a
``wait`` could have come and did not), the one nearest in position, so the two sets match in
length and syntax and differ in whether the model hesitates next.

What "hesitating" is in tokens depends on the workload (:mod:`mechdiff.workloads`);
:func:`hesitation_for` gives a :class:`Hesitation` that says it:

* the organism (:class:`OrganismHesitation`): its task's hesitation word(s) (``wait`` on the
  shipped organism; :class:`~mechdiff.organism.task.TaskSpec`), and the ``;`` closing a step;
* the chat (:class:`ChatHesitation`, SmolLM2): the first token of the " Wait" written after a
  step (``ĠWait``; the other spellings, e.g. ``Ġwait``, count as hesitations too), and the
  newline after a step's ``carry N.`` where no "Wait" follows; both read off a chat trace.

Example:
    >>> from mechdiff.models import load_pair
    >>> from mechdiff.organism import corpus
    >>> pair = load_pair("organism")
    >>> hes, ctl = hesitation_prompts(pair.target, pair.tokenizer, corpus.problems(20, "validation"))
    >>> pair.tokenizer.convert_ids_to_tokens(hes.tokens[0][-1:]) != ["wait"]
    True
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from mechdiff.evaluation.behaviour import MAX_NEW_TOKENS
from mechdiff.generation import generate
from mechdiff.organism import grading, task
from mechdiff.padding import pad
from mechdiff.real import chat
from mechdiff.workloads import OrganismWorkload, Workload


@dataclass
class CutPrompts:
    """Prefixes of generated responses; the next token is a hesitation (``wait``) or, for
    controls, the go-on token (``;``) of :class:`Hesitation`."""

    kind: str
    tokens: list[list[int]] = field(default_factory=list)
    problem_index: list[int] = field(default_factory=list)
    response_position: list[int] = field(default_factory=list)
    after_error: list[bool] = field(default_factory=list)
    labels: list[list[str]] = field(default_factory=list)  # ground truth of each prefix's response part

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, tokens, problem_index, position, after_error, labels) -> None:
        self.tokens.append(tokens)
        self.problem_index.append(problem_index)
        self.response_position.append(position)
        self.after_error.append(after_error)
        self.labels.append(labels)


Cut = tuple[list[str], list[tuple[int, bool]], list[int]]  # labels, (hesitation, after error), controls


@dataclass
class Hesitation:
    """How a workload's responses hesitate, in token ids, and how they are generated and graded.

    ``target``: the token attribution graphs explain; ``variants``: every token counted as a
    hesitation (``target`` first); ``go_on``: the token written in the same slot when the model
    does not hesitate; ``word``: what reports call the hesitation. :meth:`evaluate` is the
    workload's, capped at ``max_new_tokens``, so this object serves as the workload too.
    """

    workload: Workload
    target: int
    variants: tuple[int, ...]
    go_on: int
    max_new_tokens: int
    word: str

    @property
    def tokenizer(self):
        return self.workload.tokenizer

    @property
    def name(self) -> str:
        return self.workload.name

    @property
    def decisions(self) -> tuple[int, ...]:
        """The tokens of a hesitate-or-go-on decision (:func:`set_decides_ids`)."""
        return (*self.variants, self.go_on)

    def traces(self, n: int, split: str = "train", seed: int = 0) -> Dataset:
        return self.workload.traces(n, split, seed)

    def problems(self, n: int, split: str = "test", seed: int = 0) -> Dataset:
        return self.workload.problems(n, split, seed)

    def evaluate(self, model: HookedTransformer, problems: Dataset, **kwargs) -> dict[str, float]:
        """The workload's generation and grading, ``max_new_tokens`` new tokens at most."""
        return self.workload.evaluate(model, problems, max_new_tokens=self.max_new_tokens, **kwargs)

    def responses(self, model: HookedTransformer, problems: Dataset, *, batch_size: int = 128,
                  progress: bool = False) -> list[list[int]]:
        """Greedy responses (token ids, eos kept) to the problems' prompts."""
        tok = self.tokenizer
        return generate(model, problems["input_ids"], self.max_new_tokens, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, batch_size=batch_size, progress=progress)

    def problem(self, operands: Sequence[int]) -> task.Problem:
        """The problem a row's ``operands`` pose, in the workload's task."""
        return chat.TASK.problem(operands)

    def grade(self, problem: task.Problem, ids: Sequence[int]) -> grading.Graded:
        raise NotImplementedError

    def summarize(self, graded: Sequence[grading.Graded]) -> dict[str, float]:
        return grading.summarize(list(graded))

    def cut(self, problem: task.Problem, ids: Sequence[int]) -> Cut:
        """A label per response token, the hesitations ``(position, after an error)`` and the
        positions of the go-on tokens that may serve as controls."""
        raise NotImplementedError


class OrganismHesitation(Hesitation):
    """The organism's: its task's hesitation words (the first is the graphs' target), the ``;``
    that closes a step, words graded by :mod:`mechdiff.organism.grading` (labels from
    :func:`~mechdiff.organism.grading.label_response`)."""

    def __init__(self, workload: Workload, max_new_tokens: int | None = None):
        tok, self.spec = workload.tokenizer, workload.spec
        ids = tuple(tok.convert_tokens_to_ids(list(self.spec.hesitation_words)))
        super().__init__(workload, ids[0], ids, tok.convert_tokens_to_ids(";"),
                         max_new_tokens or MAX_NEW_TOKENS, self.spec.word)

    def problem(self, operands: Sequence[int]) -> task.Problem:
        return self.spec.problem(operands)

    def grade(self, problem: task.Problem, ids: Sequence[int]) -> grading.Graded:
        return grading.grade(problem, self.tokenizer.convert_ids_to_tokens(list(ids)), self.spec)

    def cut(self, problem: task.Problem, ids: Sequence[int]) -> Cut:
        words = self.tokenizer.convert_ids_to_tokens(list(ids))
        labels = grading.label_response(problem, words, self.spec)
        hesitation = set(self.spec.hesitation_words)
        waits = [(j, labels[j] == "hesitation") for j, w in enumerate(words) if w in hesitation]
        return labels, waits, [j for j, w in enumerate(words) if w == ";"]


class ChatHesitation(Hesitation):
    """The chat's (:mod:`mechdiff.real.chat`): "Wait" after a step, the newline after a step
    nothing follows, replies decoded and graded by :func:`mechdiff.real.chat.grade`.

    Token labels are coarse, from the text: a step is ``slip`` (wrong, a "Wait" right after),
    ``correction`` / ``recheck_step`` (the step a "Wait" brought), ``error`` (wrong, left
    standing) or ``step``; the "Wait" itself ``hesitation`` (after a wrong step, as the grader
    judges) or ``recheck``; the ``Answer:`` line ``answer``; everything else ``text``.
    """

    def __init__(self, workload: Workload, max_new_tokens: int | None = None):
        tok = workload.tokenizer
        target, go_on = written_slot_tokens(tok)
        variants = (target, *[i for i in chat.hesitation_token_ids(tok) if i != target])
        super().__init__(workload, target, variants, go_on, max_new_tokens or chat.MAX_NEW_TOKENS,
                         chat.HESITATION)

    def text(self, ids: Sequence[int]) -> str:
        """The reply as :func:`mechdiff.real.chat.respond` decodes it."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def grade(self, problem: task.Problem, ids: Sequence[int]) -> chat.ChatGraded:
        return chat.grade(problem, self.text(ids), len(ids))

    def summarize(self, graded: Sequence[grading.Graded]) -> dict[str, float]:
        return chat.summarize(graded)

    def cut(self, problem: task.Problem, ids: Sequence[int]) -> Cut:
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


HESITATIONS = {"organism": OrganismHesitation, "chat": ChatHesitation}


def hesitation_for(workload: Workload, max_new_tokens: int | None = None) -> Hesitation:
    """The :class:`Hesitation` of ``workload`` (by its ``name``); ``max_new_tokens`` defaults to
    the workload's own (96 organism words, 256 chat tokens)."""
    return HESITATIONS[workload.name](workload, max_new_tokens)


def written_slot_tokens(tokenizer) -> tuple[int, int]:
    """``(hesitation, go_on)`` as a chat trace tokenizes them: the first token of the "Wait" after
    a slipped step, and the first token holding the newline after a step no "Wait" follows.

    Read off a trace, not guessed: "Wait" after a step is " Wait" (``ĠWait`` on SmolLM2, not
    ``Wait``), and the newline may or may not merge with what precedes it.
    """
    problem = task.Problem((1234, 5678))  # units carry into the tens: the tens step slips
    text = chat.reasoning_response(problem, random.Random(0), slip_prob=1.0, recheck_prob=0.0)
    row = chat.encode(tokenizer, problem, text)
    ids = row["input_ids"][row["prompt_len"]:]
    _, spans = decoded_spans(tokenizer, ids)
    variants = set(chat.hesitation_token_ids(tokenizer))
    hesitation = next((i for i in ids if i in variants), None)
    units_end = next(chat._STEP.finditer(text)).end()  # the units step: no carry in, no slip
    go_on = next((ids[j] for j, (a, b) in enumerate(spans)
                  if a >= units_end and "\n" in text[a:b]), None)
    if hesitation is None or go_on is None:
        raise ValueError("the tokenizer writes no 'Wait' token or no newline after a step in a chat trace")
    return hesitation, go_on


def decoded_spans(tokenizer, ids: Sequence[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded text (special tokens skipped) and each token's ``[start, end)`` in it, from
    the decoded prefixes (a byte-level token alone may not decode to its share of the text)."""
    ids = list(ids)
    decode = lambda n: tokenizer.decode(ids[:n], skip_special_tokens=True,  # noqa: E731
                                        clean_up_tokenization_spaces=False)
    ends = [len(decode(n)) for n in range(1, len(ids) + 1)]
    return decode(len(ids)), list(zip([0, *ends[:-1]], ends))


def chat_char_labels(problem: task.Problem, text: str) -> tuple[list[str], list[tuple[int, int, bool]]]:
    """A label per character of a chat reply (see :class:`ChatHesitation`), and each "wait" word
    as ``(start, end, after_error)``, after an error exactly as :func:`mechdiff.real.chat.grade`
    judges it."""
    labels = ["text"] * len(text)

    def paint(a, b, name):
        labels[a:b] = [name] * (b - a)

    words = [(m.start(), m.end(), after) for m, after in
             zip(chat._WAIT.finditer(text), chat.grade(problem, text).hesitation_after_error)]
    for a, b, after in words:
        paint(a, b, "hesitation" if after else "recheck")
    steps = list(chat._STEP.finditer(text))
    for i, step in enumerate(steps):
        since = steps[i - 1].end() if i else 0
        brought = [w for w in words if since <= w[0] and w[1] <= step.start()]  # the "Wait" before it
        judged = any(chat._BETWEEN.fullmatch(text, step.end(), w[0]) for w in words if w[0] >= step.end())
        right = chat.step_is_right(problem, step)
        name = ("slip" if judged and not right else
                ("correction" if brought[-1][2] else "recheck_step") if brought else
                "step" if right else "error")
        paint(*step.span(), name)
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


def hesitation_prompts(
    model: HookedTransformer, tokenizer, problems: Dataset, batch_size: int = 128,
    progress: bool = False, *, hesitation: Hesitation | None = None,
) -> tuple[CutPrompts, CutPrompts]:
    """Generate greedily, then cut before every hesitation and before the nearest go-on token
    (a ``;`` on the organism) as its control. ``hesitation`` (default: the organism's over
    ``tokenizer``) says which tokens those are and how the response is labelled."""
    spec = hesitation if hesitation is not None else OrganismHesitation(OrganismWorkload(tokenizer))
    responses = spec.responses(model, problems, batch_size=batch_size, progress=progress)
    hes, ctl = CutPrompts("hesitation"), CutPrompts("control")
    for idx, (row, ids) in enumerate(zip(problems, responses)):
        labels, waits, seps = spec.cut(spec.problem(row["operands"]), ids)
        for j, after_error in waits:
            hes.add(row["input_ids"] + ids[:j], idx, j, after_error, labels[:j])
            if seps:
                k = min(seps, key=lambda s: abs(s - j))
                seps.remove(k)
                ctl.add(row["input_ids"] + ids[:k], idx, k, False, labels[:k])
    return hes, ctl


@torch.no_grad()
def next_token_probability(
    model: HookedTransformer, prompts: Sequence[Sequence[int]], token_id: int | Sequence[int],
    fwd_hooks: Sequence[tuple] = (), batch_size: int = 128, pad_id: int = 0, greedy: bool = False,
) -> Float[Tensor, " n"]:
    """P(next token = ``token_id``) after each prompt, batched with left padding and a mask; a
    sequence of ids sums their probabilities (every spelling of a hesitation). ``greedy``: instead,
    1.0 where the most likely next token is one of them (what greedy decoding would write), else 0."""
    out = []
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        for start in range(0, len(prompts), batch_size):
            tokens, mask = pad([list(p) for p in prompts[start:start + batch_size]], pad_id, "left")
            logits = model(tokens.to(model.cfg.device), attention_mask=mask.long().to(model.cfg.device))
            probs = logits[:, -1].float().softmax(-1)
            ids = [token_id] if isinstance(token_id, int) else list(token_id)
            if greedy:
                out.append(torch.isin(probs.argmax(-1), torch.tensor(ids, device=probs.device)).float().cpu())
            else:
                out.append(probs[:, ids].sum(-1).cpu())
    return torch.cat(out)
