"""The organism family's table, figure and report (:mod:`mechdiff.studies.organisms`).

Every sentence is built from the numbers it states; a failed target carries its measured reason.
"""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from mechdiff.visualization.figures import save

COLUMNS = (  # (label, getter on one organism's summary, format)
    ("word", lambda o: o["hesitation_word"], "{}"),
    (
        "task",
        lambda o: (
            f"{o['task']['n_operands']}x{o['task']['width']} digits, slip "
            f"{o['task']['slip_prob']:.0%}, re-check {o['task']['recheck_prob']:.0%}"
        ),
        "{}",
    ),
    ("target accuracy", lambda o: o["behaviour"]["target"]["accuracy"], "{:.3f}"),
    ("base accuracy", lambda o: o["behaviour"]["base"]["accuracy"], "{:.3f}"),
    ("hesitations / response", lambda o: o["behaviour"]["target"]["hesitations_per_response"], "{:.2f}"),
    ("P(hesitation after a wrong step), sampled", lambda o: _sampled(o, "p_hesitation_given_wrong_step"), "{:.2f}"),
    (
        "P(hesitation after a right hard step), sampled",
        lambda o: _sampled(o, "p_hesitation_given_correct_hard_step"),
        "{:.3f}",
    ),
    ("adapter gain recovered", lambda o: o["adapters"]["gain_recovered"], "{:.2f}"),
    ("set size", lambda o: o["hesitation"]["n_hesitation_features"], "{}"),
    ("set fraction", lambda o: o["hesitation"]["hesitation_fraction"], "{:.2%}"),
    ("ablation cut", lambda o: o["hesitation"]["ablation_cut"], "{:.0%}"),
    ("random cut", lambda o: o["hesitation"]["random_ablation_cut"], "{:.0%}"),
    ("activation-difference cut", lambda o: o["hesitation"]["activation_difference_cut"], "{:.0%}"),
    ("set decides", lambda o: o["hesitation"]["set_decides"], "{:.0%}"),
    ("  of which after a wrong step", lambda o: o["hesitation"].get("set_decides_after_error"), "{:.0%}"),
    (
        "steering P(hes)",
        lambda o: f"{o['hesitation']['steering_before']:.3f} -> {o['hesitation']['steering_after']:.3f}",
        "{}",
    ),
    ("roles (out/err/ctx)", lambda o: "/".join(str(v) for v in o["hesitation"]["roles"].values()), "{}"),
)
BARS = {
    "ablation_cut": "cut: set",
    "random_ablation_cut": "cut: random",
    "activation_difference_cut": "cut: act.-diff.",
    "set_decides": "set decides",
}


def _sampled(o: dict, key: str):
    return o["behaviour"]["target"].get("sampled", {}).get(key)


def _cell(fmt: str, value) -> str:
    return "n/a" if value is None else fmt.format(value)


def table_markdown(data: dict) -> str:
    names = list(data["organisms"])
    rows = ["| | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, get, fmt in COLUMNS:
        rows.append(f"| {label} | " + " | ".join(_cell(fmt, get(data["organisms"][n])) for n in names) + " |")
    return "\n".join(rows)


def headline_figure(data: dict) -> go.Figure:
    """Organisms x headline cuts and retention, grouped bars."""
    fig = go.Figure()
    for name, org in data["organisms"].items():
        h = org["hesitation"]
        fig.add_trace(
            go.Bar(
                name=f"{name} ('{org['hesitation_word']}')",
                x=list(BARS.values()),
                y=[h[k] if h[k] is not None else 0 for k in BARS],
            )
        )
    fig.update_layout(
        barmode="group",
        title_text="Hesitations cut by ablation, and retained when the set decides",
        yaxis_title_text="share of the full model's hesitations",
        template="simple_white",
    )
    return fig


def report_markdown(data: dict) -> str:
    parts = [
        "# The hesitation study across the organism family",
        "",
        "Regenerate with `python -m analyses.organisms`. One study config for every organism "
        "(nothing retuned); targets: " + ", ".join(f"{k} {v}" for k, v in data["targets"].items()) + ".",
        "",
        table_markdown(data),
        "",
    ]
    for name, org in data["organisms"].items():
        failed = {k: t for k, t in org["targets"].items() if not t["met"]}
        met = sum(t["met"] for t in org["targets"].values())
        parts.append(f"## {name}: {met} of {len(org['targets'])} targets met")
        parts.append(f"Set rule: {org['hesitation']['set_rule']} ({org['hesitation']['set_sizes']}).")
        for key, t in failed.items():
            parts.append(f"- **{key}** {_cell('{:.3g}', t['value'])} (goal {t['goal']}): {t['reason']}.")
        h = org["hesitation"]
        if h["set_decides"] is not None and h["set_decides"] > 1.1:
            parts.append(
                f"- The kept-only copy decides {h['set_decides']:.0%} of the full model's hesitations: "
                f"it also hesitates where the full model goes on (only "
                f"{_cell('{:.0%}', h.get('set_decides_after_error'))} of its hesitations follow a wrong "
                "step), so the set carries the push to hesitate but not the evidence to go on."
            )
        parts.append(f"Per-organism report: `{name}/report.md`.")
        parts.append("")
    return "\n".join(parts)


def write(out: Path, data: dict) -> None:
    save(headline_figure(data), out / "headline")
    (out / "report.md").write_text(report_markdown(data))
