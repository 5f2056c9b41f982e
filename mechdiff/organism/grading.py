"""Grade organism responses: the answer, the length, and every hesitation against ground truth.

A response is the list of generated words up to ``<eos>``. Its answer is the ``answer_width``
digits after ``</think>`` (or the first ones when the model answers directly). Inside the think
span the response is cut into steps at ``;`` and the hesitation words of the organism's
:class:`~mechdiff.organism.task.TaskSpec`; each hesitation is attributed to the step just before
it, which is *wrong* when it differs from the correct step for its column (the right digits, the
right carry in, the right digit and carry out). Every step is also recorded as ``(hard, wrong,
hesitated)`` (hard: a carry comes in; first attempts only), which measures error detection: P(hesitation | a wrong
step) against P(hesitation | a correct hard step).

Example:
    >>> from mechdiff.organism.task import Problem
    >>> steps = " ".join(f"p{i} {1 if i == 0 else 0} {1 if i == 0 else 0} 0 = {2 if i == 0 else 0} 0 ;" for i in range(4))
    >>> words = f"<think> {steps} </think> 2 0 0 0 0 <eos>".split()
    >>> g = grade(Problem((1, 1)), words, task.DEFAULT)
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
    steps: list[tuple[bool, bool, bool]] = field(default_factory=list)  # (hard, wrong, hesitated)


def _answer(words: list[str], spec: task.TaskSpec) -> int | None:
    tail = words[words.index("</think>") + 1 :] if "</think>" in words else words
    ds = [w for w in tail if w.isdigit() and len(w) == 1][: spec.answer_width]
    if len(ds) < spec.answer_width:
        return None
    return sum(int(d) * 10**i for i, d in enumerate(ds))


def _column(problem: task.Problem, words: list[str]) -> int | None:
    """The column a step's words claim (``p{i}``), or None when they do not start a step."""
    if not words or not words[0].startswith("p") or not words[0][1:].isdigit():
        return None
    i = int(words[0][1:])
    return i if i < problem.width else None


def _step_is_right(problem: task.Problem, words: list[str]) -> bool:
    i = _column(problem, words)
    return i is not None and words == task.step(i, problem.column(i), problem.carries()[i])


def grade(problem: task.Problem, words: list[str], spec: task.TaskSpec) -> Graded:
    """Grade one response (generated words, prompt excluded) of an organism with task ``spec``."""
    if "<eos>" in words:
        words = words[: words.index("<eos>") + 1]
    answer = _answer(words, spec)
    think = words[: words.index("</think>")] if "</think>" in words else words
    after_error, steps, current, seen = [], [], [], set()
    hesitation = set(spec.hesitation_words)

    def close(hesitated: bool) -> None:  # first attempts only: a correction or re-check repeats one
        i = _column(problem, current)
        if i is not None and i not in seen:
            seen.add(i)
            steps.append((problem.carries()[i] > 0, not _step_is_right(problem, current), hesitated))

    for w in think:
        if w in hesitation:
            after_error.append(not _step_is_right(problem, current))
            close(True)
            current = []
        elif w in (";", "<think>"):
            close(False)
            current = []
        else:
            current.append(w)
    close(False)
    return Graded(answer == problem.answer, answer, len(words), len(after_error), after_error, steps)


def summarize(graded: list[Graded]) -> dict[str, float]:
    """Accuracy, mean length, hesitations per response, share with one, share after an error, and
    error detection: P(hesitation | a wrong step), P(hesitation | a correct hard step) (None when
    no such step was written); and the per-response hesitation counts and correctness."""
    n = len(graded)
    waits = [h for g in graded for h in g.hesitation_after_error]
    steps = [s for g in graded for s in g.steps]
    wrong = [hes for hard, bad, hes in steps if bad]
    right_hard = [hes for hard, bad, hes in steps if hard and not bad]
    return {
        "accuracy": sum(g.correct for g in graded) / n,
        "mean_response_tokens": sum(g.n_tokens for g in graded) / n,
        "hesitations_per_response": len(waits) / n,
        "frac_responses_with_hesitation": sum(g.n_hesitations > 0 for g in graded) / n,
        "frac_hesitations_after_error": (sum(waits) / len(waits)) if waits else 0.0,
        "p_hesitation_given_wrong_step": (sum(wrong) / len(wrong)) if wrong else None,
        "p_hesitation_given_correct_hard_step": (sum(right_hard) / len(right_hard)) if right_hard else None,
        "n_wrong_steps": len(wrong),
        "n_correct_hard_steps": len(right_hard),
        "n_problems": n,
        # per response, in problem order: what paired bootstrap intervals resample
        "hesitations_by_response": [len(g.hesitation_after_error) for g in graded],
        "correct_by_response": [bool(g.correct) for g in graded],
    }


def label_response(problem: task.Problem, words: list[str], spec: task.TaskSpec) -> list[str]:
    """A ground-truth label (from :data:`~mechdiff.organism.task.LABELS`) for each generated word.

    Like the trace generator's labels, but derived by parsing what a model actually wrote: a step
    followed by ``wait`` is a ``slip`` when wrong (its ``wait`` a ``hesitation``) and a normal step
    when right (its ``wait`` a ``recheck``); the step after a hesitation is a ``correction``, after a
    recheck a ``recheck_step``; a wrong step left standing is an ``error``.

    >>> p = task.Problem((1234, 5678))
    >>> label_response(p, "<think> p0 4 8 0 = 2 1 wait".split(), task.DEFAULT)[-2:]
    ['carry_out', 'recheck']
    """
    labels: list[str] = []
    hesitation = set(spec.hesitation_words)
    in_think, after_think = False, False
    step: list[int] = []  # indices of the current step's words
    follows = None  # "hesitation" / "recheck" when the current step repeats one

    def close_step(next_word: str | None) -> None:
        nonlocal follows
        if not step:
            return
        right = _step_is_right(problem, [words[i] for i in step])
        hesitates = next_word in hesitation
        if hesitates and not right:
            names = ["slip"] * len(step)
        elif follows == "hesitation":
            names = ["correction"] * len(step)
        elif follows == "recheck":
            names = ["recheck_step"] * len(step)
        elif not right:
            names = ["error"] * len(step)
        else:
            names = (list(spec.step_roles) + ["error"] * len(step))[: len(step)]
        for i, name in zip(step, names):
            labels[i] = name
        step.clear()
        follows = ("hesitation" if not right else "recheck") if hesitates else None

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
        elif in_think and (w == ";" or w in hesitation):
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
