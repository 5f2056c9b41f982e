"""Activation checkpointing by block: keep each block's input, recompute its inside in backward.

Within :func:`checkpointed_blocks`, every block of the given ``HookedTransformer`` s runs under
:func:`torch.utils.checkpoint.checkpoint` when gradients are on: the same loss and gradients for
about one more forward, and the backward graph holds one residual per block instead of every
intermediate (attention scores, MLP hidden states...). Module hooks (adapters, LoRA) run again in
the recomputation, so they are recomputed too. The adapter and LoRA objectives use it.

Example:
    >>> import torch
    >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
    >>> cfg = HookedTransformerConfig(n_layers=2, d_model=8, n_ctx=4, d_head=4, d_vocab=5, act_fn="relu")
    >>> model = HookedTransformer(cfg)
    >>> tokens = torch.tensor([[0, 1, 2]])
    >>> with checkpointed_blocks((model,)):
    ...     loss = model(tokens).sum()
    >>> loss.backward()
    >>> torch.allclose(loss, model(tokens).sum())
    True
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformer_lens import HookedTransformer

from mechdiff.training.block_forwards import replaced_forwards


@contextmanager
def checkpointed_blocks(models: tuple[HookedTransformer, ...]):
    """Within the context, each block of ``models`` keeps only its input for backward and recomputes
    the rest (when gradients are on). A backward after the context still recomputes correctly: each
    wrapper holds the block's own forward."""

    def make(block, forward):
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():
                return forward(*args, **kwargs)
            # early_stop=False: the recomputation runs the whole block. Stopping once the saved
            # tensors are back would leave hooks that hand a tensor from one hook point to a later
            # one (LoRA's pending deltas) holding it, and with it the block's recomputed graph.
            return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, early_stop=False, **kwargs)

        return run

    with replaced_forwards([block for model in models for block in model.blocks], make):
        yield
