"""Swapping the forward of TransformerLens blocks for the length of a ``with`` block.

:func:`~mechdiff.training.block_recompute.checkpointed_blocks` and
:func:`~mechdiff.training.lean_blocks.lean_blocks` each run every block another way; both set an
instance ``forward`` that wraps whatever ran before, so they nest in either order and each exit
puts back exactly what it found.

Example:
    >>> import torch
    >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
    >>> cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, d_vocab=5, act_fn="relu")
    >>> block = HookedTransformer(cfg).blocks[0]
    >>> with replaced_forwards([block], lambda block, forward: lambda x, **kw: 2 * forward(x, **kw)):
    ...     "forward" in block.__dict__
    True
    >>> "forward" in block.__dict__
    False
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager


@contextmanager
def replaced_forwards(blocks: list, make: Callable[[object, Callable], Callable]):
    """Within the context, each block's forward is ``make(block, forward)``, ``forward`` being
    what ran before (the class's, or an enclosing replacement); restored on exit."""
    previous = [block.__dict__.get("forward") for block in blocks]
    for block in blocks:
        block.forward = make(block, block.forward)
    try:
        yield
    finally:
        for block, before in zip(blocks, previous, strict=True):
            if before is None:
                del block.forward  # the class's forward again
            else:
                block.forward = before
