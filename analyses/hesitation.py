"""The hesitation study: trace "wait" to adapter features, then ablate, keep and steer them.

    python -m analyses.hesitation [--pair organism] [--adapters DIR] [--out figures/hesitation]
    python -m analyses.hesitation --pair smollm2 --adapters runs/adapters-smollm2 \
        --out figures/real/hesitation --n-prompts 40 --n-problems 100

The pair's workload (:func:`mechdiff.workloads.for_pair`) gives the problems, traces and grader;
:func:`mechdiff.evaluation.hesitation.hesitation_for` what hesitating is in its tokens: the
organism's ``wait`` (controls before a ``;``), or on SmolLM2's chat the " Wait" written after a
step (``ĠWait``, other spellings counted too; controls before the newline after a step).

Steps (each printed as it runs):
 1. faithfulness and behaviour of base / hybrid / adapted / target;
 2. hesitation prompts (target responses cut right before each "wait") and matched controls;
 3. rank features by their influence on "wait" across prompts, and take the hesitation set:
    ``--ranking graph`` (default): an attribution graph per prompt; the set = the fewest features
    covering ``--share`` of the aggregated graph influence;
    ``--ranking gradient``: activation x gradient of the log-odds of "wait" (one backward per
    batch of prompts, :mod:`attribution.gradient`; for models where a graph per prompt costs
    minutes); the set = the fewest top-ranked features whose ablation removes ``--share`` of
    P("wait") at the hesitation prompts (teacher-forced); ``--n-graphs`` graphs are still built
    for the example figure;
 4. roles: output features (decoder promotes "wait"), error detection (fire on wrong steps),
    context/format (the rest), with top activating contexts;
 5. necessity (ablate the set while generating; random and activation-difference controls;
    dose-response), sufficiency (only the set decides when to hesitate; keep only the set),
    steering (add output features in the hybrid).
Writes ``--out``: HTML + PNG figures, ``summary.json`` and ``report.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

for _var, _val in (("HF_HUB_OFFLINE", "1"), ("HF_DATASETS_OFFLINE", "1"), ("WANDB_MODE", "disabled")):
    os.environ.setdefault(_var, _val)

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from analyses import hesitation_figures as figs  # noqa: E402
from attribution.build import attribute  # noqa: E402
from attribution.gradient import feature_attribution  # noqa: E402
from mechdiff.adapters.formats import SHIPPED_DIR, load_adapted  # noqa: E402
from mechdiff.evaluation import hesitation as H  # noqa: E402
from mechdiff.evaluation.faithfulness import adapter_report  # noqa: E402
from mechdiff.models import hybrid, load_pair  # noqa: E402
from mechdiff.organism import task  # noqa: E402
from mechdiff.workloads import for_pair  # noqa: E402

PUBLISHED = {"hesitation_fraction": 0.024, "gain_recovered": (0.5, 0.9)}


def _log(msg: str) -> None:
    print(f"[hesitation] {msg}", flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m analyses.hesitation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pair", default="organism",
                   help="model pair: organism (default) or smollm2[:RUN] (needs --adapters)")
    p.add_argument("--adapters", default=None,
                   help="trained adapters folder (default: the shipped ones, for the organism only)")
    p.add_argument("--out", default="figures/hesitation", help="output folder")
    p.add_argument("--n-prompts", type=int, default=120,
                   help="hesitation prompts (graphs) to use, cut from the target's replies to as many problems")
    p.add_argument("--n-problems", type=int, default=300, help="test problems for generation")
    p.add_argument("--n-dose-problems", type=int, default=200,
                   help="test problems per dose-response point (at most --n-problems)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="tokens generated per reply (default: the workload's, 96 organism / 256 chat)")
    p.add_argument("--n-traces", type=int, default=200, help="held-out traces for faithfulness")
    p.add_argument("--share", type=float, default=0.8, help="influence share the set must cover")
    p.add_argument("--max-feature-nodes", type=int, default=256, help="features visited per graph")
    p.add_argument("--ranking", choices=("graph", "gradient"), default="graph",
                   help="how features are ranked: attribution graphs (default) or activation x gradient")
    p.add_argument("--n-graphs", type=int, default=None,
                   help="attribution graphs to build (default: one per prompt with --ranking graph, "
                        "1 for the example figure with --ranking gradient)")
    p.add_argument("--random-draws", type=int, default=5, help="random same-size control sets")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    args = p.parse_args(argv)
    if args.adapters is None:
        if args.pair != "organism":
            p.error(f"--adapters DIR is required for --pair {args.pair} (the shipped adapters are the organism's)")
        args.adapters = str(SHIPPED_DIR)
    return args


def hesitation_set(adapted, prompts, spec, args):
    """(hesitation set, its scores by feature, the graphs built, how the set was sized)."""
    n_graphs = args.n_graphs if args.n_graphs is not None else (len(prompts) if args.ranking == "graph" else 1)
    rankings, graphs = [], []
    for tokens in tqdm(prompts.tokens[:n_graphs], desc="attribution graphs", leave=False):
        graph = attribute(adapted, torch.tensor(tokens), target=spec.target,
                          max_feature_nodes=args.max_feature_nodes)
        rankings.append(graph.feature_ranking(0, aggregate=True))
        graphs.append(graph)
    if args.ranking == "graph":
        scores = H.aggregate_influence(rankings)
        return H.covering_set(scores, args.share), scores, graphs, {
            "rule": f"the fewest features covering {args.share:.0%} of the graph influence on '{spec.word}'"}
    scores = H.normalized_positive(feature_attribution(adapted, prompts.tokens, spec.variants))
    ranked = list(scores)
    k, curve = H.smallest_ablating_prefix(adapted, ranked, prompts.tokens, spec.variants, args.share)
    chosen = set(ranked[:k])
    # the graphs built (on the first prompts) as a cross-check: how many of each graph's top-k
    # features (by influence on that one prompt) the gradient-ranked set contains
    overlap = []
    for ranking in rankings:
        top = [(int(r["layer"]), int(r["feature"])) for r in ranking[:k]]
        overlap.append(sum(f in chosen for f in top) / max(1, len(top)))
    return ranked[:k], scores, graphs, {
        "rule": f"the fewest top features by activation x gradient whose ablation removes {args.share:.0%} "
                f"of P('{spec.word}') at the hesitation prompts",
        "p_wait_by_k": {str(key): value for key, value in curve.items()}, "n_ranked": len(ranked),
        "graph_top_k_in_set": overlap}


def roles(adapted, hes, feature_set, wait_id):
    effect = H.decoder_logit_effect(adapted, wait_id)
    rank = _promote_rank(adapted, wait_id)
    acts = H.feature_activations(adapted, hes.tokens)
    prompt_len = [len(t) - len(lab) for t, lab in zip(hes.tokens, hes.labels)]
    labels = [["prompt"] * n + list(lab) for n, lab in zip(prompt_len, hes.labels)]
    mass = H.activation_mass_by_label(acts, labels, feature_set)
    return H.assign_roles(feature_set, effect, rank, mass), mass, acts


def _promote_rank(adapted, token_id: int) -> torch.Tensor:
    """``[layer, d_sae]``: how many tokens each feature's decoder promotes more than ``token_id``.
    One layer's logit lens (``d_sae x d_vocab``) at a time: all of SmolLM2's would take gigabytes."""
    w_u = adapted.model.W_U.detach().float()
    w_u = w_u - w_u.mean(1, keepdim=True)
    ranks = []
    for adapter in adapted.adapters:
        lens = adapter.W_dec.detach().float() @ w_u
        ranks.append((lens > lens[:, token_id:token_id + 1]).sum(-1))
    return torch.stack(ranks)


def necessity(adapted, spec, problems, feature_set, alive, hes, ctl, hes_acts, args):
    model, n = adapted.model, len(feature_set)
    after = spec.evaluate(model, problems, fwd_hooks=adapted.ablation_hooks(feature_set))
    rng = random.Random(args.seed)
    random_after = [spec.evaluate(model, problems, fwd_hooks=adapted.ablation_hooks(rng.sample(alive, n)))
                    for _ in tqdm(range(args.random_draws), desc="random controls", leave=False)]
    last = lambda acts: torch.stack([a[-1] for a in acts])  # noqa: E731  [n layer d_sae]
    diff = last(hes_acts).mean(0) - last(H.feature_activations(adapted, ctl.tokens)).mean(0)
    top = torch.topk(diff.flatten(), n).indices
    actdiff_set = [(int(i) // diff.shape[1], int(i) % diff.shape[1]) for i in top]
    actdiff_after = spec.evaluate(model, problems, fwd_hooks=adapted.ablation_hooks(actdiff_set))
    return after, random_after, actdiff_after, actdiff_set


def hesitation_at_prompts(adapted, hes, ctl, feature_set, wait_ids):
    """Greedy-"wait" rate and mean P("wait") (every spelling in ``wait_ids``) at hesitation and
    control prompts, with every adapter feature (full) and with only the hesitation set kept."""
    out = {}
    for name, hooks in (("full", []), ("kept_only", H.keep_only_hooks(adapted, feature_set))):
        p_hes = H.next_token_probability(adapted.model, hes.tokens, wait_ids, fwd_hooks=hooks)
        p_ctl = H.next_token_probability(adapted.model, ctl.tokens, wait_ids, fwd_hooks=hooks)
        out[name] = {"wait_rate": float((p_hes > 0.5).float().mean()), "wait_prob": float(p_hes.mean()),
                     "control_wait_rate": float((p_ctl > 0.5).float().mean())}
    return out


def set_decides(adapted, spec, problems, feature_set, alive, args):
    """Hesitations per response when only ``feature_set`` decides whether to hesitate (the full
    model writes every other token); controls: random sets of the same size, and no feature."""
    def rate(features):
        rows = H.set_decides_ids(adapted, spec.tokenizer, problems, features, spec.decisions,
                                 spec.max_new_tokens)
        return spec.summarize([spec.grade(task.Problem(tuple(r["operands"])), ids)
                               for r, ids in zip(problems, rows)])

    rng = random.Random(args.seed + 2)
    randoms = [rate(rng.sample(alive, len(feature_set)))["hesitations_per_response"]
               for _ in tqdm(range(args.random_draws), desc="random deciding sets", leave=False)]
    kept = rate(feature_set)
    return {"hesitations_per_response": kept["hesitations_per_response"], "accuracy": kept["accuracy"],
            "frac_hesitations_after_error": kept["frac_hesitations_after_error"],
            "random_sets": randoms, "no_features": rate([])["hesitations_per_response"]}


def dose_response(adapted, spec, problems, ranked, alive, args):
    ks = sorted({0, *[k for k in (1, 2, 4, 8, 16, 32, 64, 128) if k < len(ranked)], len(ranked)})
    shuffled = random.Random(args.seed + 1).sample(alive, len(alive))
    curves = {"ranked": [], "random": []}
    for k in tqdm(ks, desc="dose-response", leave=False):
        for name, order in (("ranked", ranked), ("random", shuffled)):
            stats = spec.evaluate(adapted.model, problems, fwd_hooks=adapted.ablation_hooks(order[:k]))
            curves[name].append(stats["hesitations_per_response"])
    return ks, curves


def steering(pair, adapted, hes, acts, output_features, wait_ids, backbone):
    """Add the output features' decoder vectors (at their mean activation on hesitation prompts)
    to the hybrid's MLP output at the last position; report P("wait") there before and after."""
    base_model = hybrid(pair, backbone)
    if not output_features:
        p = H.next_token_probability(base_model, hes.tokens, wait_ids).mean().item()
        return {"wait_prob_before": p, "wait_prob_after": p, "n_output_features": 0}
    last = torch.stack([a[-1] for a in acts])  # [n layer d_sae]
    hooks = []
    for layer in sorted({f[0] for f in output_features}):
        feats = [f[1] for f in output_features if f[0] == layer]
        vec = (last[:, layer, feats].mean(0) @ adapted.adapters[layer].W_dec.detach()[feats])

        def add(resid, hook, vec=vec):
            resid = resid.clone()
            resid[:, -1] += vec.to(resid.dtype)
            return resid
        hooks.append((f"blocks.{layer}.hook_mlp_out", add))
    before = H.next_token_probability(base_model, hes.tokens, wait_ids)
    after = H.next_token_probability(base_model, hes.tokens, wait_ids, fwd_hooks=hooks)
    full = H.next_token_probability(adapted.model, hes.tokens, wait_ids)
    return {"wait_prob_before": before.mean().item(), "wait_prob_after": after.mean().item(),
            "wait_prob_adapted": full.mean().item(), "n_output_features": len(output_features)}


def main(argv=None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    torch.manual_seed(args.seed)
    out, t0 = Path(args.out), time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    pair = load_pair(args.pair, dtype=args.dtype, device=args.device)
    adapted = load_adapted(pair, args.adapters)
    spec = H.hesitation_for(for_pair(pair), args.max_new_tokens)
    word = spec.word
    problems = spec.problems(args.n_problems, "test", seed=args.seed)

    _log("1/5 faithfulness and behaviour of base, hybrid, adapted, target")
    report = adapter_report(pair, adapted, spec.traces(args.n_traces, "test", seed=args.seed),
                            problems, progress=False, workload=spec, bridging=False)

    _log("2/5 hesitation prompts from target responses")
    hes, ctl = H.hesitation_prompts(pair.target, spec.tokenizer,
                                    spec.problems(args.n_prompts, "validation", args.seed), hesitation=spec)
    hes = _first(hes, args.n_prompts)
    ctl = _first(ctl, args.n_prompts)
    _log(f"    {len(hes)} hesitation prompts, {len(ctl)} controls, "
         f"{sum(hes.after_error) / max(1, len(hes)):.0%} after a wrong step")
    if not len(hes):
        raise SystemExit(f"the target wrote no {word!r} in its replies to {args.n_prompts} problems: "
                         "nothing to attribute; raise --n-prompts (or --max-new-tokens)")

    _log(f"3/5 ranking features for '{word}' ({args.ranking}) and the hesitation set")
    feature_set, scores, graphs, sizing = hesitation_set(adapted, hes, spec, args)
    n_total = adapted.n_features
    _log(f"    {len(feature_set)} features ({len(feature_set) / n_total:.2%} of {n_total}): {sizing['rule']}")

    _log("4/5 roles")
    role_of, mass, acts = roles(adapted, hes, feature_set, spec.target)
    counts = {r: sum(v == r for v in role_of.values()) for r in ("output", "error_detection", "context/format")}

    _log("5/5 necessity, dose-response, sufficiency, steering")
    alive_mask = torch.stack([a.amax(0) for a in acts]).amax(0) > 0  # [layer d_sae]
    alive = [tuple(map(int, ij)) for ij in alive_mask.nonzero()]
    before = report["adapted"]
    after, random_after, actdiff_after, actdiff_set = necessity(
        adapted, spec, problems, feature_set, alive, hes, ctl, acts, args)
    dose_problems = spec.problems(min(args.n_dose_problems, args.n_problems), "test", args.seed)
    ks, curves = dose_response(adapted, spec, dose_problems, feature_set, alive, args)
    keep = spec.evaluate(adapted.model, problems, fwd_hooks=H.keep_only_hooks(adapted, feature_set))
    at_prompts = hesitation_at_prompts(adapted, hes, ctl, feature_set, spec.variants)
    decides = set_decides(adapted, spec, problems, feature_set, alive, args)
    outputs = [f for f in feature_set if role_of[f] == "output"]
    steer = steering(pair, adapted, hes, acts, outputs, spec.variants, adapted.config.backbone)

    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    summary = {
        "pair": args.pair, "adapters": _shown(args.adapters),
        "hesitation_tokens": _tokens(spec),
        "n_adapter_features": n_total, "n_alive_features": len(alive),
        "n_problems": len(problems), "n_dose_problems": len(dose_problems),
        "n_hesitation_prompts": len(hes), "n_control_prompts": len(ctl),
        "frac_prompts_after_error": sum(hes.after_error) / max(1, len(hes)),
        "n_hesitation_features": len(feature_set),
        "hesitation_fraction": len(feature_set) / n_total,
        "influence_share": args.share,
        "ranking": args.ranking, "set_rule": sizing, "n_graphs": len(graphs),
        "roles": counts,
        "role_rule": H.role_rule(word),
        "hesitation_features": [{"layer": f[0], "feature": f[1], "role": role_of[f],
                                 "influence": scores[f], "top_labels": _top_labels(mass[f])}
                                for f in feature_set],
        "necessity": {
            "hesitations_per_response_before": before["hesitations_per_response"],
            "hesitations_per_response_after": after["hesitations_per_response"],
            "random_control_after": mean([r["hesitations_per_response"] for r in random_after]),
            "random_control_after_draws": [r["hesitations_per_response"] for r in random_after],
            "activation_difference_control_after": actdiff_after["hesitations_per_response"],
            "length_before": before["mean_response_tokens"], "length_after": after["mean_response_tokens"],
            "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
            "cut": _cut(before["hesitations_per_response"], after["hesitations_per_response"]),
            "random_cut": _cut(before["hesitations_per_response"],
                               mean([r["hesitations_per_response"] for r in random_after])),
        },
        "dose_response": {"k": ks, **curves},
        "sufficiency": {
            # in generation, the kept-only copy making every hesitate-or-go-on decision while the full
            # model writes the steps (mechdiff.evaluation.hesitation.set_decides_generation)
            "hesitation_retained": _ratio(decides["hesitations_per_response"],
                                          before["hesitations_per_response"]),
            "set_decides_in_generation": decides,
            "random_sets_retained": _ratio(mean(decides["random_sets"]), before["hesitations_per_response"]),
            # teacher-forced, at the target's own hesitation prefixes (the paper's sense)
            "hesitation_retained_at_prompts": _ratio(at_prompts["kept_only"]["wait_rate"],
                                                     at_prompts["full"]["wait_rate"]),
            "at_hesitation_prompts": at_prompts,
            # free generation with only the set, everywhere: it must also write the slips itself
            "hesitations_per_response_kept_only": keep["hesitations_per_response"],
            "hesitation_retained_in_generation": _ratio(keep["hesitations_per_response"],
                                                        before["hesitations_per_response"]),
            "accuracy_kept_only": keep["accuracy"]},
        "steering": steer,
        "models": {k: {m: report[k].get(m) for m in ("accuracy", "mean_response_tokens",
                                                    "hesitations_per_response", "fve_per_layer",
                                                    "kl_to_target", "top1_agreement")}
                   for k in ("base", "hybrid", "adapted", "target")},
        "gain_recovered": report.get("gain_recovered"),
        "seconds": time.perf_counter() - t0,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    figs.write_all(out, summary, report, graphs, hes, acts, role_of, spec.tokenizer)
    (out / "report.md").write_text(figs.report_markdown(summary, PUBLISHED))
    _log(f"wrote {out}/ in {summary['seconds']:.0f} s")
    return summary


def _tokens(spec: H.Hesitation) -> dict:
    """What the study counted as hesitating, for the record (token strings as the tokenizer has them)."""
    names = lambda ids: spec.tokenizer.convert_ids_to_tokens(list(ids))  # noqa: E731
    return {"workload": spec.name, "word": spec.word, "target": names([spec.target])[0],
            "variants": names(spec.variants), "go_on": names([spec.go_on])[0],
            "max_new_tokens": spec.max_new_tokens}


def _shown(path: str | Path) -> str:
    """``path`` relative to the working folder when inside it (summaries stay the same on every machine)."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _ratio(x: float, ref: float) -> float | None:
    """``x / ref``, or None when the reference is zero (nothing to cut or retain)."""
    return None if ref == 0 else x / ref


def _cut(before: float, after: float) -> float | None:
    ratio = _ratio(after, before)
    return None if ratio is None else 1 - ratio


def _first(prompts: H.CutPrompts, n: int) -> H.CutPrompts:
    out = H.CutPrompts(prompts.kind)
    for i in range(min(n, len(prompts))):
        out.add(prompts.tokens[i], prompts.problem_index[i], prompts.response_position[i],
                prompts.after_error[i], prompts.labels[i])
    return out


def _top_labels(mass: dict[str, float], k: int = 3) -> dict[str, float]:
    return dict(sorted(mass.items(), key=lambda kv: -kv[1])[:k])


if __name__ == "__main__":
    main()
