"""The summary, figures and report of the study on SmolLM2, from its stages' JSON
(:mod:`mechdiff.studies.real_stages`), with the organism's numbers (from its shipped adapters and
its study summaries) beside them: ``figures/real/summary.json``, ``report.md`` and the figures.

Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> summary = summarize(out, {})   # no stage has run yet: every section is None
    >>> summary["base"] is None, sorted(figures(summary))
    (True, [])
    >>> summary = write(out, {})
    >>> (out / "report.md").read_text().startswith("# The study on a real model")
    True
"""

from __future__ import annotations

import json
from pathlib import Path

import plotly.graph_objects as go

from mechdiff.studies import features, hesitation, lora
from mechdiff.visualization.figures import save

BEHAVIOUR_KEYS = ("accuracy", "mean_response_tokens", "hesitations_per_response")
# The papers' numbers, as each study states them (../shared/METHODS.md): transcoder adapters on
# Qwen-7B (Hu et al.) and the rank-1 LoRA lens on Qwen-32B (Ward et al.); ranges as text.
PUBLISHED = {
    "adapters_gain_recovered": "{:.2f}-{:.2f}".format(*hesitation.PUBLISHED["gain_recovered"]),
    "hesitation_fraction": hesitation.PUBLISHED["hesitation_fraction"],
    "reasoning_fraction": features.PUBLISHED["reasoning_fraction"],
    "lora_gain_recovered": lora.PUBLISHED["gain_recovered"],
    "lora_monosemantic": lora.PUBLISHED["monosemantic_lora"],
    "mlp_monosemantic": lora.PUBLISHED["monosemantic_mlp"],
    "necessity": "necessary",
    "sufficiency": "sufficient",
}


def _read(path: Path | str) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def _behaviour(stats: dict | None) -> dict | None:
    return (
        None
        if stats is None
        else {
            k: stats.get(k)
            for k in (
                *BEHAVIOUR_KEYS,
                "frac_responses_with_hesitation",
                "frac_hesitations_after_error",
                "accuracy_hesitation_banned",
            )
        }
    )


def _adapters(report: dict | None) -> dict | None:
    if report is None:
        return None
    adapted = report["adapted"]
    return {
        "fve_mean": adapted["mean_fve"],
        "fve_per_layer": adapted["fve_per_layer"],
        "kl_to_target": adapted["kl_to_target"],
        "kl_to_target_hybrid": report["hybrid"]["kl_to_target"],
        "l0_mean": adapted["mean_l0"],
        "dead_fraction": adapted["dead_fraction"],
        "gain_recovered": report.get("gain_recovered"),
        "behaviour": {k: _behaviour(report[k]) for k in ("base", "hybrid", "adapted", "target")},
    }


def _hesitation(summary: dict | None) -> dict | None:
    if summary is None:
        return None
    n, s = summary["necessity"], summary["sufficiency"]
    return {
        "n_hesitation_features": summary["n_hesitation_features"],
        "n_adapter_features": summary["n_adapter_features"],
        "hesitation_fraction": summary["hesitation_fraction"],
        "ablation_cut": n["cut"],
        "random_ablation_cut": n["random_cut"],
        "roles": summary["roles"],
        "hesitations_per_response_before": n["hesitations_per_response_before"],
        "hesitations_per_response_after": n["hesitations_per_response_after"],
        "sufficiency_retained": s.get("hesitation_retained"),
        "steering": {k: summary["steering"].get(k) for k in ("wait_prob_before", "wait_prob_after")},
        "accuracy_before": n["accuracy_before"],
        "accuracy_after": n["accuracy_after"],
        "activation_difference_cut": 1 - n["activation_difference_control_after"] / n["hesitations_per_response_before"]
        if n["hesitations_per_response_before"]
        else None,
        "teacher_forced_retained": s.get("hesitation_retained_at_prompts"),
        "n_problems": summary.get("n_problems"),
        "n_dose_problems": summary.get("n_dose_problems"),
        "n_hesitation_prompts": summary["n_hesitation_prompts"],
        "ranking": summary.get("ranking", "graph"),
        "set_rule": (summary.get("set_rule") or {}).get("rule"),
        "set_sizes": (summary.get("set_rule") or {}).get("sizes"),
        "ranking_agreement": (summary.get("set_rule") or {}).get("ranking_agreement"),
        "n_graphs": summary.get("n_graphs"),
        "random_draws": (summary.get("config") or {}).get("random_draws"),
        "confidence_intervals": summary.get("confidence_intervals"),
        "set_decides": _set_decides(s.get("set_decides_in_generation")),
        "sufficiency_variants": _variants(s.get("variants")),
    }


def _mean(xs) -> float | None:
    xs = [x for x in xs or [] if x is not None]
    return sum(xs) / len(xs) if xs else None


def _set_decides(d: dict | None) -> dict | None:
    """Hesitations per response when only the set decides whether to hesitate, against random sets."""
    if d is None:
        return None
    return {
        "hesitations_per_response": d["hesitations_per_response"],
        "random_sets": d["random_sets"],
        "random_sets_mean": _mean(d["random_sets"]),
        "no_features": d["no_features"],
    }


def _variants(v: dict | None) -> dict | None:
    """The teacher-forced sufficiency variants, one line each: the share of the full model's greedy
    hesitations the set (and the set plus its feeders) keeps, against random sets of the same sizes."""
    if v is None:
        return None
    out = {
        "n_prompts": v["n_prompts"],
        "n_set": v["n_set"],
        "n_set_plus_feeders": v["n_set_plus_feeders"],
        "threshold": v["threshold"],
    }
    for name, d in v["variants"].items():
        out[name] = {
            "set_retained": d["set"]["retained"],
            "set_greedy_rate_ci": d["set"]["greedy_rate_ci"],
            "set_plus_feeders_retained": d["set_plus_feeders"]["retained"],
            "random_sets_retained_mean": _mean(d["random_sets"]),
            "random_sets_plus_feeders_size_retained_mean": _mean(d["random_sets_plus_feeders_size"]),
            "smallest_sufficient_k": d["smallest_sufficient_k"],
            "instead": d.get("instead"),
        }
    return out


def _features(summary: dict | None) -> dict | None:
    """The feature census: reasoning fraction of the adapters and of each baseline."""
    if summary is None:
        return None
    return {
        "n_features": summary["n_features"],
        "n_alive": summary["n_alive"],
        "n_reasoning": summary["n_reasoning"],
        "reasoning_fraction": summary["reasoning_fraction"],
        "category_counts": summary["category_counts"],
        "role_counts": summary.get("role_counts"),
        "baselines": {k: b.get("reasoning_fraction") for k, b in (summary.get("baselines") or {}).items()},
        "n_traces": (summary.get("store") or {}).get("n_traces"),
    }


def _monosemanticity(classes: dict | None, chance: float | None) -> dict | None:
    """LoRA adapters against MLP neurons: the share of each class and the mean precision."""
    if classes is None:
        return None
    keep = ("monosemantic", "broad", "polysemantic", "mean_precision", "n_units")
    return {
        **{who: {k: classes[who][k] for k in keep} for who in ("lora", "mlp") if who in classes},
        "chance_precision": chance,
    }


def organism_numbers(paths: dict) -> dict:
    """The organism's side of every comparison, from its committed study outputs."""
    shipped = _read(paths.get("behaviour", "")) or {}
    report = shipped.get("metrics", {}).get("eval")
    hes, lora = _read(paths.get("hesitation", "")), _read(paths.get("lora", ""))
    return {
        "base": _behaviour(report["base"]) if report else None,
        "target": _behaviour(report["target"]) if report else None,
        "adapters": _adapters(report),
        "hesitation": _hesitation(hes),
        "lora": {
            "gain_recovered": lora["gain_recovered"],
            "monosemanticity": _monosemanticity(lora.get("monosemanticity_classes"), lora.get("chance_precision")),
        }
        if lora
        else None,
        "features": _features(_read(paths.get("features", ""))),
    }


def real_numbers(out: Path) -> dict:
    behaviour, adapters = _read(out / "behaviour.json"), _read(out / "adapters.json")
    hes_stage, lora, cost = _read(out / "hesitation.json"), _read(out / "lora.json"), _read(out / "cost.json")
    hes = _read(hes_stage["summary"]) if hes_stage else None
    features_stage = _read(out / "features.json")
    return {
        "base": _behaviour(behaviour["base"]) if behaviour else None,
        "target": _behaviour(behaviour["target"]) if behaviour else None,
        "adapters": None
        if adapters is None
        else {
            **_adapters(adapters["report"]),
            "recipe": _recipe(adapters["recipe"]),
            "train_seconds": adapters.get("train_seconds"),
        },
        "hesitation": _hesitation(hes),
        "n_problems": {
            "behaviour": (behaviour or {}).get("base", {}).get("n_problems"),
            "hesitation": ((hes or {}).get("n_problems")),
            "adapters": (adapters or {}).get("report", {}).get("n_problems"),
            "lora": (lora or {}).get("eval", {}).get("lora_r1", {}).get("n_problems"),
        },
        "lora": None
        if lora is None
        else {
            "gain_recovered": lora["eval"]["lora_r1"]["gain_recovered"],
            "behaviour": _behaviour(lora["eval"]["lora_r1"]),
            "config": {k: lora["config"][k] for k in ("rank", "steps", "lr", "batch_size")},
            "train_seconds": lora["train_seconds"],
            "monosemanticity": None
            if not lora.get("monosemanticity")
            else {
                **_monosemanticity(lora["monosemanticity"]["classes"], lora["monosemanticity"]["chance_precision"]),
                "n_tokens": lora["monosemanticity"]["n_tokens"],
                "labels": sorted(lora["monosemanticity"]["label_share"]),
            },
        },
        "features": _features(_read(features_stage["summary"])) if features_stage else None,
        "published": PUBLISHED,
        "cost": cost,
        "sweep": _read(out / "sweep.json"),
        "adapter_targets": None if adapters is None else adapter_targets(_adapters(adapters["report"])),
    }


# Issue 16's bar for SmolLM2 adapters "as faithful as the organism's": (key, direction, bound).
ADAPTER_TARGETS = (
    ("gain_recovered", ">=", 0.9),
    ("dead_fraction", "<=", 0.25),
    ("fve_min_layer", ">=", 0.98),
    ("kl_to_target", "<=", 0.02),
    ("l0_mean", "<=", 16),
)


def adapter_targets(adapters: dict) -> dict:
    """Each target with the measured value and whether it is met (None when not measured)."""
    values = {**adapters, "fve_min_layer": min(adapters["fve_per_layer"]) if adapters.get("fve_per_layer") else None}
    out = {}
    for key, op, bound in ADAPTER_TARGETS:
        v = values.get(key)
        met = None if v is None else (v >= bound if op == ">=" else v <= bound)
        out[key] = {"value": v, "target": f"{op} {bound}", "met": met}
    return out


def _recipe(recipe: dict) -> dict:
    return {k: recipe[k] for k in ("d_sae", "activation", "k", "steps", "batch_size", "n_traces", "lr")}


def summarize(out: Path, organism_paths: dict) -> dict:
    """The ``summary.json`` content: the stages' numbers in ``out`` and the organism's (from ``organism_paths``)."""
    return {**real_numbers(Path(out)), "organism": organism_numbers(organism_paths)}


def write(out: Path, organism_paths: dict) -> dict:
    """:func:`summarize` ``out``, then write ``summary.json``, the figures and ``report.md`` into it."""
    summary = summarize(out, organism_paths)
    write_summary(out, summary)
    return summary


def write_summary(out: Path, summary: dict) -> Path:
    """``summary.json``, the figures (HTML + PNG) and ``report.md`` of ``summary``, into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    for name, fig in figures(summary).items():
        save(fig, out / name)
    (out / "report.md").write_text(report_markdown(summary))
    return out


def _hesitation_sections(h: dict | None) -> list[str]:
    """How the two rankings agree, the sufficiency variants and the set deciding in generation."""
    if not h:
        return []
    lines = []
    agree = h.get("ranking_agreement")
    if agree:
        overlap = ", ".join(f"top {k}: {v:.2f}" for k, v in agree["top_k_overlap"].items())
        lines += [
            "",
            "## Two rankings of the hesitation features",
            "",
            f"Graph influence ({agree['n_graphs']} graphs) against activation x gradient, on the same "
            f"prompts: shared share of the top features ({overlap}); Spearman "
            f"{_f(agree['spearman'], '.2f')} over the {agree['n_compared']} features either ranks. "
            f"Set sizes by rule: {h.get('set_sizes')}.",
        ]
    v = h.get("sufficiency_variants")
    if v:
        lines += [
            "",
            f"## Sufficiency, teacher-forced at {v['n_prompts']} hesitation prompts",
            "",
            f"Share of the full model's greedy hesitations kept when only the set ({v['n_set']} features) "
            f"or the set plus up to as many of its graph feeders ({v['n_set_plus_feeders']} features in all) stays on; "
            "every "
            "other feature at zero, at its mean activation, or the set patched from the full model into "
            f"the hybrid; against random sets of the same sizes. Sufficient: >= {v['threshold']:.0%}.",
            "",
            "| others | set | set + feeders | random sets | random sets (feeders' size) | smallest sufficient top-k | "
            "said instead |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in ("zero", "mean", "patch"):
            d = v.get(name)
            if d is None:
                continue
            instead = ", ".join(f"{t!r} x{c}" for t, c in (d.get("instead") or {}).items())
            lines.append(
                f"| {name} | {_f(d['set_retained'])} | {_f(d['set_plus_feeders_retained'])} | "
                f"{_f(d['random_sets_retained_mean'])} | {_f(d['random_sets_plus_feeders_size_retained_mean'])} | "
                f"{d['smallest_sufficient_k'] if d['smallest_sufficient_k'] is not None else 'none'} | {instead} |"
            )
    dec = h.get("set_decides")
    if dec:
        lines += [
            "",
            f"In generation, with only the set deciding whether to hesitate: {_f(dec['hesitations_per_response'])} "
            f"hesitations per response; random sets of the same size {_f(dec['random_sets_mean'])} "
            f"({h.get('random_draws')} draws); no feature {_f(dec['no_features'])}; the full model "
            f"{_f(h['hesitations_per_response_before'])}.",
        ]
    return lines


def figures(s: dict) -> dict[str, go.Figure]:
    """The study's plotly figures by file stem: behaviour beside the organism's, and the adapters' FVE
    per layer (each only when measured)."""
    org, figs = s["organism"], {}
    names = [("base", "base"), ("target", "fine-tune")]
    for key, title in (
        ("accuracy", "Accuracy on held-out problems"),
        ("hesitations_per_response", "Hesitations per response"),
    ):
        series = {who: [(src[n] or {}).get(key) for n, _ in names] for who, src in (("organism", org), ("SmolLM2", s))}
        if all(v is None for vs in series.values() for v in vs):
            continue
        fig = go.Figure(
            [
                go.Bar(name=who, x=[t for _, t in names], y=[float("nan") if v is None else v for v in vals])
                for who, vals in series.items()
            ]
        )
        figs[key] = fig.update_layout(title=title, yaxis_title=key.replace("_", " "), barmode="group")
    if s["adapters"]:
        fve = s["adapters"]["fve_per_layer"]
        fig = go.Figure(go.Bar(x=[f"L{i}" for i in range(len(fve))], y=fve))
        figs["faithfulness"] = fig.update_layout(title="SmolLM2 adapters: FVE per layer", yaxis_title="FVE")
    return figs


def _f(x, fmt=".3f") -> str:
    return "n/a" if x is None else (x if isinstance(x, str) else format(x, fmt))


def _row(label, org, real, fmt=".3f", published=None, ci=None) -> str:
    """One table row; ``ci``: SmolLM2's 95% interval, printed after its value."""
    cell = _f(real, fmt) + ("" if not ci or real is None else f" [{_f(ci[0], fmt)}, {_f(ci[1], fmt)}]")
    return f"| {label} | {_f(org, fmt)} | {cell} | {_f(published, fmt) if published is not None else ''} |"


# (summary key, its confidence-interval key) of the hesitation rows
HESITATION_ROWS = (
    ("n_hesitation_features", None),
    ("hesitation_fraction", None),
    ("ablation_cut", "necessity_cut"),
    ("random_ablation_cut", "random_cut"),
    ("activation_difference_cut", None),
    ("accuracy_before", "accuracy_before"),
    ("accuracy_after", "accuracy_after"),
    ("sufficiency_retained", "set_decides_retained"),
    ("teacher_forced_retained", None),
)


def report_markdown(s: dict) -> str:
    o = s["organism"]
    get = lambda d, *ks: None if d is None else (get(d.get(ks[0]), *ks[1:]) if ks else d)  # noqa: E731
    published = s.get("published") or PUBLISHED
    lines = [
        "# The study on a real model: SmolLM2-135M-Instruct",
        "",
        "Regenerate with `python -m analyses.real` (needs `make real` and `python -m mechdiff.real train`). "
        "Brackets: 95% intervals (paired bootstrap over problems, Wilson for rates).",
        "",
        "| | organism | SmolLM2-135M | published |",
        "|---|---|---|---|",
    ]
    for who in ("base", "target"):
        for key in BEHAVIOUR_KEYS:
            lines.append(_row(f"{who}: {key.replace('_', ' ')}", get(o, who, key), get(s, who, key)))
    for key in ("fve_mean", "kl_to_target", "l0_mean", "gain_recovered"):
        pub = published["adapters_gain_recovered"] if key == "gain_recovered" else None
        lines.append(
            _row(f"adapters: {key.replace('_', ' ')}", get(o, "adapters", key), get(s, "adapters", key), ".3f", pub)
        )
    cis = get(s, "hesitation", "confidence_intervals") or {}
    for key, ci in HESITATION_ROWS:
        fmt = "d" if key.startswith("n_") else ".3f"
        pub = {
            "hesitation_fraction": published["hesitation_fraction"],
            "ablation_cut": published["necessity"],
            "sufficiency_retained": published["sufficiency"],
        }.get(key)
        lines.append(
            _row(
                f"hesitation: {key.replace('_', ' ')}",
                get(o, "hesitation", key),
                get(s, "hesitation", key),
                fmt,
                pub,
                cis.get(ci) if ci else None,
            )
        )
    lines.append(
        _row(
            "rank-1 LoRA: gain recovered",
            get(o, "lora", "gain_recovered"),
            get(s, "lora", "gain_recovered"),
            ".3f",
            published["lora_gain_recovered"],
        )
    )
    for who, pub in (("lora", "lora_monosemantic"), ("mlp", "mlp_monosemantic")):
        lines.append(
            _row(
                f"monosemantic share: {'LoRA adapters' if who == 'lora' else 'MLP neurons'}",
                get(o, "lora", "monosemanticity", who, "monosemantic"),
                get(s, "lora", "monosemanticity", who, "monosemantic"),
                ".3f",
                published[pub],
            )
        )
    lines.append(
        _row(
            "feature census: reasoning fraction",
            get(o, "features", "reasoning_fraction"),
            get(s, "features", "reasoning_fraction"),
            ".3f",
            published["reasoning_fraction"],
        )
    )
    for name in ("random_adapters", "mlp_neurons"):
        lines.append(
            _row(
                f"feature census: reasoning fraction, {name.replace('_', ' ')}",
                get(o, "features", "baselines", name),
                get(s, "features", "baselines", name),
            )
        )
    lines += _hesitation_sections(s.get("hesitation"))
    lines += [
        "",
        "## Settings",
        "",
        f"SmolLM2 held-out problems: {s.get('n_problems')} (the organism: 500; hesitation: 300). "
        f"Hesitation prompts: {get(o, 'hesitation', 'n_hesitation_prompts')} (organism) and "
        f"{get(s, 'hesitation', 'n_hesitation_prompts')} (SmolLM2). Hesitation set: "
        f"{get(o, 'hesitation', 'set_rule') or 'graph influence'} (organism); "
        f"{get(s, 'hesitation', 'set_rule') or 'graph influence'} (SmolLM2).",
        "",
    ]
    if s["adapters"]:
        lines.append(
            f"Adapters: {s['adapters']['recipe']} (organism: TopK k=8, 1024 features per layer, "
            f"300 steps at batch 64); trained in {_f(s['adapters']['train_seconds'], '.0f')} s."
        )
    if s.get("adapter_targets"):
        lines += [
            "",
            "## SmolLM2 adapters against the targets (issue 16)",
            "",
            "| | SmolLM2 | target | met |",
            "|---|---|---|---|",
        ]
        for key, t in s["adapter_targets"].items():
            lines.append(
                f"| {key.replace('_', ' ')} | {_f(t['value'], '.3f')} | {t['target']} | "
                f"{'-' if t['met'] is None else ('yes' if t['met'] else 'no')} |"
            )
        lines.append("")
    if s.get("sweep"):
        lines += [
            "",
            "## Width sweep (short runs on the same traces, 16 held-out traces)",
            "",
            "| width | k | steps | held-out KL | worst-layer FVE | mean FVE | dead | s/step |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in s["sweep"]["candidates"]:
            lines.append(
                f"| {r['d_sae']} | {r['k']} | {r['steps']} | {r['val_kl']:.4f} | {r['fve_min']:.4f} | "
                f"{r['fve_mean']:.4f} | {r['dead_fraction']:.2f} | {r['seconds_per_step']:.1f} |"
            )
        lines += ["", f"Picked {s['sweep']['picked']}: {s['sweep']['rule']}", ""]
    if s["lora"]:
        lines.append(f"Rank-1 LoRA: {s['lora']['config']}; trained in {_f(s['lora']['train_seconds'], '.0f')} s.")
    if s.get("cost"):
        lines += [
            "",
            "## Cost (one process each; seconds and peak resident memory)",
            "",
            "| | organism | SmolLM2-135M |",
            "|---|---|---|",
        ]
        for what in ("adapter_step", "lora_step", "attribution_graph", "gradient_ranking"):
            org, real = s["cost"]["organism"].get(what), s["cost"]["smollm2"].get(what)
            if org is None or real is None:  # measured before this row existed
                continue
            lines.append(
                f"| {what.replace('_', ' ')} | {org['seconds']:.3g} s, {org['peak_rss_gib']:.2f} GiB | "
                f"{real['seconds']:.3g} s, {real['peak_rss_gib']:.2f} GiB |"
            )
        lines.append("")
        lines.append(
            f"Training steps at batch {s['cost']['smollm2']['adapter_step'].get('batch_size')} (the "
            "batch the study trained at); graphs on one hesitation prefix with "
            "random adapters of the same width, 256 feature nodes; the gradient ranking per prompt, in "
            "batches of 8 hesitation prefixes, same adapters. Threads: "
            f"{s['cost']['smollm2']['adapter_step'].get('threads')}."
        )
    return "\n".join(lines) + "\n"
