"""What the LoRA activations encode: top contexts, a monosemanticity score and ablations.

* :func:`collect` runs held-out traces through a :class:`~mechdiff.adapters.lora.LoRAModel` and
  keeps, for every real token, the LoRA state ``[n_layers, 7 * rank]``, the MLP neurons
  (``blocks.L.mlp.hook_post`` of the same forward), the ground-truth label and where it came from.
* :func:`monosemanticity` scores units from the organism's labels. A unit is one column and one
  *polarity* (``+`` its largest activations, ``-`` its most negative ones); among its top ``k``
  tokens, the best label's share is the **precision** (the score), and the share of all tokens
  with that label that fall among the unit's top ``n_label`` is the **recall**. Units are classed
  *monosemantic* (precision >= ``mono``), *broad but consistent* (the top three labels cover
  >= ``broad``) or *polysemantic*, like the paper's three classes.
* :func:`ablation_kl` zeroes sets of adapters and measures ``KL(full LoRA || ablated)`` on the
  response tokens of held-out traces: per layer, per (layer, module), per group.

Example:
    >>> from mechdiff.organism import corpus

    Not run as a doctest: it needs a trained LoRA (``lora``) from the caller.
    >>> acts = collect(lora, corpus.reasoning_traces(32, "validation"))  # doctest: +SKIP
    >>> scores = monosemanticity(acts.lora.flatten(1), acts.labels, k=50)  # doctest: +SKIP
    >>> scores["precision"].shape  # 2 * n_layers * 7 units  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from datasets import Dataset
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from mechdiff.adapters.lora import ATTENTION_MODULES, MLP_MODULES, LoRAModel
from mechdiff.organism.task import LABELS
from mechdiff.padding import pad
from mechdiff.training.lora_objective import TraceBatches

CLASSES = ("monosemantic", "broad", "polysemantic")


@dataclass
class TokenActivations:
    """Per-token activations of held-out traces (real tokens only, flattened over rows)."""

    lora: Float[Tensor, "n_tokens n_layers state"]
    mlp: Float[Tensor, "n_tokens n_layers d_mlp"] | None
    labels: Int[Tensor, " n_tokens"]
    token_ids: Int[Tensor, " n_tokens"]
    row: Int[Tensor, " n_tokens"]
    pos: Int[Tensor, " n_tokens"]
    traces: list[list[int]]


@torch.no_grad()
def collect(
    lora: LoRAModel,
    data: Dataset,
    *,
    batch_size: int = 128,
    with_mlp: bool = True,
    progress: bool = False,
) -> TokenActivations:
    """Run ``data`` (rows with ``input_ids`` and ``label_ids``) and gather per-token activations."""
    if "label_ids" not in data.column_names:
        raise ValueError("collect needs ground-truth labels (a label_ids column)")
    traces = [list(r) for r in data["input_ids"]]
    labels_pad = pad(list(data["label_ids"]), pad_id=-1)[0]
    batches = TraceBatches(data, batch_size=batch_size)
    L = lora.n_layers
    names = set(lora.act_names()) | ({f"blocks.{i}.mlp.hook_post" for i in range(L)} if with_mlp else set())
    out: dict[str, list[Tensor]] = {"lora": [], "mlp": [], "row": [], "pos": []}
    starts = range(0, len(data), batch_size)
    for start in tqdm(starts, desc="collect", disable=not progress, leave=False):
        rows = torch.arange(start, min(start + batch_size, len(data)))
        tokens, _ = batches.rows(rows)
        real = torch.arange(tokens.shape[1])[None] < batches.lengths[rows][:, None]
        _, cache = lora.model.run_with_cache(tokens.to(lora.model.cfg.device), names_filter=lambda n: n in names)
        state = torch.stack(
            [torch.cat([cache[lora.act_name(i, m)] for m in lora.config.modules], -1) for i in range(L)], dim=2
        )
        out["lora"].append(state[real].cpu())
        if with_mlp:
            out["mlp"].append(torch.stack([cache[f"blocks.{i}.mlp.hook_post"] for i in range(L)], 2)[real].cpu())
        r, p = real.nonzero(as_tuple=True)
        out["row"].append(rows[r])
        out["pos"].append(p)
    row, pos = torch.cat(out["row"]), torch.cat(out["pos"])
    return TokenActivations(
        lora=torch.cat(out["lora"]),
        mlp=torch.cat(out["mlp"]) if with_mlp else None,
        labels=labels_pad[row, pos],
        token_ids=batches.tokens[row, pos],
        row=row,
        pos=pos,
        traces=traces,
    )


def monosemanticity(
    acts: Float[Tensor, "n_tokens units"],
    labels: Int[Tensor, " n_tokens"],
    *,
    k: int = 100,
    n_labels: int = len(LABELS),
    mono: float = 0.8,
    broad: float = 0.8,
    polarities: str = "+-",
    chunk: int = 256,
) -> dict[str, Tensor]:
    """Label precision/recall of each unit's top activations; units are ``polarity x column``.

    Returns tensors over ``len(polarities) * units`` (all ``+`` units first): ``best_label``,
    ``precision``, ``recall``, ``top3_cover``, ``klass`` (index into :data:`CLASSES`).

    Example:
        >>> labels = torch.tensor([0, 0, 1, 1, 2, 2])
        >>> acts = torch.tensor([[5., 0], [4, 1], [0, 2], [1, 3], [0, 4], [0, 5]])
        >>> s = monosemanticity(acts, labels, k=2, n_labels=3, polarities="+")
        >>> s["best_label"].tolist(), s["precision"].tolist()
        ([0, 2], [1.0, 1.0])
    """
    if acts.ndim != 2 or acts.shape[0] != labels.shape[0]:
        raise ValueError(
            f"acts must be [n_tokens, units] matching labels; got {tuple(acts.shape)} and {tuple(labels.shape)}"
        )
    if not set(polarities) <= {"+", "-"} or not polarities:
        raise ValueError(f"polarities must be '+', '-' or '+-', not {polarities!r}")
    k = min(k, acts.shape[0])
    label_count = torch.bincount(labels, minlength=n_labels).float()
    parts = []
    for sign in polarities:
        signed = acts if sign == "+" else -acts
        for start in range(0, acts.shape[1], chunk):
            parts.append(_score_chunk(signed[:, start : start + chunk].float(), labels, label_count, k, n_labels))
    res = {key: torch.cat([p[key] for p in parts]) for key in parts[0]}
    klass = torch.full_like(res["best_label"], 2)
    klass[res["top3_cover"] >= broad] = 1
    klass[res["precision"] >= mono] = 0
    res["klass"] = klass
    return res


def _score_chunk(acts, labels, label_count, k, n_labels) -> dict[str, Tensor]:
    order = acts.argsort(dim=0, descending=True)  # [N, U]
    top = labels[order[:k]]  # [k, U]
    counts = torch.zeros(n_labels, acts.shape[1]).scatter_add_(0, top, torch.ones_like(top, dtype=torch.float))
    share = counts / k
    best = share.argmax(0)
    n_best = label_count[best].long().clamp(min=1)  # R-precision: the unit's top n_best tokens
    ranked_is_best = labels[order] == best[None]  # [N, U]
    within = torch.arange(acts.shape[0])[:, None] < n_best[None]
    recall = (ranked_is_best & within).sum(0).float() / n_best
    return {
        "best_label": best,
        "precision": share.max(0).values,
        "recall": recall,
        "top3_cover": share.topk(min(3, n_labels), dim=0).values.sum(0),
    }


def class_fractions(scores: dict[str, Tensor]) -> dict[str, float]:
    """Share of units in each class, plus the mean precision and recall."""
    n = len(scores["klass"])
    out = {c: float((scores["klass"] == i).sum()) / n for i, c in enumerate(CLASSES)}
    out["mean_precision"] = float(scores["precision"].mean())
    out["mean_recall"] = float(scores["recall"].mean())
    out["n_units"] = n
    return out


def lora_against_neurons(
    acts: TokenActivations, *, k: int = 100, n_labels: int = len(LABELS)
) -> tuple[dict[str, dict[str, Tensor]], dict[str, dict[str, float]], Float[Tensor, " n_labels"]]:
    """:func:`monosemanticity` of the LoRA adapters and of the MLP neurons in ``acts`` (gathered
    with ``with_mlp``), their :func:`class_fractions`, and each label's share of the tokens (the
    most common one's share is the precision of a unit that fires at random)."""
    scores = {
        "lora": monosemanticity(acts.lora.flatten(1), acts.labels, k=k, n_labels=n_labels),
        "mlp": monosemanticity(acts.mlp.flatten(1), acts.labels, k=k, n_labels=n_labels),
    }
    label_freq = torch.bincount(acts.labels, minlength=n_labels).float() / len(acts.labels)
    return scores, {name: class_fractions(v) for name, v in scores.items()}, label_freq


def unit_names(lora: LoRAModel, polarities: str = "+-") -> list[str]:
    """Names matching :func:`monosemanticity`'s order for ``acts.lora.flatten(1)``."""
    r = lora.config.rank
    cols = [
        f"L{L}.{m}" + (f"[{j}]" if r > 1 else "")
        for L in range(lora.n_layers)
        for m in lora.config.modules
        for j in range(r)
    ]
    return [c + s for s in polarities for c in cols]


def top_contexts(
    values: Float[Tensor, " n_tokens"],
    acts: TokenActivations,
    tokenizer,
    *,
    k: int = 5,
    window: int = 8,
    polarity: str = "+",
) -> list[str]:
    """The ``k`` most extreme tokens of one polarity in context: ``value  ... [[token]] ...``.

    ``polarity="+"`` takes the largest values, ``"-"`` the most negative (shown with their sign).
    """
    if polarity not in ("+", "-"):
        raise ValueError(f"polarity must be '+' or '-', not {polarity!r}")
    sign = 1.0 if polarity == "+" else -1.0
    top = (sign * values).topk(min(k, len(values)))
    out = []
    for v, i in zip((sign * top.values).tolist(), top.indices.tolist(), strict=True):
        ids, p = acts.traces[int(acts.row[i])], int(acts.pos[i])
        words = tokenizer.convert_ids_to_tokens(ids[max(0, p - window) : p + 3])
        mid = min(p, window)
        words[mid] = f"[[{words[mid]}]]"
        out.append(f"{v:+.2f}  {' '.join(words)}")
    return out


def adapter_sets(lora: LoRAModel) -> dict[str, dict[str, list[tuple[int, str]]]]:
    """The ablations of the paper: per layer, per (layer, module) and per module group."""
    mods, L = lora.config.modules, range(lora.n_layers)
    return {
        "layer": {f"L{i}": [(i, m) for m in mods] for i in L},
        "adapter": {f"L{i}.{m}": [(i, m)] for i in L for m in mods},
        "group": {
            "attention": [(i, m) for i in L for m in mods if m in ATTENTION_MODULES],
            "mlp": [(i, m) for i in L for m in mods if m in MLP_MODULES],
        },
    }


@torch.no_grad()
def ablation_kl(
    lora: LoRAModel,
    tokens: Int[Tensor, "batch pos"],
    keep: Bool[Tensor, "batch pos_minus_1"],
    sets: dict[str, list[tuple[int, str]]],
    *,
    batch_size: int = 128,
    progress: bool = False,
) -> dict[str, float]:
    """Mean ``KL(full || ablated)`` (nats per response token) for each set of zeroed adapters.

    ``tokens``/``keep`` as from :meth:`TraceBatches.rows`. An empty set gives 0.

    Example:
        Not run as a doctest: it needs a trained LoRA from the caller.
        >>> tb = TraceBatches(corpus.reasoning_traces(64, "validation"), 64)  # doctest: +SKIP
        >>> ablation_kl(lora, *tb.rows(range(64)), adapter_sets(lora)["layer"])  # doctest: +SKIP
    """
    totals = {name: 0.0 for name in sets}
    n = int(keep.sum())
    if n == 0:
        raise ValueError("no response tokens to measure the KL on")
    device = lora.model.cfg.device
    for start in tqdm(range(0, len(tokens), batch_size), desc="ablations", disable=not progress, leave=False):
        tok, kp = tokens[start : start + batch_size].to(device), keep[start : start + batch_size].to(device)
        full = lora(tok)[:, :-1][kp].log_softmax(-1)
        for name, adapters in sets.items():
            if not adapters:
                continue
            ablated = lora.model.run_with_hooks(tok, fwd_hooks=lora.ablation_hooks(adapters))
            logq = ablated[:, :-1][kp].log_softmax(-1)
            totals[name] += float((full.exp() * (full - logq)).sum())
    return {name: total / n for name, total in totals.items()}


def kl_matrix(kl: dict[str, float], lora: LoRAModel) -> Float[Tensor, "module layer"]:
    """Per-adapter KLs (keys ``L{i}.{m}``) as a ``[module, layer]`` matrix for a heatmap."""
    mods = lora.config.modules
    return torch.tensor([[kl[f"L{i}.{m}"] for i in range(lora.n_layers)] for m in mods])


def mlp_over_attention(kl: dict[str, float], lora: LoRAModel) -> float:
    """Mean per-adapter ablation KL of MLP adapters over that of attention adapters."""

    def mean(group):
        vals = [kl[f"L{i}.{m}"] for i in range(lora.n_layers) for m in lora.config.modules if m in group]
        return sum(vals) / len(vals) if vals else float("nan")

    att = mean(ATTENTION_MODULES)
    return mean(MLP_MODULES) / att if att > 0 else float("nan")
