"""The token-level KL lens: where the target's next-token distribution departs from the base's.

``KL(p_target || p_base)`` at every token of the labelled replies (the prediction made *at* that
token, of the next one), summarised by ground-truth label. It names tokens, not units, so its unit
scores (units, precision, recall, necessity, steering) are null; the label rule is still applied
to the KL as if it were one unit (``token_precision`` / ``token_recall``), and the KL series takes
part in the agreement between lenses.

Example:
    >>> kl = token_kl(pair.target, pair.base, [[1, 5, 6, 7]])  # doctest: +SKIP
    >>> kl.shape  # every token but the first  # doctest: +SKIP
    torch.Size([3])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechdiff.lenses import scoring
from mechdiff.lenses.context import LensContext
from mechdiff.lenses.cost import measure
from mechdiff.padding import pad


@torch.no_grad()
def token_kl(
    target, base, sequences: Sequence[Sequence[int]], batch_size: int = 64, pad_id: int = 0
) -> Float[Tensor, " n_tokens"]:
    """``KL(p_target || p_base)`` (nats) at every token but each sequence's first, flattened in order."""
    out = []
    for start in range(0, len(sequences), batch_size):
        tokens, mask = pad([list(s) for s in sequences[start : start + batch_size]], pad_id, "right")
        mask[:, 0] = False
        logp = target(tokens.to(target.cfg.device)).float().log_softmax(-1)
        logq = base(tokens.to(base.cfg.device)).float().log_softmax(-1)
        kl = (logp.exp() * (logp - logq)).sum(-1)
        out.append(kl[mask.to(kl.device)].cpu())
    return torch.cat(out)


def kl_lens(ctx: LensContext) -> scoring.LensResult:
    """KL per token on the labelled replies, its mean per label, and the label rule on it."""
    with measure() as score:
        kl = token_kl(ctx.pair.target, ctx.pair.base, ctx.tokens.sequences)
    labels = ctx.tokens.flat_labels()
    by_label = {}
    for lab in dict.fromkeys(labels):
        sel = torch.tensor([x == lab for x in labels])
        by_label[lab] = {"mean_kl": float(kl[sel].mean()), "n_tokens": int(sel.sum())}
    rule = scoring.label_scores(kl[:, None], ctx.tokens.truth())
    return scoring.LensResult(
        "kl",
        None,
        kl[:, None],
        score=score,
        extra={
            "by_label": dict(sorted(by_label.items(), key=lambda kv: -kv[1]["mean_kl"])),
            "mean_kl": float(kl.mean()),
            "token_precision": rule["precision"],
            "token_recall": rule["recall"],
        },
    )
