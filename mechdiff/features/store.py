"""Activation store: one pass over a corpus records what every feature does, in bounded memory.

For any ``(model, hook names)`` (the adapters' ``blocks.L.adapter.hook_acts``, the LoRA state's
``blocks.L.lora.hook_{m}_act``, ...) the features are the hooks' last axes, concatenated in hook
order. One forward per batch caches every hook (``run_with_cache`` with a ``names_filter``, stopped
after the last hooked layer); the statistics are updated with tensor operations over all features:

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

A feature *fires* on a token when its activation exceeds ``threshold`` (>= 0). Buffers have a
fixed size (features x top_k x window); the store is one safetensors file (all tensors, and the
JSON metadata in its header, so a write is atomic) plus a readable ``store.json``. After each chunk
of ``chunk_batches`` batches the store is saved with the number of rows done; calling
:func:`build_store` again on the same folder continues where it stopped, with the same result as
an uninterrupted run.

Example:
    >>> from attribution.synthetic import tiny_adapted
    >>> from mechdiff.features.classify import decoder_directions
    >>> adapted = tiny_adapted(seed=0)
    >>> rows = [[2, 5, 9, 11, 7, 20], [2, 8, 8, 30, 6]]
    >>> names = [adapted.acts_name(layer) for layer in range(2)]
    >>> store = build_store(adapted.model, rows, names, config=StoreConfig(top_k=2, batch_size=2),
    ...                     decoder=decoder_directions(adapted))
    >>> store.n_features, store.n_tokens, store.top_values.shape
    (96, 9, torch.Size([96, 2]))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from mechdiff.atomic import atomic_file, write_json
from mechdiff.features.classify import logit_lens
from mechdiff.padding import pad

REGIONS = ("prompt", "thinking", "answer")
STORE_FILE, META_FILE = "store.safetensors", "store.json"
FORMAT = "mechdiff-activation-store"


class StoreMismatch(ValueError):
    """A store folder holds a store of another model, corpus, hook set or configuration."""


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
        if min(self.top_k, self.n_random, self.batch_size, self.chunk_batches, self.pos_bins,
               self.act_bins, self.feature_group) < 1:
            raise ValueError(f"sizes in {self} must be >= 1")

    @property
    def window(self) -> int:
        return self.before + 1 + self.after


def _empty(n: int, cfg: StoreConfig, d_vocab: int) -> dict[str, Tensor]:
    w, n_lab = cfg.window, max(1, len(cfg.label_names))
    t = {"n_fire": torch.zeros(n, dtype=torch.long), "act_sum": torch.zeros(n, dtype=torch.float64),
         "act_max": torch.full((n,), float("-inf")),
         "act_hist": torch.zeros(n, cfg.act_bins, dtype=torch.long),
         "pos_hist": torch.zeros(n, cfg.pos_bins), "region_count": torch.zeros(n, len(REGIONS)),
         "region_mass": torch.zeros(n, len(REGIONS)), "label_count": torch.zeros(n, n_lab),
         "label_mass": torch.zeros(n, n_lab), "tokens_by_region": torch.zeros(len(REGIONS)),
         "tokens_by_label": torch.zeros(n_lab), "label_token_count": torch.zeros(n_lab, d_vocab)}
    for kind, k in (("top", cfg.top_k), ("rand", cfg.n_random)):
        t[f"{kind}_values"], t[f"{kind}_acts"] = torch.full((n, k), float("-inf")), torch.zeros(n, k, w)
        for field, shape in (("row", (n, k)), ("pos", (n, k)), ("label", (n, k)), ("tokens", (n, k, w))):
            t[f"{kind}_{field}"] = torch.full(shape, -1, dtype=torch.long)
    t["rand_keys"] = torch.full((n, cfg.n_random), float("inf"))
    for side in ("top", "bottom"):
        t[f"lens_{side}_ids"] = torch.full((n, cfg.lens_k), -1, dtype=torch.long)
        t[f"lens_{side}_values"] = torch.full((n, cfg.lens_k), float("nan"))
    return t


class ActivationStore:
    """Per-feature statistics of one pass; tensors are attributes (``store.top_values``, ...)."""

    def __init__(self, hook_names: Sequence[str], widths: Sequence[int], config: StoreConfig,
                 tensors: dict[str, Tensor] | None = None, meta: dict | None = None):
        self.hook_names, self.widths, self.config = list(hook_names), [int(w) for w in widths], config
        self.offsets = [0]
        for w in self.widths:
            self.offsets.append(self.offsets[-1] + w)
        self.meta = {"rows_done": 0, "n_tokens": 0, "seconds": 0.0, "fingerprint": "",
                     "has_lens": False, "d_vocab": 1, **(meta or {})}
        self.t = tensors if tensors is not None else _empty(self.n_features, config, self.meta["d_vocab"])

    def __getattr__(self, name: str) -> Tensor:
        t = self.__dict__.get("t", {})
        if name in t:
            return t[name]
        raise AttributeError(name)

    n_features = property(lambda self: self.offsets[-1])
    n_tokens = property(lambda self: int(self.meta["n_tokens"]), doc="tokens seen (position 0 excluded)")
    rows_done = property(lambda self: int(self.meta["rows_done"]), doc="corpus rows folded in")

    @property
    def density(self) -> Float[Tensor, " n_features"]:
        return self.t["n_fire"].double() / max(1, self.n_tokens)

    @property
    def alive(self) -> Bool[Tensor, " n_features"]:
        """Features that fired at least once."""
        return self.t["n_fire"] > 0

    def locate(self, i: int) -> tuple[str, int]:
        """``(hook name, unit)`` of feature ``i``."""
        if not 0 <= i < self.n_features:
            raise IndexError(f"feature {i} out of range 0..{self.n_features - 1}")
        h = max(j for j in range(len(self.widths)) if self.offsets[j] <= i)
        return self.hook_names[h], i - self.offsets[h]

    def index(self, hook_name: str, unit: int) -> int:
        """The store index of ``unit`` of ``hook_name`` (e.g. an adapter feature of one layer)."""
        h = self.hook_names.index(hook_name)
        if not 0 <= unit < self.widths[h]:
            raise IndexError(f"{hook_name} has {self.widths[h]} units, not {unit}")
        return self.offsets[h] + unit

    def name(self, i: int) -> str:
        """A short name: ``L2/F17`` (adapters), ``L0.gate`` (rank-1 LoRA), else ``hook[unit]``."""
        hook, unit = self.locate(i)
        if m := re.fullmatch(r"blocks\.(\d+)\.adapter\.hook_acts", hook):
            return f"L{m[1]}/F{unit}"
        if m := re.fullmatch(r"blocks\.(\d+)\.lora\.hook_(\w+)_act", hook):
            return f"L{m[1]}.{m[2]}" + (f"[{unit}]" if self.widths[self.hook_names.index(hook)] > 1 else "")
        return f"{hook}[{unit}]"

    def examples(self, i: int, kind: str = "top") -> list[dict]:
        """Feature ``i``'s stored examples (``kind`` "top" or "rand"), best first: dicts with
        ``tokens`` (ids), ``acts``, ``centre`` (index of the max/sampled token), ``value``,
        ``row``, ``pos`` and ``label`` (-1: none)."""
        if kind not in ("top", "rand"):
            raise ValueError(f"kind must be 'top' or 'rand', not {kind!r}")
        t, out = self.t, []
        for j in range(t[f"{kind}_row"].shape[1]):
            if int(t[f"{kind}_row"][i, j]) < 0:
                continue
            toks, acts = t[f"{kind}_tokens"][i, j], t[f"{kind}_acts"][i, j]
            keep = toks >= 0
            centre = int(keep[: self.config.before].sum())
            out.append({"tokens": toks[keep].tolist(), "acts": acts[keep].tolist(), "centre": centre,
                        "value": float(t[f"{kind}_values"][i, j]), "row": int(t[f"{kind}_row"][i, j]),
                        "pos": int(t[f"{kind}_pos"][i, j]), "label": int(t[f"{kind}_label"][i, j])})
        if kind == "rand":
            out.sort(key=lambda e: -e["value"])
        return out

    # ------------------------------------------------------------------ io

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/store.safetensors`` (atomically) and ``folder/store.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "hook_names": self.hook_names, "widths": self.widths,
                "config": dataclasses.asdict(self.config), **self.meta}
        with atomic_file(folder / STORE_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in self.t.items()}, str(tmp),
                      metadata={"mechdiff": json.dumps(meta)})
        write_json(folder / META_FILE, meta)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> ActivationStore:
        """The store saved in ``folder`` (the metadata read from the tensor file's header)."""
        path = Path(folder) / STORE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no activation store in {folder} (expected {STORE_FILE})")
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("mechdiff", "{}"))
            if meta.get("format") != FORMAT:
                raise StoreMismatch(f"{path} is not a {FORMAT} file")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = StoreConfig(**meta.pop("config"))
        return cls(meta.pop("hook_names"), meta.pop("widths"), config, tensors,
                   {k: v for k, v in meta.items() if k != "format"})

    # ------------------------------------------------------------------ update

    @torch.no_grad()
    def update(self, tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"],
               ann: dict[str, Int[Tensor, "batch pos"]], acts_by_hook: Sequence[Float[Tensor, "batch pos _"]],
               batch_index: int, row_offset: int) -> None:
        """Fold one batch (``[batch pos]`` tokens and mask, :func:`annotate` output, one
        ``[batch pos width]`` tensor per hook) into the statistics."""
        valid = mask.clone()
        if self.config.skip_first:
            valid[:, 0] = False
        n_reg, n_lab = len(REGIONS), self.t["label_count"].shape[1]
        onehot = torch.cat([_onehot(ann["region"], n_reg), _onehot(ann["label"], n_lab),
                            _onehot(ann["pos_bin"], self.config.pos_bins)], -1) * valid[..., None]
        onehot = onehot.flatten(0, 1)
        self.t["tokens_by_region"] += onehot[:, :n_reg].sum(0)
        self.t["tokens_by_label"] += onehot[:, n_reg:n_reg + n_lab].sum(0)
        vocab = self.t["label_token_count"].shape[1]
        seen = valid & (ann["label"] >= 0) & (tokens < vocab)
        flat = ann["label"][seen] * vocab + tokens[seen]
        self.t["label_token_count"] += torch.bincount(flat, minlength=n_lab * vocab).view(n_lab, vocab).float()
        self.meta["n_tokens"] += int(valid.sum())
        acts = torch.cat([a.float().cpu() for a in acts_by_hook], -1)  # [batch pos n_features]
        for s in range(0, acts.shape[-1], self.config.feature_group):
            self._update_group(s, acts[..., s:s + self.config.feature_group], tokens, mask, valid,
                               onehot, ann["label"], batch_index, row_offset)

    def _update_group(self, f0, acts, tokens, mask, valid, onehot, labels, batch_index, row_offset):
        cfg, t = self.config, self.t
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
        t["pos_hist"][sl] += counts[:, n_reg + n_lab:]
        lo, hi = cfg.act_log10_range
        bins = ((acts[fire].clamp(min=1e-30).log10() - lo) / (hi - lo) * cfg.act_bins).floor()
        feat = torch.arange(G).expand(B, P, G)[fire]
        flat = feat * cfg.act_bins + bins.clamp(0, cfg.act_bins - 1).long()
        t["act_hist"][sl] += torch.bincount(flat, minlength=G * cfg.act_bins).view(G, cfg.act_bins)
        # top-k sequences by their maximum activation
        seq_max, seq_pos = masked.max(dim=1)  # [B G]
        seq_max = seq_max.masked_fill(seq_max <= cfg.threshold, float("-inf"))
        vals, b = seq_max.topk(min(cfg.top_k, B), dim=0)  # [k G]
        self._merge("top", sl, vals, b, seq_pos.gather(0, b), vals, acts, tokens, mask, valid,
                    labels, row_offset, largest=True)
        # reservoir: the n_random firing tokens with the smallest seeded random keys
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + batch_index * 7919 + f0)
        keys = torch.rand(B, P, G, generator=gen).masked_fill(~fire, float("inf")).flatten(0, 1)
        neg, idx = (-keys).topk(min(cfg.n_random, B * P), dim=0)
        rand_vals = acts.flatten(0, 1).gather(0, idx)
        self._merge("rand", sl, -neg, idx // P, idx % P, rand_vals, acts, tokens, mask, valid,
                    labels, row_offset, largest=False)

    def _merge(self, kind, sl, keys, b, p, vals, acts, tokens, mask, valid, labels, row_offset, largest):
        """Merge candidates ``[k G]`` (sort keys, batch rows, positions, values) into the buffers."""
        cfg, t = self.config, self.t
        P, G = acts.shape[1], acts.shape[2]
        offs = torch.arange(-cfg.before, cfg.after + 1)
        wpos = p[..., None] + offs  # [k G W]
        wp = wpos.clamp(0, P - 1)
        bw = b[..., None].expand_as(wpos)
        inside = (wpos >= 0) & (wpos < P) & mask[bw, wp]
        new = {"tokens": tokens[bw, wp].masked_fill(~inside, -1),
               "acts": acts[bw, wp, torch.arange(G)[None, :, None].expand_as(wpos)]
               .masked_fill(~(inside & valid[bw, wp]), 0.0),
               "values": vals, "row": b + row_offset, "pos": p, "label": labels[b, p]}
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


def annotate(tokens: Int[Tensor, "batch pos"], mask: Bool[Tensor, "batch pos"],
             prompt_len: Int[Tensor, " batch"], label_ids: Int[Tensor, "batch pos"] | None,
             think_ids: tuple[int, int] | None, pos_bins: int) -> dict[str, Int[Tensor, "batch pos"]]:
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


def _corpus_rows(corpus, i: int, j: int) -> tuple[list, list | None, list | None]:
    if hasattr(corpus, "column_names"):  # a datasets.Dataset: slice by column
        batch = corpus[i:j]
        return batch["input_ids"], batch.get("prompt_len"), batch.get("label_ids")
    rows = list(corpus[i:j])
    if rows and isinstance(rows[0], dict):
        get = lambda key: [r[key] for r in rows] if key in rows[0] else None
        return get("input_ids"), get("prompt_len"), get("label_ids")
    return [list(r) for r in rows], None, None


def _fingerprint(model, corpus, hook_names, widths, config) -> str:
    n = len(corpus)
    ends = [_corpus_rows(corpus, i, i + 1)[0][0] for i in sorted({0, n - 1})] if n else []
    norms = [round(float(p.detach().float().norm()), 4) for p in model.parameters()]
    text = json.dumps([n, [list(map(int, e)) for e in ends], norms, hook_names, widths,
                       dataclasses.asdict(config)], default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_store(
    model, corpus, hook_names: Sequence[str], folder: str | Path | None = None, *,
    config: StoreConfig | None = None, decoder: Float[Tensor, "n_features d_model"] | None = None,
    pad_id: int = 0, progress: bool = False, on_chunk: Callable[[ActivationStore], None] | None = None,
) -> ActivationStore:
    """One pass of ``model`` over ``corpus``, caching ``hook_names``; see the module docstring.

    ``corpus``: a ``datasets.Dataset`` or list of dicts with ``input_ids`` (and optionally
    ``prompt_len`` and ``label_ids`` indexing ``config.label_names``), or lists of token ids.
    ``decoder``: one residual direction per feature for the logit lens (or None).
    ``folder``: saved after every chunk; an unfinished store there is continued (a store of another
    model, corpus or config raises :class:`StoreMismatch`). ``on_chunk`` is called after each save.
    """
    config = config or StoreConfig()
    names = list(hook_names)
    if not names:
        raise ValueError("give at least one hook name")
    unknown = [n for n in names if n not in model.hook_dict]
    if unknown:
        raise ValueError(f"model has no hook points {unknown[:3]}; e.g. {list(model.hook_dict)[:3]}")
    layers = [int(m[1]) for n in names if (m := re.match(r"blocks\.(\d+)\.", n))]
    stop = max(layers) + 1 if len(layers) == len(names) else None
    device = model.cfg.device

    def forward(ids):
        tokens, mask = pad([list(r) for r in ids], pad_id, "right")
        _, cache = model.run_with_cache(tokens.to(device), names_filter=lambda n: n in names,
                                        stop_at_layer=stop)
        return tokens, mask, [cache[n] for n in names]

    if len(corpus) == 0:
        raise ValueError("the corpus is empty")
    with torch.no_grad():
        widths = [a.shape[-1] for a in forward(_corpus_rows(corpus, 0, 1)[0])[2]]
    fp = _fingerprint(model, corpus, names, widths, config)
    if folder is not None and (Path(folder) / STORE_FILE).is_file():
        store = ActivationStore.load(folder)
        if store.meta.get("fingerprint") != fp:
            raise StoreMismatch(f"{folder} holds a store of another model, corpus or config; "
                                "delete it or choose another folder")
    else:
        store = ActivationStore(names, widths, config, meta={"fingerprint": fp, "n_rows": len(corpus),
                                                             "d_vocab": int(model.cfg.d_vocab)})
        if decoder is not None:
            if decoder.shape[0] != store.n_features:
                raise ValueError(f"decoder has {decoder.shape[0]} rows, the hooks {store.n_features} units")
            store.t.update(logit_lens(model, decoder, config.lens_k))
            store.meta["has_lens"] = True
    bs, per_chunk = config.batch_size, config.batch_size * config.chunk_batches
    bar = tqdm(total=len(corpus), initial=store.rows_done, desc="activation store", disable=not progress)
    for chunk in range(store.rows_done, len(corpus), per_chunk):
        t0 = time.perf_counter()
        for i in range(chunk, min(chunk + per_chunk, len(corpus)), bs):
            ids, plen, labs = _corpus_rows(corpus, i, min(i + bs, len(corpus)))
            with torch.no_grad():
                tokens, mask, acts = forward(ids)
            plen = torch.tensor(plen if plen is not None else [0] * len(ids))
            lab = pad([list(r) for r in labs], -1, "right")[0] if labs is not None else None
            ann = annotate(tokens, mask, plen, lab, config.think_ids, config.pos_bins)
            store.update(tokens, mask, ann, acts, i // bs, i)
            bar.update(len(ids))
        store.meta["rows_done"] = min(chunk + per_chunk, len(corpus))
        store.meta["seconds"] += time.perf_counter() - t0
        if folder is not None:
            store.save(folder)
        if on_chunk is not None:
            on_chunk(store)
    bar.close()
    return store
