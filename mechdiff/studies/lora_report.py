"""Figures, headline and markdown report of the LoRA-lens study (:mod:`mechdiff.studies.lora`).

Everything here reads the study's summary (``summary.json``'s content), its top contexts
(``contexts.json``) and the few arrays the figures need beyond the summary (plain lists, see
:class:`mechdiff.studies.lora.LoraStudyResult`); nothing is measured here.

Example:
    >>> fig = bars("Gain recovered by LoRA rank", ["r1", "r2"], {"gain recovered": [0.8, 0.9]}, "gain", hline=0.8)
    >>> [trace.type for trace in fig.data], fig.layout.showlegend
    (['bar'], False)
"""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from mechdiff.features.lora_lens import CLASSES


def bars(title: str, x, series: dict[str, list[float]], ylabel: str, hline: float | None = None) -> go.Figure:
    """Grouped bars, one trace per series (a legend only when there are several), an optional dashed line."""
    fig = go.Figure([go.Bar(name=k, x=x, y=v) for k, v in series.items()])
    fig.update_layout(title=title, barmode="group", yaxis_title=ylabel, showlegend=len(series) > 1)
    if hline is not None:
        fig.add_hline(y=hline, line_dash="dash")
    return fig


def heatmap(title: str, z, x, y, zlabel: str) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, colorbar_title=zlabel, colorscale="Viridis"))
    return fig.update_layout(title=title)


def donut(title: str, labels, values) -> go.Figure:
    return go.Figure(go.Pie(labels=labels, values=values, hole=0.5)).update_layout(title=title)


def figures(summary: dict, plots: dict) -> dict[str, go.Figure]:
    """The study's figures by file name, in the order ``index.html`` shows them.

    ``plots`` holds what the summary does not: ``ablation_heatmap`` and ``sae_label_distribution``
    (each ``{"z", "x", "y"}``) and ``sae_categories`` (``{"labels", "values"}``, activation mass).
    """
    behaviour, ranks = summary["behaviour"], list(summary["gain_recovered_by_rank"])
    names, kl = list(behaviour), summary["ablation_kl"]
    mono = summary["monosemanticity_classes"]
    return {
        "behaviour": bars(
            "Accuracy on held-out problems",
            names,
            {"accuracy": [behaviour[n]["accuracy"] for n in names]},
            "accuracy",
        ),
        "length_hesitation": bars(
            "Response length and hesitations",
            names,
            {
                "tokens / 10": [behaviour[n]["mean_response_tokens"] / 10 for n in names],
                "hesitations": [behaviour[n]["hesitations_per_response"] for n in names],
            },
            "per response",
        ),
        "gain_by_rank": bars(
            "Gain recovered by LoRA rank",
            [f"r{r}" for r in ranks],
            {"gain recovered": list(summary["gain_recovered_by_rank"].values())},
            "gain recovered",
            hline=0.8,
        ),
        "ablation_layer": bars(
            "Ablating a layer's 7 adapters: KL to the full LoRA",
            list(kl["layer"]),
            {"KL": list(kl["layer"].values())},
            "KL (nats / response token)",
        ),
        "ablation_heatmap": heatmap(
            "Ablation KL per adapter (module x layer)", **plots["ablation_heatmap"], zlabel="KL"
        ),
        "monosemanticity": bars(
            "LoRA adapters vs MLP neurons vs SAE latents: label-based classes",
            list(CLASSES) + ["mean precision"],
            {k: [v[c] for c in CLASSES] + [v["mean_precision"]] for k, v in mono.items()},
            "share of units",
            hline=summary["chance_precision"],
        ),
        "sae_categories": donut("SAE activation mass by category", **plots["sae_categories"]),
        "sae_label_distribution": heatmap(
            "SAE latents (by category): share of activation mass per label",
            **plots["sae_label_distribution"],
            zlabel="share",
        ),
    }


def index_html(names: list[str], header: str) -> str:
    """One page showing every figure's HTML (``NAME.html`` beside it) in an iframe."""
    frames = "".join(f"<iframe src='{n}.html' style='width:100%;height:520px;border:0'></iframe>" for n in names)
    return f"<html><head><meta charset='utf-8'><title>LoRA lens</title></head><body>{header}{frames}</body></html>"


def headline(s: dict, published: dict) -> str:
    """The headline numbers, one per line (printed by the CLI, atop ``index.html`` and ``report.md``)."""
    rows = [
        f"gain recovered (rank 1): {s['gain_recovered']:.3f}   published {published['gain_recovered']}",
        "gain recovered by rank: " + ", ".join(f"r{r}={g:.3f}" for r, g in s["gain_recovered_by_rank"].items()),
        f"SAE: FVU {s['sae']['fvu']:.4f}, L0 {s['sae']['l0']:.2f}, dead {s['sae']['dead_fraction']:.3f}",
        f"monosemanticity (mean precision): LoRA {s['monosemanticity']['lora']:.3f}, MLP "
        f"{s['monosemanticity']['mlp']:.3f} (chance {s['chance_precision']:.3f})",
        f"ablation KL MLP/attention per adapter: {s['ablation_kl_mlp_over_attention']:.2f} (published ~2.4)",
        f"wall time {s.get('seconds', 0):.0f} s",
    ]
    return "\n".join(rows)


def report_markdown(s: dict, contexts: dict, published: dict) -> str:
    """``report.md``: behaviour, monosemanticity, ablation KL and the units' top contexts."""
    b = s["behaviour"]
    lines = [
        "# Rank-1 LoRA lens on the organism",
        "",
        "```",
        headline(s, published),
        "```",
        "",
        "## Behaviour (greedy, held-out test problems)",
        "",
        "| model | accuracy | tokens | hesitations | gain recovered |",
        "|---|---|---|---|---|",
    ]
    for name, st in b.items():
        g = st.get("gain_recovered")
        lines.append(
            f"| {name} | {st['accuracy']:.3f} | {st['mean_response_tokens']:.1f} | "
            f"{st['hesitations_per_response']:.2f} | {'' if g is None else f'{g:.3f}'} |"
        )
    lines += [
        "",
        "## Monosemanticity (label precision among top activations)",
        "",
        "| units | monosemantic | broad | polysemantic | mean precision | mean recall | n |",
        "|---|---|---|---|---|---|---|",
    ]
    for k, v in s["monosemanticity_classes"].items():
        lines.append(
            f"| {k} | {v['monosemantic']:.2f} | {v['broad']:.2f} | {v['polysemantic']:.2f} | "
            f"{v['mean_precision']:.3f} | {v['mean_recall']:.3f} | {v['n_units']} |"
        )
    lines += [
        "",
        f"Published (LLM-judged, not comparable one to one): LoRA {published['monosemantic_lora']:.0%} "
        f"monosemantic vs MLP {published['monosemantic_mlp']:.0%}.",
        "",
        "## Ablation KL (nats per response token)",
        "",
        "| layer | KL |",
        "|---|---|",
    ] + [f"| {k} | {v:.4f} |" for k, v in s["ablation_kl"]["layer"].items()]
    lines += [
        "",
        "Groups: " + ", ".join(f"ablate {k}: {v:.4f}" for k, v in s["ablation_kl"]["group"].items()),
        "",
        "## LoRA adapters: best label and top contexts",
        "",
    ]
    for name, u in contexts["lora"].items():
        lines.append(
            f"- **{name}** {u['class']}, {u['best_label']} (P {u['precision']:.2f}, R {u['recall']:.2f}): "
            f"`{u['top'][0]}`"
        )
    lines += ["", "## SAE latents (largest activation mass)", ""]
    for name, u in contexts["sae_top16"].items():
        lines.append(f"- **{name}** [{u['category']}] {u['labels']}: `{u['top'][0]}`")
    lines += [
        "",
        "Figures: index.html (interactive), *.png; SAE in SAELens format under sae/; all contexts in contexts.json.",
        "",
    ]
    return "\n".join(lines)


def write_figures(out: Path, summary: dict, plots: dict, published: dict) -> list[str]:
    """Each figure as ``NAME.html`` + ``NAME.png`` in ``out``, and ``index.html`` showing them all."""
    from mechdiff.visualization.figures import save

    figs = figures(summary, plots)
    for name, fig in figs.items():
        save(fig, out / name)
    header = f"<h1>Rank-1 LoRA lens on the organism</h1><pre>{headline(summary, published)}</pre>"
    (out / "index.html").write_text(index_html(list(figs), header))
    return list(figs)
