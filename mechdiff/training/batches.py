"""Choosing a batch from a step number (padding lives in :mod:`mechdiff.padding`)."""

from __future__ import annotations

import torch


def step_indices(n_rows: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Rows for ``step``: epochs are seeded permutations, so step -> batch is a pure function."""
    per_epoch = max(1, n_rows // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
    return perm[k * batch_size : (k + 1) * batch_size].tolist()
