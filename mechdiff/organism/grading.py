"""Grade organism responses: the answer, the length, and every hesitation against ground truth.

A response is the list of generated words up to ``<eos>``. Its answer is the four digits after
``</think>`` (or the first four digits when the model answers directly). Inside the think span the
response is cut into steps at ``;`` and ``wait``; each ``wait`` is attributed to the step just
before it, which is *wrong* when it differs from the correct step for its column (the right
digits, the right carry in, the right digit and carry out).

Example:
    >>> from mechdiff.organism.task import Problem
    >>> steps = " ".join(f"p{i} {1 if i == 0 else 0} {1 if i == 0 else 0} 0 = {2 if i == 0 else 0} 0 ;" for i in range(4))
    >>> words = f"<think> {steps} </think> 2 0 0 0 0 <eos>".split()
    >>> g = grade(Problem((1, 1)), words)
    >>> g.correct, g.n_hesitations, g.n_tokens
    (True, 0, 40)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mechdiff.organism import task


@dataclass
class Graded:
    correct: bool
    answer: int | None
    n_tokens: int
    n_hesitations: int
    hesitation_after_error: list[bool] = field(default_factory=list)


def _answer(words: list[str]) -> int | None:
    tail = words[words.index("</think>") + 1:] if "</think>" in words else words
    ds = [w for w in tail if w.isdigit() and len(w) == 1][: task.ANSWER_WIDTH]
    if len(ds) < task.ANSWER_WIDTH:
        return None
    return sum(int(d) * 10**i for i, d in enumerate(ds))


def _step_is_right(problem: task.Problem, words: list[str]) -> bool:
    if not words or not words[0].startswith("p") or not words[0][1:].isdigit():
        return False
    i = int(words[0][1:])
    if i >= task.WIDTH:
        return False
    return words == task.step(i, problem.column(i), problem.carries()[i])


def grade(problem: task.Problem, words: list[str]) -> Graded:
    """Grade one response (generated words, prompt excluded)."""
    if "<eos>" in words:
        words = words[: words.index("<eos>") + 1]
    answer = _answer(words)
    think = words[: words.index("</think>")] if "</think>" in words else words
    after_error, current = [], []
    for w in think:
        if w == "wait":
            after_error.append(not _step_is_right(problem, current))
            current = []
        elif w in (";", "<think>"):
            current = []
        else:
            current.append(w)
    return Graded(answer == problem.answer, answer, len(words), len(after_error), after_error)


def summarize(graded: list[Graded]) -> dict[str, float]:
    """Accuracy, mean length, hesitations per response, share with one, share after an error."""
    n = len(graded)
    waits = [h for g in graded for h in g.hesitation_after_error]
    return {
        "accuracy": sum(g.correct for g in graded) / n,
        "mean_response_tokens": sum(g.n_tokens for g in graded) / n,
        "hesitations_per_response": len(waits) / n,
        "frac_responses_with_hesitation": sum(g.n_hesitations > 0 for g in graded) / n,
        "frac_hesitations_after_error": (sum(waits) / len(waits)) if waits else 0.0,
        "n_problems": n,
    }
