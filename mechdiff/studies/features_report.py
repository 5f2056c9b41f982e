"""Figures, dashboards and the markdown report of the feature census (:mod:`mechdiff.studies.features`).

* ``category_counts``: the share of alive units in each category, adapters against the baselines;
* ``regions``: where the adapter features of each category fire (prompt, thinking span, answer;
  a workload without thinking delimiters, the chat, has prompt and reply only);
* the dashboards (:func:`mechdiff.features.dashboard.write_dashboards`) and ``report.md``.

Example:
    >>> summary = {"n_features": 4, "n_alive": 3, "reasoning_fraction": 1 / 3,
    ...            "category_counts": {"format": 1, "arithmetic": 1, "hesitation": 1, "dead": 1}, "baselines": {}}
    >>> fig = category_figure(summary)
    >>> [trace.name for trace in fig.data], list(fig.data[0].x)
    (['adapters'], ['format', 'arithmetic', 'hesitation'])
"""

from __future__ import annotations

from pathlib import Path

import plotly.graph_objects as go

from mechdiff.features import classify as C
from mechdiff.features.store import REGIONS
from mechdiff.visualization import figures as figure_io

FIGURES = ("category_counts", "regions")


def figure_files() -> list[str]:
    """The files :func:`write_figures` writes, relative to its folder."""
    return [f"{name}.{ext}" for name in FIGURES for ext in ("html", "png")]


def category_figure(summary: dict) -> go.Figure:
    """Share of alive units per category, for the adapters and each baseline (log scale)."""
    summaries = {"adapters": summary, **summary.get("baselines", {})}
    shown = [c for c in C.CATEGORIES if any(s["category_counts"].get(c) for s in summaries.values())]
    fig = go.Figure(
        [
            go.Bar(name=name, x=shown, y=[s["category_counts"].get(c, 0) / max(1, s["n_alive"]) for c in shown])
            for name, s in summaries.items()
        ]
    )
    fig.update_layout(
        title="feature categories (ground-truth label rule), share of alive features",
        yaxis_title="share of alive features (log scale)",
        barmode="group",
        yaxis_type="log",
    )  # shares span orders of magnitude (rare categories ~1e-3)
    return fig


def regions_figure(summary: dict, store, categories, groups: dict) -> go.Figure:
    """Where the adapter features of each shown category fire (share of their firing tokens by region)."""
    summaries = {"adapters": summary, **summary.get("baselines", {})}
    shown = [c for c in C.CATEGORIES if any(s["category_counts"].get(c) for s in summaries.values())]
    thinking = store.config.think_ids is not None
    regions = [j for j, _ in enumerate(REGIONS) if thinking or REGIONS[j] != "thinking"]
    names = [REGIONS[j] if thinking or REGIONS[j] != "answer" else "reply" for j in regions]
    cat_share = {}
    for c in shown:
        members = [i for i in groups["adapters"] if categories[i] == c]
        if members:
            counts = store.region_count[members].sum(0)
            cat_share[c] = (counts / counts.sum().clamp(min=1)).tolist()
    fig = go.Figure(
        [go.Bar(name=r, x=list(cat_share), y=[v[j] for v in cat_share.values()]) for j, r in zip(regions, names)]
    )
    fig.update_layout(
        title="where adapter features fire, by category", barmode="group", yaxis_title="share of firing tokens"
    )
    return fig


def figures(summary: dict, store, categories, groups: dict) -> dict[str, go.Figure]:
    """Every figure by name (:data:`FIGURES`), as plotly figures (they display inline in a notebook)."""
    return {
        "category_counts": category_figure(summary),
        "regions": regions_figure(summary, store, categories, groups),
    }


def write_figures(out: Path, figs: dict[str, go.Figure]) -> list[str]:
    """Each figure as ``out/NAME.html`` and ``.png``; the paths written."""
    paths = []
    for name, fig in figs.items():
        paths += figure_io.save(fig, Path(out) / name)
    return [str(p) for p in paths]


def _is_organism(summary: dict) -> bool:
    return summary.get("workload", {}).get("name", "organism") == "organism"


def write_dashboards(out: Path, summary: dict, store, tokenizer, categories, roles, pages) -> Path:
    """``index.html`` and a page per feature in ``pages`` (see :func:`~mechdiff.features.dashboard.write_dashboards`)."""
    from mechdiff.features.dashboard import write_dashboards as write

    summaries = {"adapters": summary, **summary["baselines"]}
    sums_html = "".join(
        f"<p><b>{k}</b>: {s['n_alive']} of {s['n_features']} alive; reasoning "
        f"fraction {s['reasoning_fraction']:.1%}; {s['category_counts']}</p>"
        for k, s in summaries.items()
    )
    title = "Adapter features of the organism" if _is_organism(summary) else f"Adapter features of {summary['pair']}"
    return write(
        store,
        out,
        tokenizer,
        categories=categories,
        roles=roles,
        features=pages,
        title=title,
        summary_html=sums_html,
    )


def report_markdown(s: dict) -> str:
    """``report.md``: the headline, the category table against the baselines, roles and the rule."""
    work = s.get("workload", {})
    what = "organism" if _is_organism(s) else f"{s['pair']}, {work.get('name')} workload"
    lines = [
        f"# Feature interpretation ({what})",
        "",
        f"Adapters `{s['adapters']}`: {s['n_alive']} of {s['n_features']} features alive on "
        f"{s['store']['n_tokens']} tokens of {s['store']['n_traces']} held-out traces.",
        "",
        f"**Reasoning fraction: {s['reasoning_fraction']:.1%}** of alive features "
        f"(published, real pair: ~{s['published']['reasoning_fraction']:.0%}).",
        "",
        "| category | adapters | " + " | ".join(s["baselines"]) + " |",
        "|---|---|" + "---|" * len(s["baselines"]),
    ]
    for c in (*C.CATEGORIES, "dead"):
        lines.append(
            f"| {c} | {s['category_counts'][c]} | "
            + " | ".join(str(b["category_counts"][c]) for b in s["baselines"].values())
            + " |"
        )
    lines += [
        "",
        f"Reasoning roles: {s['role_counts']}.",
        "",
        f"Rule: {s['rule']}",
        "",
        f"Store: {s['store']['tokens_per_second']:.0f} tokens/s; {s['n_dashboards']} dashboards in `index.html`.",
    ]
    if work:
        lines += [
            "",
            f"Hesitation tokens ({work['name']} workload): {', '.join(map(repr, work['hesitation_tokens']))}; "
            f"token labels: {', '.join(work['label_names'][:12])}{', ...' if len(work['label_names']) > 12 else ''}"
            + ("" if work["thinking_span"] else "; no thinking delimiters: the whole reply is one region")
            + ".",
        ]
    if s.get("judge"):
        j = s["judge"]
        lines += [
            "",
            f"LM judge `{j['model']}` on {j['n']} features: {j['category_counts']}; agrees with the label rule "
            f"on reasoning for {j['agreement_with_label_rule_on_reasoning']:.0%} ({j['unparsed']} answers unparsed).",
        ]
    else:
        lines += ["", "LM judge: not run (no judge endpoint given)."]
    return "\n".join(lines) + "\n"
