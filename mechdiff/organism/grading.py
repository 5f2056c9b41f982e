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


def label_response(problem: task.Problem, words: list[str]) -> list[str]:
    """A ground-truth label (from :data:`~mechdiff.organism.task.LABELS`) for each generated word.

    Like the trace generator's labels, but derived by parsing what a model actually wrote: a step
    followed by ``wait`` is a ``slip`` when wrong (its ``wait`` a ``hesitation``) and a normal step
    when right (its ``wait`` a ``recheck``); the step after a hesitation is a ``correction``, after a
    recheck a ``recheck_step``; a wrong step left standing is an ``error``.

    >>> p = task.Problem((1234, 5678))
    >>> label_response(p, "<think> p0 4 8 0 = 2 1 wait".split())[-2:]
    ['carry_out', 'recheck']
    """
    labels: list[str] = []
    in_think, after_think = False, False
    step: list[int] = []  # indices of the current step's words
    follows = None  # "hesitation" / "recheck" when the current step repeats one

    def close_step(next_word: str | None) -> None:
        nonlocal follows
        if not step:
            return
        right = _step_is_right(problem, [words[i] for i in step])
        if next_word == "wait" and not right:
            names = ["slip"] * len(step)
        elif follows == "hesitation":
            names = ["correction"] * len(step)
        elif follows == "recheck":
            names = ["recheck_step"] * len(step)
        elif not right:
            names = ["error"] * len(step)
        else:
            names = (task.STEP_ROLES + ["error"] * len(step))[: len(step)]
        for i, name in zip(step, names):
            labels[i] = name
        step.clear()
        follows = ("hesitation" if not right else "recheck") if next_word == "wait" else None

    for i, w in enumerate(words):
        labels.append("error")
        if w == "<think>":
            labels[i], in_think = "think_open", True
        elif w == "</think>":
            close_step(None)
            labels[i], in_think, after_think = "think_close", False, True
        elif w == "<eos>":
            close_step(None)
            labels[i] = "eos"
        elif in_think and w in (";", "wait"):
            close_step(w)
            if w == ";":
                labels[i], follows = "separator", None
            else:  # close_step set follows from the step this wait judges
                labels[i] = follows or "hesitation"
        elif in_think:
            step.append(i)
        else:
            labels[i] = "answer" if (after_think or w.isdigit()) else "error"
    close_step(None)
    return labels
