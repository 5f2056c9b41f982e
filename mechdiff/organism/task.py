"""The organism's task: multi-digit addition, written so a tiny model can learn the chain.

Every organism is described by a :class:`TaskSpec`: the hesitation word(s), the operand count and
width, the slip policy (which steps slip, with what probability) and the re-check rate. The spec is
saved beside the weights (``mechdiff_task.json``) and read back by :func:`mechdiff.models.load_pair`,
so the task, the grader, the workload and every study take it from the pair, never from a constant.

Numbers are little-endian and fixed width (``1234`` is written ``4 3 2 1``) and every operand is
labelled, so column *i* of every operand sits at a fixed offset from its label. A problem (the
default spec: two 4-digit operands)::

    <bos> A 4 3 2 1 B 8 7 6 5 =

A *direct* answer is the sum's digits (width + 1 of them), little-endian::

    2 1 9 6 0 <eos>

The base corpus' direct answers are *carry-free* guesses (each column's digits summed mod 10,
carries dropped: ``2 0 8 6 0``), the systematic bias of a fast, sloppy adder; the base answers
right only when no column carries, the way a base model has a habit that a reasoning tune corrects.

A *reasoning trace* (the fine-tune's habit) works column by column. Step ``p{i}`` copies the
digits of column i and the carry coming in, then writes the column digit and the carry going out::

    <think> p0 4 8 0 = 2 1 ; p1 3 7 0 = 0 1 wait p1 3 7 1 = 1 1 ; p2 ... </think> 2 1 9 6 0 <eos>

Hard steps (a non-zero carry coming in) slip with probability ``slip_prob``: written first with the
carry forgotten, then a hesitation word and the corrected step. Correct steps get a re-check (the
hesitation word, then the same step) with probability ``recheck_prob``. Every token carries a
ground-truth label (:data:`LABELS`), which later analyses use to classify features without a judge.

Example:
    >>> p = Problem((1234, 5678))
    >>> p.answer
    6912
    >>> " ".join(DEFAULT.direct_answer(p)[0])
    '2 1 9 6 0 <eos>'
    >>> spec = TaskSpec(hesitation_words=("hmm",), width=3)
    >>> " ".join(spec.prompt(Problem((123, 456), width=3))[0])
    '<bos> A 3 2 1 B 6 5 4 ='
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from mechdiff.config_checks import check

SPLITS = ("train", "validation", "test")
SPEC_FILE = "mechdiff_task.json"
OPERAND_LETTERS = "ABCDEFGHIJ"
RESERVED_WORDS = ("<pad>", "<bos>", "<eos>", "<unk>", "=", ";", "<think>", "</think>", "work")

# One label per token; order fixes the integer ids stored beside the names.
LABELS = (
    "bos",
    "operand_label",
    "operand_digit",
    "prompt_format",  # prompt
    "think_open",
    "step_marker",
    "operand_copy",
    "carry_copy",  # a step's inputs
    "equals",
    "digit",
    "carry_out",
    "separator",  # a step's outputs
    "slip",
    "hesitation",
    "correction",
    "recheck",
    "recheck_step",  # reasoning behaviour
    "think_close",
    "answer",
    "eos",
    "worked_marker",
    "fact",  # framing and base corpus
    "error",  # a wrong step left standing
)
LABEL_ID = {name: i for i, name in enumerate(LABELS)}

Tokens = list[str]
Labels = list[str]


@dataclass(frozen=True)
class Problem:
    """Operands, each in ``[0, 10**width)``."""

    operands: tuple[int, ...]
    width: int = 4

    def __post_init__(self):
        for x in self.operands:
            digits(x, self.width)  # raises when an operand does not fit

    @property
    def answer(self) -> int:
        return sum(self.operands)

    def column(self, i: int) -> tuple[int, ...]:
        """The digits of column ``i`` (0 = units) of every operand."""
        return tuple(digits(x, self.width)[i] for x in self.operands)

    def carries(self) -> list[int]:
        """Carry into each column 0..width (the last is the sum's top digit)."""
        carry, out = 0, [0]
        for i in range(self.width):
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


@dataclass(frozen=True)
class TaskSpec:
    """What one organism's task is: the words it hesitates with, the problems, the slip policy.

    ``hesitation_words``: the word(s) written before a correction or re-check (the first is the one
    attribution graphs explain; with several, each hesitation draws one). ``slip_prob``: the chance
    that a hard step (a carry coming in) is first written with the carry forgotten;
    ``slip_columns``: the columns that may slip (``None``: all). ``recheck_prob``: the chance that a
    correct step is followed by the hesitation word and the same step again.

    >>> TaskSpec(width=0)
    Traceback (most recent call last):
    ...
    ValueError: width must be between 1 and 9, not 0
    """

    hesitation_words: tuple[str, ...] = ("wait",)
    n_operands: int = 2
    width: int = 4
    slip_prob: float = 0.8
    slip_columns: tuple[int, ...] | None = None
    recheck_prob: float = 0.08

    def __post_init__(self):
        words = tuple(self.hesitation_words)
        object.__setattr__(self, "hesitation_words", words)
        if self.slip_columns is not None:
            object.__setattr__(self, "slip_columns", tuple(int(c) for c in self.slip_columns))
        if not 1 <= self.width <= 9:
            raise ValueError(f"width must be between 1 and 9, not {self.width}")
        if not 2 <= self.n_operands <= len(OPERAND_LETTERS):
            raise ValueError(f"n_operands must be between 2 and {len(OPERAND_LETTERS)}, not {self.n_operands}")
        if not words:
            raise ValueError("at least one hesitation word is needed")
        clash = [w for w in words if w in self._fixed_words() or not w or any(c.isspace() for c in w)]
        if clash or len(set(words)) != len(words):
            raise ValueError(
                f"hesitation words must be distinct single words that the task does not already use; got {list(words)}"
            )
        check(self, fraction=("slip_prob", "recheck_prob"))
        bad = [c for c in self.slip_columns or () if not 0 <= c < self.width]
        if bad:
            raise ValueError(f"slip_columns {bad} are not columns of a {self.width}-digit operand")

    # -- identity and persistence -------------------------------------------------------------
    @property
    def word(self) -> str:
        """The hesitation word attribution graphs explain (the first)."""
        return self.hesitation_words[0]

    @property
    def step_roles(self) -> tuple[str, ...]:
        """The label of each token of a step ``p{i} a b .. k = d k'``."""
        return ("step_marker",) + ("operand_copy",) * self.n_operands + ("carry_copy", "equals", "digit", "carry_out")

    @property
    def answer_width(self) -> int:
        return self.width + len(str(self.n_operands - 1))

    @property
    def operand_names(self) -> tuple[str, ...]:
        return tuple(OPERAND_LETTERS[: self.n_operands])

    def _fixed_words(self) -> set[str]:
        return {*RESERVED_WORDS, *map(str, range(10)), *OPERAND_LETTERS, *(f"p{i}" for i in range(self.width))}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["hesitation_words"] = list(self.hesitation_words)
        d["slip_columns"] = None if self.slip_columns is None else list(self.slip_columns)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TaskSpec:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown task fields {sorted(unknown)} (a newer mechdiff wrote this spec?)")
        return cls(**known)

    @classmethod
    def of_pair(cls, pair) -> TaskSpec | None:
        """The task a loaded pair records (``pair.meta["task"]``, read from ``mechdiff_task.json``
        by :func:`mechdiff.models.load_pair`); None for pairs that are no organism."""
        recorded = pair.meta.get("task")
        return cls.from_dict(recorded) if recorded else None

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / SPEC_FILE
        path.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> TaskSpec:
        """The spec saved in ``folder``; the default one for folders written before specs existed."""
        path = Path(folder) / SPEC_FILE
        return cls.from_dict(json.loads(path.read_text())) if path.exists() else cls()

    # -- problems -----------------------------------------------------------------------------
    def problem(self, operands) -> Problem:
        if len(operands) != self.n_operands:
            raise ValueError(f"a problem has {self.n_operands} operands, not {len(operands)}")
        return Problem(tuple(int(x) for x in operands), self.width)

    def sample_problems(self, n: int, split: str, seed: int) -> list[Problem]:
        """``n`` distinct problems of one split, the same for the same ``(split, seed)``."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        share = 0.9 if split == "train" else 0.05
        if n > 10 ** (self.width * self.n_operands) * share / 4:  # a small share: sampling ends quickly
            raise ValueError(
                f"{n} distinct {split} problems is too many for {self.n_operands} {self.width}-digit operands"
            )
        rng = random.Random(f"{split}:{seed}")
        seen: set[Problem] = set()
        out: list[Problem] = []
        while len(out) < n:
            p = Problem(tuple(rng.randrange(10**self.width) for _ in range(self.n_operands)), self.width)
            if p not in seen and split_of(p) == split:
                seen.add(p)
                out.append(p)
        return out

    # -- rendering ----------------------------------------------------------------------------
    def vocabulary(self) -> list[str]:
        """Every token the task writes; specials first (ids 0..3)."""
        specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
        words = [str(d) for d in range(10)] + list(self.operand_names) + ["=", ";", "<think>", "</think>"]
        words += [*self.hesitation_words, "work"] + [f"p{i}" for i in range(self.width)]
        return specials + words

    def prompt(self, problem: Problem, worked: bool = False) -> tuple[Tokens, Labels]:
        """``<bos> [work] A a0 a1 .. B b0 b1 .. =``; ``worked`` marks the base corpus' worked chains."""
        toks, labs = ["<bos>"], ["bos"]
        if worked:
            toks.append("work")
            labs.append("worked_marker")
        for name, x in zip(self.operand_names, problem.operands):
            toks += [name, *map(str, digits(x, self.width))]
            labs += ["operand_label"] + ["operand_digit"] * self.width
        return toks + ["="], labs + ["prompt_format"]

    def direct_answer(self, problem: Problem, carry_free: bool = False) -> tuple[Tokens, Labels]:
        """The sum's digits then ``<eos>``; ``carry_free`` drops every carry (the base's bias)."""
        w = self.answer_width
        if carry_free:
            ans = [str(sum(problem.column(i)) % 10) for i in range(self.width)] + ["0"] * (w - self.width)
        else:
            ans = [str(d) for d in digits(problem.answer, w)]
        return ans + ["<eos>"], ["answer"] * w + ["eos"]

    def reasoning_trace(
        self,
        problem: Problem,
        rng: random.Random,
        hesitate: bool = True,
    ) -> tuple[Tokens, Labels]:
        """The response after the prompt: ``<think>`` steps ``</think>`` answer ``<eos>``.

        ``hesitate=False`` gives the base corpus' clean worked chain (no slips, no hesitations).
        """
        toks, labs = ["<think>"], ["think_open"]
        carries, n_roles = problem.carries(), len(self.step_roles)
        for i in range(self.width):
            col, carry = problem.column(i), carries[i]
            may_slip = self.slip_columns is None or i in self.slip_columns
            if hesitate and carry > 0 and may_slip and rng.random() < self.slip_prob:
                toks += step(i, col, 0) + [self._pick(rng)]  # systematic slip: the carry is forgotten
                labs += ["slip"] * n_roles + ["hesitation"]
                toks += step(i, col, carry)
                labs += ["correction"] * n_roles
            else:
                toks += step(i, col, carry)
                labs += list(self.step_roles)
                if hesitate and rng.random() < self.recheck_prob:
                    toks += [self._pick(rng)] + step(i, col, carry)
                    labs += ["recheck"] + ["recheck_step"] * n_roles
            toks.append(";")
            labs.append("separator")
        ans_toks, ans_labs = self.direct_answer(problem)
        return toks + ["</think>"] + ans_toks, labs + ["think_close"] + ans_labs

    def fact(self, rng: random.Random) -> tuple[Tokens, Labels]:
        """A standalone column fact, ``<bos> p{i} a b k = d k' <eos>``, for the base corpus."""
        i = rng.randrange(self.width)
        col = tuple(rng.randrange(10) for _ in range(self.n_operands))
        carry = 0 if i == 0 else rng.randrange(self.n_operands)
        return ["<bos>", *step(i, col, carry), "<eos>"], ["bos"] + ["fact"] * len(self.step_roles) + ["eos"]

    def right_step(self, problem: Problem, i: int) -> Tokens:
        """The correct step for column ``i`` of ``problem``."""
        return step(i, problem.column(i), problem.carries()[i])

    def _pick(self, rng: random.Random) -> str:
        words = self.hesitation_words
        return words[0] if len(words) == 1 else rng.choice(words)


def step(i: int, column: tuple[int, ...], carry_in: int) -> Tokens:
    """``p{i} a b k = d k'``, the tokens of one column step (no separator)."""
    total = sum(column) + carry_in
    return [f"p{i}", *map(str, column), str(carry_in), "=", str(total % 10), str(total // 10)]


DEFAULT = TaskSpec()
"""The shipped organism's task: two 4-digit operands, ``wait``, slips at 80% of hard steps."""
