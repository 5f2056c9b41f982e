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

from mechdiff.visualization.figures import save

BEHAVIOUR_KEYS = ("accuracy", "mean_response_tokens", "hesitations_per_response")


def _read(path: Path | str) -> dict | None:
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def _behaviour(stats: dict | None) -> dict | None:
    return (
        None
        if stats is None
        else {k: stats.get(k) for k in (*BEHAVIOUR_KEYS, "frac_hesitations_after_error", "accuracy_hesitation_banned")}
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
        "lora": {"gain_recovered": lora["gain_recovered"]} if lora else None,
    }


def real_numbers(out: Path) -> dict:
    behaviour, adapters = _read(out / "behaviour.json"), _read(out / "adapters.json")
    hes_stage, lora, cost = _read(out / "hesitation.json"), _read(out / "lora.json"), _read(out / "cost.json")
    hes = _read(hes_stage["summary"]) if hes_stage else None
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
        },
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
    return "n/a" if x is None else format(x, fmt)


def _row(label, org, real, fmt=".3f") -> str:
    return f"| {label} | {_f(org, fmt)} | {_f(real, fmt)} |"


def report_markdown(s: dict) -> str:
    o = s["organism"]
    get = lambda d, *ks: None if d is None else (get(d.get(ks[0]), *ks[1:]) if ks else d)  # noqa: E731
    lines = [
        "# The study on a real model: SmolLM2-135M-Instruct",
        "",
        "Regenerate with `python -m analyses.real` (needs `make real` and `python -m mechdiff.real train`).",
        "",
        "| | organism | SmolLM2-135M |",
        "|---|---|---|",
    ]
    for who in ("base", "target"):
        for key in BEHAVIOUR_KEYS:
            lines.append(_row(f"{who}: {key.replace('_', ' ')}", get(o, who, key), get(s, who, key)))
    for key in ("fve_mean", "kl_to_target", "l0_mean", "gain_recovered"):
        lines.append(_row(f"adapters: {key.replace('_', ' ')}", get(o, "adapters", key), get(s, "adapters", key)))
    for key in (
        "n_hesitation_features",
        "hesitation_fraction",
        "ablation_cut",
        "random_ablation_cut",
        "activation_difference_cut",
        "accuracy_before",
        "accuracy_after",
        "sufficiency_retained",
        "teacher_forced_retained",
    ):
        fmt = "d" if key.startswith("n_") else ".3f"
        lines.append(
            _row(f"hesitation: {key.replace('_', ' ')}", get(o, "hesitation", key), get(s, "hesitation", key), fmt)
        )
    lines.append(
        _row("rank-1 LoRA: gain recovered", get(o, "lora", "gain_recovered"), get(s, "lora", "gain_recovered"))
    )
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
