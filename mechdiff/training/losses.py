"""Token losses shared by every trainer: next-token cross-entropy and KL to a teacher, plain or chunked.

Two paths compute the same numbers:

* the plain one (:func:`masked_kl`, :func:`next_token_ce`) takes full logits ``[batch, pos, vocab]``;
* the chunked one (:func:`head_losses`) takes the hidden states that enter the unembedding
  (``[n, d_model]``, the rows that count) and never holds more than ``[chunk, vocab]`` per model at
  once. The gradient of CE and of KL with respect to the logits is known in closed form
  (``softmax(z) - onehot`` and ``softmax(z) - p_teacher``), so each chunk's gradient with respect
  to the hidden rows (and, when it trains, the unembedding) is formed right away and the logits are
  dropped: no logits are kept for backward and none are recomputed. The teacher's log-probabilities
  are formed chunk by chunk from its own hidden rows, without gradients.

Every trainer in the project builds its keep mask with :func:`next_token_keep` and reduces through
these functions: the organism recipe, the LoRA objective, the SmolLM2 fine-tune and the adapter
objective.

Example:
    >>> import torch
    >>> _ = torch.manual_seed(0); h, W = torch.randn(6, 8), torch.randn(8, 11)
    >>> labels, teacher = torch.randint(0, 11, (6,)), torch.randn(6, 8)
    >>> out = head_losses([Head(h, W)], labels=labels, teacher=Head(teacher, W))
    >>> plain_ce = torch.nn.functional.cross_entropy(h @ W, labels)
    >>> bool(torch.allclose(out.ce[0], plain_ce, atol=1e-5))
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

CHUNK_ELEMENTS = 2**22  # logits per chunk and model (16 MiB in float32): rows = this // vocab


def next_token_keep(
    mask: Bool[Tensor, "batch pos"],
    prompt_len: Int[Tensor, " batch"] | None = None,
) -> Bool[Tensor, "batch pos_minus_1"]:
    """True where position ``t`` predicts a real token ``t + 1`` (that is, ``mask[:, t + 1]``), and,
    with ``prompt_len``, only a response token (``t + 1 >= prompt_len``).

    >>> mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]]).bool()
    >>> next_token_keep(mask, torch.tensor([2, 2])).int().tolist()
    [[0, 1, 1, 0], [0, 1, 0, 0]]
    """
    keep = mask[:, 1:].clone()
    if prompt_len is not None:
        prompt_len = torch.as_tensor(prompt_len, device=mask.device)
        if (prompt_len < 1).any() or (prompt_len > mask.sum(1)).any():
            raise ValueError("need 1 <= prompt_len <= length for every row")
        keep &= torch.arange(1, mask.shape[1], device=mask.device)[None] >= prompt_len[:, None]
    return keep


# ----------------------------------------------------------------------------- plain path


def masked_kl(
    target_logits: Float[Tensor, "batch pos vocab"],
    logits: Float[Tensor, "batch pos vocab"],
    mask: Bool[Tensor, "batch pos"],
) -> Float[Tensor, ""]:
    """Mean over ``mask`` tokens of KL(softmax(target_logits) || softmax(logits)).

    >>> z = torch.randn(2, 3, 5); bool(masked_kl(z, z, torch.ones(2, 3, dtype=torch.bool)).abs() < 1e-6)
    True
    """
    lp_t, lp = target_logits.float().log_softmax(-1), logits.float().log_softmax(-1)
    kl = (lp_t.exp() * (lp_t - lp)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1)


def next_token_ce(
    logits: Float[Tensor, "batch pos vocab"], tokens: Int[Tensor, "batch pos"], keep: Bool[Tensor, "batch pos_minus_1"]
) -> Float[Tensor, ""]:
    """Mean cross-entropy of ``tokens[:, t + 1]`` under ``logits[:, t]`` over ``keep`` positions.

    >>> z = torch.zeros(1, 3, 4); tokens = torch.tensor([[0, 1, 2]])
    >>> round(float(next_token_ce(z, tokens, torch.ones(1, 2, dtype=torch.bool))), 4) == round(float(torch.log(torch.tensor(4.0))), 4)
    True
    """
    if not keep.any():
        raise ValueError("no tokens to predict in the batch (check the mask / prompt_len)")
    return F.cross_entropy(logits[:, :-1][keep].float(), tokens[:, 1:][keep])


# ----------------------------------------------------------------------------- chunked path


@dataclass
class Head:
    """Rows entering an unembedding and the unembedding itself: ``logits = hidden @ W + b``."""

    hidden: Float[Tensor, "n d_model"]
    W: Float[Tensor, "d_model vocab"]
    b: Float[Tensor, " vocab"] | None = None


class HeadLosses(NamedTuple):
    """Per student head: mean CE (zeros without labels), mean KL from the teacher (zeros without
    one), and the number of rows whose argmax is the label (no gradient)."""

    ce: Float[Tensor, " student"]
    kl: Float[Tensor, " student"]
    correct: Int[Tensor, " student"]


def head_losses(
    students: list[Head],
    *,
    labels: Int[Tensor, " n"] | None = None,
    teacher: Head | None = None,
    chunk: int | None = None,
) -> HeadLosses:
    """Mean CE(labels) and KL(teacher || student) of every student head over its rows, chunked
    over rows (see the module docstring); equal to :func:`next_token_ce` / :func:`masked_kl`
    on the full logits, gradients included (to the hidden rows, ``W`` and ``b`` where they need one).

    A student may cover fewer rows than the teacher (or the labels): its ``n_s`` rows are the first
    ``n_s`` of theirs, and its means are over those. So students on a subset of the rows share
    the teacher's logits with the others instead of forming them again.

    ``chunk``: rows per chunk (default: :data:`CHUNK_ELEMENTS` logits per model). Under
    ``torch.autocast`` the matmuls run in the autocast dtype and the softmax in float32.

    Example:
        >>> _ = torch.manual_seed(0); W, h = torch.randn(4, 9), torch.randn(5, 4)
        >>> teacher = Head(torch.randn(5, 4), W)
        >>> both = head_losses([Head(h, W), Head(h[:2], W)], teacher=teacher).kl
        >>> alone = head_losses([Head(h[:2], W)], teacher=Head(teacher.hidden[:2], W)).kl
        >>> bool(torch.allclose(both[1], alone[0]))
        True
    """
    if not students:
        raise ValueError("need at least one student head")
    if labels is None and teacher is None:
        raise ValueError("nothing to compute: give labels, a teacher, or both")
    n = max(s.hidden.shape[0] for s in students)
    for rows in (labels, teacher.hidden if teacher is not None else None):
        if rows is not None and rows.shape[0] < n:
            raise ValueError(f"a student has {n} rows, more than the teacher or the labels ({rows.shape[0]})")
    if any(s.hidden.shape[0] == 0 for s in students):
        raise ValueError("no rows to score")
    vocab = students[0].W.shape[1]
    chunk = chunk or max(1, CHUNK_ELEMENTS // vocab)
    flat = [t for s in students for t in (s.hidden, s.W, s.b)]
    t_parts = (teacher.hidden, teacher.W, teacher.b) if teacher is not None else (None, None, None)
    ce, kl, correct = _HeadLosses.apply(len(students), labels, chunk, *t_parts, *flat)
    return HeadLosses(ce, kl, correct)


def _logits(hidden: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    z = hidden @ W
    return (z + b if b is not None else z).float()


def _project(g: Tensor, W: Tensor, like: Tensor) -> Tensor:
    """``g @ W.T`` in the unembedding's dtype (autocast may lower it), returned in ``like``'s."""
    return (g.to(W.dtype) @ W.T).to(like.dtype)


class _HeadLosses(torch.autograd.Function):
    """Forward computes the losses and their gradients chunk by chunk; backward scales those.

    Per chunk and student, one ``[rows, vocab]`` tensor goes from log-probabilities to
    probabilities to the gradient in place, and the KL's difference goes through one scratch
    buffer: each ``[rows, vocab]`` allocation and pass costs as much as a small matmul here.
    """

    @staticmethod
    def forward(ctx, n_students, labels, chunk, t_hidden, t_W, t_b, *flat):
        heads = [flat[i : i + 3] for i in range(0, len(flat), 3)]
        sizes = [h.shape[0] for h, _, _ in heads]
        n, dev = max(sizes), heads[0][0].device
        ce, kl = torch.zeros(n_students, device=dev), torch.zeros(n_students, device=dev)
        correct = torch.zeros(n_students, dtype=torch.long, device=dev)
        grads = {}  # (student, term, which) -> accumulated gradient of that term's sum
        want = ctx.needs_input_grad[6:]
        terms = [t for t, on in (("ce", labels is not None), ("kl", t_hidden is not None)) if on]
        for s, (h, _, _) in enumerate(heads):
            for term in terms:
                if want[3 * s]:
                    grads[s, term, 0] = torch.empty_like(h)
                for j in (1, 2):
                    if want[3 * s + j]:
                        grads[s, term, j] = torch.zeros_like(heads[s][j], dtype=torch.float32)
        # lp_t - lp, one chunk's worth
        scratch = torch.empty(min(chunk, n), t_W.shape[1], device=dev) if t_hidden is not None else None
        with torch.no_grad():
            for lo in range(0, n, chunk):
                hi = min(n, lo + chunk)
                p_t = lp_t = None
                if t_hidden is not None:
                    lp_t = _logits(t_hidden[lo:hi], t_W, t_b).log_softmax(-1)
                    p_t = lp_t.exp()
                for s, (h, W, b) in enumerate(heads):
                    if lo >= sizes[s]:
                        continue
                    m = min(hi, sizes[s]) - lo  # this student's rows in the chunk
                    lp = _logits(h[lo : lo + m], W, b).log_softmax(-1)
                    term_grads = {}
                    if lp_t is not None:
                        diff = torch.sub(lp_t[:m], lp, out=scratch[:m])
                        kl[s] += torch.dot(p_t[:m].flatten(), diff.flatten())
                    if labels is not None:
                        y = labels[lo : lo + m]
                        ce[s] -= lp.gather(1, y[:, None]).sum()
                        correct[s] += (lp.argmax(-1) == y).sum()
                    p = lp.exp_()  # lp is not needed again: probabilities in its place
                    if labels is not None:
                        g = p.clone() if lp_t is not None else p
                        g[torch.arange(m, device=dev), y] -= 1
                        term_grads["ce"] = g
                    if lp_t is not None:
                        term_grads["kl"] = p.sub_(p_t[:m])
                    for term, g in term_grads.items():
                        if (s, term, 0) in grads:
                            grads[s, term, 0][lo : lo + m] = _project(g, W, h)
                        if (s, term, 1) in grads:
                            grads[s, term, 1] += h[lo : lo + m].T.float() @ g
                        if (s, term, 2) in grads:
                            grads[s, term, 2] += g.sum(0)
        size = torch.tensor(sizes, dtype=torch.float32, device=dev)
        ctx.n_students, ctx.grads, ctx.sizes = n_students, grads, sizes
        ctx.dtypes = [(t.dtype if t is not None else None) for t in flat]
        ctx.mark_non_differentiable(correct)
        return ce / size, kl / size, correct

    @staticmethod
    def backward(ctx, g_ce, g_kl, _):
        out = [None] * (3 * ctx.n_students)
        for (s, term, j), g in ctx.grads.items():
            scale = (g_ce if term == "ce" else g_kl)[s] / ctx.sizes[s]  # the gradients are of sums
            add = (g * scale).to(ctx.dtypes[3 * s + j])
            i = 3 * s + j
            out[i] = add if out[i] is None else out[i] + add
        return (None, None, None, None, None, None, *out)


# ----------------------------------------------------------------------------- model heads


def hooked_head(model, hidden: Float[Tensor, "n d_model"]) -> Head:
    """``hidden`` (rows after ``ln_final``) with a ``HookedTransformer``'s unembedding."""
    if getattr(model.cfg, "output_logits_soft_cap", -1.0) > 0:
        raise ValueError("the chunked losses do not support soft-capped logits")
    return Head(hidden, model.W_U, model.b_U)


def causal_lm_ce(
    model,
    tokens: Int[Tensor, "batch pos"],
    mask: Bool[Tensor, "batch pos"],
    prompt_len: Int[Tensor, " batch"] | None = None,
) -> Float[Tensor, ""]:
    """Mean next-token cross-entropy of a ``transformers`` causal LM (``model.model`` then its output
    embedding) over :func:`next_token_keep` positions, chunked: no ``[batch, pos, vocab]`` tensor.

    Example:
        Not run as a doctest: it needs a Hugging Face model and a padded batch from the caller.
        >>> loss = causal_lm_ce(hf_model, tokens, mask, prompt_len)  # doctest: +SKIP
    """
    keep = next_token_keep(mask, prompt_len)
    if not keep.any():
        raise ValueError("no tokens to predict in the batch (check the mask / prompt_len)")
    hidden = model.model(input_ids=tokens, attention_mask=mask.long()).last_hidden_state[:, :-1][keep]
    out = model.get_output_embeddings()
    return head_losses([Head(hidden, out.weight.T, out.bias)], labels=tokens[:, 1:][keep]).ce[0]
