"""The target's side of adapter training, computed once per trace set and read back per batch.

An adapter step needs the target's residual after every layer (for the NMSE and the bridges) and
its final hidden rows (the KL teacher). They depend on the target and the traces only, not on the
adapters, so every run over the same traces (the SmolLM2 study's sweep candidates, a resumed run,
an L1 sweep) can read them instead of running the target: :func:`train_adapters
<mechdiff.training.adapter_objective.train_adapters>` does with ``target_cache=folder``.

On disk it is an :mod:`~mechdiff.training.activation_cache` (safetensors shards, atomic commits,
resumable) of ``blocks.{i}.hook_resid_post`` for every layer, one row per real token, in the
target's own dtype, computed in the lean blocks the objective's target pass runs
(:mod:`~mechdiff.training.lean_blocks`): read back, the loss equals the online target's to float
error (the batches are padded differently). Its header names the target (a fingerprint of its
weights) and the traces (a hash of their tokens), so a cache is never read for another model or
another trace set.
It costs ``n_layers * d_model`` values per token: 71 KB in float32 on SmolLM2-135M, 4 GB for the
study's 240 training traces.

Example:
    >>> from mechdiff.models import load_pair
    >>> from mechdiff.padding import pad
    >>> from mechdiff.training.adapter_objective import organism_traces
    >>> import tempfile
    >>> pair = load_pair("organism")
    >>> traces = organism_traces(8)["input_ids"]
    >>> cache = TargetCache.build(pair.target, traces, tempfile.mkdtemp())
    >>> tokens, mask = pad([traces[i] for i in (5, 2)], 0, side="right")
    >>> target = cache.batch([5, 2], tokens.shape[1])
    >>> len(target.resid) == pair.target.cfg.n_layers + 1
    True
    >>> target.out.shape == (*tokens.shape, pair.target.cfg.d_model)  # final hidden rows
    True
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from safetensors import safe_open
from torch import Tensor
from transformer_lens import HookedTransformer

from mechdiff.training.activation_cache import ActivationCache, CacheError, cache_activations
from mechdiff.training.lean_blocks import lean_blocks

__all__ = ["TargetCache", "TargetPass", "model_fingerprint", "traces_fingerprint"]


@dataclass
class TargetPass:
    """The target's side of one batch: its logits (plain path) or final hidden rows after
    ``ln_final`` (fast path), and its residual stream ``[resid_pre 0, resid_post 0, ...,
    resid_post n-1]`` as :func:`~mechdiff.capture.run_capture` returns it (``resid[0]``, the
    embeddings, is never read by the loss and may be ``None``)."""

    out: Float[Tensor, "batch pos _"]
    resid: list[Tensor | None]

    @classmethod
    def from_residuals(cls, target: HookedTransformer, resid: list[Tensor | None], logits: bool) -> TargetPass:
        """The pass whose residual stream is ``resid``: its final hidden rows (or logits) are
        recomputed from the last residual, as the target's own forward computes them."""
        hidden = target.ln_final(resid[-1])
        return cls(target.unembed(hidden) if logits else hidden, resid)


def model_fingerprint(model: HookedTransformer) -> str:
    """A hash of ``model``'s shape and of the first values of every weight (cheap on 7B models,
    and different for a fine-tune, another model or another dtype)."""
    h = hashlib.sha256(repr((model.cfg.n_layers, model.cfg.d_model, model.cfg.d_vocab)).encode())
    for name, p in sorted(model.state_dict().items()):
        head = p.detach().reshape(-1)[:4096].to("cpu")
        h.update(f"{name}:{tuple(p.shape)}:{head.dtype}".encode())
        h.update(head.float().numpy().tobytes())
    return h.hexdigest()[:16]


def traces_fingerprint(sequences: Sequence[Sequence[int]]) -> str:
    """A hash of the token ids of ``sequences``, in order."""
    h = hashlib.sha256()
    for seq in sequences:
        h.update(np.asarray(seq, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:16]


def _hook_names(model: HookedTransformer) -> list[str]:
    return [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]


class TargetCache:
    """The cached target pass of every trace in a trace set; :meth:`batch` gathers a batch's.

    ``TargetCache(folder, target, sequences)`` opens a finished cache and checks that it was made
    by ``target`` from ``sequences`` (:class:`~mechdiff.training.activation_cache.CacheError`
    otherwise); :meth:`build` makes (or resumes, or reuses) one first.
    """

    def __init__(self, directory: str | Path, target: HookedTransformer, sequences: Sequence[Sequence[int]]):
        self.cache, self.target = ActivationCache(directory), target
        want = {"target": model_fingerprint(target), "traces": traces_fingerprint(sequences)}
        have = {key: self.cache.meta.get(key) for key in want}
        if have != want:
            raise CacheError(
                f"the target cache in {directory} was made for another "
                f"{' and '.join(k for k in want if have[k] != want[k])} ({have}, now {want}): "
                f"give this run its own folder, or move that one away"
            )
        self.names = _hook_names(target)
        self._locate(len(sequences))

    @classmethod
    def build(
        cls,
        target: HookedTransformer,
        sequences: Sequence[Sequence[int]],
        directory: str | Path,
        *,
        batch_size: int = 8,
        shard_rows: int = 16384,
        progress: bool = False,
        lean: bool = True,
    ) -> TargetCache:
        """Run ``target`` over ``sequences`` once and store its pass in ``directory``: a killed run
        resumes, a finished cache is reused (after the same checks as opening it). ``lean``
        (default) runs the blocks as the adapter objective's target pass does
        (:mod:`~mechdiff.training.lean_blocks`: fused attention, faster); ``False``,
        TransformerLens' own forward. Either agrees with the other to float error."""
        meta = {"target": model_fingerprint(target), "traces": traces_fingerprint(sequences)}
        with lean_blocks((target,) if lean else ()):
            cache_activations(
                target,
                sequences,
                directory,
                _hook_names(target),
                batch_size=batch_size,
                shard_rows=shard_rows,
                meta=meta,
                progress=progress,
            )
        return cls(directory, target, sequences)

    def _locate(self, n_sequences: int) -> None:
        """Where each sequence's rows are: ``(shard, first row, rows)``. A batch's rows are
        appended together, so a sequence never spans two shards."""
        where: dict[int, tuple[int, int, int]] = {}
        for index in range(len(self.cache.shards)):
            seq = self.cache.read_shard(index, ["sequence"])["sequence"]
            ids, counts = torch.unique_consecutive(seq, return_counts=True)
            starts = torch.cumsum(counts, 0) - counts
            for i, start, count in zip(ids.tolist(), starts.tolist(), counts.tolist(), strict=True):
                where[i] = (index, start, count)
        missing = sorted(set(range(n_sequences)) - set(where))
        if missing:
            raise CacheError(f"the target cache in {self.cache.directory} lacks sequences {missing[:5]}")
        self.where = where

    def __len__(self) -> int:
        return len(self.where)

    def batch(self, indices: Sequence[int], positions: int, logits: bool = False) -> TargetPass:
        """The target pass of the right-padded batch of sequences ``indices`` (``positions`` wide):
        what :meth:`AdapterObjective.target_pass
        <mechdiff.training.adapter_objective.AdapterObjective.target_pass>` returns on it (zeros
        at pad positions, which no loss reads; ``logits``: the plain path's logits)."""
        d_model, device = self.target.cfg.d_model, self.target.cfg.device
        dtype = next(self.target.parameters()).dtype
        resid = torch.zeros(len(self.names), len(indices), positions, d_model, dtype=dtype)
        by_shard: dict[int, list[tuple[int, int, int]]] = {}
        for row, i in enumerate(indices):
            shard, start, count = self.where[i]
            if count > positions:
                raise ValueError(f"sequence {i} has {count} tokens, more than the batch's {positions} positions")
            by_shard.setdefault(shard, []).append((row, start, count))
        for shard, spans in by_shard.items():
            path = self.cache.shards[shard][0]
            try:
                with safe_open(str(path), framework="pt") as f:
                    for layer, name in enumerate(self.names):
                        rows = f.get_slice(name)
                        for row, start, count in spans:
                            resid[layer, row, :count] = rows[start : start + count]
            except Exception as err:  # safetensors raises its own error type for a damaged file
                raise CacheError(f"cannot read {path} ({err}): the target cache is corrupt") from err
        resid = resid.to(device)
        stream = [None, *resid.unbind(0)]  # resid_pre 0 (the embeddings) is never read by the loss
        with torch.no_grad():
            return TargetPass.from_residuals(self.target, stream, logits)
