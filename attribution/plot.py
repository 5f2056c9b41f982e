"""Figures of attribution graphs (plotly, matplotlib) and feature activations (circuitsvis).

* :func:`graph_figure`: the pruned graph, x = token position, y = layer (embeddings at the
  bottom, targets at the top), edges coloured by sign with width by |weight|; hover shows each
  node's activation and influence.
* :func:`save_graph_figure`: that figure as self-contained HTML (plotly.js inlined) and a static
  PNG drawn with matplotlib (rows named embedding / layer k / target, prompt tokens under the
  positions, each feature labelled ``layer/feature top-token``, a legend for the edge signs; a
  crowded position gets a column wide enough that its nodes and labels do not overlap).
* :func:`feature_token_views`: circuitsvis colored-token views of chosen features' activations
  on prompts, saved as HTML with the JavaScript inlined (``local_src``), for offline viewing.

Example:
    >>> import torch, tempfile
    >>> from attribution.build import attribute
    >>> from attribution.synthetic import tiny_adapted
    >>> graph = attribute(tiny_adapted(seed=0), torch.tensor([2, 5, 9, 11, 7, 20]))
    >>> fig = graph_figure(graph)
    >>> paths = save_graph_figure(graph, tempfile.mkdtemp() + "/graph")
    >>> [p.suffix for p in paths]
    ['.html', '.png']
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
import torch
from jaxtyping import Int
from matplotlib.figure import Figure
from torch import Tensor

from attribution.graph import Graph, PruneResult
from mechdiff.adapters.transcoder import AdaptedModel
from mechdiff.visualization.assets import circuitsvis_bundle, circuitsvis_src, without_bundle
from mechdiff.visualization.figures import write_html

POSITIVE, NEGATIVE = "#1f77b4", "#d62728"
KIND_STYLE = {"feature": ("o", "#ff7f0e", 30), "embedding": ("s", "#7f7f7f", 40), "target": ("^", "#2ca02c", 60)}


def layer_names(n_layers: int) -> list[str]:
    """Names of the graph's rows, bottom to top: embedding, layer 0 .. layer n-1, target."""
    return ["embedding", *(f"layer {i}" for i in range(n_layers)), "target"]


def _cells(graph: Graph, pruned: PruneResult) -> dict[tuple[int, int], list[int]]:
    """Kept nodes by (row, position): row 0 the embeddings, 1 + layer the features, n_layers + 1
    the targets."""
    n_layers, n_f = graph.info["n_layers"], graph.n_features
    cells: dict[tuple[int, int], list[int]] = {}
    for i in pruned.node_mask.nonzero()[:, 0].tolist():
        if i < n_f:
            layer, pos, _ = graph.features[i].tolist()
            row = layer + 1
        elif i < graph.target_slice.start:
            row, pos = 0, i - n_f
        else:
            row, pos = n_layers + 1, graph.targets[i - graph.target_slice.start]["pos"]
        cells.setdefault((row, pos), []).append(i)
    return cells


def _layout(graph: Graph, pruned: PruneResult) -> dict[int, tuple[float, float]]:
    """(x, y) of every kept node: x = position (spread within a cell), y = row (0 = embedding)."""
    coords = {}
    for (row, pos), members in _cells(graph, pruned).items():
        for j, i in enumerate(members):
            offset = 0.0 if len(members) == 1 else 0.7 * (j / (len(members) - 1) - 0.5)
            coords[i] = (pos + offset, float(row))
    return coords


def _edges(graph: Graph, pruned: PruneResult):
    dst, src = pruned.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[dst, src]
    top = float(weights.abs().max()) if len(weights) else 1.0
    return list(zip(src.tolist(), dst.tolist(), weights.tolist())), top


def feature_top_tokens(adapted: AdaptedModel, graph: Graph) -> dict[tuple[int, int], str]:
    """The token each of the graph's features' decoder promotes most (logit lens), by (layer, feature)."""
    from mechdiff.features.classify import logit_lens

    pairs = sorted({(la, f) for la, _, f in graph.features.tolist()})
    if not pairs:
        return {}
    rows = torch.stack([adapted.adapters[la].W_dec[f].detach().float() for la, f in pairs])
    ids = logit_lens(adapted.model, rows, k=1)["lens_top_ids"][:, 0].tolist()
    tok = adapted.model.tokenizer
    words = tok.convert_ids_to_tokens(ids) if tok is not None else [str(i) for i in ids]
    return dict(zip(pairs, words))


def _feature_label(graph: Graph, i: int, top_tokens: dict | None) -> str:
    layer, _, feat = graph.features[i].tolist()
    word = (top_tokens or {}).get((layer, feat))
    return f"{layer}/{feat}" + (f" {word}" if word else "")


def graph_figure(
    graph: Graph,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    title: str | None = None,
    top_tokens: dict | None = None,
) -> go.Figure:
    """Plotly figure of the graph pruned at the given thresholds. ``top_tokens`` (from
    :func:`feature_top_tokens`) adds each feature's promoted token to its hover text."""
    pruned = graph.prune(node_threshold, edge_threshold)
    coords = _layout(graph, pruned)
    edges, top = _edges(graph, pruned)
    fig = go.Figure()
    buckets: dict[tuple[bool, int], tuple[list, list]] = {}  # (positive, width class) -> xs, ys
    for s, d, w in edges:
        if s in coords and d in coords:
            xs, ys = buckets.setdefault((w > 0, min(4, int(5 * abs(w) / top))), ([], []))
            xs += [coords[s][0], coords[d][0], None]
            ys += [coords[s][1], coords[d][1], None]
    shown = set()
    for (positive, width), (xs, ys) in sorted(buckets.items()):
        name = "positive edge" if positive else "negative edge"
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines",
                hoverinfo="skip",
                name=name,
                legendgroup=name,
                showlegend=name not in shown,
                opacity=0.6,
                line={"color": POSITIVE if positive else NEGATIVE, "width": 0.5 + 1.2 * width},
            )
        )
        shown.add(name)
    nodes = sorted(coords)
    kinds = [
        "feature" if i < graph.n_features else "embedding" if i < graph.target_slice.start else "target" for i in nodes
    ]
    act = {i: float(graph.activations[i]) for i in nodes if i < graph.n_features}

    def hover(i):
        name = (
            f"feature {_feature_label(graph, i, top_tokens)} @ {graph.features[i, 1]}"
            if i in act
            else graph.node_label(i)
        )
        extra = f"<br>activation {act[i]:.3g}" if i in act else ""
        return f"{name}{extra}<br>influence {float(pruned.node_influence[i]):.3g}"

    fig.add_trace(
        go.Scatter(
            x=[coords[i][0] for i in nodes],
            y=[coords[i][1] for i in nodes],
            mode="markers",
            marker={
                "size": [9 if k == "feature" else 12 for k in kinds],
                "line": {"width": 1},
                "color": [KIND_STYLE[k][1] for k in kinds],
                "symbol": [
                    "circle" if k == "feature" else "square" if k == "embedding" else "triangle-up" for k in kinds
                ],
            },
            text=[hover(i) for i in nodes],
            hoverinfo="text",
            showlegend=False,
        )
    )
    n_layers = graph.info["n_layers"]
    fig.update_layout(
        title=title or f"attribution graph: {', '.join(t['label'] for t in graph.targets)}",
        xaxis={
            "title": "prompt token (position)",
            "tickmode": "array",
            "tickvals": list(range(graph.n_pos)),
            "ticktext": list(graph.token_strs),
            "tickangle": -90,
        },
        yaxis={
            "title": "",
            "tickmode": "array",
            "tickvals": list(range(n_layers + 2)),
            "ticktext": layer_names(n_layers),
        },
        legend={"orientation": "h", "y": 1.02, "x": 1, "xanchor": "right", "yanchor": "bottom"},
        template="plotly_white",
        height=220 + 90 * n_layers,
        width=max(700, 45 * graph.n_pos),
    )
    return fig


def save_graph_figure(
    graph: Graph,
    path: str | Path,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    title: str | None = None,
    top_tokens: dict | None = None,
) -> tuple[Path, Path]:
    """Write ``path.html`` (interactive; loads the tree's one shared plotly.js) and ``path.png``."""
    stem = Path(path).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig = graph_figure(graph, node_threshold, edge_threshold, title, top_tokens)
    html = stem.with_suffix(".html")
    write_html(fig, html)
    png = stem.with_suffix(".png")
    _static_png(graph, graph.prune(node_threshold, edge_threshold), png, fig.layout.title.text, top_tokens)
    return html, png


NODE_GAP, MIN_COLUMN, ROW = 0.17, 0.3, 1.15  # inches: between nodes of a cell, per position, per row


def static_layout(graph: Graph, pruned: PruneResult) -> tuple[dict[int, tuple[float, float]], list[float]]:
    """(x, y) in inches of every kept node for the static figure, and the positions' column edges.

    A position's column is as wide as its fullest cell needs (``NODE_GAP`` per node), so the nodes
    of a crowded position (the last one, usually) and their vertical labels never overlap."""
    cells = _cells(graph, pruned)
    widths = [MIN_COLUMN] * graph.n_pos
    for (_, pos), members in cells.items():
        widths[pos] = max(widths[pos], NODE_GAP * (len(members) + 1))
    edges = [0.0]
    for w in widths:
        edges.append(edges[-1] + w)
    centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    coords = {}
    for (row, pos), members in cells.items():
        for j, i in enumerate(members):
            coords[i] = (centres[pos] + NODE_GAP * (j - (len(members) - 1) / 2), row * ROW)
    return coords, edges


def _static_png(graph: Graph, pruned: PruneResult, path: Path, title: str, top_tokens: dict | None = None) -> None:
    static_figure(graph, pruned, title, top_tokens).savefig(path, dpi=130)


def static_figure(graph: Graph, pruned: PruneResult, title: str = "", top_tokens: dict | None = None) -> Figure:
    """The matplotlib figure of ``graph.png`` (see the module docstring)."""
    from matplotlib.lines import Line2D

    coords, columns = static_layout(graph, pruned)
    centres = [(a + b) / 2 for a, b in zip(columns, columns[1:])]
    edges, top = _edges(graph, pruned)
    n_layers = graph.info["n_layers"]
    width = max(7.0, columns[-1] + 3.0)
    fig = Figure(figsize=(width, 1.8 + ROW * (n_layers + 1.6)))  # no pyplot: no global backend state
    ax = fig.add_subplot()
    for s, d, w in edges:
        if s in coords and d in coords:
            ax.plot(
                [coords[s][0], coords[d][0]],
                [coords[s][1], coords[d][1]],
                color=POSITIVE if w > 0 else NEGATIVE,
                lw=0.3 + 3 * abs(w) / top,
                alpha=0.5,
                zorder=1,
            )
    for i, (x, y) in coords.items():
        kind = "feature" if i < graph.n_features else "embedding" if i < graph.target_slice.start else "target"
        marker, color, size = KIND_STYLE[kind]
        ax.scatter([x], [y], s=size, marker=marker, zorder=2, color=color, edgecolor="k", linewidth=0.5)
        if kind != "embedding":  # embeddings are named by the position axis
            label = _feature_label(graph, i, top_tokens) if kind == "feature" else graph.node_label(i)
            ax.annotate(
                label,
                (x, y),
                xytext=(0, 5),
                textcoords="offset points",
                rotation=90,
                ha="center",
                va="bottom",
                fontsize=6,
                zorder=3,
            )
    ax.set_xticks(centres, list(graph.token_strs), rotation=90, fontsize=7)
    ax.set_yticks([r * ROW for r in range(n_layers + 2)], layer_names(n_layers))
    ax.set_xlim(0, columns[-1])
    ax.set_ylim(-0.4 * ROW, (n_layers + 1.9) * ROW)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("prompt token (position)")
    ax.spines[["top", "right"]].set_visible(False)
    handles = [
        Line2D([], [], color=POSITIVE, lw=2, label="positive edge"),
        Line2D([], [], color=NEGATIVE, lw=2, label="negative edge"),
        *[
            Line2D(
                [],
                [],
                ls="",
                marker=KIND_STYLE[k][0],
                color=KIND_STYLE[k][1],
                markeredgecolor="k",
                label=k if k != "feature" else "feature (layer/feature, top token)",
            )
            for k in ("feature", "embedding", "target")
        ],
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
    fig.tight_layout()
    return fig


def feature_activations(
    adapted: AdaptedModel, tokens: Int[Tensor, " pos"], features: Sequence[tuple[int, int]]
) -> torch.Tensor:
    """Activations ``[pos, n_features]`` of ``(layer, feature)`` pairs on one prompt (true model)."""
    for layer, feat in features:
        if not 0 <= layer < adapted.config.n_layers or not 0 <= feat < adapted.config.d_sae:
            raise IndexError(f"feature ({layer}, {feat}) is out of range")
    names = {adapted.acts_name(layer) for layer, _ in features}
    with torch.no_grad():
        _, cache = adapted.model.run_with_cache(
            torch.as_tensor(tokens).reshape(1, -1), names_filter=lambda n: n in names
        )
    return torch.stack([cache[adapted.acts_name(la)][0, :, f] for la, f in features], dim=1)


def feature_token_views(
    adapted: AdaptedModel,
    prompts: Sequence[Int[Tensor, " pos"]],
    features: Sequence[tuple[int, int]],
    path: str | Path | None = None,
) -> list:
    """One circuitsvis ``colored_tokens_multi`` view per prompt (a value per feature, labelled
    ``L{layer}F{feature}``); with ``path``, all views are written to one offline HTML file that
    loads the tree's one shared circuitsvis bundle.

    Example:
        Not run as a doctest: it writes an HTML page.
        >>> views = feature_token_views(adapted, [tokens], [(0, 3), (1, 7)], "figures/x.html")  # doctest: +SKIP
    """
    from circuitsvis.tokens import colored_tokens_multi

    if not features:
        raise ValueError("give at least one (layer, feature) pair")
    tok = adapted.model.tokenizer
    labels = [f"L{la}F{f}" for la, f in features]
    views = []
    for tokens in prompts:
        tokens = torch.as_tensor(tokens).reshape(-1)
        strs = tok.convert_ids_to_tokens(tokens.tolist()) if tok is not None else [str(int(t)) for t in tokens]
        values = feature_activations(adapted, tokens, features).float().cpu()
        views.append(colored_tokens_multi(strs, values, labels))
    if path is not None:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        bundle = circuitsvis_bundle()
        body = "\n".join(f"<h3>prompt {i}</h3>\n{without_bundle(v.local_src, bundle)}" for i, v in enumerate(views))
        out.write_text(
            f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>feature activations"
            f"</title><script src='{circuitsvis_src(out)}'></script></head><body>\n{body}\n"
            "</body></html>\n",
            encoding="utf-8",
        )
    return views
