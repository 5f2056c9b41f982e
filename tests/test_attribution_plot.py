"""Graph figures a person reads: named rows, prompt tokens, labelled features, no overlapping labels."""

import itertools

import plotly.graph_objects as go
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg

from attribution.build import attribute
from attribution.plot import (
    NODE_GAP,
    feature_top_tokens,
    graph_figure,
    layer_names,
    static_figure,
    static_layout,
)
from attribution.synthetic import tiny_adapted
from mechdiff.visualization.figures import render_static

TOKENS = torch.tensor([2, 5, 9, 11, 7, 20, 30, 4, 8, 9, 13, 6])


@pytest.fixture(scope="module")
def built():
    """A tiny adapted model and a graph with a crowded last position (60 feature nodes)."""
    torch.set_num_threads(1)
    adapted = tiny_adapted(seed=2)
    return adapted, attribute(adapted, TOKENS, None, max_feature_nodes=60, batch_size=16)


def _boxes(fig, texts):
    renderer = FigureCanvasAgg(fig).get_renderer()
    return [t.get_window_extent(renderer) for t in texts]


def test_graph_png_names_rows_tokens_and_features_without_overlap(built):
    adapted, graph = built
    pruned = graph.prune(0.9, 0.98)
    words = feature_top_tokens(adapted, graph)
    fig = static_figure(graph, pruned, "t", words)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == layer_names(graph.info["n_layers"])
    assert layer_names(2) == ["embedding", "layer 0", "layer 1", "target"]
    assert [t.get_text() for t in ax.get_xticklabels()] == graph.token_strs
    assert {"positive edge", "negative edge"} <= {t.get_text() for t in ax.get_legend().get_texts()}
    kept = pruned.node_mask[: graph.n_features].nonzero()[:, 0].tolist()
    labels = {t.get_text() for t in ax.texts}
    for i in kept:  # every feature: layer/feature and the token its decoder promotes
        layer, _, feat = graph.features[i].tolist()
        assert f"{layer}/{feat} {words[layer, feat]}" in labels
    coords, _ = static_layout(graph, pruned)
    rows = {}
    for x, y in coords.values():
        rows.setdefault(y, []).append(x)
    crowded = max(rows.values(), key=len)
    assert len(crowded) >= 4  # the test exercises a crowded position
    for xs in rows.values():
        xs = sorted(xs)
        assert all(b - a >= NODE_GAP - 1e-9 for a, b in zip(xs, xs[1:]))
    for a, b in itertools.combinations(_boxes(fig, ax.texts), 2):
        assert not a.overlaps(b), "two node labels overlap"


def test_top_tokens_are_the_decoders_logit_lens(built):
    adapted, graph = built
    words = feature_top_tokens(adapted, graph)
    layer, _, feat = graph.features[0].tolist()
    w_u = adapted.model.W_U.detach().double()
    logits = (adapted.adapters[layer].W_dec[feat].detach().double() * adapted.model.ln_final.w.double()) @ (
        w_u - w_u.mean(1, keepdim=True)
    )
    assert words[layer, feat] == adapted.model.tokenizer.convert_ids_to_tokens(int(logits.argmax()))


def test_the_static_rendering_of_the_plotly_graph_keeps_its_named_axes(built):
    _, graph = built
    fig = render_static(graph_figure(graph, 0.6, 0.85))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == layer_names(graph.info["n_layers"])
    assert [t.get_text() for t in ax.get_xticklabels()] == graph.token_strs
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert sorted(legend) == sorted(set(legend)) and "positive edge" in legend  # one entry each


def test_count_axes_get_integer_ticks():
    fig = render_static(go.Figure(go.Bar(x=["a", "b", "c"], y=[1, 3, 2])))
    ticks = fig.axes[0].get_yticks()
    assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks)
    shares = render_static(go.Figure(go.Bar(x=["a", "b"], y=[0.2, 0.7])))
    assert not all(float(t).is_integer() for t in shares.axes[0].get_yticks())
