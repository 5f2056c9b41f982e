"""Roles of hesitation features: what a feature's decoder writes (logit effect) and where it fires
(activation mass by ground-truth label), and the rule that names output / error-detection /
context features.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from mechdiff.evaluation.feature_sets import Feature
from mechdiff.padding import pad


def decoder_logit_effect(adapted, token_id: int) -> Float[Tensor, "layer d_sae"]:
    """Direct effect of one unit of each feature on ``token_id``'s demeaned logit.

    The decoder row goes straight to the unembedding through the final norm's weight (scale left
    out: it is shared by all features at a position, so it does not change the ranking).
    """
    model = adapted.model
    w_u = model.W_U.detach().float()
    direction = (w_u[:, token_id] - w_u.mean(1)) * model.ln_final.w.detach().float()
    return torch.stack([a.W_dec.detach().float() @ direction for a in adapted.adapters])


@torch.no_grad()
def feature_activations(
    adapted,
    sequences: Sequence[Sequence[int]],
    batch_size: int = 64,
    pad_id: int = 0,
) -> list[Float[Tensor, "pos layer d_sae"]]:
    """Every adapter feature's activation at every real position of each sequence (one pass)."""
    names = [adapted.acts_name(layer) for layer in range(adapted.config.n_layers)]
    out = []
    for start in range(0, len(sequences), batch_size):
        chunk = [list(s) for s in sequences[start : start + batch_size]]
        tokens, mask = pad(chunk, pad_id, "left")
        _, cache = adapted.model.run_with_cache(
            tokens.to(adapted.model.cfg.device),
            attention_mask=mask.long().to(adapted.model.cfg.device),
            names_filter=lambda n: n in names,
        )
        acts = torch.stack([cache[n] for n in names], dim=2).cpu()  # [batch pos layer d_sae]
        for row, seq in enumerate(chunk):
            out.append(acts[row, tokens.shape[1] - len(seq) :])
    return out


def activation_mass_by_label(
    acts: Sequence[Float[Tensor, "pos layer d_sae"]],
    labels: Sequence[Sequence[str]],
    features: Sequence[Feature],
) -> dict[Feature, dict[str, float]]:
    """For each feature, the share of its total activation that falls on each token label."""
    idx_l = torch.tensor([f[0] for f in features], dtype=torch.long)
    idx_f = torch.tensor([f[1] for f in features], dtype=torch.long)
    mass: dict[str, Tensor] = {}
    for a, labs in zip(acts, labels):
        sel = a[:, idx_l, idx_f]  # [pos n_features]
        for lab in dict.fromkeys(labs):  # first-seen order, not a set's: the same sums in every process
            rows = torch.tensor([i for i, x in enumerate(labs) if x == lab], dtype=torch.long)
            mass[lab] = mass.get(lab, torch.zeros(len(features))) + sel[rows].sum(0)
    total = sum(mass.values()) if mass else torch.zeros(len(features))
    return {
        f: {lab: float(m[i] / total[i]) if total[i] > 0 else 0.0 for lab, m in mass.items()}
        for i, f in enumerate(features)
    }


def role_rule(word: str) -> str:
    """The rule :func:`assign_roles` applies, for a hesitation written ``word`` (the graphs' target)."""
    return (
        f"output: the feature's decoder raises the '{word}' logit directly (its direct effect on '{word}' "
        f"is positive and '{word}' is among the 3 tokens it promotes most); of the others, "
        "error_detection: at least half of its activation mass lies on the tokens of a wrong step "
        "(label 'slip'); context/format: the rest, which fire on the step's own tokens, separators "
        "and other formatting."
    )


def assign_roles(
    features: Sequence[Feature],
    direct_effect: Float[Tensor, "layer d_sae"],
    promote_rank: Float[Tensor, "layer d_sae"],
    mass: dict[Feature, dict[str, float]],
) -> dict[Feature, str]:
    """Classify hesitation features by :func:`role_rule`.

    ``promote_rank[l, i]``: the rank of "wait" among the tokens feature (l, i) promotes (0 = top).
    """
    roles = {}
    for f in features:
        layer, feat = f
        if direct_effect[layer, feat] > 0 and promote_rank[layer, feat] < 3:
            roles[f] = "output"
        elif mass.get(f, {}).get("slip", 0.0) >= 0.5:
            roles[f] = "error_detection"
        else:
            roles[f] = "context/format"
    return roles
