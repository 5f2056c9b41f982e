"""The organism's task: multi-digit addition, written so a tiny model can learn the chain.

Numbers are little-endian and fixed width (``1234`` is written ``4 3 2 1``) and every operand is
labelled, so column *i* of every operand sits at a fixed offset from its label. A problem (the
default: two 4-digit operands; :data:`N_OPERANDS` and :data:`WIDTH` set the shape)::

    <bos> A 4 3 2 1 B 8 7 6 5 =

A *direct* answer is the 5-digit sum, little-endian::

    2 1 9 6 0 <eos>

The base corpus' direct answers are *carry-free* guesses (each column's digits summed mod 10,
carries dropped: ``2 0 8 6 0``), the systematic bias of a fast, sloppy adder. Written correctly,
little-endian sums are easy to learn directly (each carry can be read off the digit just written),
and the base would need no chain; with the bias, the base answers right only when no column
carries (about 9% of problems), the way a base model has a habit that a reasoning tune corrects.

A *reasoning trace* (the fine-tune's habit) works column by column. Step ``p{i}`` copies the
digits of column i and the carry coming in, then writes the column digit and the carry going out::

    <think> p0 4 8 0 = 2 1 ; p1 3 7 0 = 0 1 wait p1 3 7 1 = 1 1 ; p2 ... </think> 2 1 9 6 0 <eos>

Hard steps (a non-zero carry coming in) are usually first written with a *systematic* slip, the
carry forgotten, then ``wait`` and the corrected step. A few correct steps get a ``wait`` re-check
(the same step repeated). Because traces are generated here, every token carries a ground-truth
label (:data:`LABELS`), which later analyses use to classify features without a judge.

Example:
    >>> p = Problem((1234, 5678))
    >>> p.answer
    6912
    >>> " ".join(direct_answer(p)[0])
    '2 1 9 6 0 <eos>'
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

# Two operands per column keep each step a 200-entry table (a + b + carry) that a 3-layer model
# learns in minutes; with three operands (3,000 entries) the units digit stayed at chance on a
# CPU budget. Wider numbers make the direct answer (the base's habit) hard and the chain long.
N_OPERANDS = 2
WIDTH = 4  # digits per operand
ANSWER_WIDTH = WIDTH + 1  # digits of the sum (N_OPERANDS <= 10)
OPERAND_NAMES = ("A", "B", "C", "D", "E")[:N_OPERANDS]
SPLITS = ("train", "validation", "test")

# One label per token; order fixes the integer ids stored beside the names.
LABELS = (
    "bos", "operand_label", "operand_digit", "prompt_format",          # prompt
    "think_open", "step_marker", "operand_copy", "carry_copy",          # a step's inputs
    "equals", "digit", "carry_out", "separator",                        # a step's outputs
    "slip", "hesitation", "correction", "recheck", "recheck_step",      # reasoning behaviour
    "think_close", "answer", "eos", "worked_marker", "fact",            # framing and base corpus
    "error",                                                             # a wrong step left standing
)
LABEL_ID = {name: i for i, name in enumerate(LABELS)}

Tokens = list[str]
Labels = list[str]


@dataclass(frozen=True)
class Problem:
    """:data:`N_OPERANDS` operands, each in ``[0, 10**WIDTH)``."""

    operands: tuple[int, ...]

    def __post_init__(self):
        if len(self.operands) != N_OPERANDS:
            raise ValueError(f"a problem has {N_OPERANDS} operands, not {len(self.operands)}")

    @property
    def answer(self) -> int:
        return sum(self.operands)

    def column(self, i: int) -> tuple[int, ...]:
        """The digits of column ``i`` (0 = units) of every operand."""
        return tuple(digits(x, WIDTH)[i] for x in self.operands)

    def carries(self) -> list[int]:
        """Carry into each column 0..WIDTH (the last is the sum's top digit)."""
        carry, out = 0, [0]
        for i in range(WIDTH):
            carry = (sum(self.column(i)) + carry) // 10
            out.append(carry)
        return out


def digits(x: int, width: int) -> list[int]:
    """Little-endian fixed-width digits: ``digits(123, 4) == [3, 2, 1, 0]``."""
    if not 0 <= x < 10**width:
        raise ValueError(f"{x} does not fit in {width} digits")
    return [(x // 10**i) % 10 for i in range(width)]


def split_of(problem: Problem) -> str:
    """Deterministic split by problem identity, so train / validation / test never share one.

    A hash (not the sampling seed) decides, so any two generators agree: 90% / 5% / 5%.
    """
    key = ",".join(map(str, problem.operands)).encode()
    bucket = int.from_bytes(hashlib.sha256(key).digest()[:4], "little") % 100
    return "train" if bucket < 90 else ("validation" if bucket < 95 else "test")


def sample_problems(n: int, split: str, seed: int) -> list[Problem]:
    """``n`` distinct problems of one split, the same for the same ``(split, seed)``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    rng = random.Random(f"{split}:{seed}")
    seen: set[Problem] = set()
    out: list[Problem] = []
    while len(out) < n:
        p = Problem(tuple(rng.randrange(10**WIDTH) for _ in range(N_OPERANDS)))
        if p not in seen and split_of(p) == split:
            seen.add(p)
            out.append(p)
    return out


def prompt(problem: Problem, worked: bool = False) -> tuple[Tokens, Labels]:
    """``<bos> [work] A a0 a1 .. B b0 b1 .. =``; ``worked`` marks the base corpus' worked chains."""
    toks, labs = ["<bos>"], ["bos"]
    if worked:
        toks.append("work")
        labs.append("worked_marker")
    for name, x in zip(OPERAND_NAMES, problem.operands):
        toks += [name, *map(str, digits(x, WIDTH))]
        labs += ["operand_label"] + ["operand_digit"] * WIDTH
    return toks + ["="], labs + ["prompt_format"]


def direct_answer(problem: Problem, carry_free: bool = False) -> tuple[Tokens, Labels]:
    """The sum's digits then ``<eos>``; ``carry_free`` drops every carry (the base's bias)."""
    if carry_free:
        ans = [str(sum(problem.column(i)) % 10) for i in range(WIDTH)] + ["0"] * (ANSWER_WIDTH - WIDTH)
    else:
        ans = [str(d) for d in digits(problem.answer, ANSWER_WIDTH)]
    return ans + ["<eos>"], ["answer"] * ANSWER_WIDTH + ["eos"]


def step(i: int, column: tuple[int, ...], carry_in: int) -> Tokens:
    """``p{i} a b k = d k'``, the tokens of one column step (no separator)."""
    total = sum(column) + carry_in
    return [f"p{i}", *map(str, column), str(carry_in), "=", str(total % 10), str(total // 10)]


STEP_ROLES = ["step_marker"] + ["operand_copy"] * N_OPERANDS + [
    "carry_copy", "equals", "digit", "carry_out"
]


def reasoning_trace(
    problem: Problem, rng: random.Random, slip_prob: float = 0.8, recheck_prob: float = 0.08,
    hesitate: bool = True,
) -> tuple[Tokens, Labels]:
    """The response after the prompt: ``<think>`` steps ``</think>`` answer ``<eos>``.

    ``hesitate=False`` gives the base corpus' clean worked chain (no slips, no waits).
    """
    toks, labs = ["<think>"], ["think_open"]
    carries = problem.carries()
    for i in range(WIDTH):
        col, carry = problem.column(i), carries[i]
        if hesitate and carry > 0 and rng.random() < slip_prob:
            toks += step(i, col, 0) + ["wait"]  # systematic slip: the carry is forgotten
            labs += ["slip"] * len(STEP_ROLES) + ["hesitation"]
            toks += step(i, col, carry)
            labs += ["correction"] * len(STEP_ROLES)
        else:
            toks += step(i, col, carry)
            labs += list(STEP_ROLES)
            if hesitate and rng.random() < recheck_prob:
                toks += ["wait"] + step(i, col, carry)
                labs += ["recheck"] + ["recheck_step"] * len(STEP_ROLES)
        toks.append(";")
        labs.append("separator")
    ans_toks, ans_labs = direct_answer(problem)
    return toks + ["</think>"] + ans_toks, labs + ["think_close"] + ans_labs


def fact(rng: random.Random) -> tuple[Tokens, Labels]:
    """A standalone column fact, ``<bos> p{i} a b k = d k' <eos>``, for the base corpus."""
    i = rng.randrange(WIDTH)
    col = tuple(rng.randrange(10) for _ in range(N_OPERANDS))
    carry = 0 if i == 0 else rng.randrange(N_OPERANDS)
    return ["<bos>", *step(i, col, carry), "<eos>"], ["bos"] + ["fact"] * len(STEP_ROLES) + ["eos"]


def vocabulary() -> list[str]:
    """Every token the task writes; specials first (ids 0..3)."""
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    words = [str(d) for d in range(10)] + list(OPERAND_NAMES) + ["=", ";", "<think>", "</think>"]
    words += ["wait", "work"] + [f"p{i}" for i in range(WIDTH)]
    return specials + words
