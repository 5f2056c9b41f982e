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

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from mechdiff.visualization.figures import PALETTE, new_figure, save, write_html

TABLE = (
    "n_units",
    "precision",
    "recall",
    "necessity_cut",
    "random_cut",
    "steering",
    "train_cpu_s",
    "score_cpu_s",
    "train_peak_gib",
    "score_peak_gib",
)
KIND = {"wall": "wall, recorded", "wall+cpu": "wall+CPU"}  # train_s_kind shown beside a train_cpu_s that is not all CPU
SHOWN_METRICS = ("val_kl", "val_nmse", "val_fve", "loss", "token_acc")  # a retrained artefact's, beside the given's
SHARES = ("precision", "recall", "necessity_cut", "random_cut", "steering")


def _num(v) -> float:
    return float("nan") if v is None else float(v)


def _rows(summary: dict) -> list[tuple[str, str, dict]]:
    many = len(summary["organisms"]) > 1
    return [
        (f"{org}/{lens}" if many else lens, org, rec)
        for org, o in summary["organisms"].items()
        for lens, rec in o["lenses"].items()
    ]


def _panels(rows, with_scores: bool) -> list[tuple[str, bool, dict[str, list[float]]]]:
    """``(y title, log scale, {series: values per row})`` per panel."""

    def series(keys):
        return {k: [_num(r[2].get(k)) for r in rows] for k in keys}

    panels = [("share", False, series(SHARES))] if with_scores else []
    return panels + [
        ("seconds (one thread)", True, series(("train_cpu_s", "score_cpu_s"))),
        ("memory, GiB", False, series(("train_peak_gib", "score_peak_gib"))),
    ]


def _save_panels(out: Path, name: str, title: str, rows, panels) -> None:
    """``name.html`` (plotly, one subplot per panel) and ``name.png`` (matplotlib, the same panels);
    a train_cpu_s bar that is not CPU seconds measured here is labelled with its kind."""
    labels = [r[0] for r in rows]
    marks = [KIND.get(r[2].get("train_s_kind"), "") for r in rows]
    heights = [2 if p[0] == "share" else 1 for p in panels]
    fig = make_subplots(
        rows=len(panels),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        row_heights=[h / sum(heights) for h in heights],
    )
    for i, (ytitle, log, series) in enumerate(panels, start=1):
        for k, ys in series.items():
            fig.add_trace(go.Bar(name=k, x=labels, y=ys, text=marks if k == "train_cpu_s" else None), row=i, col=1)
        fig.update_yaxes(title_text=ytitle, type="log" if log else None, row=i, col=1)
    fig.update_layout(title=title, barmode="group", height=250 * sum(heights) + 100)
    write_html(fig, out / f"{name}.html")
    figure = new_figure(figsize=(11, 1.9 * sum(heights) + 1.2))
    axes = figure.subplots(len(panels), 1, sharex=True, gridspec_kw={"height_ratios": heights}, squeeze=False)[:, 0]
    x = np.arange(len(labels))
    for ax, (ytitle, log, series) in zip(axes, panels, strict=True):
        n = len(series)
        for j, (k, ys) in enumerate(series.items()):
            pos = x + (j - (n - 1) / 2) * 0.8 / n
            bars = ax.bar(pos, ys, width=0.8 / n, label=k, color=PALETTE[j % len(PALETTE)])
            if k == "train_cpu_s":
                for bar, mark in zip(bars, marks, strict=True):
                    if mark:
                        bar.set_hatch("//")
                if any(marks):
                    ax.text(
                        1.005,
                        0.0,
                        "hatched: wall seconds\nrecorded when trained",
                        transform=ax.transAxes,
                        fontsize=7,
                        va="bottom",
                    )
        ax.set_ylabel(ytitle, fontsize=9)
        if log:
            ax.set_yscale("log")
        ax.legend(fontsize=7, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.spines[["top", "right"]].set_visible(False)
    axes[-1].set_xticks(x, labels, rotation=35, ha="right", fontsize=8)
    axes[0].set_title(title, fontsize=10)
    figure.savefig(out / f"{name}.png", dpi=130, bbox_inches="tight")


def write_figures(out: Path, summary: dict) -> list[str]:
    """``lenses_x_scores`` (per lens: the scores, then its cost in seconds and memory), ``cost``
    (seconds and memory alone) and one ``agreement_NAME`` heatmap per organism; returns the figure names."""
    rows = _rows(summary)
    out.mkdir(parents=True, exist_ok=True)
    _save_panels(
        out,
        "lenses_x_scores",
        "Lenses x scores and cost (null left blank; train seconds marked "
        "'wall' were recorded when a reused artefact was trained)",
        rows,
        _panels(rows, True),
    )
    _save_panels(
        out,
        "cost",
        "Cost per lens: CPU seconds (train marked 'wall': recorded when trained), memory "
        "(peak RSS rise over the phase's start)",
        rows,
        _panels(rows, False),
    )
    names = ["lenses_x_scores", "cost"]
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
    if isinstance(v, float):
        return f"{v:.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    return str(v)


def table_markdown(summary: dict) -> str:
    """The lenses x scores table (one row per organism and lens)."""
    lines = ["| organism | word | lens | " + " | ".join(TABLE) + " |", "|" + "---|" * (len(TABLE) + 3)]
    for org, o in summary["organisms"].items():
        for lens, rec in o["lenses"].items():
            cells = [
                _cell(rec.get(k))
                + (
                    f" ({KIND[rec.get('train_s_kind')]})"
                    if k == "train_cpu_s" and rec.get("train_s_kind") in KIND
                    else ""
                )
                for k in TABLE
            ]
            lines.append(f"| {org} | {o['hesitation_word']} | {lens} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _cost_prose(summary: dict) -> str:
    """The report's paragraph on cost: what was measured in the run and what recorded."""
    retrained = (summary.get("settings") or {}).get("retrain") or []
    reused = {"adapters": "the transcoder adapters", "lora": "the LoRA", "lora-sae": "the SAE on the LoRA state"}
    again = [reused[k] for k in retrained if k in reused]
    text = "**Cost**: train_cpu_s / score_cpu_s are CPU seconds measured in this run (time.process_time, one thread)"
    if again:
        text += (
            f"; the reused artefacts ({', '.join(again)}) were trained again in this run with the recipes saved "
            "beside them, to measure their training (the scores read the given ones; how close each retrained "
            "copy came is listed per organism)"
        )
    text += (
        '. Where marked, "wall, recorded" is the wall seconds a reused artefact\'s training recorded (not '
        'retrained here), "wall+CPU" the LoRA\'s recorded wall seconds plus the CPU seconds of training an '
        f"SAE like the given one in this run. Memory: {summary.get('memory_rule', '')}. Null where nothing was "
        "measured (train_cpu_s_source in summary.json says which and why). "
        f"Whole run: peak RSS {_cell(summary.get('peak_rss_gib'))} GiB, {_cell(summary.get('cpu_s'))} CPU s."
    )
    return text


def _retrained_lines(lenses: dict) -> list[str]:
    """One line per reused artefact trained again in the run: its cost and its closeness to the given one."""
    parts = {}
    for rec in lenses.values():
        for kind, part in (rec.get("train_parts") or {}).items():
            if part and part.get("closeness"):
                parts[kind] = part
    lines = []
    for kind, part in parts.items():
        c = part["closeness"]
        shown = "; ".join(
            f"{k} {_cell(v['given'])} given, {_cell(v['retrained'])} retrained"
            for k, v in c.get("metrics", {}).items()
            if k.startswith(SHOWN_METRICS)
        )
        lines.append(
            f"- **{kind} trained again** ({part.get('overrides') or 'the saved recipe'}): "
            f"{_cell(part.get('cpu_s'))} CPU s, {_cell(part.get('rise_gib'))} GiB over the start "
            f"(process peak {_cell(part.get('peak_gib'))} GiB); weight cosine with the given "
            f"{_cell(c.get('weight_cosine'))}; final metrics: {shown}."
        )
    return lines


def report_markdown(summary: dict) -> str:
    lines = [
        "# Which lens finds the mechanism?",
        "",
        "Every lens on the same pair, the same tokens and the same problems, scored against the "
        "organism's ground-truth token labels. Null: a score the lens cannot give.",
        "",
        table_markdown(summary),
        "",
        f"**Label rule** (every lens): {summary.get('label_rule', '')}.",
        "",
        "**Necessity**: 1 - hesitations per response after ablating the units while generating on the test "
        "problems / before; random_cut: the same for random units of the same count (mean of the draws). "
        "**Steering**: share of the gap in P(hesitation) at the test hesitation prompts from the lens's "
        "starting model (base, or the hybrid for adapters) to its full model that adding the units closes.",
        "",
        _cost_prose(summary),
        "",
    ]
    for org, o in summary["organisms"].items():
        lines += [
            f"## {org} (hesitation word {o['hesitation_word']!r})",
            "",
            f"{o.get('n_label_tokens')} labelled tokens ({o.get('n_truth_tokens')} hesitation/slip/correction: chance "
            f"precision {o.get('n_truth_tokens', 0) / max(1, o.get('n_label_tokens') or 1):.2f}), "
            f"{o.get('n_hesitation_prompts')} validation hesitation prompts, {o.get('n_test_problems')} test problems.",
            "",
        ]
        for lens, why in o.get("skipped", {}).items():
            lines.append(f"- **{lens}** skipped: {why}")
        lenses = o["lenses"]
        if "crosscoder" in lenses:
            c = lenses["crosscoder"]
            lines.append(
                f"- **crosscoder** at {c.get('site')}: d_sae {c.get('d_sae')}, L0 {_cell(c.get('l0'))}, "
                f"FVU {_cell(c.get('fvu'))}, alive {c.get('n_alive')}; latent kinds {c.get('latent_kinds')}; "
                f"target-specific by Latent Scaling: {c.get('n_target_specific_by_scaling')} "
                f"(median nu: target-only latents {_cell(c.get('target_only_nu_median'))}, all alive latents "
                f"{_cell(c.get('alive_nu_median'))}). Named: {c.get('selection')}."
            )
        if "activation_difference" in lenses:
            a = lenses["activation_difference"]
            lines.append(
                f"- **activation difference** at layer {a.get('layer')}: logit lens top {a.get('logit_lens_top')}, "
                f"bottom {a.get('logit_lens_bottom')}; the hesitation token ranks {a.get('hesitation_rank_in_logit_lens')}."
            )
        if "kl" in lenses:
            k = lenses["kl"]
            top = list(k.get("by_label", {}).items())[:5]
            lines.append(
                "- **KL** by label (mean nats, largest first): "
                + ", ".join(f"{lab} {v['mean_kl']:.3g} (n={v['n_tokens']})" for lab, v in top)
                + f"; as one unit under the label rule: precision {_cell(k.get('token_precision'))}, "
                f"recall {_cell(k.get('token_recall'))}."
            )
        lines += _retrained_lines(lenses)
        for lens, rec in lenses.items():
            if rec.get("units"):
                lines.append(
                    f"- **{lens}** units: {', '.join(rec['units'][:20])}{' ...' if len(rec['units']) > 20 else ''}"
                )
        agree = summary["agreement"].get(org, {})
        lines += [
            "",
            "Agreement (row: mean over its units of the best |correlation| with the column lens's units):",
            "",
            "| | " + " | ".join(agree.get("matrix", {})) + " |",
            "|---|" + "---|" * len(agree.get("matrix", {})),
        ]
        for a, row in agree.get("matrix", {}).items():
            lines.append(f"| {a} | " + " | ".join("-" if a == b else _cell(row.get(b)) for b in agree["matrix"]) + " |")
        pairs = agree.get("same_mechanism", [])
        lines += [
            "",
            f"Same mechanism seen twice (units of lenses with different dictionaries, |r| >= {agree.get('threshold', 0.7)}): "
            + ("; ".join(f"{p['a']} ~ {p['b']} ({p['correlation']:+.2f})" for p in pairs) or "none")
            + ".",
            "Units two lenses both name: "
            + (", ".join(f"{k} {n}" for k, n in agree.get("shared_units", {}).items()) or "none")
            + ".",
            "",
        ]
    lines += ["Figures: lenses_x_scores, cost, agreement_* (.html interactive, .png static).", ""]
    return "\n".join(lines)
