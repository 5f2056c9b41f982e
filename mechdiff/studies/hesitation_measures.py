"""The measurements of the hesitation study, each on explicit inputs (no config, no files).

Roles of the set's features, necessity (ablation while generating, with random and
activation-difference controls), dose-response, sufficiency (only the set decides each
hesitate-or-go-on slot; teacher-forced at the prompts) and steering of the hybrid. Used by
:func:`mechdiff.studies.hesitation.run`.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from mechdiff.evaluation import feature_roles, feature_sets, sufficiency
from mechdiff.evaluation import hesitation as H
from mechdiff.evaluation.intervals import wilson
from mechdiff.models import hybrid

Feature = feature_sets.Feature


def roles(adapted, hes: H.CutPrompts, feature_set: Sequence[Feature], target_id: int):
    """``(role by feature, activation mass by label, activations at the prompts)``."""
    effect = feature_roles.decoder_logit_effect(adapted, target_id)
    rank = promote_rank(adapted, target_id)
    acts = feature_roles.feature_activations(adapted, hes.tokens)
    prompt_len = [len(t) - len(lab) for t, lab in zip(hes.tokens, hes.labels)]
    labels = [["prompt"] * n + list(lab) for n, lab in zip(prompt_len, hes.labels)]
    mass = feature_roles.activation_mass_by_label(acts, labels, feature_set)
    return feature_roles.assign_roles(feature_set, effect, rank, mass), mass, acts


def promote_rank(adapted, token_id: int) -> Float[Tensor, "layer d_sae"]:
    """How many tokens each feature's decoder promotes more than ``token_id``. One layer's logit
    lens (``d_sae x d_vocab``) at a time: all of SmolLM2's at once would take gigabytes."""
    w_u = adapted.model.W_U.detach().float()
    w_u = w_u - w_u.mean(1, keepdim=True)
    ranks = []
    for adapter in adapted.adapters:
        lens = adapter.W_dec.detach().float() @ w_u
        ranks.append((lens > lens[:, token_id : token_id + 1]).sum(-1))
    return torch.stack(ranks)


def activation_difference_set(adapted, hes_acts, ctl: H.CutPrompts, n: int) -> list[Feature]:
    """The ``n`` features whose mean activation at the last position differs most (hesitation minus
    control prompts): the set a plain activation-difference lens would name."""
    last = lambda acts: torch.stack([a[-1] for a in acts])  # noqa: E731  [n layer d_sae]
    diff = last(hes_acts).mean(0) - last(feature_roles.feature_activations(adapted, ctl.tokens)).mean(0)
    top = torch.topk(diff.flatten(), n).indices
    return [(int(i) // diff.shape[1], int(i) % diff.shape[1]) for i in top]


def necessity(adapted, spec, problems, feature_set, alive, actdiff_set, random_draws: int, seed: int):
    """Behaviour with the set ablated while generating, with ``random_draws`` random sets of the
    same size (from ``alive`` features) and with the activation-difference set ablated."""
    model, n = adapted.model, len(feature_set)
    after = spec.evaluate(model, problems, fwd_hooks=adapted.ablation_hooks(feature_set))
    rng = random.Random(seed)
    random_after = [
        spec.evaluate(model, problems, fwd_hooks=adapted.ablation_hooks(rng.sample(alive, n)))
        for _ in tqdm(range(random_draws), desc="random controls", leave=False)
    ]
    actdiff_after = spec.evaluate(model, problems, fwd_hooks=adapted.ablation_hooks(actdiff_set))
    return after, random_after, actdiff_after


def hesitation_at_prompts(adapted, hes, ctl, feature_set, token_ids) -> dict:
    """Greedy-hesitation rate and mean P(hesitation) (every spelling in ``token_ids``) at hesitation
    and control prompts, with every adapter feature (full) and with only the set kept."""
    out = {}
    for name, hooks in (("full", []), ("kept_only", sufficiency.keep_only_hooks(adapted, feature_set))):
        p_hes = H.next_token_probability(adapted.model, hes.tokens, token_ids, fwd_hooks=hooks)
        p_ctl = H.next_token_probability(adapted.model, ctl.tokens, token_ids, fwd_hooks=hooks)
        out[name] = {
            "wait_rate": float((p_hes > 0.5).float().mean()),
            "wait_prob": float(p_hes.mean()),
            "control_wait_rate": float((p_ctl > 0.5).float().mean()),
        }
    return out


def set_decides(adapted, spec, problems, feature_set, alive, random_draws: int, seed: int) -> dict:
    """Hesitations per response when only ``feature_set`` decides whether to hesitate (the full
    model writes every other token); controls: random sets of the same size, and no feature."""

    def rate(features):
        rows = sufficiency.set_decides_ids(
            adapted, spec.tokenizer, problems, features, spec.decisions, spec.max_new_tokens
        )
        return spec.summarize([spec.grade(spec.problem(r["operands"]), ids) for r, ids in zip(problems, rows)])

    rng = random.Random(seed + 2)
    randoms = [
        rate(rng.sample(alive, len(feature_set)))["hesitations_per_response"]
        for _ in tqdm(range(random_draws), desc="random deciding sets", leave=False)
    ]
    kept = rate(feature_set)
    return {
        "hesitations_per_response": kept["hesitations_per_response"],
        "accuracy": kept["accuracy"],
        "frac_hesitations_after_error": kept["frac_hesitations_after_error"],
        "hesitations_by_response": kept.get("hesitations_by_response"),
        "random_sets": randoms,
        "no_features": rate([])["hesitations_per_response"],
    }


def dose_response(adapted, spec, problems, ranked, alive, seed: int):
    """Hesitations per response with the top-k ranked features ablated, against k random ones."""
    ks = sorted({0, *[k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k < len(ranked)], len(ranked)})
    shuffled = random.Random(seed + 1).sample(alive, len(alive))
    curves = {"ranked": [], "random": []}
    for k in tqdm(ks, desc="dose-response", leave=False):
        for name, order in (("ranked", ranked), ("random", shuffled)):
            stats = spec.evaluate(adapted.model, problems, fwd_hooks=adapted.ablation_hooks(order[:k]))
            curves[name].append(stats["hesitations_per_response"])
    return ks, curves


def steering(pair, adapted, hes, acts, output_features, token_ids, backbone) -> dict:
    """Add the output features' decoder vectors (at their mean activation on hesitation prompts)
    to the hybrid's MLP output at the last position; P(hesitation) there before and after."""
    base_model = hybrid(pair, backbone)
    if not output_features:
        p = H.next_token_probability(base_model, hes.tokens, token_ids).mean().item()
        return {"wait_prob_before": p, "wait_prob_after": p, "n_output_features": 0}
    last = torch.stack([a[-1] for a in acts])  # [n layer d_sae]
    hooks = []
    for layer in sorted({f[0] for f in output_features}):
        feats = [f[1] for f in output_features if f[0] == layer]
        vec = last[:, layer, feats].mean(0) @ adapted.adapters[layer].W_dec.detach()[feats]

        def add(resid, hook, vec=vec):
            resid = resid.clone()
            resid[:, -1] += vec.to(resid.dtype)
            return resid

        hooks.append((f"blocks.{layer}.hook_mlp_out", add))
    before = H.next_token_probability(base_model, hes.tokens, token_ids)
    after = H.next_token_probability(base_model, hes.tokens, token_ids, fwd_hooks=hooks)
    full = H.next_token_probability(adapted.model, hes.tokens, token_ids)
    return {
        "wait_prob_before": before.mean().item(),
        "wait_prob_after": after.mean().item(),
        "wait_prob_adapted": full.mean().item(),
        "n_output_features": len(output_features),
    }


SUFFICIENT = 0.8  # a set "suffices" when it keeps this share of the full model's greedy hesitations


def feeders(graphs, feature_set: Sequence[Feature], n: int) -> list[Feature]:
    """The ``n`` features outside the set with the largest summed positive direct edges into the
    set's nodes, over ``graphs``: what the set reads from (its inputs in the graphs)."""
    inside = set(feature_set)
    score: dict[Feature, float] = {}
    for g in graphs:
        feats = [tuple(int(x) for x in f) for f in g.features.tolist()]  # (layer, pos, feature)
        rows = [i for i, (la, _, f) in enumerate(feats) if (la, f) in inside]
        if not rows:
            continue
        into = g.adjacency[rows, : g.n_features].clamp(min=0).sum(0)
        for i, value in enumerate(into.tolist()):
            key = (feats[i][0], feats[i][2])
            if key not in inside and value > 0:
                score[key] = score.get(key, 0.0) + value
    return [f for f, _ in sorted(score.items(), key=lambda kv: -kv[1])[:n]]


def sufficiency_variants(
    adapted,
    hes: H.CutPrompts,
    feature_set: Sequence[Feature],
    ranked: Sequence[Feature],
    graphs,
    alive: Sequence[Feature],
    means,
    token_ids: Sequence[int],
    random_draws: int,
    seed: int,
) -> dict:
    """Teacher-forced sufficiency at the hesitation prompts, three ways (others at zero, at their
    mean, or the set patched from the full model into the hybrid: see
    :mod:`mechdiff.evaluation.sufficiency`), each for the set, for the set plus as many of its
    feeders (from ``graphs``), and for ``random_draws`` random sets of the same sizes; with the
    retention curve over the top-k of ``ranked`` and what the kept-only model predicts instead."""
    ids = torch.tensor(list(token_ids))
    rng = random.Random(seed + 3)
    fed = list(feature_set) + feeders(graphs, feature_set, len(feature_set))

    def measure(features, others):
        p, top = sufficiency.kept_only_next_token(adapted, hes.tokens, features, token_ids, others=others, means=means)
        return p, torch.isin(top, ids), top

    _, full_greedy, _ = measure(
        [(la, f) for la in range(adapted.config.n_layers) for f in range(adapted.config.d_sae)], "zero"
    )  # every feature kept: full
    n, full_rate = len(hes), float(full_greedy.float().mean())

    def summary(p, greedy):
        k = int(greedy.sum())
        return {
            "greedy_rate": k / n,
            "greedy_rate_ci": wilson(k, n),
            "mean_prob": float(p.mean()),
            "retained": None if full_rate == 0 else (k / n) / full_rate,
        }

    out = {
        "n_prompts": n,
        "full": {"greedy_rate": full_rate, "greedy_rate_ci": wilson(int(full_greedy.sum()), n)},
        "n_set": len(feature_set),
        "n_set_plus_feeders": len(fed),
        "threshold": SUFFICIENT,
        "variants": {},
    }
    ks = sorted(
        {k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if k < min(len(ranked), 4 * len(feature_set))}
        | {len(feature_set), min(len(ranked), 4 * len(feature_set))}
    )
    for others in sufficiency.OTHERS:
        p, greedy, top = measure(feature_set, others)
        v = {"set": summary(p, greedy), "set_plus_feeders": summary(*measure(fed, others)[:2])}
        v["random_sets"] = [
            summary(*measure(rng.sample(alive, len(feature_set)), others)[:2])["retained"] for _ in range(random_draws)
        ]
        v["random_sets_plus_feeders_size"] = [
            summary(*measure(rng.sample(alive, min(len(alive), len(fed))), others)[:2])["retained"]
            for _ in range(random_draws)
        ]
        v["curve"] = {str(k): summary(*measure(list(ranked[:k]), others)[:2])["retained"] for k in ks}
        v["smallest_sufficient_k"] = next((k for k in ks if (v["curve"][str(k)] or 0) >= SUFFICIENT), None)
        lost = full_greedy & ~greedy  # prompts where the full model hesitates and the kept-only one does not
        v["instead"] = _counts(top[lost].tolist())
        out["variants"][others] = v
    return out


def _counts(ids: list[int], k: int = 5) -> dict[int, int]:
    return dict(Counter(ids).most_common(k))


def ranking_agreement(a: dict[Feature, float], b: dict[Feature, float], ks: Sequence[int]) -> dict:
    """How far two feature rankings (scores, highest first) agree: the share of each top-k they
    hold in common, for each ``k``, and Spearman's rank correlation of their scores over the union
    of their top-``max(ks)`` (a feature one ranking does not score counts as zero there)."""
    top = lambda r, k: [f for f, _ in sorted(r.items(), key=lambda kv: -kv[1])[:k]]  # noqa: E731
    overlap = {str(k): len(set(top(a, k)) & set(top(b, k))) / k for k in sorted(set(ks)) if k > 0}
    union = sorted(set(top(a, max(ks))) | set(top(b, max(ks))))
    if len(union) < 3:
        return {"top_k_overlap": overlap, "spearman": None, "n_compared": len(union)}
    ranks = [torch.tensor([r.get(f, 0.0) for f in union]).argsort().argsort().float() for r in (a, b)]
    rho = torch.corrcoef(torch.stack(ranks))[0, 1].item()
    return {"top_k_overlap": overlap, "spearman": rho, "n_compared": len(union)}
