"""The linearized forward of an adapted model: the model attribution graphs are exact for.

Inside :func:`linearized` the adapted model's ``HookedTransformer`` runs with (``sg`` = stop-grad):

* every RMSNorm scale frozen (``blocks.L.ln1/ln2.hook_scale``, ``ln_final.hook_scale``);
* every attention pattern frozen (``blocks.L.attn.hook_pattern``);
* the gated MLP's ``SiLU(g)`` replaced by ``g * sg(sigmoid(g))`` and its gate x up product
  ``a * b`` by ``0.5 * a * sg(b) + 0.5 * sg(a) * b`` (same value, half the gradient to each factor);
* every adapter feature activation a leaf (``blocks.L.adapter.hook_acts`` is stop-gradiented, so
  nothing flows back into the encoder).

"Frozen" values are either the detached values of the current forward (``frozen=None``: the
outputs equal the true model's, only gradients change) or the values of a recorded reference
forward (:func:`record_frozen`; then perturbing embeddings or features gives the linearized
model's response, which is exactly affine in the token embeddings and feature activations).
The context restores everything on exit (TransformerLens hook levels, ``requires_grad`` flags).
Edits belong on ``adapter.hook_acts``, ``hook_embed`` or residual hooks: the linearized MLP
product is rebuilt from what ``mlp.hook_pre`` / ``hook_pre_linear`` received before any hook of
yours added later, so such hooks are bypassed inside the context.

Example:
    >>> import torch
    >>> from attribution.synthetic import tiny_adapted
    >>> adapted = tiny_adapted(seed=0)
    >>> tokens = torch.tensor([[2, 5, 9, 11, 7]])
    >>> with linearized(adapted):
    ...     lin = adapted.model(tokens)
    >>> torch.allclose(lin, adapted.model(tokens), atol=1e-5)
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens.components.mlps.gated_mlp import GatedMLP

from mechdiff.adapters.transcoder import AdaptedModel


@dataclass
class FrozenState:
    """Everything the linearized forward holds fixed, from one real forward of one prompt.

    ``values`` maps hook names to batch-1 tensors: norm scales, attention patterns, the gated
    MLP's ``hook_pre`` (gate pre-activation) and ``hook_pre_linear`` (up projection), and the
    adapters' ``hook_acts``.
    """

    tokens: Int[Tensor, " pos"]
    values: dict[str, Tensor] = field(default_factory=dict)

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class Leaves:
    """Filled by :func:`linearized`: the gradient sources and the injection sites of one forward.

    ``embed`` (``hook_embed``) and ``adapter_out[L]`` (``blocks.L.adapter.hook_out``) are leaves
    that require grad: the gradient of a feature activation ``a_i`` at (L, p) is
    ``adapter_out[L].grad[p] @ W_dec[i]``. ``mlp_in[L]`` is layer L's MLP input (where a feature
    target injects its encoder row) and ``final`` the final-normed residual (``unembed.hook_in``).

    With ``cut_layers`` (see :func:`linearized`), the autograd graph is cut between blocks:
    ``resid_out[L]`` is block L's output (``blocks.L.hook_resid_post``) and ``resid_in[L + 1]`` the
    leaf (same values) the next block (or ``ln_final``) reads, so a backward pass can go one block
    at a time; block 0 reads ``embed``.
    """

    embed: Tensor | None = None
    adapter_out: dict[int, Tensor] = field(default_factory=dict)
    mlp_in: dict[int, Tensor] = field(default_factory=dict)
    final: Tensor | None = None
    resid_out: dict[int, Tensor] = field(default_factory=dict)
    resid_in: dict[int, Tensor] = field(default_factory=dict)

    def block_input(self, layer: int) -> Tensor:
        """The leaf block ``layer`` reads (``embed`` for block 0; ``n_layers``: ``ln_final``'s)."""
        return self.embed if layer == 0 else self.resid_in[layer]

    def site(self, site: int, n_layers: int) -> Tensor:
        """The tensor of injection site ``site`` (a layer's MLP input, or ``n_layers``: final)."""
        out = self.final if site == n_layers else self.mlp_in.get(site)
        if out is None:
            raise RuntimeError(f"site {site} was not captured; run a forward inside linearized()")
        return out


def check_supported(adapted: AdaptedModel) -> None:
    """Raise ``NotImplementedError`` unless the model has the parts the linearization knows."""
    cfg = adapted.model.cfg
    problems = []
    if cfg.normalization_type not in ("RMS", "RMSPre"):
        problems.append(f"normalization_type={cfg.normalization_type!r} (RMSNorm expected)")
    if cfg.parallel_attn_mlp or cfg.attn_only:
        problems.append("parallel attention/MLP or attention-only blocks")
    for i, block in enumerate(adapted.model.blocks):
        if not isinstance(block.mlp, GatedMLP) or block.mlp.act_fn is not F.silu:
            problems.append(f"block {i}: MLP {type(block.mlp).__name__} is not a SiLU GatedMLP")
            break
    if problems:
        raise NotImplementedError(
            "linearized attribution supports Qwen2/Llama-style models; this model has " + "; ".join(problems)
        )


def record_frozen(adapted: AdaptedModel, tokens: Int[Tensor, " pos"]) -> FrozenState:
    """Run the true adapted model once on ``tokens`` and keep what the linearization freezes.

    Example:
        Not run as a doctest: it needs an adapted model from the caller (the attribution tests run
        it on the organism).
        >>> frozen = record_frozen(adapted, torch.tensor([2, 5, 9]))  # doctest: +SKIP
        >>> frozen.values["blocks.0.attn.hook_pattern"].shape  # doctest: +SKIP
        torch.Size([1, 4, 3, 3])
    """
    tokens = _as_prompt(adapted, tokens)
    values: dict[str, Tensor] = {}

    def keep(t: Tensor, hook) -> Tensor:
        values.setdefault(hook.name, t.detach().clone())  # ln1 runs 3x on the same input
        return t

    with torch.no_grad(), adapted.model.hooks(fwd_hooks=[(_is_frozen_name, keep)]):
        adapted.model(tokens[None])
    return FrozenState(tokens=tokens, values=values)


@contextlib.contextmanager
def linearized(
    adapted: AdaptedModel, frozen: FrozenState | None = None, leaves: Leaves | None = None, cut_layers: bool = False
) -> Iterator[Leaves | None]:
    """Run ``adapted.model`` linearized inside this context (see the module docstring).

    ``frozen``: hold values from that recorded forward (the prompt must have its length) instead
    of the current forward's. ``leaves``: make embeddings and adapter outputs gradient leaves and
    capture the injection sites into it. ``cut_layers`` (with ``leaves``): also cut the autograd
    graph after every block (``Leaves.resid_out`` / ``Leaves.resid_in``). Hooks added later (e.g.
    feature edits on ``hook_acts``) run after these, so they act on the frozen values.
    """
    check_supported(adapted)
    model = adapted.model
    hooks = []
    for name in model.hook_dict:
        if name.endswith("hook_scale") or name.endswith("attn.hook_pattern"):
            hooks.append((name, _freeze_hook(frozen)))
        elif name.endswith("adapter.hook_acts"):
            hooks.append((name, _freeze_hook(frozen)))
    for layer, block in enumerate(model.blocks):
        hooks += _mlp_hooks(layer, block.mlp, frozen)
        if leaves is not None:
            hooks.append((f"blocks.{layer}.adapter.hook_in", _keep(partial(leaves.mlp_in.__setitem__, layer))))
            hooks.append(
                (f"blocks.{layer}.adapter.hook_out", _keep(partial(leaves.adapter_out.__setitem__, layer), leaf=True))
            )
            if cut_layers:
                hooks.append((f"blocks.{layer}.hook_resid_post", _cut(leaves, layer)))
    if leaves is not None:
        hooks.append(("hook_embed", _keep(partial(setattr, leaves, "embed"), leaf=True)))
        hooks.append(("unembed.hook_in", _keep(partial(setattr, leaves, "final"))))
    flags = [(p, p.requires_grad) for p in adapted.parameters()]
    try:
        for p, _ in flags:  # gradients only to the leaves: no graph through parameters
            p.requires_grad_(False)
        with model.hooks(fwd_hooks=hooks):
            yield leaves
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def linearized_logits(
    adapted: AdaptedModel,
    tokens: Int[Tensor, " pos"],
    frozen: FrozenState | None = None,
    fwd_hooks: list | None = None,
) -> Float[Tensor, "pos vocab"]:
    """Logits of the linearized model on one prompt (``fwd_hooks`` run after the freezing).

    Example:
        Not run as a doctest: it needs an adapted model from the caller (the attribution tests run
        it on the organism).
        >>> logits = linearized_logits(adapted, torch.tensor([2, 5, 9]))  # doctest: +SKIP
    """
    tokens = _as_prompt(adapted, tokens)
    with torch.no_grad(), linearized(adapted, frozen), adapted.model.hooks(fwd_hooks=fwd_hooks or []):
        return adapted.model(tokens[None])[0]


# --------------------------------------------------------------------------- hooks


def _is_frozen_name(name: str) -> bool:
    return name.endswith(
        ("hook_scale", "attn.hook_pattern", "mlp.hook_pre", "mlp.hook_pre_linear", "adapter.hook_acts")
    )


def _frozen_value(frozen: FrozenState, name: str, like: Tensor) -> Tensor:
    value = frozen.values.get(name)
    if value is None:
        raise KeyError(f"the frozen state has no value for {name}")
    if value.shape[1:] != like.shape[1:]:
        raise ValueError(
            f"{name}: frozen value has shape {tuple(value.shape)}, the forward "
            f"{tuple(like.shape)}; record the frozen state on the same prompt"
        )
    return value.to(like.dtype).expand_as(like)


def _freeze_hook(frozen: FrozenState | None):
    def hook(t: Tensor, hook) -> Tensor:
        return t.detach() if frozen is None else _frozen_value(frozen, hook.name, t)

    return hook


def _mlp_hooks(layer: int, mlp: GatedMLP, frozen: FrozenState | None) -> list:
    """hook_pre / hook_pre_linear stash the factors; hook_post returns the linearized product."""
    stash: dict[str, Tensor] = {}
    pre_name, up_name = f"blocks.{layer}.mlp.hook_pre", f"blocks.{layer}.mlp.hook_pre_linear"

    def keep(t: Tensor, hook) -> Tensor:
        stash[hook.name] = t
        return t

    def post(t: Tensor, hook) -> Tensor:
        gate, up = stash.pop(pre_name), stash.pop(up_name)
        gate0 = gate.detach() if frozen is None else _frozen_value(frozen, pre_name, gate)
        up0 = up.detach() if frozen is None else _frozen_value(frozen, up_name, up)
        sig0 = torch.sigmoid(gate0)
        # 0.5 * SiLU(g) * sg(b) + 0.5 * sg(SiLU(g)) * b with SiLU(g) = g * sg(sigmoid(g)), as two
        # frozen coefficients: the backward pass is then one multiply per factor
        return gate * (0.5 * sig0 * up0) + up * (0.5 * gate0 * sig0) + mlp.b_in

    return [(pre_name, keep), (up_name, keep), (f"blocks.{layer}.mlp.hook_post", post)]


def _keep(store, leaf: bool = False):
    """A hook passing its tensor on (as a fresh leaf if ``leaf``) after handing it to ``store``."""

    def hook(t: Tensor, hook) -> Tensor:
        if leaf:
            t = t.detach().requires_grad_(True)
        store(t)
        return t

    return hook


def _cut(leaves: Leaves, layer: int):
    """Keep block ``layer``'s output and hand the next block a fresh leaf with its values."""

    def hook(t: Tensor, hook) -> Tensor:
        leaves.resid_out[layer] = t
        leaf = t.detach().requires_grad_(True)
        leaves.resid_in[layer + 1] = leaf
        return leaf

    return hook


def _as_prompt(adapted: AdaptedModel, tokens) -> Int[Tensor, " pos"]:
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 2 and tokens.shape[0] == 1:
        tokens = tokens[0]
    if tokens.ndim != 1 or tokens.numel() == 0 or tokens.dtype not in (torch.long, torch.int32):
        raise ValueError(
            f"expected one prompt as a 1-D integer tensor of token ids, got shape "
            f"{tuple(tokens.shape)} and dtype {tokens.dtype}"
        )
    cfg = adapted.model.cfg
    if tokens.shape[0] > cfg.n_ctx:
        raise ValueError(f"prompt has {tokens.shape[0]} tokens; the model's context is {cfg.n_ctx}")
    bad = tokens[(tokens < 0) | (tokens >= cfg.d_vocab)]
    if bad.numel():
        raise ValueError(f"token ids {bad.tolist()[:8]} are outside the vocabulary [0, {cfg.d_vocab})")
    return tokens.long().to(cfg.device)
