"""The organism family's table, figure and report (:mod:`mechdiff.studies.organisms`).

Every sentence is built from the numbers it states; a failed target carries its measured reason.
"""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from mechdiff.visualization.figures import save

COLUMNS = (  # (label, getter on one organism's summary, format)
    ("word", lambda o: o["hesitation_word"], "{}"),
    ("task", lambda o: f"{o['task']['n_operands']}x{o['task']['width']} digits, slip "
                       f"{o['task']['slip_prob']:.0%}, re-check {o['task']['recheck_prob']:.0%}", "{}"),
    ("target accuracy", lambda o: o["behaviour"]["target"]["accuracy"], "{:.3f}"),
    ("base accuracy", lambda o: o["behaviour"]["base"]["accuracy"], "{:.3f}"),
    ("hesitations / response", lambda o: o["behaviour"]["target"]["hesitations_per_response"], "{:.2f}"),
    ("P(hes | wrong step), sampled", lambda o: _sampled(o, "p_hesitation_given_wrong_step"), "{:.2f}"),
    ("P(hes | right hard step), sampled", lambda o: _sampled(o, "p_hesitation_given_correct_hard_step"), "{:.3f}"),
    ("adapter gain recovered", lambda o: o["adapters"]["gain_recovered"], "{:.2f}"),
    ("set size", lambda o: o["hesitation"]["n_hesitation_features"], "{}"),
    ("set fraction", lambda o: o["hesitation"]["hesitation_fraction"], "{:.2%}"),
    ("ablation cut", lambda o: o["hesitation"]["ablation_cut"], "{:.0%}"),
    ("random cut", lambda o: o["hesitation"]["random_ablation_cut"], "{:.0%}"),
    ("activation-difference cut", lambda o: o["hesitation"]["activation_difference_cut"], "{:.0%}"),
    ("set decides", lambda o: o["hesitation"]["set_decides"], "{:.0%}"),
    ("steering P(hes)", lambda o: f"{o['hesitation']['steering_before']:.3f} -> "
                                  f"{o['hesitation']['steering_after']:.3f}", "{}"),
    ("roles (out/err/ctx)", lambda o: "/".join(str(v) for v in o["hesitation"]["roles"].values()), "{}"),
)
BARS = ("ablation_cut", "random_ablation_cut", "activation_difference_cut", "set_decides")


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
        fig.add_trace(go.Bar(name=f"{name} ('{org['hesitation_word']}')", x=list(BARS),
                             y=[h[k] if h[k] is not None else 0 for k in BARS]))
    fig.update_layout(barmode="group", title_text="The hesitation study on each organism (same config)",
                      yaxis_title_text="share of the full model's hesitations", yaxis_range=[0, 1.05],
                      template="simple_white")
    return fig


def report_markdown(data: dict) -> str:
    parts = ["# The hesitation study across the organism family", "",
             "Regenerate with `python -m analyses.organisms`. One study config for every organism "
             "(nothing retuned); targets: " + ", ".join(f"{k} {v}" for k, v in data["targets"].items()) + ".",
             "", table_markdown(data), ""]
    for name, org in data["organisms"].items():
        failed = {k: t for k, t in org["targets"].items() if not t["met"]}
        met = sum(t["met"] for t in org["targets"].values())
        parts.append(f"## {name}: {met} of {len(org['targets'])} targets met")
        parts.append(f"Set rule: {org['hesitation']['set_rule']} ({org['hesitation']['set_sizes']}).")
        for key, t in failed.items():
            parts.append(f"- **{key}** {_cell('{:.3g}', t['value'])} (goal {t['goal']}): {t['reason']}.")
        parts.append(f"Per-organism report: `{name}/report.md`.")
        parts.append("")
    return "\n".join(parts)


def write(out: Path, data: dict) -> None:
    save(headline_figure(data), out / "headline")
    (out / "report.md").write_text(report_markdown(data))
