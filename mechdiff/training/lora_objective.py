"""The LoRA distillation objective: next-token loss on the response tokens of target traces.

A trace is ``prompt + response``; position ``t`` predicts token ``t + 1`` and only predictions of
response tokens (index ``>= prompt_len``) count. The loss mixes two targets::

    loss = (1 - kl_weight) * CE(next trace token) + kl_weight * KL(p_target || p_lora)

``kl_weight = 0`` (the paper's recipe: plain SFT on the traces) needs no target model;
``kl_weight > 0`` also runs the target model on the batch to distil its full next-token
distribution. Batches are right-padded, which a causal model needs no mask for.

Example:
    >>> import torch
    >>> tokens = torch.tensor([[1, 5, 6, 7, 0], [1, 5, 8, 0, 0]])
    >>> lengths, prompt_len = torch.tensor([4, 3]), torch.tensor([2, 2])
    >>> response_mask(lengths, prompt_len, tokens.shape[1]).int().tolist()
    [[0, 1, 1, 0], [0, 1, 0, 0]]
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from datasets import Dataset
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer

from mechdiff import distributed
from mechdiff.capture import final_hidden
from mechdiff.padding import pad
from mechdiff.training.batches import step_indices
from mechdiff.training.block_recompute import checkpointed_blocks
from mechdiff.training.losses import (
    head_losses,
    hooked_head,
    masked_kl,
    next_token_ce,
    next_token_keep,
)


def response_mask(
    lengths: Int[Tensor, " batch"], prompt_len: Int[Tensor, " batch"], width: int
) -> Bool[Tensor, "batch width_minus_1"]:
    """True where position ``t`` predicts a real response token (``prompt_len <= t + 1 < length``)."""
    return next_token_keep(torch.arange(width)[None] < lengths[:, None], prompt_len)


def _check_weight(kl_weight: float, has_target: bool) -> None:
    if not 0.0 <= kl_weight <= 1.0:
        raise ValueError(f"kl_weight must be in [0, 1], not {kl_weight}")
    if kl_weight > 0 and not has_target:
        raise ValueError("kl_weight > 0 needs target_logits")


def distillation_loss(
    logits: Float[Tensor, "batch pos vocab"],
    tokens: Int[Tensor, "batch pos"],
    keep: Bool[Tensor, "batch pos_minus_1"],
    target_logits: Float[Tensor, "batch pos vocab"] | None = None,
    kl_weight: float = 0.0,
) -> tuple[Float[Tensor, ""], dict[str, float]]:
    """``(loss, metrics)`` from full logits (the plain path); metrics hold ``ce``, ``token_acc``
    and, with a target, ``kl``. :func:`chunked_distillation_loss` computes the same from a model.

    Example:
        >>> logits = torch.zeros(1, 3, 4); tokens = torch.tensor([[0, 1, 2]])
        >>> loss, m = distillation_loss(logits, tokens, torch.tensor([[True, True]]))
        >>> round(m["ce"], 4) == round(float(torch.log(torch.tensor(4.0))), 4)
        True
    """
    _check_weight(kl_weight, target_logits is not None)
    ce = next_token_ce(logits, tokens, keep)
    acc = (logits[:, :-1][keep].argmax(-1) == tokens[:, 1:][keep]).float().mean()
    metrics = {"ce": ce.item(), "token_acc": acc.item()}
    loss = ce
    if target_logits is not None:
        kl = masked_kl(target_logits[:, :-1], logits[:, :-1], keep)
        metrics["kl"] = kl.item()
        loss = (1 - kl_weight) * ce + kl_weight * kl
    return loss, metrics


def chunked_distillation_loss(
    model: HookedTransformer,
    tokens: Int[Tensor, "batch pos"],
    keep: Bool[Tensor, "batch pos_minus_1"],
    target: HookedTransformer | None = None,
    kl_weight: float = 0.0,
) -> tuple[Float[Tensor, ""], dict[str, float]]:
    """:func:`distillation_loss` of ``model(tokens)`` (and ``target(tokens)``) without full logits:
    both models stop before the unembedding and :func:`~mechdiff.training.losses.head_losses`
    scores the kept rows in chunks (the target's under no_grad). Same values and gradients.

    Example:
        Not run as a doctest: it needs a LoRA and a batch from the caller
        (:func:`mechdiff.lora.train_lora` makes both).
        >>> loss, m = chunked_distillation_loss(lora.model, tokens, keep)  # doctest: +SKIP
    """
    _check_weight(kl_weight, target is not None)
    if not keep.any():
        raise ValueError("no response tokens in the batch (check prompt_len)")
    labels = tokens[:, 1:][keep]
    student = hooked_head(model, final_hidden(model, tokens)[:, :-1][keep])
    teacher = None
    if target is not None:
        with torch.no_grad():
            teacher = hooked_head(target, final_hidden(target, tokens)[:, :-1][keep])
    out = head_losses([student], labels=labels, teacher=teacher)
    metrics = {"ce": out.ce[0].item(), "token_acc": out.correct[0].item() / len(labels)}
    loss = out.ce[0]
    if teacher is not None:
        metrics["kl"] = out.kl[0].item()
        loss = (1 - kl_weight) * out.ce[0] + kl_weight * out.kl[0]
    return loss, metrics


class TraceBatches:
    """All traces padded once into one tensor; ``batch(step)`` is a pure function of the step.

    Example:
        >>> from mechdiff.organism import corpus
        >>> tb = TraceBatches(corpus.reasoning_traces(8, "validation"), batch_size=4, seed=0)
        >>> tokens, keep = tb.batch(0)
        >>> tokens.shape[0], keep.shape[1] == tokens.shape[1] - 1
        (4, True)
    """

    def __init__(self, data: Dataset, batch_size: int, seed: int = 0, pad_id: int = 0):
        if len(data) == 0:
            raise ValueError("no traces")
        missing = {"input_ids", "prompt_len"} - set(data.column_names)
        if missing:
            raise ValueError(f"traces need columns input_ids and prompt_len; missing {sorted(missing)}")
        self.tokens, mask = pad(list(data["input_ids"]), pad_id)
        self.lengths = mask.sum(1)
        self.prompt_len = torch.tensor(data["prompt_len"])
        self.batch_size, self.seed = min(batch_size, len(data)), seed

    def __len__(self) -> int:
        return len(self.tokens)

    def rows(self, rows: list[int] | Tensor) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos_minus_1"]]:
        rows = torch.as_tensor(rows, dtype=torch.long)
        width = int(self.lengths[rows].max())
        tokens = self.tokens[rows, :width]
        return tokens, response_mask(self.lengths[rows], self.prompt_len[rows], width)

    def batch(self, step: int) -> tuple[Int[Tensor, "batch pos"], Bool[Tensor, "batch pos_minus_1"]]:
        return self.rows(step_indices(len(self), self.batch_size, step, self.seed))


def make_loss_fn(
    lora, batches: TraceBatches, target=None, kl_weight: float = 0.0, fast: bool = True, checkpoint: bool = False
) -> Callable[[int], tuple[Tensor, dict[str, float]]]:
    """``loss_fn(step)`` for :func:`mechdiff.training.loop.train` (LoRA model in, loss out).

    ``fast`` scores the batch with :func:`chunked_distillation_loss` (no ``[batch, pos, vocab]``
    logits); ``fast=False`` is the plain full-logits path (:func:`distillation_loss`).
    ``checkpoint`` recomputes each block of the LoRA model in backward
    (:func:`~mechdiff.training.block_recompute.checkpointed_blocks`): the same loss and gradients,
    for about one more forward, in the memory of one block's internals instead of all of them.
    Under torchrun (see :mod:`mechdiff.distributed`) each rank takes its shard of the step's
    batch and the steps equal a single process's; the logged metrics are then rank averages.
    """
    if kl_weight > 0 and target is None:
        raise ValueError("kl_weight > 0 needs the target model")
    device = lora.model.cfg.device

    def loss_fn(step: int):
        rows = distributed.shard(step_indices(len(batches), batches.batch_size, step, batches.seed))
        tokens, keep = (t.to(device) for t in batches.rows(rows))
        teacher = target if kl_weight > 0 else None
        with checkpointed_blocks((lora.model,) if checkpoint else ()):
            if fast:
                loss, metrics = chunked_distillation_loss(lora.model, tokens, keep, teacher, kl_weight)
            else:
                with torch.no_grad():
                    target_logits = teacher(tokens) if teacher is not None else None
                loss, metrics = distillation_loss(lora(tokens), tokens, keep, target_logits, kl_weight)
        # a mean over this rank's response tokens, rescaled so the ranks' average is the global mean
        return distributed.as_global_mean(loss, keep.sum()), metrics

    return loss_fn
