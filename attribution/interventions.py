"""Ablate or steer adapter features, in one forward pass or throughout generation, on the true or
the linearized adapted model.

An edit acts on ``blocks.{layer}.adapter.hook_acts``: ``mode="set"`` (``value=0`` ablates),
``"scale"`` or ``"add"``, on the features listed, at chosen absolute positions (0 = BOS) or at
every position (``positions=None``; during generation that includes every generated token).
On the linearized model (``linearized=True``) the norm scales, attention patterns, MLP gates and
all other feature activations are held at their values in the clean (unedited) run, so an edit
shows its direct, linear effect: zeroing a feature changes a target by minus its graph edge.

Example:
    >>> import torch
    >>> from attribution.synthetic import tiny_adapted
    >>> adapted = tiny_adapted(seed=0)
    >>> tokens = torch.tensor([2, 5, 9, 11, 7, 20])
    >>> edits = ablate([(0, 3), (1, 7)], positions=[4])
    >>> clean, edited = intervene(adapted, tokens, []), intervene(adapted, tokens, edits)
    >>> torch.equal(clean[:4], edited[:4])  # positions before the edit are untouched
    True
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attribution.linearize import _as_prompt, linearized_logits, record_frozen
from mechdiff.adapters.transcoder import AdaptedModel
from mechdiff.generation import generate

MODES = ("set", "scale", "add")


@dataclass(frozen=True)
class FeatureEdit:
    """Set / scale / add ``value`` to feature ``feature`` of ``layer`` at ``positions`` (all if None)."""

    layer: int
    feature: int
    mode: str = "set"
    value: float = 0.0
    positions: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, not {self.mode!r}")


def steer(features: Iterable[Sequence[int]], value: float, mode: str = "set",
          positions: Sequence[int] | None = None) -> list[FeatureEdit]:
    """Edits for ``features``: ``(layer, feature)`` pairs (at ``positions``, or everywhere) or
    ``(layer, pos, feature)`` triples (at that position; then ``positions`` must be None).

    Example:
        >>> steer([(2, 17)], value=3.0, mode="scale")[0].mode
        'scale'
    """
    edits = []
    for f in features:
        f = tuple(int(x) for x in f)
        if len(f) == 3:
            if positions is not None:
                raise ValueError("give positions either in (layer, pos, feature) triples or in positions=")
            edits.append(FeatureEdit(f[0], f[2], mode, float(value), (f[1],)))
        elif len(f) == 2:
            pos = None if positions is None else tuple(int(p) for p in positions)
            edits.append(FeatureEdit(f[0], f[1], mode, float(value), pos))
        else:
            raise ValueError(f"a feature is (layer, feature) or (layer, pos, feature), not {f}")
    return edits


def ablate(features: Iterable[Sequence[int]], positions: Sequence[int] | None = None,
           ) -> list[FeatureEdit]:
    """Edits zeroing ``features`` (see :func:`steer` for the forms accepted).

    Example:
        >>> ablate([(0, 3, 12)])[0]
        FeatureEdit(layer=0, feature=12, mode='set', value=0.0, positions=(3,))
    """
    return steer(features, 0.0, "set", positions)


def edit_hooks(adapted: AdaptedModel, edits: Sequence[FeatureEdit]) -> list[tuple[str, callable]]:
    """``(hook_name, fn)`` pairs for ``model.hooks``; fresh for each forward or generation run.

    Edits at every position use :meth:`AdaptedModel.steering_hooks`; positioned edits use hooks
    that count positions across calls, so they also work with the KV cache during generation.
    """
    n_layers, d_sae = adapted.model.cfg.n_layers, adapted.config.d_sae
    hooks, groups = [], {}
    for e in edits:
        if not 0 <= e.layer < n_layers or not 0 <= e.feature < d_sae:
            raise IndexError(f"feature (layer {e.layer}, feature {e.feature}) is out of range "
                             f"({n_layers} layers, d_sae {d_sae})")
        groups.setdefault((e.layer, e.mode, e.value, e.positions), []).append(e.feature)
    for (layer, mode, value, positions), feats in groups.items():
        if positions is None:
            hooks += adapted.steering_hooks([(layer, f) for f in feats], value, mode=mode)
        else:
            hooks.append((adapted.acts_name(layer), _PositionedEdit(feats, mode, value, positions)))
    return hooks


def intervene(adapted: AdaptedModel, tokens: Int[Tensor, " pos"], edits: Sequence[FeatureEdit], *,
              linearized: bool = False) -> Float[Tensor, "pos vocab"]:
    """Logits of one prompt with ``edits`` applied, on the true or the linearized model.

    Example:
        >>> logits = intervene(adapted, tokens, ablate([(1, 7)]), linearized=True)  # doctest: +SKIP
    """
    tokens = _as_prompt(adapted, tokens)
    _check_positions(edits, int(tokens.shape[0]))
    hooks = edit_hooks(adapted, edits)
    if linearized:
        return linearized_logits(adapted, tokens, record_frozen(adapted, tokens), fwd_hooks=hooks)
    with torch.no_grad():
        return adapted.model.run_with_hooks(tokens[None], fwd_hooks=hooks)[0]


def generate_with_edits(adapted: AdaptedModel, prompts: Sequence[Sequence[int]],
                        edits: Sequence[FeatureEdit], max_new_tokens: int, *,
                        linearized: bool = False, **generate_kwargs) -> list[list[int]]:
    """Continue each prompt with ``edits`` active throughout (see :func:`mechdiff.generation.generate`).

    On the linearized model decoding is greedy and re-linearizes at every step around the clean
    run of the current context (no KV cache: for small models). Positioned edits are absolute
    positions in each prompt + continuation.

    Example:
        >>> outs = generate_with_edits(adapted, [prompt], ablate([(2, 17)]), 64)  # doctest: +SKIP
    """
    for e in edits:
        if e.positions is not None and any(p < 0 for p in e.positions):
            raise ValueError("positions for generation are absolute (>= 0), got negative ones")
    if linearized:
        return [_generate_linearized(adapted, list(p), edits, max_new_tokens, **generate_kwargs)
                for p in prompts]
    if all(e.positions is None for e in edits):
        return generate(adapted.model, prompts, max_new_tokens,
                        fwd_hooks=edit_hooks(adapted, edits), **generate_kwargs)
    results: list[list[int]] = [[] for _ in prompts]  # positions: one unpadded run per length
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    kwargs = {k: v for k, v in generate_kwargs.items() if k != "batch_size"}
    for idx in by_len.values():
        outs = generate(adapted.model, [prompts[i] for i in idx], max_new_tokens,
                        fwd_hooks=edit_hooks(adapted, edits), batch_size=len(idx), **kwargs)
        for i, out in zip(idx, outs):
            results[i] = out
    return results


def _generate_linearized(adapted, prompt, edits, max_new_tokens, eos_token_id=None,
                         temperature: float = 0.0, **ignored) -> list[int]:
    if temperature != 0.0:
        raise ValueError("generation on the linearized model is greedy only (temperature=0)")
    eos = eos_token_id if eos_token_id is not None else getattr(adapted.model.tokenizer, "eos_token_id", None)
    seq, out = list(prompt), []
    for _ in range(max_new_tokens):
        tokens = _as_prompt(adapted, torch.tensor(seq))
        logits = linearized_logits(adapted, tokens, record_frozen(adapted, tokens),
                                   fwd_hooks=edit_hooks(adapted, edits))
        nxt = int(logits[-1].argmax())
        out.append(nxt)
        seq.append(nxt)
        if nxt == eos or len(seq) >= adapted.model.cfg.n_ctx:
            break
    return out


def _check_positions(edits: Sequence[FeatureEdit], n_pos: int) -> None:
    for e in edits:
        for p in e.positions or ():
            if not 0 <= p < n_pos:
                raise IndexError(f"edit position {p} is out of range for a prompt of {n_pos} tokens")


class _PositionedEdit:
    """Edit features at absolute positions; counts positions across calls (KV-cached generation)."""

    def __init__(self, feats: list[int], mode: str, value: float, positions: tuple[int, ...]):
        self.feats, self.mode, self.value = torch.tensor(feats), mode, value
        self.positions, self.offset = torch.tensor(positions), 0

    def __call__(self, acts: Tensor, hook) -> Tensor:
        n = acts.shape[1]
        here = torch.isin(self.offset + torch.arange(n), self.positions).nonzero()[:, 0]
        self.offset += n
        if not len(here):
            return acts
        acts = acts.clone()
        p, f = here.to(acts.device)[:, None], self.feats.to(acts.device)[None, :]
        sel = acts[:, p, f]
        acts[:, p, f] = {"set": torch.full_like(sel, self.value), "scale": sel * self.value,
                         "add": sel + self.value}[self.mode]
        return acts
