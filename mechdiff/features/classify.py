"""Classify features: by a workload's ground-truth token labels (the organism's, the chat's), or by an LM judge.

**Labels.** The organism labels every token (:data:`~mechdiff.organism.task.LABELS`). Whole steps
are labelled ``slip``/``correction``/``recheck_step``/``error``; :func:`fine_labels` adds each such
token's role in its step (``slip:digit``, ...: :data:`FINE_LABELS`), so a feature that merely
reads digits is not mistaken for one that detects wrong steps. Any other workload labels its
tokens itself (:mod:`mechdiff.studies.features_labels`: on chat, whole steps ``step`` / ``slip`` /
``error`` / ``correction`` / ``recheck_step``, the "Wait" ``hesitation`` / ``recheck``, ``answer``,
``prompt`` and ``text``): step-kind labels without roles share the role ``step``, so the excess below
compares each example with the corpus' step tokens of the same id.

**The rule** (:data:`RULE`), on a feature's top-k examples (sequences, each at its maximum token):
``wait`` scores: the shares of ``hesitation`` (a "wait" after a wrong step) and ``recheck``
labels; step scores: for each step kind, the share of examples in such steps *beyond* what the
examples' surface predicts, ``sum_j P(kind | role_j, token_j)`` from the corpus' counts, clipped
at 0 (a feature for "carry 1" is not a correction feature because most carry-1 copies are in
corrections).
Categories: ``hesitation`` = hesitation share; ``recheck`` = recheck share + recheck-step excess;
``error_detection`` = slip + error excess; ``correction`` = correction excess. An alive feature
(fired at least once) with fewer than ``min_examples`` examples is ``rare``; with reasoning
scores summing to >= ``majority`` it is *reasoning*, in its top-scoring category; else
``format`` or ``arithmetic`` when the roles of that group hold >= ``majority``; else ``mixed``.
Reasoning features get the paper's role: ``output`` when "wait" is among the top-3 logit-lens
tokens (the workload's hesitation tokens; :func:`rule_text` names its word), ``input-simple`` when
>= 80% of its top examples peak on one token, else ``input-abstract``. ``reasoning_fraction`` =
reasoning / alive (published, real pair: about 8%).

**The judge** (:class:`JudgeClient`): for real models, an optional language model behind any
OpenAI-compatible ``/chat/completions`` endpoint (base URL and model configurable; API key from
``$MECHDIFF_JUDGE_API_KEY`` if set) puts a feature into :data:`JUDGE_CATEGORIES`. Standard
library only; never required.

Example:
    >>> L = FINE_LABELS.index
    >>> base = torch.ones(len(FINE_LABELS), 40)  # corpus token counts per (label, token id)
    >>> labels = torch.tensor([[L("hesitation")] * 3 + [L("digit")], [L("digit"), L("slip:digit")] * 2])
    >>> tokens = torch.tensor([[22, 22, 22, 5], [5, 5, 5, 5]])
    >>> classify_examples(labels, tokens, torch.tensor([True, True]), base)
    ['hesitation', 'arithmetic']
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from mechdiff.organism import task
from mechdiff.organism.task import LABELS

REASONING = ("hesitation", "recheck", "error_detection", "correction")
FORMAT = (
    "bos",
    "operand_label",
    "prompt_format",
    "think_open",
    "step_marker",
    "equals",
    "separator",
    "think_close",
    "eos",
    "worked_marker",
    "prompt",  # a chat workload's prompt tokens (mechdiff.studies.features_labels)
    "text",  # a chat reply's prose outside steps, answer and hesitation words
)
ARITHMETIC = ("operand_digit", "operand_copy", "carry_copy", "digit", "carry_out", "answer", "fact")
WAIT = {"hesitation": "hesitation", "recheck": "recheck"}  # "wait" labels -> category
STEP_KINDS = {
    "slip": "error_detection",
    "error": "error_detection",
    "correction": "correction",
    "recheck_step": "recheck",
}  # labels of whole steps -> category
STEP_ROLES = tuple(dict.fromkeys(task.DEFAULT.step_roles))  # the same names for any operand count
FINE_LABELS = LABELS + tuple(f"{k}:{r}" for k in STEP_KINDS for r in STEP_ROLES)
CATEGORIES = ("format", "arithmetic", *REASONING, "mixed", "rare")
ROLES = ("output", "input-simple", "input-abstract")


def rule_text(word: str = "wait") -> str:
    """:data:`RULE` for a workload whose hesitation word is ``word``.

    >>> rule_text("hmm") == RULE.replace("'wait'", "'hmm'")
    True
    """
    return (
        "Per feature, label distribution c of its top-k sequences (at their max token). Scores: "
        f"hesitation = share of '{word}' tokens after a wrong step; recheck = share of '{word}' re-checks + "
        "excess of recheck-step tokens; error_detection = excess of slip/error-step tokens; correction "
        "= excess of correction-step tokens; excess = observed share minus the share predicted by the "
        "examples' (step role, token id) from corpus counts, clipped at 0. Alive (fired once) with < min_examples "
        "examples: rare; reasoning scores summing to >= majority: reasoning, top-scoring category; "
        "else format/arithmetic by the roles' group share >= majority; else mixed. Reasoning roles: "
        f"output if '{word}' is in the top-3 logit-lens tokens; input-simple if >= 80% of top examples "
        "peak on one token; else input-abstract."
    )


RULE = rule_text("wait")  # the shipped organism's


# --------------------------------------------------------------------------- logit lens


@torch.no_grad()
def logit_lens(
    model,
    directions: Float[Tensor, "n d_model"],
    k: int = 8,
    chunk: int = 1024,
) -> dict[str, Tensor]:
    """Top and bottom ``k`` tokens of ``W_U^T (ln_final.w * d)`` for each direction ``d``, the
    unembedding demeaned over the vocabulary. Rows of NaN (no residual direction) give ids -1.

    >>> from attribution.synthetic import tiny_adapted
    >>> adapted = tiny_adapted(seed=0)
    >>> lens = logit_lens(adapted.model, adapted.model.W_U.T[[7]] / adapted.model.ln_final.w, k=1)
    >>> lens["lens_top_ids"].tolist()
    [[7]]
    """
    w_u = model.W_U.detach().float().cpu()
    w_u = w_u - w_u.mean(1, keepdim=True)
    gain = model.ln_final.w.detach().float().cpu() if hasattr(model.ln_final, "w") else 1.0
    k = min(k, w_u.shape[1])
    out = {f"lens_{s}_{f}": [] for s in ("top", "bottom") for f in ("ids", "values")}
    for start in range(0, len(directions), chunk):
        d = directions[start : start + chunk].detach().float().cpu()
        missing = d.isnan().any(1)
        logits = (d.nan_to_num() * gain) @ w_u
        for side, largest in (("top", True), ("bottom", False)):
            v, i = logits.topk(k, dim=1, largest=largest)
            out[f"lens_{side}_ids"].append(i.masked_fill(missing[:, None], -1))
            out[f"lens_{side}_values"].append(v.masked_fill(missing[:, None], float("nan")))
    return {name: torch.cat(parts) for name, parts in out.items()}


def decoder_directions(adapted) -> Float[Tensor, "n_features d_model"]:
    """The adapters' decoder rows, layer-major: the store order of ``blocks.L.adapter.hook_acts``."""
    return torch.cat([a.W_dec.detach().float() for a in adapted.adapters])


def lora_directions(lora) -> Float[Tensor, "n_features d_model"]:
    """Residual directions of a LoRA's units in :meth:`LoRAModel.act_names` order: ``scale * B``
    columns for ``o`` and ``down`` (they write to the residual stream), NaN for the others."""
    d_model, rows = lora.model.cfg.d_model, []
    for layer in lora.layers:
        for m in lora.config.modules:
            b = layer.scale * layer.B[m].detach().float().T  # [rank d_out]
            rows.append(b if m in ("o", "down") else torch.full((b.shape[0], d_model), float("nan")))
    return torch.cat(rows)


# --------------------------------------------------------------------------- the label rule


def fine_labels(label_ids: Sequence[int], spec: task.TaskSpec = task.DEFAULT) -> list[int]:
    """Indices into :data:`FINE_LABELS`: step-kind tokens get their role in the step (a step of
    ``spec``'s operand count).

    >>> ids = [LABELS.index(n) for n in ["separator", *["slip"] * 7, "hesitation"]]
    >>> [FINE_LABELS[i] for i in fine_labels(ids)][-3:]
    ['slip:digit', 'slip:carry_out', 'hesitation']
    """
    out, start = [], 0
    for j, lab in enumerate(label_ids):
        name = LABELS[lab]
        if name not in STEP_KINDS:
            out.append(int(lab))
            continue
        start = j if j == 0 or label_ids[j - 1] != lab else start
        role = spec.step_roles[(j - start) % len(spec.step_roles)]
        out.append(FINE_LABELS.index(f"{name}:{role}"))
    return out


def with_fine_labels(dataset, spec: task.TaskSpec = task.DEFAULT):
    """A ``datasets.Dataset`` of organism rows with ``label_ids`` mapped by :func:`fine_labels`."""
    return dataset.map(lambda row: {"label_ids": fine_labels(row["label_ids"], spec)})


def _rule_tables(names: Sequence[str]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per label: role index, step-kind category, wait category (-1: none); per role: group."""
    fine = any(":" in n for n in names)

    def role(n):
        if ":" in n:
            return n.split(":")[1]
        if n in WAIT:
            return "wait"
        return "step" if not fine and (n in STEP_KINDS or n in STEP_ROLES) else n

    roles = list(dict.fromkeys(role(n) for n in names))
    role_of = torch.tensor([roles.index(role(n)) for n in names])
    kind = torch.tensor([REASONING.index(STEP_KINDS[k]) if (k := n.split(":")[0]) in STEP_KINDS else -1 for n in names])
    wait = torch.tensor([REASONING.index(WAIT[n]) if n in WAIT else -1 for n in names])
    group = torch.tensor([0 if r in FORMAT else 1 if r in ARITHMETIC or r == "step" else -1 for r in roles])
    return role_of, kind, wait, group


def _onehot(index: Tensor, n: int) -> Tensor:
    return torch.nn.functional.one_hot(index.clamp(min=0), n).float() * (index >= 0)[..., None]


def reasoning_scores(
    labels: Int[Tensor, "n_features k"],
    tokens: Int[Tensor, "n_features k"],
    base: Float[Tensor, "n_labels d_vocab"],
    label_names: Sequence[str] = FINE_LABELS,
) -> Float[Tensor, "n_features 4"]:
    """Each feature's score per :data:`REASONING` category from its examples' labels and (centre)
    token ids (-1: no example); ``base`` counts corpus tokens per (label, token id). See :data:`RULE`."""
    role_of, kind, wait, _ = _rule_tables(label_names)
    n_roles, valid = int(role_of.max()) + 1, labels >= 0
    lab, tok = labels.clamp(min=0), tokens.clamp(min=0, max=base.shape[1] - 1)
    by_role = torch.zeros(n_roles, base.shape[1]).index_add_(0, role_of, base.float())  # [R V]
    by_kind = torch.stack(
        [
            torch.zeros_like(by_role).index_add_(0, role_of, base.float() * (kind == c)[:, None])
            for c in range(len(REASONING))
        ]
    )  # [4 R V]
    expected = (by_kind / by_role.clamp(min=1e-12))[:, role_of[lab], tok].permute(1, 2, 0)  # [F k 4]
    observed = _onehot(kind[lab], len(REASONING))
    n = valid.sum(1, keepdim=True).clamp(min=1)
    excess = ((observed - expected) * valid[..., None]).sum(1).clamp(min=0)
    return ((_onehot(wait[lab], len(REASONING)) * valid[..., None]).sum(1) + excess) / n


def classify_examples(
    labels: Int[Tensor, "n_features k"],
    tokens: Int[Tensor, "n_features k"],
    alive: Bool[Tensor, " n_features"],
    base: Float[Tensor, "n_labels d_vocab"],
    *,
    label_names: Sequence[str] = FINE_LABELS,
    majority: float = 0.5,
    min_examples: int = 1,
) -> list[str]:
    """The category of each feature by :data:`RULE` (``"dead"`` when not alive)."""
    if labels.shape != tokens.shape or labels.shape[0] != alive.shape[0] or base.shape[0] != len(label_names):
        raise ValueError(
            f"labels {tuple(labels.shape)} and tokens {tuple(tokens.shape)} must be "
            f"[n_features, k] matching alive {tuple(alive.shape)}; base "
            f"{tuple(base.shape)} must be [{len(label_names)}, d_vocab]"
        )
    role_of, _, _, group = _rule_tables(label_names)
    valid = labels >= 0
    n = valid.sum(1)
    scores = reasoning_scores(labels, tokens, base, label_names)
    groups = (_onehot(group[role_of[labels.clamp(min=0)]], 2) * valid[..., None]).sum(1) / n.clamp(min=1)[:, None]
    out = []
    for i in range(len(n)):
        if not alive[i]:
            out.append("dead")
        elif n[i] < max(1, min_examples):
            out.append("rare")
        elif scores[i].sum() >= majority:
            out.append(REASONING[int(scores[i].argmax())])
        elif groups[i].max() >= majority:
            out.append(("format", "arithmetic")[int(groups[i].argmax())])
        else:
            out.append("mixed")
    return out


def classify_store(store, *, majority: float = 0.5, min_examples: int = 3, hesitation_ids: Sequence[int] = ()) -> dict:
    """Categories (and reasoning roles) of every feature of a labelled store, from its top
    examples (:data:`RULE`); ``hesitation_ids``: the tokens whose promotion makes a reasoning
    feature an ``output`` (the workload's hesitation tokens).

    Returns ``{"categories": [...], "roles": {feature: role}, "scores": [F 4], "summary": {...}}``;
    the summary has ``n_features``, ``n_alive``, ``category_counts``, ``reasoning_fraction``...
    """
    names = store.config.label_names
    if not names:
        raise ValueError("the store has no ground-truth labels (config.label_names); use the judge")
    centre = store.top_tokens[:, :, store.config.before]
    tokens = centre.masked_fill(store.top_label < 0, -1)
    cats = classify_examples(
        store.top_label,
        tokens,
        store.alive,
        store.label_token_count,
        label_names=names,
        majority=majority,
        min_examples=min_examples,
    )
    roles = reasoning_roles(store, cats, hesitation_ids)
    return {
        "categories": cats,
        "roles": roles,
        "summary": summarize(cats, roles),
        "scores": reasoning_scores(store.top_label, tokens, store.label_token_count, names),
    }


def reasoning_roles(
    store, categories: Sequence[str], hesitation_ids: Sequence[int] = (), simple_share: float = 0.8
) -> dict[int, str]:
    """The role (:data:`ROLES`) of every reasoning feature."""
    centre = store.config.before
    roles = {}
    for i, cat in enumerate(categories):
        if cat not in REASONING:
            continue
        lens = store.lens_top_ids[i, :3].tolist()
        toks = [int(t) for t in store.top_tokens[i, :, centre] if t >= 0]
        top_share = Counter(toks).most_common(1)[0][1] / len(toks) if toks else 0.0
        if any(h in lens for h in hesitation_ids):
            roles[i] = "output"
        elif top_share >= simple_share:
            roles[i] = "input-simple"
        else:
            roles[i] = "input-abstract"
    return roles


def summarize(categories: Sequence[str], roles: dict[int, str] | None = None) -> dict:
    """Counts per category over all features; ``reasoning_fraction`` over the alive ones."""
    counts = Counter(categories)
    n_alive = len(categories) - counts.get("dead", 0)
    n_reasoning = sum(counts.get(c, 0) for c in REASONING)
    return {
        "n_features": len(categories),
        "n_alive": n_alive,
        "category_counts": {c: counts.get(c, 0) for c in (*CATEGORIES, "dead")},
        "n_reasoning": n_reasoning,
        "reasoning_fraction": n_reasoning / n_alive if n_alive else 0.0,
        "role_counts": {r: sum(v == r for v in (roles or {}).values()) for r in ROLES},
    }


# --------------------------------------------------------------------------- the LM judge

JUDGE_CATEGORIES = ("language", "domain", "reasoning", "uninterpretable")
SYSTEM_PROMPT = (
    "You label features of a language model's internal dictionary from their activating examples. "
    "Categories: language (a token, word or syntactic pattern), domain (a topic or domain concept, "
    "e.g. arithmetic), reasoning (reasoning behaviour: hesitation, backtracking, verification, "
    "self-correction, planning), uninterpretable (no consistent pattern). For reasoning features, "
    "the role: output (it promotes a reasoning token such as 'wait', see the logit lens), "
    "input-simple (it fires on one reasoning token) or input-abstract (it fires on a reasoning "
    "situation). Reply with one JSON object and nothing else: "
    '{"category": "...", "role": "..." or null, "explanation": "one sentence"}'
)


@dataclass
class Judgement:
    category: str
    role: str | None = None
    explanation: str = ""
    ok: bool = True  # False when the answer could not be parsed (category "uninterpretable")
    raw: str = field(default="", repr=False)


class JudgeError(RuntimeError):
    """The judge endpoint could not be reached or answered with an error."""


def mark_example(words: Sequence[str], acts: Sequence[float], centre: int) -> str:
    """``words`` with the centre in ``[[ ]]`` and every active token's activation appended.

    >>> mark_example(["a", "b", "c"], [0.0, 2.0, 0.5], 1)
    'a [[b]](2) c(0.5)'
    """
    out = []
    for j, (w, a) in enumerate(zip(words, acts)):
        w = f"[[{w}]]" if j == centre else w
        out.append(f"{w}({a:.2g})" if a > 0 else w)
    return " ".join(out)


def build_messages(
    name: str,
    top: Sequence[str],
    random: Sequence[str],
    lens_top: Sequence[str],
    lens_bottom: Sequence[str],
    density: float,
) -> list[dict]:
    """Chat messages asking the judge to classify one feature.

    >>> msgs = build_messages("L0/F3", ["x [[wait]](3)"], [], ["wait"], ["7"], 0.01)
    >>> msgs[0]["role"], "[[wait]]" in msgs[1]["content"]
    ('system', True)
    """
    lines = [
        f"Feature {name}; fires on {density:.3%} of tokens.",
        "Top activating examples (maximum token in [[ ]], activations in parentheses):",
    ]
    lines += [f"{j + 1}. {e}" for j, e in enumerate(top)] or ["(none)"]
    if random:
        lines += ["Random activating examples:", *[f"- {e}" for e in random]]
    lines += [
        f"Logit lens, promoted tokens: {' '.join(map(repr, lens_top)) or '(n/a)'}",
        f"Logit lens, suppressed tokens: {' '.join(map(repr, lens_bottom)) or '(n/a)'}",
    ]
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "\n".join(lines)}]


def parse_judgement(text: str) -> Judgement:
    """Read the judge's reply: the first JSON object in it, else ``category: ...`` text.

    >>> parse_judgement('```json\\n{"category": "Reasoning", "role": "output", "explanation": "wait"}\\n```').role
    'output'
    >>> parse_judgement("no idea").ok
    False
    """
    decoder = json.JSONDecoder()
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = decoder.raw_decode(text[m.start() :])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and "category" in obj:
            cat = str(obj.get("category", "")).strip().lower()
            role = obj.get("role")
            role = str(role).strip().lower() if role else None
            if cat in JUDGE_CATEGORIES:
                return Judgement(
                    cat,
                    role if cat == "reasoning" and role in ROLES else None,
                    str(obj.get("explanation", "")),
                    True,
                    text,
                )
    m = re.search(r"category\W+(" + "|".join(JUDGE_CATEGORIES) + ")", text, re.IGNORECASE)
    if m:
        cat = m[1].lower()
        r = re.search(r"role\W+(" + "|".join(ROLES) + ")", text, re.IGNORECASE)
        return Judgement(cat, r[1].lower() if r and cat == "reasoning" else None, "", True, text)
    return Judgement("uninterpretable", None, "unparsable answer", False, text)


@dataclass
class JudgeClient:
    """Client of an OpenAI-compatible chat-completions endpoint (e.g. ``http://localhost:8000/v1``).

    Example:
        Not run as a doctest: it needs a judge model served at that address.
        >>> client = JudgeClient("http://127.0.0.1:8000/v1", "qwen2.5-7b-instruct")  # doctest: +SKIP
        >>> client.judge(build_messages("L0/F3", ["x [[wait]](3)"], [], ["wait"], [], 0.01))  # doctest: +SKIP
        Judgement(category='reasoning', role='output', ...)
    """

    base_url: str
    model: str
    api_key: str | None = None  # default: $MECHDIFF_JUDGE_API_KEY when set
    timeout: float = 60.0
    max_tokens: int = 200

    def complete(self, messages: list[dict]) -> str:
        """POST ``messages``; the first choice's message content."""
        body = {"model": self.model, "messages": messages, "temperature": 0.0, "max_tokens": self.max_tokens}
        headers = {"Content-Type": "application/json"}
        key = self.api_key or os.environ.get("MECHDIFF_JUDGE_API_KEY")
        if key:
            headers["Authorization"] = f"Bearer {key}"
        url = self.base_url.rstrip("/") + "/chat/completions"
        req = urllib.request.Request(url, json.dumps(body).encode(), headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                reply = json.loads(resp.read().decode())
        except urllib.error.HTTPError as err:
            raise JudgeError(f"{url} answered HTTP {err.code}: {err.read()[:300]!r}") from err
        except (urllib.error.URLError, TimeoutError, OSError) as err:
            raise JudgeError(f"could not reach the judge at {url}: {err}") from err
        except json.JSONDecodeError as err:
            raise JudgeError(f"{url} did not return JSON: {err}") from err
        try:
            return reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as err:
            raise JudgeError(f"{url}: unexpected reply {str(reply)[:300]}") from err

    def judge(self, messages: list[dict]) -> Judgement:
        return parse_judgement(self.complete(messages))


def feature_messages(store, i: int, tokenizer, n_top: int = 8, n_random: int = 4) -> list[dict]:
    """:func:`build_messages` for feature ``i`` of a store (examples decoded with ``tokenizer``)."""

    def show(examples):
        return [mark_example(tokenizer.convert_ids_to_tokens(e["tokens"]), e["acts"], e["centre"]) for e in examples]

    lens = lambda side: (
        [tokenizer.convert_ids_to_tokens(int(t)) for t in getattr(store, f"lens_{side}_ids")[i] if t >= 0]
    )
    return build_messages(
        store.name(i),
        show(store.examples(i, "top")[:n_top]),
        show(store.examples(i, "rand")[:n_random]),
        lens("top"),
        lens("bottom"),
        float(store.density[i]),
    )


def judge_store(store, tokenizer, client: JudgeClient, features: Sequence[int]) -> dict[int, Judgement]:
    """Judge ``features`` of a store one request each (a failed request raises :class:`JudgeError`)."""
    return {int(i): client.judge(feature_messages(store, int(i), tokenizer)) for i in features}
