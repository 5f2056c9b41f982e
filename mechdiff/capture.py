"""One forward that captures what training and evaluation compare: the logits (or the residual the
unembedding reads), the residual stream after every layer, and any named hook activations."""

from __future__ import annotations

from functools import partial

from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

Mask = Bool[Tensor, "batch pos"]


def final_hidden(
    model, tokens: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"], **kwargs
) -> Float[Tensor, "batch pos d_model"]:
    """A ``HookedTransformer``'s residual after ``ln_final`` (what its unembedding reads); every hook
    point up to ``ln_final`` fires. ``kwargs`` go to the model (``attention_mask``, ``start_at_layer``)."""
    return model.ln_final(model(tokens, stop_at_layer=model.cfg.n_layers, **kwargs))


def run_capture(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    mask: Mask,
    extra: tuple[str, ...] = (),
    logits: bool = True,
) -> tuple[Tensor, list[Tensor], dict[str, Tensor]]:
    """Logits (or, with ``logits=False``, the residual after ``ln_final`` that the unembedding
    reads), the residual stream ``[resid_pre 0, resid_post 0, ..., resid_post n-1]`` and the
    activations at the hook points in ``extra`` (gradients flow through all of them)."""
    n = model.cfg.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    store: dict[str, Tensor] = {}

    def save(tensor, hook):
        store[hook.name] = tensor

    with model.hooks(fwd_hooks=[(name, save) for name in (*names, *extra)]):
        run = model if logits else partial(final_hidden, model)
        out = run(tokens, attention_mask=mask.long())
    return out, [store[name] for name in names], {name: store[name] for name in extra}
