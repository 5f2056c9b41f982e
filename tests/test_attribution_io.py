"""Graph pruning, scores, rankings, save/load, circuit-tracer export and figures."""

import json

import pytest
import torch

from attribution.build import attribute
from attribution.export import to_circuit_tracer_json, write_circuit_tracer_files
from attribution.graph import Graph, compute_influence, normalize_rows, partial_influence
from attribution.plot import feature_token_views, save_graph_figure
from attribution.synthetic import tiny_adapted
from attribution.targets import LogitDiff

TOKENS = torch.tensor([2, 5, 9, 11, 7, 20, 30, 4, 8, 9, 13, 6])


@pytest.fixture(scope="module")
def adapted():
    return tiny_adapted(seed=2)


@pytest.fixture(scope="module")
def graph(adapted):
    return attribute(adapted, TOKENS, None, max_feature_nodes=60, batch_size=16)


def test_influence_is_the_power_series_of_the_normalized_adjacency(graph):
    N = normalize_rows(graph.adjacency)
    w = graph.target_weights
    series, term = torch.zeros_like(w), w.clone()
    for _ in range(10):
        term = term @ N
        series += term
    torch.testing.assert_close(compute_influence(N, w), series, rtol=1e-10, atol=1e-12)
    assert (series[: graph.n_features] > 0).sum() > 10


def test_partial_influence_over_all_rows_is_the_full_influence(graph):
    """The builder's ranking (rows in any order, identified by node) equals the graph's influence."""
    n_cols = graph.n_features + graph.n_pos
    row_node = torch.cat([torch.arange(graph.n_features), torch.arange(graph.n_targets) + n_cols])
    perm = torch.randperm(len(row_node), generator=torch.Generator().manual_seed(0))
    rows = graph.adjacency[row_node[perm], :n_cols]
    weights = graph.target_weights[graph.target_slice]
    expected = compute_influence(normalize_rows(graph.adjacency), graph.target_weights)[:n_cols]
    torch.testing.assert_close(
        partial_influence(rows, row_node[perm], weights, n_cols), expected, rtol=1e-10, atol=1e-14
    )


@pytest.mark.parametrize("node_threshold,edge_threshold", [(0.8, 0.98), (0.5, 0.9), (0.95, 0.99)])
def test_pruning_keeps_the_stated_influence_share(graph, node_threshold, edge_threshold):
    p = graph.prune(node_threshold, edge_threshold)
    infl = p.node_influence
    ordered = infl.sort(descending=True).values
    cum = torch.cumsum(ordered, 0) / ordered.sum()
    n_keep = int((cum < node_threshold).sum()) + 1  # the shortest prefix reaching the threshold
    by_threshold = infl >= ordered[n_keep - 1]
    assert float(cum[n_keep - 1]) >= node_threshold and (n_keep == 1 or float(cum[n_keep - 2]) < node_threshold)
    assert p.threshold_node_share == pytest.approx(float(infl[by_threshold].sum() / infl.sum()))
    assert p.threshold_node_share >= node_threshold
    assert p.threshold_edge_share >= edge_threshold
    assert p.node_share <= p.threshold_node_share + 1.0  # embeddings are added, features dropped
    n_f = graph.n_features
    assert p.node_mask[n_f:].all()  # embeddings and targets always kept
    kept = p.node_mask[:n_f].nonzero()[:, 0]
    assert (p.edge_mask[kept].any(1) & p.edge_mask[:, kept].any(0)).all()  # connected both ways
    assert not p.edge_mask[~p.node_mask].any() and not p.edge_mask[:, ~p.node_mask].any()
    assert (graph.adjacency[p.edge_mask] != 0).all()


def test_stricter_thresholds_keep_fewer_nodes(graph):
    sizes = [int(graph.prune(t, 0.98).node_mask.sum()) for t in (0.3, 0.6, 0.9)]
    assert sizes[0] <= sizes[1] <= sizes[2] and sizes[0] < sizes[2]


def test_rankings(graph):
    top = graph.top_features(0, k=5)
    infl = graph.node_influence(0)[: graph.n_features]
    assert [t["node"] for t in top] == torch.argsort(infl, descending=True)[:5].tolist()
    direct = graph.top_features(graph.targets[0]["label"], k=3, by="direct")
    row = graph.adjacency[graph.target_slice.start, : graph.n_features]
    assert direct[0]["score"] == pytest.approx(float(row[row.abs().argmax()]))
    ranking = graph.feature_ranking(0)
    assert len(ranking) == graph.n_features
    assert [r["score"] for r in ranking] == sorted((r["score"] for r in ranking), reverse=True)
    grouped = graph.feature_ranking(0, aggregate=True)
    assert sum(len(g["positions"]) for g in grouped) == graph.n_features
    assert sum(g["score"] for g in grouped) == pytest.approx(sum(r["score"] for r in ranking))
    with pytest.raises(KeyError, match="no target"):
        graph.top_features("not-a-target")
    with pytest.raises(IndexError):
        graph.top_features(99)


def test_save_load_round_trip(graph, tmp_path):
    paths = graph.save(tmp_path / "g")
    assert [p.suffix for p in paths] == [".safetensors", ".json"]
    back = Graph.load(tmp_path / "g")
    for name in (
        "tokens",
        "features",
        "activations",
        "adjacency",
        "values",
        "constants",
        "dropped",
        "dropped_abs",
        "selected",
        "target_vectors",
    ):
        assert torch.equal(getattr(back, name), getattr(graph, name)), name
    assert back.targets == graph.targets and back.token_strs == graph.token_strs
    assert back.info == graph.info and back.meta == graph.meta
    assert back.top_features(0, 5) == graph.top_features(0, 5)
    assert back.prune().node_mask.equal(graph.prune().node_mask)


NODE_FIELDS = {
    "node_id": str,
    "feature": int,
    "layer": str,
    "ctx_idx": int,
    "feature_type": str,
    "token_prob": float,
    "is_target_logit": bool,
    "run_idx": int,
    "reverse_ctx_idx": int,
    "jsNodeId": str,
    "clerp": str,
}


def test_circuit_tracer_json_structure_and_types(graph, adapted, tmp_path):
    data = json.loads(json.dumps(to_circuit_tracer_json(graph, slug="t")))  # JSON-serializable
    assert set(data) == {"metadata", "qParams", "nodes", "links"}
    meta = data["metadata"]
    assert meta["slug"] == "t" and isinstance(meta["scan"], str) and meta["transcoder_list"] == []
    assert meta["prompt_tokens"] == graph.token_strs and isinstance(meta["prompt"], str)
    assert isinstance(meta["node_threshold"], float) and meta["schema_version"] == 1
    assert data["qParams"] == {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    ids = set()
    for node in data["nodes"]:
        for key, kind in NODE_FIELDS.items():
            assert isinstance(node[key], kind), (key, node)
        assert node["influence"] is None or isinstance(node["influence"], float)
        assert node["activation"] is None or isinstance(node["activation"], float)
        assert node["feature_type"] in ("cross layer transcoder", "embedding", "logit")
        ids.add(node["node_id"])
    feats = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert feats, "some features survive pruning"
    for n in feats:
        layer, feat, pos = map(int, n["node_id"].split("_"))
        assert n["layer"] == str(layer) and n["ctx_idx"] == pos
        assert [layer, pos, feat] in graph.features.tolist()
    emb = [n for n in data["nodes"] if n["feature_type"] == "embedding"]
    assert len(emb) == graph.n_pos and all(n["layer"] == "E" for n in emb)
    logits = [n for n in data["nodes"] if n["feature_type"] == "logit"]
    assert len(logits) == graph.n_targets and sum(n["is_target_logit"] for n in logits) == 1
    for n in logits:  # the frontend parses the probability out of the clerp
        assert n["layer"] == str(graph.info["n_layers"] + 1)
        assert float(n["clerp"].split("(p=")[1].split(")")[0]) == pytest.approx(n["token_prob"], abs=1e-3)
    assert data["links"] and all(set(link) == {"source", "target", "weight"} for link in data["links"])
    assert all(
        link["source"] in ids and link["target"] in ids and isinstance(link["weight"], float) for link in data["links"]
    )
    diff = attribute(adapted, TOKENS, LogitDiff("w3", "w4"))  # a target that is not one token
    node = [n for n in to_circuit_tracer_json(diff)["nodes"] if n["feature_type"] == "logit"][0]
    assert node["feature"] >= graph.info["d_vocab"]
    path = write_circuit_tracer_files(graph, tmp_path / "ct", slug="g1")
    write_circuit_tracer_files(graph, tmp_path / "ct", slug="g2")
    index = json.loads((tmp_path / "ct" / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == ["g1", "g2"] and path.exists()


def test_figures_are_written_for_offline_viewing(graph, adapted, tmp_path):
    html, png = save_graph_figure(graph, tmp_path / "fig" / "graph")
    text = html.read_text()
    # offline, no CDN: the page loads plotly.js from the tree's one shared local copy
    import re

    import plotly

    (src,) = re.findall(r'<script[^>]*src="([^"]+)"', text)
    assert "://" not in src and (html.parent / src).read_text() == plotly.offline.get_plotlyjs()
    assert png.read_bytes()[:4] == b"\x89PNG"
    views = feature_token_views(adapted, [TOKENS, TOKENS[:6]], [(0, 1), (1, 2)], tmp_path / "tok.html")
    assert len(views) == 2
    page = (tmp_path / "tok.html").read_text()
    assert "unpkg.com" not in page and "CircuitsVis.render" in page and "L1F2" in page
    (cv_src,) = re.findall(r"<script src='([^']+)'>", page)  # the bundle once, from a local file
    assert "://" not in cv_src and "CircuitsVis" in (tmp_path / cv_src).read_text()
    with pytest.raises(IndexError):
        feature_token_views(adapted, [TOKENS], [(5, 0)])


def test_a_graph_whose_embeddings_hold_the_threshold_names_the_threshold_that_shows_features(graph):
    """When the embeddings carry more than the node threshold, circuit-tracer's rule keeps no feature
    (SmolLM2's "Wait" graphs at 0.8); the CLI's warning names the threshold that keeps the first one."""
    from attribution.__main__ import _feature_share, no_feature_kept

    n_f = graph.n_features
    p = graph.prune(0.8, 0.98)
    order = torch.argsort(p.node_influence, descending=True)
    first = int((order < n_f).nonzero()[0])  # rank of the most influential feature
    low = float(p.cumulative_scores[order[first - 1]]) - 1e-6 if first else None
    if low is None or low <= 0:
        pytest.skip("this graph's most influential node is a feature: no threshold hides every feature")
    hidden = graph.prune(low, 0.98)
    assert not hidden.node_mask[:n_f].any()
    message = no_feature_kept(graph, low, 0.98)
    suggested = float(message.split("--node-threshold ")[1].split(" ")[0])
    assert suggested > low and graph.prune(suggested, 0.98).node_mask[:n_f].any()
    assert not graph.prune(suggested - 0.01, 0.98).node_mask[:n_f].any()
    share = _feature_share(hidden, n_f)
    assert f"features carry {share:.0%}" in message and 0 < share < 1
