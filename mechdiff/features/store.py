"""Activation store: one pass over a corpus records what every feature does, in bounded memory.

For any ``(model, hook names)`` (the adapters' ``blocks.L.adapter.hook_acts``, the LoRA state's
``blocks.L.lora.hook_{m}_act``, ...) the features are the hooks' last axes, concatenated in hook
order. One forward per batch caches every hook (``run_with_cache`` with a ``names_filter``, stopped
after the last hooked layer), and each batch is folded into per-feature statistics.
What is kept, and how one batch updates it, is :mod:`mechdiff.features.store_statistics` (top and
random examples with their token windows, firing counts, activation histograms, region / position /
label counts and masses, and a logit lens of each feature's residual direction when given).

A feature *fires* on a token when its activation exceeds ``threshold`` (>= 0). Buffers have a
fixed size (features x top_k x window). This module holds them (:class:`ActivationStore`), runs the
pass (:func:`build_store`) and reads and writes the store folder: one safetensors file (all tensors,
and the JSON metadata in its header, so a write is atomic) plus a readable ``store.json``. After each chunk
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
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from mechdiff.atomic import atomic_file, write_json
from mechdiff.features.classify import logit_lens
from mechdiff.features.store_statistics import (
    REGIONS,
    StoreConfig,
    annotate,
    empty_statistics,
    fold_batch,
)
from mechdiff.padding import pad

__all__ = [  # REGIONS, StoreConfig and annotate live in store_statistics, and are importable from here too
    "FORMAT", "META_FILE", "REGIONS", "STORE_FILE", "ActivationStore", "StoreConfig", "StoreMismatch", "annotate",
    "build_store",
]  # fmt: skip
STORE_FILE, META_FILE = "store.safetensors", "store.json"
FORMAT = "mechdiff-activation-store"


class StoreMismatch(ValueError):
    """A store folder holds a store of another model, corpus, hook set or configuration."""


class ActivationStore:
    """Per-feature statistics of one pass; tensors are attributes (``store.top_values``, ...)."""

    def __init__(
        self,
        hook_names: Sequence[str],
        widths: Sequence[int],
        config: StoreConfig,
        tensors: dict[str, Tensor] | None = None,
        meta: dict | None = None,
    ):
        self.hook_names, self.widths, self.config = list(hook_names), [int(w) for w in widths], config
        self.offsets = [0]
        for w in self.widths:
            self.offsets.append(self.offsets[-1] + w)
        self.meta = {
            "rows_done": 0,
            "n_tokens": 0,
            "seconds": 0.0,
            "fingerprint": "",
            "has_lens": False,
            "d_vocab": 1,
            **(meta or {}),
        }
        self.t = tensors if tensors is not None else empty_statistics(self.n_features, config, self.meta["d_vocab"])

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
            out.append(
                {
                    "tokens": toks[keep].tolist(),
                    "acts": acts[keep].tolist(),
                    "centre": centre,
                    "value": float(t[f"{kind}_values"][i, j]),
                    "row": int(t[f"{kind}_row"][i, j]),
                    "pos": int(t[f"{kind}_pos"][i, j]),
                    "label": int(t[f"{kind}_label"][i, j]),
                }
            )
        if kind == "rand":
            out.sort(key=lambda e: -e["value"])
        return out

    def update(
        self,
        tokens: Int[Tensor, "batch pos"],
        mask: Bool[Tensor, "batch pos"],
        ann: dict[str, Int[Tensor, "batch pos"]],
        acts_by_hook: Sequence[Float[Tensor, "batch pos _"]],
        batch_index: int,
        row_offset: int,
    ) -> None:
        """Fold one batch into the statistics (see :func:`~mechdiff.features.store_statistics.fold_batch`)."""
        self.meta["n_tokens"] += fold_batch(
            self.t, self.config, tokens, mask, ann, acts_by_hook, batch_index, row_offset
        )

    # ------------------------------------------------------------------ io

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/store.safetensors`` (atomically) and ``folder/store.json``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        meta = {
            "format": FORMAT,
            "hook_names": self.hook_names,
            "widths": self.widths,
            "config": dataclasses.asdict(self.config),
            **self.meta,
        }
        with atomic_file(folder / STORE_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in self.t.items()}, str(tmp), metadata={"mechdiff": json.dumps(meta)})
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
        return cls(
            meta.pop("hook_names"),
            meta.pop("widths"),
            config,
            tensors,
            {k: v for k, v in meta.items() if k != "format"},
        )


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
    text = json.dumps(
        [n, [list(map(int, e)) for e in ends], norms, hook_names, widths, dataclasses.asdict(config)], default=str
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_store(
    model,
    corpus,
    hook_names: Sequence[str],
    folder: str | Path | None = None,
    *,
    config: StoreConfig | None = None,
    decoder: Float[Tensor, "n_features d_model"] | None = None,
    pad_id: int = 0,
    progress: bool = False,
    on_chunk: Callable[[ActivationStore], None] | None = None,
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
        _, cache = model.run_with_cache(tokens.to(device), names_filter=lambda n: n in names, stop_at_layer=stop)
        return tokens, mask, [cache[n] for n in names]

    if len(corpus) == 0:
        raise ValueError("the corpus is empty")
    with torch.no_grad():
        widths = [a.shape[-1] for a in forward(_corpus_rows(corpus, 0, 1)[0])[2]]
    fp = _fingerprint(model, corpus, names, widths, config)
    if folder is not None and (Path(folder) / STORE_FILE).is_file():
        store = ActivationStore.load(folder)
        if store.meta.get("fingerprint") != fp:
            raise StoreMismatch(
                f"{folder} holds a store of another model, corpus or config; delete it or choose another folder"
            )
    else:
        store = ActivationStore(
            names, widths, config, meta={"fingerprint": fp, "n_rows": len(corpus), "d_vocab": int(model.cfg.d_vocab)}
        )
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
