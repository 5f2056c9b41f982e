"""The lens comparison's figures (HTML + PNG) and ``report.md``, from its ``summary.json`` dict.

Example:
    >>> s = {"organisms": {"o": {"hesitation_word": "wait", "lenses": {"kl": {k: None for k in TABLE}}}},
    ...      "agreement": {"o": {"matrix": {"kl": {}}, "same_mechanism": []}}, "label_rule": "r"}
    >>> "| kl |" in report_markdown(s)
    True
"""

from __future__ import annotations

import math
from pathlib import Path

import plotly.graph_objects as go

from mechdiff.visualization.figures import save

TABLE = ("n_units", "precision", "recall", "necessity_cut", "random_cut", "steering", "train_cpu_s", "score_cpu_s")
SHARES = ("precision", "recall", "necessity_cut", "random_cut", "steering")


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _rows(summary: dict) -> list[tuple[str, str, dict]]:
    many = len(summary["organisms"]) > 1
    return [(f"{org}/{lens}" if many else lens, org, rec)
            for org, o in summary["organisms"].items() for lens, rec in o["lenses"].items()]


def write_figures(out: Path, summary: dict) -> list[str]:
    """``lenses_x_scores`` (one bar group per lens), ``cost`` (CPU seconds) and one ``agreement_NAME``
    heatmap per organism; returns the figure names."""
    rows = _rows(summary)
    labels = [r[0] for r in rows]
    fig = go.Figure([go.Bar(name=score, x=labels, y=[_num(r[2].get(score)) for r in rows]) for score in SHARES])
    fig.update_layout(title="Lenses x scores (null scores left blank)", barmode="group", yaxis_title="share")
    save(fig, out / "lenses_x_scores", width=11)
    names = ["lenses_x_scores"]
    fig = go.Figure([go.Bar(name=k, x=labels, y=[_num(r[2].get(k)) for r in rows]) for k in ("train_cpu_s", "score_cpu_s")])
    fig.update_layout(title="Cost per lens (CPU seconds, one thread)", barmode="group", yaxis_title="CPU s",
                      yaxis_type="log")
    save(fig, out / "cost", width=11)
    names.append("cost")
    for org, agree in summary["agreement"].items():
        lenses = list(agree["matrix"])
        z = [[_num(agree["matrix"][a].get(b)) if a != b else 1.0 for b in lenses] for a in lenses]
        fig = go.Figure(go.Heatmap(z=z, x=lenses, y=lenses, zmin=0, zmax=1, colorbar_title="|r|"))
        fig.update_layout(title=f"{org}: agreement (row lens's units, best |correlation| with the column lens's)")
        save(fig, out / f"agreement_{org}")
        names.append(f"agreement_{org}")
    return names


def _cell(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "null"
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def table_markdown(summary: dict) -> str:
    """The lenses x scores table (one row per organism and lens)."""
    lines = ["| organism | word | lens | " + " | ".join(TABLE) + " |", "|" + "---|" * (len(TABLE) + 3)]
    for org, o in summary["organisms"].items():
        for lens, rec in o["lenses"].items():
            lines.append(f"| {org} | {o['hesitation_word']} | {lens} | " + " | ".join(_cell(rec.get(k)) for k in TABLE) + " |")
    return "\n".join(lines)


def report_markdown(summary: dict) -> str:
    lines = ["# Which lens finds the mechanism?", "",
             "Every lens on the same pair, the same tokens and the same problems, scored against the "
             "organism's ground-truth token labels. Null: a score the lens cannot give.", "",
             table_markdown(summary), "",
             f"**Label rule** (every lens): {summary.get('label_rule', '')}.", "",
             "**Necessity**: 1 - hesitations per response after ablating the units while generating on the test "
             "problems / before; random_cut: the same for random units of the same count (mean of the draws). "
             "**Steering**: share of the gap in P(hesitation) at the test hesitation prompts from the lens's "
             "starting model (base, or the hybrid for adapters) to its full model that adding the units closes.", ""]
    for org, o in summary["organisms"].items():
        lines += [f"## {org} (hesitation word {o['hesitation_word']!r})", "",
                  f"{o.get('n_label_tokens')} labelled tokens ({o.get('n_truth_tokens')} hesitation/slip/correction: chance "
                  f"precision {o.get('n_truth_tokens', 0) / max(1, o.get('n_label_tokens') or 1):.2f}), "
                  f"{o.get('n_hesitation_prompts')} validation hesitation prompts, {o.get('n_test_problems')} test problems.", ""]
        for lens, why in o.get("skipped", {}).items():
            lines.append(f"- **{lens}** skipped: {why}")
        lenses = o["lenses"]
        if "crosscoder" in lenses:
            c = lenses["crosscoder"]
            lines.append(f"- **crosscoder** at {c.get('site')}: d_sae {c.get('d_sae')}, L0 {_cell(c.get('l0'))}, "
                         f"FVU {_cell(c.get('fvu'))}, alive {c.get('n_alive')}; latent kinds {c.get('latent_kinds')}; "
                         f"target-specific by Latent Scaling: {c.get('n_target_specific_by_scaling')} "
                         f"(median nu: target-only latents {_cell(c.get('target_only_nu_median'))}, all alive latents "
                         f"{_cell(c.get('alive_nu_median'))}). Named: {c.get('selection')}.")
        if "activation_difference" in lenses:
            a = lenses["activation_difference"]
            lines.append(f"- **activation difference** at layer {a.get('layer')}: logit lens top {a.get('logit_lens_top')}, "
                         f"bottom {a.get('logit_lens_bottom')}; the hesitation token ranks {a.get('hesitation_rank_in_logit_lens')}.")
        if "kl" in lenses:
            k = lenses["kl"]
            top = list(k.get("by_label", {}).items())[:5]
            lines.append("- **KL** by label (mean nats, largest first): "
                         + ", ".join(f"{lab} {v['mean_kl']:.3g} (n={v['n_tokens']})" for lab, v in top)
                         + f"; as one unit under the label rule: precision {_cell(k.get('token_precision'))}, "
                           f"recall {_cell(k.get('token_recall'))}.")
        for lens, rec in lenses.items():
            if rec.get("units"):
                lines.append(f"- **{lens}** units: {', '.join(rec['units'][:20])}{' ...' if len(rec['units']) > 20 else ''}")
        agree = summary["agreement"].get(org, {})
        lines += ["", "Agreement (row: mean over its units of the best |correlation| with the column lens's units):", "",
                  "| | " + " | ".join(agree.get("matrix", {})) + " |", "|---|" + "---|" * len(agree.get("matrix", {}))]
        for a, row in agree.get("matrix", {}).items():
            lines.append(f"| {a} | " + " | ".join("-" if a == b else _cell(row.get(b)) for b in agree["matrix"]) + " |")
        pairs = agree.get("same_mechanism", [])
        lines += ["", f"Same mechanism seen twice (units of lenses with different dictionaries, |r| >= {agree.get('threshold', 0.7)}): "
                  + ("; ".join(f"{p['a']} ~ {p['b']} ({p['correlation']:+.2f})" for p in pairs) or "none") + ".",
                  "Units two lenses both name: " + (", ".join(f"{k} {n}" for k, n in agree.get("shared_units", {}).items())
                                                    or "none") + ".", ""]
    lines += ["Figures: lenses_x_scores, cost, agreement_* (.html interactive, .png static).", ""]
    return "\n".join(lines)
