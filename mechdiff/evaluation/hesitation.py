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
from mechdiff.organism.task import DEFAULT, TaskSpec
from mechdiff.real import chat
from mechdiff.training.batches import pad
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


Feature = tuple[int, int]  # (layer, feature index)


def aggregate_influence(rankings: Sequence[Sequence[dict]]) -> dict[Feature, float]:
    """Sum per-prompt feature influence, each prompt normalised to total 1 so all count equally.

    ``rankings`` are :meth:`attribution.graph.Graph.feature_ranking` outputs with
    ``aggregate=True`` (dicts with ``layer``, ``feature``, ``score``).
    """
    total: dict[Feature, float] = {}
    for ranking in rankings:
        norm = sum(max(r["score"], 0.0) for r in ranking)
        if norm <= 0:
            continue
        for r in ranking:
            key = (int(r["layer"]), int(r["feature"]))
            total[key] = total.get(key, 0.0) + max(r["score"], 0.0) / norm
    return dict(sorted(total.items(), key=lambda kv: -kv[1]))


def covering_set(scores: dict[Feature, float], share: float = 0.8) -> list[Feature]:
    """The fewest features (highest scores first) whose scores cover ``share`` of the total.

    >>> covering_set({(0, 1): 5.0, (1, 2): 3.0, (2, 3): 2.0}, share=0.8)
    [(0, 1), (1, 2)]
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], not {share}")
    items = sorted(scores.items(), key=lambda kv: -kv[1])
    total, running, chosen = sum(v for _, v in items), 0.0, []
    for key, value in items:
        if running >= share * total - 1e-12:
            break
        chosen.append(key)
        running += value
    return chosen


def normalized_positive(scores: Float[Tensor, "prompt layer d_sae"]) -> dict[Feature, float]:
    """Per-prompt feature scores (e.g. :func:`attribution.gradient.feature_attribution`) summed
    over prompts, each prompt's positive part normalised to total 1 (as :func:`aggregate_influence`
    does for graphs); features with a positive total only, highest first."""
    pos = scores.clamp(min=0)
    total = pos.flatten(1).sum(1).clamp(min=torch.finfo(pos.dtype).tiny)
    agg = (pos / total[:, None, None]).sum(0)
    idx = torch.argsort(agg.flatten(), descending=True)
    idx = idx[agg.flatten()[idx] > 0]
    d_sae = scores.shape[-1]
    return {(int(i) // d_sae, int(i) % d_sae): float(agg.flatten()[i]) for i in idx}


def smallest_ablating_prefix(adapted, ranked: Sequence[Feature], prompts: Sequence[Sequence[int]],
                             token_ids: int | Sequence[int], share: float = 0.8, batch_size: int = 32,
                             greedy: bool = False) -> tuple[int, dict[int, float]]:
    """The fewest top features of ``ranked`` whose ablation (at every position) removes ``share``
    of the part of the mean P(next token in ``token_ids``) at ``prompts`` (teacher-forced) that the
    ranked features carry: the goal is ``floor + (1 - share) * (P(0) - floor)``, with ``floor`` the
    probability left when every ranked feature is ablated (what attention and the base MLPs give
    on their own; near zero on the shipped organism, about 0.2 on the ``hmm`` one). ``greedy``:
    the curve is the share of prompts at which greedy decoding would still write the token
    (:func:`next_token_probability` with ``greedy=True``), what generation-time necessity turns on.

    Doubles k until the goal is met, then bisects (assuming the curve falls with k, as it does
    when the ranking is any good). Returns k (``len(ranked)`` when even all of them fall short)
    and every mean probability measured, ``{k: P}``, with k = 0 the unablated model and
    k = ``len(ranked)`` the floor.

    Example:
        >>> k, curve = smallest_ablating_prefix(adapted, ranked, hes.tokens, spec.variants)  # doctest: +SKIP
    """
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], not {share}")
    measured: dict[int, float] = {}

    def prob(k: int) -> float:
        if k not in measured:
            hooks = adapted.ablation_hooks(list(ranked[:k])) if k else []
            measured[k] = float(next_token_probability(adapted.model, prompts, token_ids, fwd_hooks=hooks,
                                                       batch_size=batch_size, greedy=greedy).mean())
        return measured[k]

    if not ranked:
        return 0, {0: prob(0)}
    floor = min(prob(len(ranked)), prob(0))
    goal = floor + (1 - share) * (prob(0) - floor)
    lo, hi = 0, 1
    while hi < len(ranked) and prob(hi) > goal:
        lo, hi = hi, 2 * hi
    hi = min(hi, len(ranked))
    if prob(hi) > goal:
        return len(ranked), dict(sorted(measured.items()))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if prob(mid) <= goal else (mid, hi)
    return hi, dict(sorted(measured.items()))


def keep_only_hooks(adapted, features: Sequence[Feature]) -> list[tuple[str, callable]]:
    """Hooks that zero every adapter feature except ``features`` (sufficiency tests)."""
    n_layers, d_sae = adapted.config.n_layers, adapted.config.d_sae
    keep = torch.zeros(n_layers, d_sae)
    for layer, feat in features:
        keep[layer, feat] = 1.0

    def make(layer):
        def hook(acts, hook):
            return acts * keep[layer].to(acts.device, acts.dtype)
        return hook

    return [(adapted.acts_name(layer), make(layer)) for layer in range(n_layers)]


def set_decides_generation(
    adapted, tokenizer, problems: Dataset, features: Sequence[Feature], *, spec: TaskSpec = DEFAULT,
    go_on: str = ";", max_new_tokens: int = MAX_NEW_TOKENS,
) -> list[list[str]]:
    """Greedy responses (as tokens) in which the full adapted model writes every token except the
    decisions whether to hesitate (any of ``spec``'s hesitation words) or ``go_on``, which a copy
    keeping only ``features`` makes: :func:`set_decides_ids` for an organism.

    Example:
        >>> from mechdiff.models import load_pair
        >>> from mechdiff.adapters.formats import SHIPPED_DIR, load_adapted
        >>> from mechdiff.organism import corpus
        >>> pair = load_pair("organism"); adapted = load_adapted(pair, SHIPPED_DIR)
        >>> words = set_decides_generation(adapted, pair.tokenizer, corpus.problems(4, "test"), [])
        >>> sum(w.count("wait") for w in words)  # with no feature kept, nothing hesitates
        0
    """
    ids = tokenizer.convert_tokens_to_ids([*spec.hesitation_words, go_on])
    rows = set_decides_ids(adapted, tokenizer, problems, features, ids, max_new_tokens)
    return [tokenizer.convert_ids_to_tokens(row) for row in rows]


def set_decides_ids(
    adapted, tokenizer, problems: Dataset, features: Sequence[Feature], decisions: Sequence[int],
    max_new_tokens: int,
) -> list[list[int]]:
    """Greedy responses (token ids) in which the full adapted model writes every token except the
    decisions, which a copy keeping only ``features`` makes.

    Why: zeroing every other feature for the whole response (:func:`keep_only_hooks`) also stops
    the model from writing the slips that hesitations answer, so free generation cannot tell "the
    set does not hesitate" from "there was nothing to hesitate about". Here both copies read the
    same tokens; wherever the full copy's greedy token is one of ``decisions`` (the hesitation
    tokens and the go-on token: :attr:`Hesitation.decisions`), the kept-only copy's preferred one
    of them is used. Its later states are computed with only ``features`` at every position, as in
    the teacher-forced measurement.
    """
    prompts = [list(p) for p in problems["input_ids"]]
    out: list[list[int]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for group in by_length.values():  # equal lengths: generate() keeps the two halves in order
        n = len(group)
        rows = [prompts[i] for i in group]
        hooks = _second_half_keeps_only(adapted, features, n)
        new = generate(adapted.model, rows + rows, max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, fwd_hooks=hooks, batch_size=2 * n,
                       logit_processors=[_decision_from_second_half(n, list(decisions))])
        for i, row in zip(group, new[:n]):
            out[i] = row
    return out


def _second_half_keeps_only(adapted, features: Sequence[Feature], n: int) -> list[tuple[str, callable]]:
    """Hooks that zero every adapter feature outside ``features`` in batch rows ``n:2n`` only."""
    hooks = []
    for name, keep in keep_only_hooks(adapted, features):
        def hook(acts, hook, keep=keep):
            return torch.cat([acts[:n], keep(acts[n:], hook)])
        hooks.append((name, hook))
    return hooks


def _decision_from_second_half(n: int, ids: Sequence[int]):
    """A logit processor: where the first half's greedy token is one of ``ids``, both halves take
    the second half's preferred one of ``ids``; elsewhere both take the first half's token."""
    ids_t = torch.tensor(ids)

    def process(logits, generated):
        full, kept = logits[:n], logits[n:]
        choice = full.argmax(-1)
        ids_here = ids_t.to(logits.device)
        deciding = torch.isin(choice, ids_here)
        choice = torch.where(deciding, ids_here[kept[:, ids_here].argmax(-1)], choice)
        forced = torch.full_like(logits, float("-inf"))
        forced.scatter_(1, choice.repeat(2)[:, None], 0.0)
        return forced
    return process


def decoder_logit_effect(adapted, token_id: int) -> Float[Tensor, "layer d_sae"]:
    """Direct effect of one unit of each feature on ``token_id``'s demeaned logit.

    The decoder row goes straight to the unembedding through the final norm's weight (scale left
    out: it is shared by all features at a position, so it does not change the ranking).
    """
    model = adapted.model
    w_u = model.W_U.detach().float()
    direction = (w_u[:, token_id] - w_u.mean(1)) * model.ln_final.w.detach().float()
    return torch.stack([a.W_dec.detach().float() @ direction for a in adapted.adapters])


@torch.no_grad()
def feature_activations(
    adapted, sequences: Sequence[Sequence[int]], batch_size: int = 64, pad_id: int = 0,
) -> list[Float[Tensor, "pos layer d_sae"]]:
    """Every adapter feature's activation at every real position of each sequence (one pass)."""
    names = [adapted.acts_name(layer) for layer in range(adapted.config.n_layers)]
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = [list(s) for s in sequences[start:start + batch_size]]
        tokens, mask = pad(chunk, pad_id, "left")
        _, cache = adapted.model.run_with_cache(
            tokens.to(adapted.model.cfg.device), attention_mask=mask.long().to(adapted.model.cfg.device),
            names_filter=lambda n: n in names)
        acts = torch.stack([cache[n] for n in names], dim=2).cpu()  # [batch pos layer d_sae]
        for row, seq in enumerate(chunk):
            out.append(acts[row, tokens.shape[1] - len(seq):])
    return out


def activation_mass_by_label(
    acts: Sequence[Float[Tensor, "pos layer d_sae"]], labels: Sequence[Sequence[str]],
    features: Sequence[Feature],
) -> dict[Feature, dict[str, float]]:
    """For each feature, the share of its total activation that falls on each token label."""
    idx_l = torch.tensor([f[0] for f in features], dtype=torch.long)
    idx_f = torch.tensor([f[1] for f in features], dtype=torch.long)
    mass: dict[str, Tensor] = {}
    for a, labs in zip(acts, labels):
        sel = a[:, idx_l, idx_f]  # [pos n_features]
        for lab in dict.fromkeys(labs):  # first-seen order, not a set's: the same sums in every process
            rows = torch.tensor([i for i, x in enumerate(labs) if x == lab], dtype=torch.long)
            mass[lab] = mass.get(lab, torch.zeros(len(features))) + sel[rows].sum(0)
    total = sum(mass.values()) if mass else torch.zeros(len(features))
    return {f: {lab: float(m[i] / total[i]) if total[i] > 0 else 0.0 for lab, m in mass.items()}
            for i, f in enumerate(features)}


def role_rule(word: str) -> str:
    """The rule :func:`assign_roles` applies, for a hesitation written ``word`` (the graphs' target)."""
    return (
        f"output: the feature's decoder raises the '{word}' logit directly (its direct effect on '{word}' "
        f"is positive and '{word}' is among the 3 tokens it promotes most); of the others, "
        "error_detection: at least half of its activation mass lies on the tokens of a wrong step "
        "(label 'slip'); context/format: the rest, which fire on the step's own tokens, separators "
        "and other formatting."
    )



def assign_roles(
    features: Sequence[Feature], direct_effect: Float[Tensor, "layer d_sae"],
    promote_rank: Float[Tensor, "layer d_sae"], mass: dict[Feature, dict[str, float]],
) -> dict[Feature, str]:
    """Classify hesitation features by :func:`role_rule`.

    ``promote_rank[l, i]``: the rank of "wait" among the tokens feature (l, i) promotes (0 = top).
    """
    roles = {}
    for f in features:
        layer, feat = f
        if direct_effect[layer, feat] > 0 and promote_rank[layer, feat] < 3:
            roles[f] = "output"
        elif mass.get(f, {}).get("slip", 0.0) >= 0.5:
            roles[f] = "error_detection"
        else:
            roles[f] = "context/format"
    return roles
