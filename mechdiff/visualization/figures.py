"""Write every figure twice: interactive HTML (plotly, fully offline) and a static PNG.

Plotly's own image export needs a browser (kaleido + Chrome), which a laptop or CI machine may not
have. :func:`save` therefore renders the same plotly figure with matplotlib for the PNG: bar,
scatter/line, heatmap and pie traces, one panel, titles and axis labels; that covers the study
figures. Anything else raises instead of writing a misleading image. The PNG is drawn on a
``matplotlib.figure.Figure`` with the Agg canvas: pyplot's global backend is never changed, so a
notebook's inline charts keep working after mechdiff is imported.

The JavaScript libraries are written once per figures tree
(:func:`mechdiff.visualization.assets.shared_asset`): pages under a ``figures/`` folder load
``figures/assets/plotly.min.js``; pages elsewhere load ``assets/plotly.min.js`` beside them.
Offline, and never repeated per folder.

Example:
    >>> import plotly.graph_objects as go, tempfile, pathlib
    >>> fig = go.Figure(go.Bar(x=["base", "target"], y=[0.02, 0.9]), layout_title_text="accuracy")
    >>> out = save(fig, pathlib.Path(tempfile.mkdtemp()) / "accuracy")
    >>> sorted(p.suffix for p in out)
    ['.html', '.png']
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from mechdiff.visualization.assets import shared_asset

PALETTE = ["#4C72B0", "#DD8452", "#55A868", "#C44E52", "#8172B3", "#937860", "#DA8BC3", "#8C8C8C"]


def save(fig: go.Figure, stem: str | Path, width: float = 7.0, height: float = 4.2) -> list[Path]:
    """Write ``stem.html`` and ``stem.png``; returns both paths.

    The HTML loads the tree's one shared ``plotly.min.js`` (see :func:`shared_asset`), so it works
    offline without repeating 4.6 MB of JavaScript in every figure or folder.
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    html = write_html(fig, stem.with_suffix(".html"))
    png = stem.with_suffix(".png")
    render_static(fig, width, height).savefig(png, dpi=130, bbox_inches="tight")
    return [html, png]


def new_figure(**kwargs) -> Figure:
    """A matplotlib ``Figure`` on the Agg canvas, outside pyplot (no global backend, no display).

    Example:
        >>> ax = new_figure(figsize=(2, 2)).subplots()
        >>> type(ax.figure.canvas).__name__
        'FigureCanvasAgg'
    """
    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def plotly_src(page: str | Path) -> str:
    """The ``src`` of the shared ``plotly.min.js`` for the page ``page`` (written if missing)."""
    from plotly.offline import get_plotlyjs

    return shared_asset(page, "plotly.min.js", get_plotlyjs)


def write_html(fig: go.Figure, path: str | Path) -> Path:
    """Write ``fig`` as a full HTML page that loads the shared ``plotly.min.js``; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.write_html(str(path), include_plotlyjs=plotly_src(path), full_html=True)
    return path


def _text(value) -> str:
    return "" if value is None else str(getattr(value, "text", value) or "")


def render_static(fig: go.Figure, width: float = 7.0, height: float = 4.2):
    """A matplotlib rendering of ``fig`` (bar, scatter, heatmap, pie traces)."""
    out = new_figure(figsize=(width, height))
    ax = out.subplots()
    bars = [t for t in fig.data if t.type == "bar"]
    for i, trace in enumerate(fig.data):
        color = PALETTE[i % len(PALETTE)]
        draw = {"bar": _bar, "scatter": _scatter, "heatmap": _heatmap, "pie": _pie}.get(trace.type)
        if draw is None:
            raise ValueError(f"no static rendering for plotly trace type {trace.type!r}")
        draw(ax, trace, color, bars, out)
    layout = fig.layout
    ax.set_title(_text(layout.title), fontsize=11)
    ax.set_xlabel(_text(layout.xaxis.title))
    ax.set_ylabel(_text(layout.yaxis.title))
    xs = [v for t in fig.data if t.type == "scatter" for v in (t.x or []) if v is not None]
    if xs and all(isinstance(v, (int, float)) and float(v).is_integer() for v in xs):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ys = [v for t in fig.data if t.type in ("bar", "scatter") for v in (t.y or []) if v is not None]
    if ys and all(isinstance(v, (int, float)) and float(v).is_integer() for v in ys):
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # counts: no 2.5 ticks
    for axis, set_ticks in ((layout.xaxis, ax.set_xticks), (layout.yaxis, ax.set_yticks)):
        if axis.tickmode == "array" and axis.tickvals is not None:  # named ticks (layers, tokens)
            names = list(axis.ticktext) if axis.ticktext is not None else [str(v) for v in axis.tickvals]
            turn = axis is layout.xaxis and (abs(axis.tickangle or 0) == 90 or len(names) > 8)
            set_ticks(list(axis.tickvals), names, rotation=90 if turn else 0, fontsize=7 if len(names) > 8 else None)
    if layout.yaxis.type == "log":
        ax.set_yscale("log")
    for shape in layout.shapes or ():  # fig.add_hline: a reference level (chance, a target)
        if shape.type == "line" and shape.y0 is not None and shape.y0 == shape.y1:
            ax.axhline(shape.y0, color="k", ls="--", lw=1)
    if any(t.name for t in fig.data if t.type != "pie") and len(fig.data) > 1:
        ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return out


def _bar(ax, trace, color, bars, figure):
    k, n = bars.index(trace), len(bars)
    x = list(trace.x)
    pos = np.arange(len(x)) + (k - (n - 1) / 2) * (0.8 / n)
    marker = trace.marker.color if isinstance(trace.marker.color, str) else color
    err = trace.error_y.array if trace.error_y and trace.error_y.array is not None else None
    ax.bar(pos, list(trace.y), width=0.8 / n, color=marker, label=trace.name, yerr=err, capsize=3)
    ax.set_xticks(
        np.arange(len(x)), [str(v) for v in x], rotation=30 if len(x) > 6 else 0, ha="right" if len(x) > 6 else "center"
    )


def _scatter(ax, trace, color, bars, figure):
    mode = trace.mode or "lines+markers"
    dashed = "--" if trace.line.dash == "dash" else "-"
    label = trace.name if trace.showlegend is not False else None  # one legend entry per group
    colors = trace.marker.color
    if mode == "markers" and isinstance(colors, (list, tuple)):  # a colour per point
        ax.scatter(
            list(trace.x), list(trace.y), c=list(colors), s=16, label=label, zorder=3, edgecolors="k", linewidths=0.4
        )
        return
    ax.plot(
        list(trace.x),
        list(trace.y),
        color=trace.line.color or color,
        label=label,
        marker="o" if "markers" in mode else None,
        markersize=4,
        linestyle=dashed if "lines" in mode else "none",
        linewidth=trace.line.width or 1.5,
        alpha=trace.opacity if trace.opacity is not None else 1.0,
    )


def _heatmap(ax, trace, color, bars, figure):
    z = np.asarray(trace.z, dtype=float)
    im = ax.imshow(z, aspect="auto", cmap="viridis", origin="lower")
    if trace.x is not None:
        ax.set_xticks(range(len(trace.x)), [str(v) for v in trace.x], rotation=45, ha="right")
    if trace.y is not None:
        ax.set_yticks(range(len(trace.y)), [str(v) for v in trace.y])
    figure.colorbar(im, ax=ax)


def _pie(ax, trace, color, bars, figure):
    ax.pie(
        list(trace.values),
        labels=list(trace.labels),
        colors=PALETTE,
        wedgeprops={"width": 0.45} if trace.hole else None,
        autopct="%1.0f%%",
        textprops={"fontsize": 8},
    )
    ax.axis("equal")
