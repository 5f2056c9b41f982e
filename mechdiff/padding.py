"""Padding token sequences into one tensor: used by training, evaluation, generation and features.

A neutral module (it imports only torch), so that evaluation and generation do not import the
training package for it.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Int
from torch import Tensor


def pad(
    sequences: list[list[int]], pad_id: int, side: str = "right"
) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos"]]:
    """Pad to the longest sequence; returns ``(tokens, mask)`` with ``mask`` True on real tokens.

    >>> tokens, mask = pad([[5, 6, 7], [8]], pad_id=0, side="left")
    >>> tokens.tolist(), mask.sum(1).tolist()
    ([[5, 6, 7], [0, 0, 8]], [3, 1])
    """
    if side not in ("left", "right"):
        raise ValueError(f"side must be 'left' or 'right', not {side!r}")
    width = max(map(len, sequences))
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        tokens[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = True
    return tokens, mask
