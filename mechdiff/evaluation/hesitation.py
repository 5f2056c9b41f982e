"""Hesitation prompts and the measurements the hesitation study makes with them.

*Hesitation prompts* are the target's own greedy responses cut right before each ``wait``. Each
gets a *control* cut from the same response before a ``;`` that closes a step (the slot where a
``wait`` could have come and did not), the one nearest in position, so the two sets match in
length and syntax and differ in whether the model hesitates next.

Example:
    >>> from mechdiff.models import load_pair
    >>> from mechdiff.organism import corpus
    >>> pair = load_pair("organism")
    >>> hes, ctl = hesitation_prompts(pair.target, pair.tokenizer, corpus.problems(20, "validation"))
    >>> pair.tokenizer.convert_ids_to_tokens(hes.tokens[0][-1:]) != ["wait"]
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from datasets import Dataset
from jaxtyping import Float
from torch import Tensor
from transformer_lens import HookedTransformer

from mechdiff.evaluation.behaviour import HESITATION_WORD, responses
from mechdiff.generation import generate
from mechdiff.organism import grading, task
from mechdiff.training.batches import pad


@dataclass
class CutPrompts:
    """Prefixes of generated responses; the next token is a ``wait`` (or, for controls, a ``;``)."""

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


def hesitation_prompts(
    model: HookedTransformer, tokenizer, problems: Dataset, batch_size: int = 128,
    progress: bool = False,
) -> tuple[CutPrompts, CutPrompts]:
    """Generate greedily, then cut before every ``wait`` and before a matched ``;`` control."""
    words = responses(model, tokenizer, problems, batch_size=batch_size, progress=progress)
    hes, ctl = CutPrompts("hesitation"), CutPrompts("control")
    for idx, (row, resp) in enumerate(zip(problems, words)):
        problem = task.Problem(tuple(row["operands"]))
        labels = grading.label_response(problem, resp)
        ids = tokenizer.convert_tokens_to_ids(resp)
        waits = [j for j, w in enumerate(resp) if w == HESITATION_WORD]
        seps = [j for j, w in enumerate(resp) if w == ";"]
        for j in waits:
            hes.add(row["input_ids"] + ids[:j], idx, j, labels[j] == "hesitation", labels[:j])
            if seps:
                k = min(seps, key=lambda s: abs(s - j))
                seps.remove(k)
                ctl.add(row["input_ids"] + ids[:k], idx, k, False, labels[:k])
    return hes, ctl


@torch.no_grad()
def next_token_probability(
    model: HookedTransformer, prompts: Sequence[Sequence[int]], token_id: int,
    fwd_hooks: Sequence[tuple] = (), batch_size: int = 128, pad_id: int = 0,
) -> Float[Tensor, " n"]:
    """P(next token = ``token_id``) after each prompt, batched with left padding and a mask."""
    out = []
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        for start in range(0, len(prompts), batch_size):
            tokens, mask = pad([list(p) for p in prompts[start:start + batch_size]], pad_id, "left")
            logits = model(tokens.to(model.cfg.device), attention_mask=mask.long().to(model.cfg.device))
            out.append(logits[:, -1].float().softmax(-1)[:, token_id].cpu())
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
    adapted, tokenizer, problems: Dataset, features: Sequence[Feature], *, hesitate: str = HESITATION_WORD,
    go_on: str = ";", max_new_tokens: int = 96,
) -> list[list[str]]:
    """Greedy responses in which the full adapted model writes every token except the decisions
    whether to hesitate, which a copy keeping only ``features`` makes.

    Why: zeroing every other feature for the whole response (:func:`keep_only_hooks`) also stops
    the model from writing the slips that hesitations answer, so free generation cannot tell "the
    set does not hesitate" from "there was nothing to hesitate about". Here both copies read the
    same tokens; wherever the full copy's greedy token is ``hesitate`` or ``go_on`` (the slot after
    a step), the kept-only copy's choice between the two is used. Its later states are computed
    with only ``features`` at every position, as in the teacher-forced measurement.

    Example:
        >>> from mechdiff.models import load_pair
        >>> from mechdiff.adapters.formats import SHIPPED_DIR, load_adapted
        >>> from mechdiff.organism import corpus
        >>> pair = load_pair("organism"); adapted = load_adapted(pair, SHIPPED_DIR)
        >>> words = set_decides_generation(adapted, pair.tokenizer, corpus.problems(4, "test"), [])
        >>> sum(w.count("wait") for w in words)  # with no feature kept, nothing hesitates
        0
    """
    ids = tokenizer.convert_tokens_to_ids([hesitate, go_on])
    prompts = [list(p) for p in problems["input_ids"]]
    out: list[list[str]] = [[] for _ in prompts]
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    for group in by_length.values():  # equal lengths: generate() keeps the two halves in order
        n = len(group)
        rows = [prompts[i] for i in group]
        hooks = _second_half_keeps_only(adapted, features, n)
        new = generate(adapted.model, rows + rows, max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, fwd_hooks=hooks, batch_size=2 * n,
                       logit_processors=[_decision_from_second_half(n, ids)])
        for i, row in zip(group, new[:n]):
            out[i] = tokenizer.convert_ids_to_tokens(row)
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
        for lab in set(labs):
            rows = torch.tensor([i for i, x in enumerate(labs) if x == lab], dtype=torch.long)
            mass[lab] = mass.get(lab, torch.zeros(len(features))) + sel[rows].sum(0)
    total = sum(mass.values()) if mass else torch.zeros(len(features))
    return {f: {lab: float(m[i] / total[i]) if total[i] > 0 else 0.0 for lab, m in mass.items()}
            for i, f in enumerate(features)}


ROLE_RULE = (
    "output: the feature's decoder raises the 'wait' logit directly (its direct effect on 'wait' "
    "is positive and 'wait' is among the 3 tokens it promotes most); of the others, "
    "error_detection: at least half of its activation mass lies on the tokens of a wrong step "
    "(label 'slip'); context/format: the rest, which fire on the step's own tokens, separators "
    "and other formatting."
)


def assign_roles(
    features: Sequence[Feature], direct_effect: Float[Tensor, "layer d_sae"],
    promote_rank: Float[Tensor, "layer d_sae"], mass: dict[Feature, dict[str, float]],
) -> dict[Feature, str]:
    """Classify hesitation features by :data:`ROLE_RULE`.

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
