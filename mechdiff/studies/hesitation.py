"""The hesitation study as a library call: trace the hesitation token to adapter features, then
ablate, keep and steer them.

The pair's workload (:func:`mechdiff.workloads.for_pair`) gives the problems, traces and grader,
and what hesitating is in its tokens: an organism's own hesitation word(s) (``wait`` on the shipped one; controls before a ``;``), or on
SmolLM2's chat the " Wait" written after a step. Nothing assumes the word.

Steps:
 1. faithfulness and behaviour of base / hybrid / adapted / target;
 2. hesitation prompts (target responses cut right before each hesitation) and matched controls;
 3. rank features by their influence on the hesitation token across prompts (``ranking="graph"``:
    an attribution graph per prompt, influence aggregated; ``"gradient"``: activation x gradient
    of its log-odds, one backward per batch), then size the set by two rules, both reported:
    *influence*, the fewest features covering ``share`` of the aggregated influence (graphs only),
    and *ablation*, the fewest top-ranked features whose ablation removes ``share`` of
    P(hesitation) at the prompts (teacher-forced). ``sizing`` picks the headline set: by default
    (``"both"``) the smallest top-ranked prefix that meets both rules (the ablation rule alone
    for the gradient ranking, which has no influence to cover);
 4. roles: output / error detection / context-format;
 5. necessity, dose-response, sufficiency (the set decides; kept only), steering.

Example:
    >>> from mechdiff.models import load_pair
    >>> from mechdiff.adapters.formats import SHIPPED_DIR, load_adapted
    >>> pair = load_pair("organism"); adapted = load_adapted(pair, SHIPPED_DIR)
    >>> cfg = HesitationConfig(n_prompts=6, n_problems=12, n_dose_problems=6, n_traces=8,
    ...                        random_draws=1, ranking="gradient")

    The study itself is not run as a doctest: it generates, attributes and ablates for minutes.
    >>> result = run(pair, adapted, cfg, progress=False)  # doctest: +SKIP
    >>> result.summary()["necessity"]["cut"] > 0.5  # doctest: +SKIP
    True
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mechdiff.config_checks import check
from mechdiff.evaluation import feature_roles, feature_sets, sufficiency
from mechdiff.evaluation import hesitation as H
from mechdiff.evaluation.faithfulness import adapter_report
from mechdiff.evaluation.intervals import bootstrap_paired, wilson
from mechdiff.studies import hesitation_measures as M
from mechdiff.studies import hesitation_report as report_mod
from mechdiff.studies.step_store import StepStore
from mechdiff.workloads import Workload, for_pair

PUBLISHED = {"hesitation_fraction": 0.024, "gain_recovered": (0.5, 0.9)}
RANKINGS = ("graph", "gradient")
SIZINGS = ("both", "ablation", "influence")


@dataclass(frozen=True)
class HesitationConfig:
    """Sample sizes and rules of the study (defaults: the organism's headline run)."""

    n_prompts: int = 120  # hesitation prompts, cut from the target's replies to as many problems
    n_problems: int = 300  # held-out test problems for generation
    n_dose_problems: int = 200  # test problems per dose-response point (at most n_problems)
    n_traces: int = 200  # held-out traces for faithfulness
    max_new_tokens: int | None = None  # default: the workload's (96 organism words, 256 chat tokens)
    share: float = 0.8  # influence share the set must cover (influence rule)
    ablation_share: float = 0.9  # share of the greedy hesitations at the prompts its ablation removes
    max_feature_nodes: int = 256
    ranking: str = "graph"
    sizing: str = "both"
    n_graphs: int | None = None  # default: one per prompt (graph ranking), 1 for the figure (gradient)
    random_draws: int = 5
    seed: int = 0

    def __post_init__(self):
        check(
            self,
            at_least_1=("n_prompts", "n_problems", "n_dose_problems", "n_traces", "max_feature_nodes", "random_draws"),
            positive=("share", "ablation_share"),
            fraction=("share", "ablation_share"),  # (0, 1]
            choices={"ranking": RANKINGS, "sizing": SIZINGS},
        )
        if self.sizing == "influence" and self.ranking != "graph":
            raise ValueError("sizing='influence' needs ranking='graph' (gradient scores are no influence)")
        if self.n_graphs is not None and self.n_graphs < 0:
            raise ValueError(f"n_graphs must be >= 0, not {self.n_graphs}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, not {self.max_new_tokens}")


@dataclass
class HesitationResult:
    """What :func:`run` measured: :meth:`summary` (the ``summary.json`` content), :meth:`figures`
    (plotly figures that display inline), :meth:`report` (markdown), :meth:`write` (all to a folder)."""

    data: dict
    faithfulness: dict = field(repr=False)
    graphs: list = field(repr=False)
    prompts: H.CutPrompts = field(repr=False)
    activations: list = field(repr=False)
    role_of: dict = field(repr=False)
    tokenizer: object = field(repr=False)

    def summary(self) -> dict:
        return self.data

    def figures(self) -> dict:
        return report_mod.figures(self.data)

    def report(self) -> str:
        return report_mod.report_markdown(self.data, PUBLISHED)

    def write(self, out: str | Path) -> Path:
        """``summary.json``, figures (HTML + PNG), ``report.md`` and the role examples, into ``out``."""
        import json

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(self.data, indent=1))
        report_mod.write_all(out, self.data, self.graphs, self.prompts, self.activations, self.role_of, self.tokenizer)
        (out / "report.md").write_text(self.report())
        return out


def _log(msg: str, progress: bool) -> None:
    if progress:
        print(f"[hesitation] {msg}", flush=True)


def ranked_features(
    adapted, prompts: H.CutPrompts, spec, cfg: HesitationConfig, progress: bool = True, store: StepStore | None = None
):
    """``(ranked features, their scores, the graphs built)`` by ``cfg.ranking``; with a ``store``,
    each graph is kept as it is built, so a killed run resumes at the next one."""
    from attribution.build import attribute
    from attribution.gradient import feature_attribution

    store = store or StepStore(None, {})
    n_graphs = cfg.n_graphs if cfg.n_graphs is not None else (len(prompts) if cfg.ranking == "graph" else 1)
    rankings, graphs = [], []
    for i, tokens in enumerate(
        tqdm(prompts.tokens[:n_graphs], desc="attribution graphs", leave=False, disable=not progress)
    ):
        graph = store.graph(
            f"graph_{i:03d}",
            lambda tokens=tokens: attribute(
                adapted, torch.tensor(tokens), target=spec.target, max_feature_nodes=cfg.max_feature_nodes
            ),
        )
        rankings.append(graph.feature_ranking(0, aggregate=True))
        graphs.append(graph)
    gradient = feature_sets.normalized_positive(feature_attribution(adapted, prompts.tokens, spec.variants))
    graph = feature_sets.aggregate_influence(rankings) if rankings else None
    scores = graph if cfg.ranking == "graph" else gradient
    # The other ranking, for agreement: the graphs' when ranking by gradient (if any were built).
    other = {"graph": gradient, "gradient": graph}[cfg.ranking]
    return list(scores), scores, graphs, rankings, other


def hesitation_set(
    adapted, prompts: H.CutPrompts, spec, cfg: HesitationConfig, progress: bool = True, store: StepStore | None = None
):
    """``(the set, scores by feature, graphs, how it was sized: both rules and the P curve)``."""
    store = store or StepStore(None, {})
    ranked, scores, graphs, rankings, other = ranked_features(adapted, prompts, spec, cfg, progress, store)
    k_abl, curve = store.json(
        "ablation_sizing",
        lambda: feature_sets.smallest_ablating_prefix(
            adapted, ranked, prompts.tokens, spec.variants, cfg.ablation_share, greedy=True
        ),
    )
    curve = {int(k): v for k, v in dict(curve).items()}
    sizes = {"ablation": k_abl}
    if cfg.ranking == "graph":
        sizes["influence"] = len(feature_sets.covering_set(scores, cfg.share))
    k = max(sizes.values()) if cfg.sizing == "both" else sizes[cfg.sizing]
    chosen = set(ranked[:k])
    overlap = []  # how many of each graph's own top-k features the set holds
    for ranking in rankings:
        top = [(int(r["layer"]), int(r["feature"])) for r in ranking[:k]]
        overlap.append(sum(f in chosen for f in top) / max(1, len(top)))
    by = "aggregated graph influence" if cfg.ranking == "graph" else "activation x gradient"
    rules = {
        "ablation": f"the fewest top features by {by} whose ablation removes {cfg.ablation_share:.0%} "
        f"of the greedy '{spec.word}' at the hesitation prompts that the ranked features carry",
        "influence": f"the fewest features covering {cfg.share:.0%} of the graph influence on '{spec.word}'",
    }
    rules["both"] = (
        f"the fewest top features by {by} that cover {cfg.share:.0%} of the influence on "
        f"'{spec.word}' and whose ablation removes {cfg.ablation_share:.0%} of the greedy "
        f"'{spec.word}' they carry at the hesitation prompts"
        if "influence" in sizes
        else rules["ablation"]
    )
    return (
        ranked[:k],
        scores,
        graphs,
        {
            "rule": rules[cfg.sizing],
            "sizing": cfg.sizing,
            "sizes": sizes,
            "greedy_rate_by_k": {str(key): value for key, value in curve.items()},
            "n_ranked": len(ranked),
            "graph_top_k_in_set": overlap,
            # graph influence against activation x gradient, on the same prompts (None: no graph built)
            "ranking_agreement": None
            if other is None
            else {
                "rankings": ["graph", "gradient"],
                "n_graphs": len(graphs),
                **M.ranking_agreement(scores, other, (10, k, 100)),
            },
        },
    )


def run(
    pair,
    adapted,
    cfg: HesitationConfig | None = None,
    *,
    progress: bool = True,
    pair_name: str | None = None,
    adapters_name: str = "(given)",
    steps: str | Path | None = None,
) -> HesitationResult:
    """The hesitation study on ``pair`` with its trained ``adapted`` model (see the module doc).

    ``pair_name`` / ``adapters_name`` only label the summary and report (default: the target's name).
    ``steps``: a folder that keeps each expensive step's result (:class:`StepStore`) as it finishes,
    so that a killed run, rerun with the same settings, resumes where it stopped; the steps that
    were loaded are listed in the summary's ``resumed_steps``.
    """
    cfg = cfg or HesitationConfig()
    store = StepStore(
        steps,
        {
            "config": asdict(cfg),
            "pair": pair_name or str(pair.meta.get("target_name", "?")),
            "adapters": adapters_name,
            "n_features": adapted.n_features,
        },
    )
    torch.manual_seed(cfg.seed)
    t0 = time.perf_counter()
    spec = for_pair(pair, cfg.max_new_tokens)  # the workload, its replies capped
    word = spec.word
    problems = spec.problems(cfg.n_problems, "test", seed=cfg.seed)

    _log("1/5 faithfulness and behaviour of base, hybrid, adapted, target", progress)
    faith = store.json(
        "faithfulness",
        lambda: adapter_report(
            pair,
            adapted,
            spec.traces(cfg.n_traces, "test", seed=cfg.seed),
            problems,
            progress=False,
            workload=spec,
            bridging=False,
        ),
    )

    _log(f"2/5 hesitation prompts ('{word}') from target responses", progress)
    hes, ctl = [
        H.CutPrompts(**p)
        for p in store.json(
            "prompts",
            lambda: [
                asdict(_first(p, cfg.n_prompts))
                for p in H.hesitation_prompts(
                    pair.target, spec.tokenizer, spec.problems(cfg.n_prompts, "validation", cfg.seed), workload=spec
                )
            ],
        )
    ]
    _log(f"    {len(hes)} hesitation prompts, {len(ctl)} controls", progress)
    if not len(hes):
        raise ValueError(
            f"the target wrote no {word!r} in its replies to {cfg.n_prompts} problems: "
            "nothing to attribute; raise n_prompts (or max_new_tokens)"
        )

    _log(f"3/5 ranking features for '{word}' ({cfg.ranking}) and the hesitation set", progress)
    feature_set, scores, graphs, sizing = hesitation_set(adapted, hes, spec, cfg, progress, store)
    n_total = adapted.n_features
    _log(f"    {len(feature_set)} features ({len(feature_set) / n_total:.2%} of {n_total}): {sizing['rule']}", progress)

    _log("4/5 roles", progress)
    role_of, mass, acts = M.roles(adapted, hes, feature_set, spec.target)
    counts = {r: sum(v == r for v in role_of.values()) for r in ("output", "error_detection", "context/format")}

    _log("5/5 necessity, dose-response, sufficiency, steering", progress)
    alive_mask = torch.stack([a.amax(0) for a in acts]).amax(0) > 0  # [layer d_sae]
    alive = [tuple(map(int, ij)) for ij in alive_mask.nonzero()]
    actdiff_set = M.activation_difference_set(adapted, acts, ctl, len(feature_set))
    after, random_after, actdiff_after = store.json(
        "necessity",
        lambda: M.necessity(adapted, spec, problems, feature_set, alive, actdiff_set, cfg.random_draws, cfg.seed),
    )
    dose_problems = spec.problems(min(cfg.n_dose_problems, cfg.n_problems), "test", cfg.seed)
    ks, curves = store.json(
        "dose_response", lambda: M.dose_response(adapted, spec, dose_problems, feature_set, alive, cfg.seed)
    )
    keep = store.json(
        "kept_only",
        lambda: spec.evaluate(adapted.model, problems, fwd_hooks=sufficiency.keep_only_hooks(adapted, feature_set)),
    )
    at_prompts = M.hesitation_at_prompts(adapted, hes, ctl, feature_set, spec.variants)
    decides = store.json(
        "set_decides",
        lambda: M.set_decides(adapted, spec, problems, feature_set, alive, cfg.random_draws, cfg.seed),
    )
    means = sufficiency.mean_activations(
        adapted,
        spec.traces(min(cfg.n_traces, 64), "test", seed=cfg.seed)["input_ids"],
        pad_id=spec.tokenizer.pad_token_id or 0,
    )
    variants = store.json(
        "sufficiency_variants",
        lambda: M.sufficiency_variants(
            adapted, hes, feature_set, list(scores), graphs, alive, means, spec.variants, cfg.random_draws, cfg.seed
        ),
    )
    outputs = [f for f in feature_set if role_of[f] == "output"]
    steer = store.json(
        "steering", lambda: M.steering(pair, adapted, hes, acts, outputs, spec.variants, adapted.config.backbone)
    )

    data = _summary(
        cfg,
        spec,
        faith,
        hes,
        ctl,
        feature_set,
        scores,
        graphs,
        sizing,
        role_of,
        counts,
        mass,
        alive,
        problems,
        dose_problems,
        after,
        random_after,
        actdiff_after,
        (ks, curves),
        keep,
        at_prompts,
        decides,
        steer,
        n_total,
    )
    for v in variants["variants"].values():  # what the kept-only model says instead, as tokens
        v["instead"] = {spec.tokenizer.convert_ids_to_tokens(int(i)): c for i, c in v["instead"].items()}
    data["sufficiency"]["variants"] = variants
    data = {
        "pair": pair_name or str(pair.meta.get("target_name", "?")),
        "adapters": adapters_name,
        "task": pair.meta.get("task"),
        **data,
        "seconds": time.perf_counter() - t0,
        "resumed_steps": store.loaded,
    }
    return HesitationResult(data, faith, graphs, hes, acts, role_of, spec.tokenizer)


def _summary(
    cfg,
    spec,
    faith,
    hes,
    ctl,
    feature_set,
    scores,
    graphs,
    sizing,
    role_of,
    counts,
    mass,
    alive,
    problems,
    dose_problems,
    after,
    random_after,
    actdiff_after,
    dose,
    keep,
    at_prompts,
    decides,
    steer,
    n_total,
) -> dict:
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    before = faith["adapted"]
    hpr = "hesitations_per_response"
    ks, curves = dose
    random_mean = mean([r[hpr] for r in random_after])
    return {
        "config": asdict(cfg),
        "hesitation_tokens": _tokens(spec),
        "n_adapter_features": n_total,
        "n_alive_features": len(alive),
        "n_problems": len(problems),
        "n_dose_problems": len(dose_problems),
        "n_hesitation_prompts": len(hes),
        "n_control_prompts": len(ctl),
        "frac_prompts_after_error": sum(hes.after_error) / max(1, len(hes)),
        "n_hesitation_features": len(feature_set),
        "hesitation_fraction": len(feature_set) / n_total,
        "influence_share": cfg.share,
        "ranking": cfg.ranking,
        "set_rule": sizing,
        "n_graphs": len(graphs),
        "roles": counts,
        "role_rule": feature_roles.role_rule(spec.word),
        "hesitation_features": [
            {
                "layer": f[0],
                "feature": f[1],
                "role": role_of[f],
                "influence": scores[f],
                "top_labels": _top_labels(mass[f]),
            }
            for f in feature_set
        ],
        "necessity": {
            "hesitations_per_response_before": before[hpr],
            "hesitations_per_response_after": after[hpr],
            "random_control_after": random_mean,
            "random_control_after_draws": [r[hpr] for r in random_after],
            "activation_difference_control_after": actdiff_after[hpr],
            "length_before": before["mean_response_tokens"],
            "length_after": after["mean_response_tokens"],
            "accuracy_before": before["accuracy"],
            "accuracy_after": after["accuracy"],
            "cut": _cut(before[hpr], after[hpr]),
            "random_cut": _cut(before[hpr], random_mean),
            "activation_difference_cut": _cut(before[hpr], actdiff_after[hpr]),
        },
        "confidence_intervals": _intervals(before, after, random_after, decides),
        "dose_response": {"k": ks, **curves},
        "sufficiency": {
            # in generation, the kept-only copy making every hesitate-or-go-on decision while the full
            # model writes the steps (mechdiff.evaluation.hesitation.set_decides_ids)
            "hesitation_retained": _ratio(decides[hpr], before[hpr]),
            "set_decides_in_generation": decides,
            "random_sets_retained": _ratio(mean(decides["random_sets"]), before[hpr]),
            # teacher-forced, at the target's own hesitation prefixes (the paper's sense)
            "hesitation_retained_at_prompts": _ratio(
                at_prompts["kept_only"]["wait_rate"], at_prompts["full"]["wait_rate"]
            ),
            "at_hesitation_prompts": at_prompts,
            # free generation with only the set, everywhere: it must also write the slips itself
            "hesitations_per_response_kept_only": keep[hpr],
            "hesitation_retained_in_generation": _ratio(keep[hpr], before[hpr]),
            "accuracy_kept_only": keep["accuracy"],
            "wrong_steps_per_response_kept_only": _per_response(keep),
            "wrong_steps_per_response_full": _per_response(before),
            "p_hesitation_given_wrong_step_kept_only": keep.get("p_hesitation_given_wrong_step"),
            "p_hesitation_given_wrong_step_full": before.get("p_hesitation_given_wrong_step"),
        },
        "steering": steer,
        "models": {
            k: {
                m: faith[k].get(m)
                for m in ("accuracy", "mean_response_tokens", hpr, "fve_per_layer", "kl_to_target", "top1_agreement")
            }
            for k in ("base", "hybrid", "adapted", "target")
        },
        "gain_recovered": faith.get("gain_recovered"),
    }


def _intervals(before: dict, after: dict, random_after: list[dict], decides: dict) -> dict:
    """95% intervals of the headline numbers over the held-out problems: paired bootstrap for the
    cuts and the retention (both conditions ran on the same problems), Wilson for accuracies."""
    hb = before.get("hesitations_by_response")
    if hb is None:  # an evaluation that does not grade per response
        return {}
    per_problem_random = [sum(col) / len(col) for col in zip(*[r["hesitations_by_response"] for r in random_after])]
    correct = lambda stats: stats.get("correct_by_response") or []  # noqa: E731
    return {
        "method": "95%: paired percentile bootstrap over problems (2000 resamples) for cuts and retention; "
        "Wilson score interval for accuracies",
        "necessity_cut": bootstrap_paired(hb, after["hesitations_by_response"], _cut),
        "random_cut": bootstrap_paired(hb, per_problem_random, _cut) if per_problem_random else None,
        "set_decides_retained": (
            bootstrap_paired(hb, decides["hesitations_by_response"], lambda b, a: _ratio(a, b))
            if decides.get("hesitations_by_response")
            else None
        ),
        "accuracy_before": wilson(sum(correct(before)), len(correct(before))),
        "accuracy_after": wilson(sum(correct(after)), len(correct(after))),
    }


def _per_response(stats: dict) -> float | None:
    """Wrong first-attempt steps per response (None where the grader does not parse steps)."""
    n = stats.get("n_wrong_steps")
    return None if n is None else n / max(1, stats["n_problems"])


def _tokens(spec: Workload) -> dict:
    """What the study counted as hesitating (token strings as the tokenizer has them)."""
    names = lambda ids: spec.tokenizer.convert_ids_to_tokens(list(ids))  # noqa: E731
    return {
        "workload": spec.name,
        "word": spec.word,
        "target": names([spec.target])[0],
        "variants": names(spec.variants),
        "go_on": names([spec.go_on])[0],
        "max_new_tokens": spec.max_new_tokens,
    }


def _ratio(x: float, ref: float) -> float | None:
    """``x / ref``, or None when the reference is zero (nothing to cut or retain)."""
    return None if ref == 0 else x / ref


def _cut(before: float, after: float) -> float | None:
    ratio = _ratio(after, before)
    return None if ratio is None else 1 - ratio


def _first(prompts: H.CutPrompts, n: int) -> H.CutPrompts:
    out = H.CutPrompts(prompts.kind)
    for i in range(min(n, len(prompts))):
        out.add(
            prompts.tokens[i],
            prompts.problem_index[i],
            prompts.response_position[i],
            prompts.after_error[i],
            prompts.labels[i],
        )
    return out


def _top_labels(mass: dict[str, float], k: int = 3) -> dict[str, float]:
    return dict(sorted(mass.items(), key=lambda kv: -kv[1])[:k])
