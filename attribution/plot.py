"""Figures of attribution graphs (plotly, matplotlib) and feature activations (circuitsvis).

* :func:`graph_figure`: the pruned graph, x = token position, y = layer (embeddings at the
  bottom, targets at the top), edges coloured by sign with width by |weight|; hover shows each
  node's activation and influence.
* :func:`save_graph_figure`: that figure as self-contained HTML (plotly.js inlined) and a static
  PNG drawn with matplotlib.
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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import plotly.graph_objects as go  # noqa: E402
import torch  # noqa: E402
from jaxtyping import Int  # noqa: E402
from torch import Tensor  # noqa: E402

from attribution.graph import Graph, PruneResult  # noqa: E402
from mechdiff.adapters.transcoder import AdaptedModel  # noqa: E402

POSITIVE, NEGATIVE = "#1f77b4", "#d62728"


def _layout(graph: Graph, pruned: PruneResult) -> dict[int, tuple[float, float]]:
    """(x, y) of every kept node: x = position (spread within a cell), y = layer."""
    n_layers, n_f = graph.info["n_layers"], graph.n_features
    cells: dict[tuple[int, int], list[int]] = {}
    for i in pruned.node_mask.nonzero()[:, 0].tolist():
        if i < n_f:
            layer, pos, _ = graph.features[i].tolist()
        elif i < graph.target_slice.start:
            layer, pos = -1, i - n_f
        else:
            layer, pos = n_layers, graph.targets[i - graph.target_slice.start]["pos"]
        cells.setdefault((layer, pos), []).append(i)
    coords = {}
    for (layer, pos), members in cells.items():
        for j, i in enumerate(members):
            offset = 0.0 if len(members) == 1 else 0.7 * (j / (len(members) - 1) - 0.5)
            coords[i] = (pos + offset, float(layer))
    return coords


def _edges(graph: Graph, pruned: PruneResult):
    dst, src = pruned.edge_mask.nonzero(as_tuple=True)
    weights = graph.adjacency[dst, src]
    top = float(weights.abs().max()) if len(weights) else 1.0
    return list(zip(src.tolist(), dst.tolist(), weights.tolist())), top


def graph_figure(graph: Graph, node_threshold: float = 0.8, edge_threshold: float = 0.98,
                 title: str | None = None) -> go.Figure:
    """Plotly figure of the graph pruned at the given thresholds."""
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
    for (positive, width), (xs, ys) in sorted(buckets.items()):
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                 opacity=0.6, line={"color": POSITIVE if positive else NEGATIVE,
                                                    "width": 0.5 + 1.2 * width}))
    nodes = sorted(coords)
    kinds = ["feature" if i < graph.n_features else "embedding" if i < graph.target_slice.start
             else "target" for i in nodes]
    act = {i: float(graph.activations[i]) for i in nodes if i < graph.n_features}
    fig.add_trace(go.Scatter(
        x=[coords[i][0] for i in nodes], y=[coords[i][1] for i in nodes], mode="markers",
        marker={"size": [9 if k == "feature" else 12 for k in kinds], "line": {"width": 1},
                "color": ["#ff7f0e" if k == "feature" else "#7f7f7f" if k == "embedding" else "#2ca02c"
                          for k in kinds], "symbol": ["circle" if k == "feature" else "square" for k in kinds]},
        text=[f"{graph.node_label(i)}<br>activation {act[i]:.3g}<br>influence {float(pruned.node_influence[i]):.3g}"
              if i in act else f"{graph.node_label(i)}<br>influence {float(pruned.node_influence[i]):.3g}"
              for i in nodes], hoverinfo="text", showlegend=False))
    n_layers = graph.info["n_layers"]
    fig.update_layout(
        title=title or f"attribution graph: {', '.join(t['label'] for t in graph.targets)}",
        xaxis={"title": "position", "tickmode": "array", "tickvals": list(range(graph.n_pos)),
               "ticktext": [f"{p}:{t}" for p, t in enumerate(graph.token_strs)]},
        yaxis={"title": "layer", "tickmode": "array", "tickvals": list(range(-1, n_layers + 1)),
               "ticktext": ["emb", *map(str, range(n_layers)), "target"]},
        template="plotly_white", height=220 + 90 * n_layers, width=max(700, 45 * graph.n_pos))
    return fig


def save_graph_figure(graph: Graph, path: str | Path, node_threshold: float = 0.8,
                      edge_threshold: float = 0.98, title: str | None = None) -> tuple[Path, Path]:
    """Write ``path.html`` (interactive, plotly.js inlined) and ``path.png`` (matplotlib)."""
    stem = Path(path).with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    fig = graph_figure(graph, node_threshold, edge_threshold, title)
    html = stem.with_suffix(".html")
    fig.write_html(html, include_plotlyjs=True)
    png = stem.with_suffix(".png")
    _static_png(graph, graph.prune(node_threshold, edge_threshold), png, fig.layout.title.text)
    return html, png


def _static_png(graph: Graph, pruned: PruneResult, path: Path, title: str) -> None:
    coords = _layout(graph, pruned)
    edges, top = _edges(graph, pruned)
    n_layers = graph.info["n_layers"]
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * graph.n_pos), 1.6 + 0.9 * n_layers))
    for s, d, w in edges:
        if s in coords and d in coords:
            ax.plot([coords[s][0], coords[d][0]], [coords[s][1], coords[d][1]],
                    color=POSITIVE if w > 0 else NEGATIVE, lw=0.3 + 3 * abs(w) / top, alpha=0.5, zorder=1)
    for i, (x, y) in coords.items():
        kind = 0 if i < graph.n_features else 1 if i < graph.target_slice.start else 2
        ax.scatter([x], [y], s=[30, 45, 60][kind], marker="os^"[kind], zorder=2,
                   color=["#ff7f0e", "#7f7f7f", "#2ca02c"][kind], edgecolor="k", linewidth=0.5)
    ax.set_xticks(range(graph.n_pos), [f"{p}:{t}" for p, t in enumerate(graph.token_strs)],
                  rotation=90, fontsize=7)
    ax.set_yticks(range(-1, n_layers + 1), ["emb", *map(str, range(n_layers)), "target"])
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("position")
    ax.set_ylabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def feature_activations(adapted: AdaptedModel, tokens: Int[Tensor, " pos"],
                        features: Sequence[tuple[int, int]]) -> torch.Tensor:
    """Activations ``[pos, n_features]`` of ``(layer, feature)`` pairs on one prompt (true model)."""
    for layer, feat in features:
        if not 0 <= layer < adapted.config.n_layers or not 0 <= feat < adapted.config.d_sae:
            raise IndexError(f"feature ({layer}, {feat}) is out of range")
    names = {adapted.acts_name(layer) for layer, _ in features}
    with torch.no_grad():
        _, cache = adapted.model.run_with_cache(torch.as_tensor(tokens).reshape(1, -1),
                                                names_filter=lambda n: n in names)
    return torch.stack([cache[adapted.acts_name(la)][0, :, f] for la, f in features], dim=1)


def feature_token_views(adapted: AdaptedModel, prompts: Sequence[Int[Tensor, " pos"]],
                        features: Sequence[tuple[int, int]], path: str | Path | None = None) -> list:
    """One circuitsvis ``colored_tokens_multi`` view per prompt (a value per feature, labelled
    ``L{layer}F{feature}``); with ``path``, all views are written to one offline HTML file.

    Example:
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
        body = "\n".join(f"<h3>prompt {i}</h3>\n{v.local_src}" for i, v in enumerate(views))
        out.write_text(f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>feature activations"
                       f"</title></head><body>\n{body}\n</body></html>\n", encoding="utf-8")
    return views
