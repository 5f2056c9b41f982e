"""Edit adapter features: the one way to ablate, steer, keep only, mean-ablate or patch them.

An :class:`Edit` acts on ``blocks.{layer}.adapter.hook_acts`` of an :class:`AdaptedModel`. Build
edits with :func:`ablate`, :func:`steer`, :func:`keep_only`, :func:`mean_ablate` or :func:`patch`,
turn them into TransformerLens hooks with :func:`edit_hooks`, and run them anywhere hooks run:
``model.hooks(fwd_hooks=...)``, ``run_with_hooks``, :func:`mechdiff.generation.generate`.

Positions are *absolute*: position 0 is each prompt's first real token (left padding is not
counted), and they keep counting across KV-cached forwards, so ``positions=[0]`` edits the BOS
only, never every generated token. The adapted model records each forward's positions from its
``attention_mask`` and ``past_kv_cache`` arguments (a forward pre-hook installed by
:class:`~mechdiff.adapters.transcoder.AdaptedModel`); the hooks read them. ``positions=None``
edits every real position.

Features are ``(layer, feature)`` pairs, or ``(layer, position, feature)`` triples for an edit at
one position. Everything is vectorised: one masked write per layer and forward.

Example:
    >>> import torch
    >>> from attribution.synthetic import tiny_adapted
    >>> from mechdiff.generation import generate
    >>> adapted = tiny_adapted(seed=0)
    >>> prompt = [2, 5, 9, 11, 7]
    >>> hooks = edit_hooks(adapted, steer([(1, 3)], 50.0, mode="add", positions=[0]))
    >>> seen = []  # the absolute positions feature 3 is edited at, forward by forward
    >>> def spy(acts, hook):
    ...     seen.append((acts[0, :, 3] > 40).nonzero()[:, 0].tolist())
    >>> _ = generate(adapted.model, [prompt], 3, eos_token_id=None,
    ...              fwd_hooks=hooks + [(adapted.acts_name(1), spy)])
    >>> seen  # the prompt's BOS, then no generated token
    [[0], [], []]
    >>> keep = edit_hooks(adapted, keep_only([(0, 4), (1, 3)]))  # every other feature zeroed
    >>> _, cache = adapted.model.run_with_cache(torch.tensor([prompt]), names_filter=adapted.acts_name(0))
    >>> with adapted.model.hooks(fwd_hooks=keep):
    ...     _, kept = adapted.model.run_with_cache(torch.tensor([prompt]), names_filter=adapted.acts_name(0))
    >>> bool((kept[adapted.acts_name(0)][..., 5:] == 0).all())
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

OPS = ("set", "add", "scale", "keep_only", "mean", "patch")
MODES = ("set", "add", "scale")


@dataclass(frozen=True, eq=False)
class Edit:
    """One edit of ``features`` at ``layer`` (``None``: every layer, for ``keep_only``).

    ``op``: ``set`` / ``add`` / ``scale`` by ``value``; ``keep_only`` zeroes every feature not in
    ``features`` (then ``(layer, feature)`` pairs); ``mean`` sets them to ``value`` (a tensor, one
    mean per feature); ``patch`` sets them to ``value``, another run's activations
    ``[batch or 1, pos, len(features)]`` indexed by absolute position. ``positions``: absolute
    positions, or ``None`` for all.
    """

    layer: int | None
    features: tuple
    op: str = "set"
    value: float | Tensor = 0.0
    positions: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, not {self.op!r}")
        if self.positions is not None and any(p < 0 for p in self.positions):
            raise ValueError(f"positions are absolute (>= 0), got {self.positions}")


def _grouped(features: Iterable[Sequence[int]], positions: Sequence[int] | None) -> dict:
    """``{(layer, positions): [feature, ...]}`` from pairs (at ``positions``) or triples."""
    groups: dict[tuple, list[int]] = {}
    pos = None if positions is None else tuple(int(p) for p in positions)
    for f in features:
        f = tuple(int(x) for x in f)
        if len(f) == 3:
            if positions is not None:
                raise ValueError("give positions either in (layer, pos, feature) triples or in positions=")
            groups.setdefault((f[0], (f[1],)), []).append(f[2])
        elif len(f) == 2:
            groups.setdefault((f[0], pos), []).append(f[1])
        else:
            raise ValueError(f"a feature is (layer, feature) or (layer, pos, feature), not {f}")
    return groups


def steer(
    features: Iterable[Sequence[int]], value: float, mode: str = "add", positions: Sequence[int] | None = None
) -> list[Edit]:
    """``add`` ``value`` to, ``set`` to ``value`` or ``scale`` by ``value`` the ``features``.

    Example:
        >>> steer([(2, 17), (2, 4)], 3.0, mode="scale")[0].features
        (17, 4)
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, not {mode!r}")
    return [
        Edit(layer, tuple(feats), mode, float(value), pos)
        for (layer, pos), feats in _grouped(features, positions).items()
    ]


def ablate(features: Iterable[Sequence[int]], positions: Sequence[int] | None = None) -> list[Edit]:
    """Zero ``features``.

    Example:
        >>> ablate([(0, 3, 12)])[0]
        Edit(layer=0, features=(12,), op='set', value=0.0, positions=(3,))
    """
    return steer(features, 0.0, "set", positions)


def keep_only(features: Iterable[Sequence[int]], positions: Sequence[int] | None = None) -> list[Edit]:
    """Zero every adapter feature of every layer except ``features`` (``(layer, feature)`` pairs).

    Example:
        >>> keep_only([(1, 5), (0, 2)])[0].layer is None
        True
    """
    pairs = tuple(sorted({(int(la), int(f)) for la, f in features}))
    pos = None if positions is None else tuple(int(p) for p in positions)
    return [Edit(None, pairs, "keep_only", 0.0, pos)]


def mean_ablate(
    features: Iterable[Sequence[int]], means: Float[Tensor, "layer d_sae"], positions: Sequence[int] | None = None
) -> list[Edit]:
    """Set ``features`` to their mean activation ``means[layer, feature]`` (see :func:`feature_means`).

    Example:
        >>> mean_ablate([(1, 2)], torch.arange(8.0).reshape(2, 4))[0].value
        tensor([6.])
    """
    return [
        Edit(layer, tuple(feats), "mean", means[layer, list(feats)].detach().clone(), pos)
        for (layer, pos), feats in _grouped(features, positions).items()
    ]


def patch(
    features: Iterable[Sequence[int]],
    source: Mapping[int, Float[Tensor, "batch pos d_sae"]],
    positions: Sequence[int] | None = None,
) -> list[Edit]:
    """Set ``features`` to their activations in another run: ``source[layer]`` is that run's
    ``[batch or 1, pos, d_sae]`` activations (see :func:`record`), read at the same absolute
    positions (positions past its end are left unedited).

    Example:
        >>> src = {0: torch.ones(1, 3, 4)}
        >>> patch([(0, 1)], src)[0].value.shape
        torch.Size([1, 3, 1])
    """
    return [
        Edit(layer, tuple(feats), "patch", source[layer][..., list(feats)].detach().clone(), pos)
        for (layer, pos), feats in _grouped(features, positions).items()
    ]


@torch.no_grad()
def record(adapted, tokens: Int[Tensor, "batch pos"], **kwargs) -> dict[int, Float[Tensor, "batch pos d_sae"]]:
    """Every layer's feature activations on ``tokens`` (``kwargs`` go to the forward): a
    :func:`patch` source.

    Example:
        >>> from attribution.synthetic import tiny_adapted
        >>> acts = record(tiny_adapted(seed=0), torch.tensor([[2, 5, 9]]))
        >>> acts[1].shape[:2]
        torch.Size([1, 3])
    """
    names = {adapted.acts_name(la): la for la in range(adapted.config.n_layers)}
    _, cache = adapted.model.run_with_cache(tokens, names_filter=list(names), **kwargs)
    return {la: cache[name] for name, la in names.items()}


@torch.no_grad()
def feature_means(
    adapted,
    tokens: Int[Tensor, "batch pos"],
    mask: Tensor | None = None,
) -> Float[Tensor, "layer d_sae"]:
    """Mean activation of every feature over the (unmasked) positions of ``tokens``."""
    acts = record(adapted, tokens, **({"attention_mask": mask.long()} if mask is not None else {}))
    keep = torch.ones(tokens.shape, dtype=torch.bool) if mask is None else mask.bool()
    keep = keep.to(acts[0].device)
    return torch.stack([(a * keep[..., None]).sum((0, 1)) / keep.sum() for a in acts.values()])


def edit_hooks(adapted, edits: Sequence[Edit]) -> list[tuple[str, _LayerEdits]]:
    """``(hook_name, fn)`` pairs applying ``edits`` to ``adapted``; reusable across runs.

    Raises ``IndexError`` for a layer or feature out of range.
    """
    n_layers, d_sae = adapted.config.n_layers, adapted.config.d_sae
    per_layer: dict[int, list[Edit]] = {}
    for e in edits:
        pairs = e.features if e.layer is None else [(e.layer, f) for f in e.features]
        for layer, f in pairs:
            if not 0 <= layer < n_layers or not 0 <= f < d_sae:
                raise IndexError(
                    f"feature (layer {layer}, feature {f}) is out of range ({n_layers} layers, d_sae {d_sae})"
                )
        if e.layer is not None:
            per_layer.setdefault(e.layer, []).append(e)
            continue
        for layer in range(n_layers):  # keep_only over every layer: each layer's kept features
            kept = tuple(f for la, f in e.features if la == layer)
            per_layer.setdefault(layer, []).append(Edit(layer, kept, e.op, e.value, e.positions))
    return [(adapted.acts_name(layer), _LayerEdits(adapted.positions, es)) for layer, es in sorted(per_layer.items())]


class PositionTracker:
    """Records the absolute positions of the tokens of each forward of a ``HookedTransformer``
    (a forward pre-hook: it reads ``attention_mask`` and ``past_kv_cache``)."""

    def __init__(self):
        self.current: Tensor | None = None

    def __call__(self, module, args, kwargs) -> None:
        tokens = args[0] if args else kwargs.get("input")
        self.current = None
        if not torch.is_tensor(tokens) or tokens.is_floating_point() or tokens.dim() not in (1, 2):
            return  # strings or embeddings: positions fall back to 0..n-1
        tokens = tokens if tokens.dim() == 2 else tokens[None]
        mask = kwargs.get("attention_mask")
        mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask.to(tokens.device).bool()
        cache = kwargs.get("past_kv_cache")
        before = torch.zeros(tokens.shape[0], dtype=torch.long, device=tokens.device)
        if cache is not None and cache.previous_attention_mask.shape[-1]:
            before = cache.previous_attention_mask.to(tokens.device).sum(-1)
        pos = before[:, None] + mask.long().cumsum(-1) - 1
        self.current = torch.where(mask, pos, torch.full_like(pos, -1))

    def done(self, module, args, kwargs, output) -> None:
        self.current = None  # no stale positions for hooks run outside a forward

    def record_positions(self, positions: Int[Tensor, "batch pos"] | None) -> None:
        """Set the positions of the forward being run by code that does not call the model itself
        (:class:`mechdiff.generation.StaticCacheDecoder`); -1 marks padding; None after it."""
        self.current = positions

    def positions(self, acts: Tensor) -> Int[Tensor, "batch pos"]:
        pos = self.current
        if pos is None or pos.shape[-1] != acts.shape[1] or pos.shape[0] not in (1, acts.shape[0]):
            return torch.arange(acts.shape[1], device=acts.device).expand(acts.shape[0], -1)
        return pos.to(acts.device).expand(acts.shape[0], -1)


class _LayerEdits:
    """The hook of one layer: applies its edits with one masked write each."""

    def __init__(self, tracker: PositionTracker, edits: list[Edit]):
        self.tracker, self.edits = tracker, edits
        self.index = [torch.tensor(e.features, dtype=torch.long) for e in edits]  # built once

    def __call__(self, acts: Float[Tensor, "batch pos d_sae"], hook) -> Tensor:
        pos = self.tracker.positions(acts)
        acts = acts.clone()
        for e, index in zip(self.edits, self.index):
            feats = index.to(acts.device)
            if e.op == "keep_only":
                keep = torch.zeros(acts.shape[-1], dtype=torch.bool, device=acts.device)
                keep[feats] = True
                feats = (~keep).nonzero()[:, 0]
            where = pos >= 0
            if e.positions is not None:
                where &= torch.isin(pos, torch.tensor(e.positions, device=acts.device))
            old = acts[..., feats]
            if e.op == "patch":
                src = e.value.to(acts.device, acts.dtype)
                where &= pos < src.shape[1]
                idx = pos.clamp(0, src.shape[1] - 1)
                new = src.expand(acts.shape[0], -1, -1).gather(1, idx[..., None].expand(-1, -1, len(feats)))
            elif e.op == "mean":
                new = e.value.to(acts.device, acts.dtype).expand_as(old)
            else:
                new = {
                    "set": lambda: torch.full_like(old, e.value),
                    "add": lambda: old + e.value,
                    "scale": lambda: old * e.value,
                    "keep_only": lambda: torch.zeros_like(old),
                }[e.op]()
            acts[..., feats] = torch.where(where[..., None], new, old)
        return acts
