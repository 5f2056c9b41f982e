"""What an activation store keeps per feature, and how one batch of activations updates it.

The statistics are a dict of tensors of fixed size (features x top_k x window), updated with tensor
operations over all features (in groups of ``feature_group``) by :func:`fold_batch`:

* ``top_*``: the ``top_k`` sequences with the largest maximum activation, each centred on its
  maximum token: token window (``before`` + 1 + ``after`` ids, -1 outside the sequence), the
  feature's activation on every window token, row, position and the centre token's label;
* ``rand_*``: ``n_random`` firing tokens drawn uniformly (seeded bottom-k of random keys, an exact
  reservoir sample that merges across batches), with the same window fields;
* ``n_fire`` (density = ``n_fire / n_tokens``), ``act_sum``, ``act_max``, ``act_hist`` (log10-spaced
  bins of the firing activations), ``region_count``/``region_mass`` over :data:`REGIONS` (prompt,
  thinking span, answer), ``pos_hist`` (relative position within the thinking span, firing tokens),
  ``label_count``/``label_mass`` over ground-truth token labels when the corpus has them, and the
  corpus' token counts per region, label and (label, token id);
* ``lens_*``: logit lens of a residual direction per feature, when given (see
  :func:`mechdiff.features.classify.logit_lens`, :func:`~mechdiff.features.classify.decoder_directions`).

A feature *fires* on a token when its activation exceeds ``threshold`` (>= 0). The store that holds
these tensors, saves and resumes them is :mod:`mechdiff.features.store`.

Example:
    >>> cfg = StoreConfig(top_k=2, n_random=1, before=1, after=0, skip_first=False)
    >>> t = empty_statistics(3, cfg, d_vocab=10)
    >>> tokens, mask = torch.tensor([[4, 5, 6]]), torch.ones(1, 3, dtype=torch.bool)
    >>> ann = annotate(tokens, mask, torch.tensor([1]), None, None, cfg.pos_bins)
    >>> acts = torch.tensor([[[0.0, 1.0, 2.0], [3.0, 0.0, 0.5], [0.0, 0.0, 4.0]]])  # [batch pos feature]
    >>> fold_batch(t, cfg, tokens, mask, ann, [acts], batch_index=0, row_offset=0)
    3
    >>> t["n_fire"].tolist(), t["act_max"].tolist(), t["top_tokens"][2, 0].tolist()
    ([1, 1, 3], [3.0, 1.0, 4.0], [5, 6])
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

REGIONS = ("prompt", "thinking", "answer")


@dataclass
class StoreConfig:
    """What the store keeps per feature, and how the pass is batched (part of the fingerprint)."""

    top_k: int = 16
    n_random: int = 8
    before: int = 10  # context tokens before the centre token
    after: int = 4
    threshold: float = 0.0
    act_bins: int = 30
    act_log10_range: tuple[float, float] = (-3.0, 2.0)  # edges of the activation histogram
    pos_bins: int = 10
    lens_k: int = 8
    batch_size: int = 64
    chunk_batches: int = 4
    feature_group: int = 8192  # features updated at once (bounds the per-batch working memory)
    skip_first: bool = True  # ignore position 0 (BOS) of every row
    seed: int = 0
    think_ids: tuple[int, int] | None = None  # (open, close) ids of the thinking span's delimiters
    label_names: tuple[str, ...] = ()

    def __post_init__(self):
        self.act_log10_range = tuple(self.act_log10_range)
        self.think_ids = tuple(self.think_ids) if self.think_ids is not None else None
        self.label_names = tuple(self.label_names)
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0, not {self.threshold}")
        if (
            min(
                self.top_k,
                self.n_random,
                self.batch_size,
                self.chunk_batches,
                self.pos_bins,
                self.act_bins,
                self.feature_group,
            )
            < 1
        ):
            raise ValueError(f"sizes in {self} must be >= 1")

    @property
    def window(self) -> int:
        return self.before + 1 + self.after


def empty_statistics(n: int, cfg: StoreConfig, d_vocab: int) -> dict[str, Tensor]:
    """The statistics of ``n`` features before any batch (fixed sizes: see :class:`StoreConfig`)."""
    w, n_lab = cfg.window, max(1, len(cfg.label_names))
    t = {
        "n_fire": torch.zeros(n, dtype=torch.long),
        "act_sum": torch.zeros(n, dtype=torch.float64),
        "act_max": torch.full((n,), float("-inf")),
        "act_hist": torch.zeros(n, cfg.act_bins, dtype=torch.long),
        "pos_hist": torch.zeros(n, cfg.pos_bins),
        "region_count": torch.zeros(n, len(REGIONS)),
        "region_mass": torch.zeros(n, len(REGIONS)),
        "label_count": torch.zeros(n, n_lab),
        "label_mass": torch.zeros(n, n_lab),
        "tokens_by_region": torch.zeros(len(REGIONS)),
        "tokens_by_label": torch.zeros(n_lab),
        "label_token_count": torch.zeros(n_lab, d_vocab),
    }
    for kind, k in (("top", cfg.top_k), ("rand", cfg.n_random)):
        t[f"{kind}_values"], t[f"{kind}_acts"] = torch.full((n, k), float("-inf")), torch.zeros(n, k, w)
        for field, shape in (("row", (n, k)), ("pos", (n, k)), ("label", (n, k)), ("tokens", (n, k, w))):
            t[f"{kind}_{field}"] = torch.full(shape, -1, dtype=torch.long)
    t["rand_keys"] = torch.full((n, cfg.n_random), float("inf"))
    for side in ("top", "bottom"):
        t[f"lens_{side}_ids"] = torch.full((n, cfg.lens_k), -1, dtype=torch.long)
        t[f"lens_{side}_values"] = torch.full((n, cfg.lens_k), float("nan"))
    return t


@torch.no_grad()
def fold_batch(
    t: dict[str, Tensor],
    config: StoreConfig,
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"],
    ann: dict[str, Int[Tensor, "batch pos"]],
    acts_by_hook: Sequence[Float[Tensor, "batch pos _"]],
    batch_index: int,
    row_offset: int,
) -> int:
    """Fold one batch (``[batch pos]`` tokens and mask, :func:`annotate` output, one
    ``[batch pos width]`` tensor per hook) into the statistics ``t`` in place; return the number of
    tokens it counted (``mask``, less position 0 under ``config.skip_first``)."""
    valid = mask.clone()
    if config.skip_first:
        valid[:, 0] = False
    n_reg, n_lab = len(REGIONS), t["label_count"].shape[1]
    onehot = (
        torch.cat(
            [_onehot(ann["region"], n_reg), _onehot(ann["label"], n_lab), _onehot(ann["pos_bin"], config.pos_bins)], -1
        )
        * valid[..., None]
    )
    onehot = onehot.flatten(0, 1)
    t["tokens_by_region"] += onehot[:, :n_reg].sum(0)
    t["tokens_by_label"] += onehot[:, n_reg : n_reg + n_lab].sum(0)
    vocab = t["label_token_count"].shape[1]
    seen = valid & (ann["label"] >= 0) & (tokens < vocab)
    flat = ann["label"][seen] * vocab + tokens[seen]
    t["label_token_count"] += torch.bincount(flat, minlength=n_lab * vocab).view(n_lab, vocab).float()
    acts = torch.cat([a.float().cpu() for a in acts_by_hook], -1)  # [batch pos n_features]
    for s in range(0, acts.shape[-1], config.feature_group):
        _update_group(
            t,
            config,
            s,
            acts[..., s : s + config.feature_group],
            tokens,
            mask,
            valid,
            onehot,
            ann["label"],
            batch_index,
            row_offset,
        )
    return int(valid.sum())


def _update_group(t, cfg, f0, acts, tokens, mask, valid, onehot, labels, batch_index, row_offset):
    B, P, G = acts.shape
    sl = slice(f0, f0 + G)
    fire = (acts > cfg.threshold) & valid[..., None]
    firef = fire.float()
    mass = acts * firef
    t["n_fire"][sl] += fire.sum((0, 1))
    t["act_sum"][sl] += mass.sum((0, 1)).double()
    masked = acts.masked_fill(~valid[..., None], float("-inf"))
    t["act_max"][sl] = torch.maximum(t["act_max"][sl], masked.amax((0, 1)))
    counts, masses = firef.flatten(0, 1).T @ onehot, mass.flatten(0, 1).T @ onehot
    n_reg, n_lab = len(REGIONS), t["label_count"].shape[1]
    for name, lo, hi in (("region", 0, n_reg), ("label", n_reg, n_reg + n_lab)):
        t[f"{name}_count"][sl] += counts[:, lo:hi]
        t[f"{name}_mass"][sl] += masses[:, lo:hi]
    t["pos_hist"][sl] += counts[:, n_reg + n_lab :]
    lo, hi = cfg.act_log10_range
    bins = ((acts[fire].clamp(min=1e-30).log10() - lo) / (hi - lo) * cfg.act_bins).floor()
    feat = torch.arange(G).expand(B, P, G)[fire]
    flat = feat * cfg.act_bins + bins.clamp(0, cfg.act_bins - 1).long()
    t["act_hist"][sl] += torch.bincount(flat, minlength=G * cfg.act_bins).view(G, cfg.act_bins)
    # top-k sequences by their maximum activation
    seq_max, seq_pos = masked.max(dim=1)  # [B G]
    seq_max = seq_max.masked_fill(seq_max <= cfg.threshold, float("-inf"))
    vals, b = seq_max.topk(min(cfg.top_k, B), dim=0)  # [k G]
    _merge(
        t,
        cfg,
        "top",
        sl,
        vals,
        b,
        seq_pos.gather(0, b),
        vals,
        acts,
        tokens,
        mask,
        valid,
        labels,
        row_offset,
        largest=True,
    )
    # reservoir: the n_random firing tokens with the smallest seeded random keys
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + batch_index * 7919 + f0)
    keys = torch.rand(B, P, G, generator=gen).masked_fill(~fire, float("inf")).flatten(0, 1)
    neg, idx = (-keys).topk(min(cfg.n_random, B * P), dim=0)
    rand_vals = acts.flatten(0, 1).gather(0, idx)
    _merge(
        t,
        cfg,
        "rand",
        sl,
        -neg,
        idx // P,
        idx % P,
        rand_vals,
        acts,
        tokens,
        mask,
        valid,
        labels,
        row_offset,
        largest=False,
    )


def _merge(t, cfg, kind, sl, keys, b, p, vals, acts, tokens, mask, valid, labels, row_offset, largest):
    """Merge candidates ``[k G]`` (sort keys, batch rows, positions, values) into the buffers."""
    P, G = acts.shape[1], acts.shape[2]
    offs = torch.arange(-cfg.before, cfg.after + 1)
    wpos = p[..., None] + offs  # [k G W]
    wp = wpos.clamp(0, P - 1)
    bw = b[..., None].expand_as(wpos)
    inside = (wpos >= 0) & (wpos < P) & mask[bw, wp]
    new = {
        "tokens": tokens[bw, wp].masked_fill(~inside, -1),
        "acts": acts[bw, wp, torch.arange(G)[None, :, None].expand_as(wpos)].masked_fill(
            ~(inside & valid[bw, wp]), 0.0
        ),
        "values": vals,
        "row": b + row_offset,
        "pos": p,
        "label": labels[b, p],
    }
    key_name = "values" if kind == "top" else "keys"
    all_keys = torch.cat([t[f"{kind}_{key_name}"][sl], keys.T], 1)
    k = t[f"{kind}_{key_name}"].shape[1]
    best, sel = all_keys.topk(k, dim=1, largest=largest)
    empty = ~torch.isfinite(best)
    for field in ("values", "row", "pos", "label", "tokens", "acts"):
        old, cand = t[f"{kind}_{field}"][sl], new[field].transpose(0, 1)
        merged = torch.cat([old, cand.to(old.dtype)], 1)
        index = sel if merged.ndim == 2 else sel[..., None].expand(-1, -1, merged.shape[2])
        merged = merged.gather(1, index)
        fill = {"values": float("-inf"), "acts": 0.0}.get(field, -1)
        t[f"{kind}_{field}"][sl] = merged.masked_fill(empty if merged.ndim == 2 else empty[..., None], fill)
    if kind == "rand":
        t["rand_keys"][sl] = best


def _onehot(index: Tensor, n: int) -> Tensor:
    """One-hot over the last axis; -1 entries give all-zero rows."""
    return torch.nn.functional.one_hot(index.clamp(min=0), n).float() * (index >= 0)[..., None]


def annotate(
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"],
    prompt_len: Int[Tensor, " batch"],
    label_ids: Int[Tensor, "batch pos"] | None,
    think_ids: tuple[int, int] | None,
    pos_bins: int,
) -> dict[str, Int[Tensor, "batch pos"]]:
    """Per token of a right-padded batch: ``region`` (index into :data:`REGIONS`, -1 on padding),
    ``label`` (-1 when none) and ``pos_bin`` (bin of the relative position in the thinking span,
    from its opening delimiter (0) to its closing one (1); -1 outside it).

    Positions before ``prompt_len`` are the prompt; the first ``think_ids[0]`` after it opens the
    thinking span, the next ``think_ids[1]`` (or the end of the row) closes it; the rest is answer.

    >>> ann = annotate(torch.tensor([[1, 5, 7, 6, 8, 9]]), torch.ones(1, 6, dtype=torch.bool),
    ...                torch.tensor([2]), None, (7, 8), pos_bins=2)
    >>> ann["region"].tolist(), ann["pos_bin"].tolist()
    ([[0, 0, 1, 1, 1, 2]], [[-1, -1, 0, 1, 1, -1]])
    """
    B, P = tokens.shape
    pos = torch.arange(P)[None].expand(B, P)
    prompt = pos < prompt_len[:, None]
    think = torch.zeros_like(mask)
    rel = torch.zeros(B, P)
    if think_ids is not None:
        is_open = (tokens == think_ids[0]) & ~prompt & mask
        has_open = is_open.any(1)
        open_pos = torch.where(has_open, is_open.int().argmax(1), P)
        is_close = (tokens == think_ids[1]) & (pos > open_pos[:, None]) & mask
        close_pos = torch.where(is_close.any(1), is_close.int().argmax(1), mask.sum(1) - 1)
        think = (pos >= open_pos[:, None]) & (pos <= close_pos[:, None]) & mask
        rel = (pos - open_pos[:, None]) / (close_pos - open_pos).clamp(min=1)[:, None]
    region = torch.where(prompt, 0, torch.where(think, 1, 2)).masked_fill(~mask, -1)
    pos_bin = (rel * pos_bins).floor().long().clamp(0, pos_bins - 1).masked_fill(~think, -1)
    label = torch.full((B, P), -1, dtype=torch.long) if label_ids is None else label_ids
    return {"region": region, "label": label.masked_fill(~mask, -1), "pos_bin": pos_bin}
