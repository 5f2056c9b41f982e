"""The organism's addition problems as natural-language chat for a real instruct model, and a grader.

A problem (two 4-digit operands, :mod:`mechdiff.organism.task`) becomes a system and a user message
rendered with the model's own chat template. The fine-tune's reply is the organism's reasoning
trace in words, one column per line; hard columns (a carry coming in) are usually first written
with the *systematic* slip, the carry forgotten, then "Wait," and the corrected step; a few correct
steps get a "Wait, let me check." re-check. The last line holds the answer::

    Let me add column by column.
    Units: 4 + 8 = 12, write 2, carry 1.
    Tens: 3 + 7 = 10, write 0, carry 1. Wait, I forgot the carry. Tens: 3 + 7 + 1 = 11, write 1, carry 1.
    Hundreds: 2 + 6 = 8, write 8, carry 0. Wait, I forgot the carry. Hundreds: 2 + 6 + 1 = 9, write 9, carry 0.
    Thousands: 1 + 5 = 6, write 6, carry 0.
    Answer: 6912

The slips, re-checks and their random draws are the organism's (:meth:`task.TaskSpec.reasoning_trace`), so
a seed gives the same trace shape in both forms. :func:`grade` mirrors the organism grader for
this form and returns its :class:`~mechdiff.organism.grading.Graded`, so
:func:`~mechdiff.organism.grading.summarize` applies unchanged.

Example:
    >>> import random
    >>> p = task.Problem((1234, 5678))
    >>> text = reasoning_response(p, random.Random(0))
    >>> g = grade(p, text)
    >>> g.correct, g.answer, g.n_hesitations == text.count("Wait"), all(g.hesitation_after_error)
    (True, 6912, True, True)
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

from datasets import Dataset
from transformer_lens import HookedTransformer

from mechdiff.generation import ban_tokens, generate
from mechdiff.organism import grading, task

SYSTEM = (
    "You are a careful assistant. Add the numbers column by column, starting from the units, "
    "then give the result on a final line 'Answer: <number>'."
)
TASK = task.DEFAULT  # the chat renders the shipped organism's task (two 4-digit operands)
PLACES = ("Units", "Tens", "Hundreds", "Thousands", "Ten-thousands", "Hundred-thousands")[: TASK.width]
HESITATION = "Wait"
OPENING = "Let me add column by column."
MAX_NEW_TOKENS = 256  # the longest trace (three slips and a re-check) is ~225 SmolLM2 tokens

_STEP = re.compile(
    r"(?P<place>[A-Za-z-]+)\s*:\s*(?P<terms>\d+(?:\s*\+\s*\d+)*)\s*=\s*(?P<total>\d+)\s*,\s*"
    r"write\s+(?P<digit>\d+)\s*,\s*carry\s+(?P<carry>\d+)",
    re.IGNORECASE,
)
_WAIT = re.compile(r"\bwait\b", re.IGNORECASE)
_ANSWER_LINE = re.compile(r"^\W*answer\W*(?:is\W*)?(-?\d[\d,]*)", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"-?\d[\d,]*")
_BETWEEN = re.compile(r"[\s.,;:!*)]*")  # what may stand between a step and the "Wait" judging it


@dataclass
class ChatGraded(grading.Graded):
    """:class:`~mechdiff.organism.grading.Graded` plus whether the reply had an ``Answer:`` line."""

    answer_line: bool = False


def question(problem: task.Problem) -> str:
    """The user's message: ``What is 1234 + 5678?``."""
    return f"What is {' + '.join(map(str, problem.operands))}?"


def step_text(i: int, column: Sequence[int], carry_in: int) -> str:
    """One column in words; a zero carry coming in is not written.

    >>> step_text(1, (3, 7), 1)
    'Tens: 3 + 7 + 1 = 11, write 1, carry 1.'
    """
    terms = [*column, carry_in] if carry_in else list(column)
    total = sum(terms)
    return f"{PLACES[i]}: {' + '.join(map(str, terms))} = {total}, write {total % 10}, carry {total // 10}."


def reasoning_response(
    problem: task.Problem, rng: random.Random, slip_prob: float = 0.8, recheck_prob: float = 0.08, hesitate: bool = True
) -> str:
    """The fine-tune's reply: steps with slips, "Wait," and corrections, then ``Answer: N``.

    ``hesitate=False`` gives the clean chain (no slips, no re-checks).
    """
    lines, carries = [OPENING], problem.carries()
    for i in range(TASK.width):
        col, carry = problem.column(i), carries[i]
        if hesitate and carry > 0 and rng.random() < slip_prob:  # the organism's draws, in order
            line = f"{step_text(i, col, 0)} {HESITATION}, I forgot the carry. {step_text(i, col, carry)}"
        else:
            line = step_text(i, col, carry)
            if hesitate and rng.random() < recheck_prob:
                line += f" {HESITATION}, let me check. {step_text(i, col, carry)}"
        lines.append(line)
    return "\n".join([*lines, f"Answer: {problem.answer}"])


def messages(problem: task.Problem, response: str | None = None, system: str | None = SYSTEM) -> list[dict]:
    """The chat: system (omitted when ``None``: the template's default), user, optional assistant."""
    chat = [{"role": "system", "content": system}] if system is not None else []
    chat.append({"role": "user", "content": question(problem)})
    return chat + ([{"role": "assistant", "content": response}] if response is not None else [])


def encode(tokenizer, problem: task.Problem, response: str | None = None, system: str | None = SYSTEM) -> dict:
    """``{"input_ids", "prompt_len"}``: the templated prompt (ending in the assistant header), then
    the response and eos when given. Prompt and response are tokenized apart, so the prompt is
    exactly what generation starts from.

    Not run by the tests: it needs SmolLM2's tokenizer (the optional [real] extra).
    >>> row = encode(tokenizer, task.Problem((1234, 5678)), "Answer: 6912")  # doctest: +SKIP
    >>> tokenizer.decode(row["input_ids"][row["prompt_len"]:])  # doctest: +SKIP
    'Answer: 6912<|im_end|>'
    """
    text = tokenizer.apply_chat_template(messages(problem, None, system), tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prompt_len = len(ids)
    if response is not None:
        ids = ids + tokenizer(response + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return {"input_ids": ids, "prompt_len": prompt_len}


def traces(
    tokenizer,
    n: int,
    split: str = "train",
    seed: int = 0,
    slip_prob: float = 0.8,
    recheck_prob: float = 0.08,
    system: str | None = SYSTEM,
) -> Dataset:
    """``n`` fine-tuning conversations on distinct problems of ``split`` (the organism's splits).

    Rows: ``input_ids``, ``prompt_len``, ``operands``, ``response``.
    """
    rng = random.Random(f"chat-traces:{split}:{seed}")
    rows = []
    for p in TASK.sample_problems(n, split, seed):
        response = reasoning_response(p, rng, slip_prob, recheck_prob)
        rows.append({**encode(tokenizer, p, response, system), "operands": list(p.operands), "response": response})
    return Dataset.from_list(rows)


def parse_answer(text: str) -> tuple[int | None, bool]:
    """``(answer, from_answer_line)``: the last ``Answer: N`` line, else the last number at all.

    >>> parse_answer("17 + 25 = 32."), parse_answer("...\\nAnswer: 6,912")
    ((32, False), (6912, True))
    """
    lines = _ANSWER_LINE.findall(text)
    if lines:
        return int(lines[-1].replace(",", "")), True
    numbers = [n.replace(",", "") for n in _NUMBER.findall(text)]
    numbers = [n for n in numbers if n.lstrip("-").isdigit()]
    return (int(numbers[-1]), False) if numbers else (None, False)


def step_is_right(problem: task.Problem, match: re.Match) -> bool:
    """Whether a parsed step is the correct one for its column (digits, carry in, total, outputs).

    A zero carry may be written (``+ 0``) or not; anything else must match exactly.
    """
    place = match["place"].capitalize()
    if place not in PLACES:
        return False
    i = PLACES.index(place)
    terms = [int(t) for t in re.split(r"\s*\+\s*", match["terms"])]
    terms += [0] * (TASK.n_operands + 1 - len(terms))
    carry_in, col = problem.carries()[i], list(problem.column(i))
    total = sum(col) + carry_in
    return (
        terms == [*col, carry_in]
        and int(match["total"]) == total
        and int(match["digit"]) == total % 10
        and int(match["carry"]) == total // 10
    )


def grade(problem: task.Problem, text: str, n_tokens: int | None = None) -> ChatGraded:
    """Grade one reply (the generated text, prompt excluded).

    ``n_tokens`` is the reply's length in tokens (default: its whitespace-separated words). Each
    "Wait" is judged by the step right before it (only whitespace or punctuation between, and
    after the previous "Wait"): after an error when that step is wrong, or when there is no such
    step, as the organism grader judges a ``wait`` after a cut-off step.
    """
    answer, line = parse_answer(text)
    after_error, start = [], 0
    for wait in _WAIT.finditer(text):
        steps = list(_STEP.finditer(text, start, wait.start()))
        last = steps[-1] if steps else None
        attributed = last is not None and _BETWEEN.fullmatch(text, last.end(), wait.start())
        after_error.append(not (attributed and step_is_right(problem, last)))
        start = wait.end()
    n = n_tokens if n_tokens is not None else len(text.split())
    return ChatGraded(answer == problem.answer, answer, n, len(after_error), after_error, answer_line=line)


# What the organism's summary derives from first-attempt steps, which :func:`grade` does not parse
# (it judges each "Wait" by the step before it): left out rather than reported as zero steps.
STEP_KEYS = (
    "p_hesitation_given_wrong_step",
    "p_hesitation_given_correct_hard_step",
    "n_wrong_steps",
    "n_correct_hard_steps",
)


def summarize(graded: Sequence[ChatGraded]) -> dict[str, float]:
    """The organism's summary (accuracy, length, hesitations...) plus the share with an Answer line;
    without the first-attempt step counts (:data:`STEP_KEYS`), which the chat grader does not parse."""
    stats = {k: v for k, v in grading.summarize(list(graded)).items() if k not in STEP_KEYS}
    return {**stats, "frac_answer_line": sum(g.answer_line for g in graded) / len(graded)}


def hesitation_token_ids(tokenizer) -> list[int]:
    """Every vocabulary token that reads "wait" in any case, with or without a leading space."""
    vocab = tokenizer.get_vocab()
    return sorted(i for t, i in vocab.items() if tokenizer.convert_tokens_to_string([t]).strip().lower() == "wait")


def respond(
    model: HookedTransformer,
    problems: Sequence[task.Problem],
    *,
    system: str | None = SYSTEM,
    max_new_tokens: int = MAX_NEW_TOKENS,
    batch_size: int = 16,
    ban_hesitation: bool = False,
    fwd_hooks: Sequence[tuple] = (),
    progress: bool = False,
    tokenizer=None,
) -> list[tuple[str, int]]:
    """Greedy replies ``(text, n_tokens)`` of ``model``; ``tokenizer`` (default: the model's) has
    the chat template."""
    tok = tokenizer if tokenizer is not None else model.tokenizer
    prompts = [encode(tok, p, None, system)["input_ids"] for p in problems]
    processors = [ban_tokens(hesitation_token_ids(tok))] if ban_hesitation else []
    outs = generate(
        model,
        prompts,
        max_new_tokens,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        logit_processors=processors,
        fwd_hooks=fwd_hooks,
        batch_size=batch_size,
        progress=progress,
    )
    return [(tok.decode(row, skip_special_tokens=True), len(row)) for row in outs]


def evaluate(model: HookedTransformer, problems: Sequence[task.Problem], **kwargs) -> dict[str, float]:
    """Generate (keyword arguments as :func:`respond`) and grade: the :func:`summarize` dict.

    Not run by the tests: it needs SmolLM2's tokenizer (the optional [real] extra).
    >>> evaluate(load_smollm2(), TASK.sample_problems(8, "test", 0))["accuracy"]  # doctest: +SKIP
    0.0
    """
    replies = respond(model, problems, **kwargs)
    return summarize([grade(p, text, n) for p, (text, n) in zip(problems, replies)])
