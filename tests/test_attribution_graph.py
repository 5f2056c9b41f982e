"""Exactness of attribution graphs on small random adapted models (float64, no mocks).

Every check compares against an independent computation: interventions on the linearized model
held at a recorded frozen state, the true model's values, or the true model's gradients.
"""

import pytest
import torch

from attribution.build import attribute
from attribution.linearize import Leaves, linearized, linearized_logits, record_frozen
from attribution.synthetic import tiny_adapted
from attribution.targets import Direction, FeatureTarget, LogitDiff, Token, TopLogits

TOKENS = torch.tensor([2, 5, 9, 11, 7, 20, 30, 4, 8, 9, 13, 6])


@pytest.fixture(scope="module")
def adapted():
    return tiny_adapted(seed=0)


def measured_by_intervention(adapted, tokens, graph):
    """Row values of the frozen linearized model, for the clean run (batch row 0) and with each
    source of the graph zeroed (row 1 + s), plus the value with every source zeroed (last row).

    Sources: the graph's features, then the embeddings at positions >= 1.
    """
    n_f, n_pos = graph.n_features, graph.n_pos
    n_src = n_f + n_pos - 1
    B = n_src + 2
    feats = graph.features
    frozen = record_frozen(adapted, tokens)
    rows_b = 1 + torch.arange(n_f)

    def zero_features(layer):
        m = feats[:, 0] == layer

        def hook(acts, hook):
            acts = acts.clone()
            acts[rows_b[m], feats[m, 1], feats[m, 2]] = 0
            acts[-1, feats[m, 1], feats[m, 2]] = 0
            return acts

        return hook

    def zero_embed(emb, hook):
        emb = emb.clone()
        emb[1 + n_f + torch.arange(n_pos - 1), torch.arange(1, n_pos)] = 0
        emb[-1, 1:] = 0
        return emb

    hooks = [(f"blocks.{la}.adapter.hook_acts", zero_features(la)) for la in range(adapted.model.cfg.n_layers)]
    hooks.append(("hook_embed", zero_embed))
    leaves = Leaves()
    with torch.no_grad(), linearized(adapted, frozen, leaves), adapted.model.hooks(fwd_hooks=hooks):
        adapted.model(tokens[None].expand(B, -1))
    n_layers = adapted.model.cfg.n_layers
    out = []
    for i in range(n_f):  # feature rows: pre-activation at (layer, pos)
        layer, pos, feat = graph.features[i].tolist()
        a = adapted.adapters[layer]
        out.append(leaves.mlp_in[layer][:, pos] @ a.W_enc[:, feat] + a.b_enc[feat])
    for k, t in enumerate(graph.targets):
        x = leaves.site(t["site"], n_layers)[:, t["pos"]]
        out.append(x @ graph.target_vectors[k] + t["bias"])
    return torch.stack(out)  # [rows, B]


def row_ids(graph):
    return torch.cat([torch.arange(graph.n_features), torch.arange(graph.n_targets) + graph.target_slice.start])


@pytest.mark.parametrize("target", [None, FeatureTarget(1, 5, pos=8), LogitDiff("w3", "w4", pos=6)])
def test_every_edge_equals_an_intervention_on_the_linearized_model(adapted, target):
    tokens = TOKENS
    graph = attribute(adapted, tokens, target, batch_size=16)
    assert graph.n_features > 40
    measured = measured_by_intervention(adapted, tokens, graph)
    rows = row_ids(graph)
    clean = measured[:, 0]
    torch.testing.assert_close(clean, graph.values[rows], rtol=1e-9, atol=1e-9)
    effect = clean[:, None] - measured[:, 1:-1]  # edge = value - value with the source zeroed
    sources = torch.cat([torch.arange(graph.n_features), graph.embed_slice.start + torch.arange(1, graph.n_pos)])
    edges = graph.adjacency[rows][:, sources]
    scale = edges.abs().amax(1, keepdim=True).clamp(min=1e-12)
    assert ((effect - edges).abs() <= 1e-4 * (edges.abs() + 1e-3 * scale)).all()
    assert (edges != 0).sum() > 100  # the comparison is not vacuous
    assert graph.adjacency[:, graph.embed_slice.start].abs().max() == 0  # BOS is zeroed


def test_completeness_edges_plus_frozen_terms_equal_value(adapted):
    graph = attribute(adapted, TOKENS, TopLogits(0.99), batch_size=7)
    rows = row_ids(graph)
    frozen_terms = measured_by_intervention(adapted, TOKENS, graph)[:, -1]
    torch.testing.assert_close(graph.constants[rows], frozen_terms, rtol=1e-4, atol=1e-9)
    total = graph.adjacency[rows].sum(1) + frozen_terms
    torch.testing.assert_close(total, graph.values[rows], rtol=1e-4, atol=1e-8)
    assert graph.adjacency[rows].sum(1).abs().min() > 1e-3  # edges carry real mass


def test_completeness_with_dropped_features(adapted):
    graph = attribute(adapted, TOKENS, "w8", max_feature_nodes=15, batch_size=4, refresh_every=6)
    assert graph.n_features == 15 and graph.info["n_active"] > 15
    rows = row_ids(graph)
    total = graph.adjacency[rows].sum(1) + graph.dropped[rows] + graph.constants[rows]
    torch.testing.assert_close(total, graph.values[rows], rtol=1e-10, atol=1e-10)
    assert graph.dropped_abs[rows].sum() > 0
    s = graph.scores()
    assert 0 < s.replacement < 1 and 0 < s.completeness < 1
    assert attribute(adapted, TOKENS, "w8").scores().completeness == pytest.approx(1.0)


def test_values_are_the_true_models(adapted):
    true_logits = adapted.model(TOKENS[None])[0].detach()
    torch.testing.assert_close(linearized_logits(adapted, TOKENS), true_logits, rtol=0, atol=1e-12)
    frozen = record_frozen(adapted, TOKENS)
    torch.testing.assert_close(linearized_logits(adapted, TOKENS, frozen), true_logits, rtol=0, atol=1e-12)
    graph = attribute(adapted, TOKENS, [Token("w8", demean=False), Token("w9"), Direction(adapted.model.W_U[:, 5])])
    values = graph.values[graph.target_slice]
    last = true_logits[-1]
    expected = torch.stack([last[12], last[13] - last.mean(), (last[5] - adapted.model.b_U[5])])
    torch.testing.assert_close(values, expected, rtol=1e-10, atol=1e-10)
    _, cache = adapted.model.run_with_cache(TOKENS[None])
    layer, pos, feat = graph.features[-1].tolist()
    pre = cache[f"blocks.{layer}.adapter.hook_pre"][0, pos, feat]
    torch.testing.assert_close(graph.values[graph.n_features - 1], pre, rtol=1e-10, atol=1e-10)


def test_linearized_gradients_differ_from_true_ones_and_context_restores(adapted):
    """The freezing must actually change the backward pass, and leave no trace afterwards."""
    flags = [p.requires_grad for p in adapted.parameters()]

    def embed_grad(lin: bool):
        leaves = Leaves()
        ctx = linearized(adapted, leaves=leaves) if lin else torch.enable_grad()
        with ctx:
            emb = {}

            def keep(t, hook):
                t = t.detach().requires_grad_(True)
                emb["e"] = t
                return t

            with adapted.model.hooks(fwd_hooks=[] if lin else [("hook_embed", keep)]):
                logits = adapted.model(TOKENS[None])
            e = leaves.embed if lin else emb["e"]
            return torch.autograd.grad(logits[0, -1, 8], e)[0]

    before = embed_grad(False)
    lin = embed_grad(True)
    assert (lin - before).abs().max() > 1e-3
    torch.testing.assert_close(embed_grad(False), before, rtol=0, atol=0)
    assert all(len(hp.fwd_hooks) == 0 for hp in adapted.model.hook_dict.values())
    assert [p.requires_grad for p in adapted.parameters()] == flags


@pytest.mark.parametrize("max_feature_nodes,vmap", [(None, True), (20, True), (20, False)])
def test_graph_is_independent_of_batch_size(adapted, max_feature_nodes, vmap):
    kw = dict(target=None, max_feature_nodes=max_feature_nodes, refresh_every=8)
    g1 = attribute(adapted, TOKENS, batch_size=1, **kw)
    g16 = attribute(adapted, TOKENS, batch_size=16, vmap=vmap, **kw)
    assert torch.equal(g1.features, g16.features)
    torch.testing.assert_close(g1.adjacency, g16.adjacency, rtol=1e-10, atol=1e-12)
    assert g1.meta["n_backward"] == g1.meta["n_rows"]
    if max_feature_nodes is None:  # one stream of rows per prefix bucket
        assert g16.meta["n_backward"] <= g16.meta["floor_backward"] + g16.meta["prefix_buckets"] - 1
        flat = attribute(adapted, TOKENS, batch_size=16, prefix_buckets=1, **kw)
        assert flat.meta["n_backward"] == flat.meta["floor_backward"]  # exactly the floor
        torch.testing.assert_close(flat.adjacency, g16.adjacency, rtol=1e-10, atol=1e-12)


def test_features_are_visited_by_influence(adapted):
    """With a budget, the graph keeps the features the full graph ranks most influential first."""
    full = attribute(adapted, TOKENS, "w8")
    small = attribute(adapted, TOKENS, "w8", max_feature_nodes=10, refresh_every=2, batch_size=2)
    direct = full.adjacency[full.target_slice.start, : full.n_features].abs()
    top_direct = {tuple(full.features[i].tolist()) for i in torch.argsort(direct, descending=True)[:2]}
    kept = {tuple(f) for f in small.features.tolist()}
    assert top_direct <= kept  # the first refresh ranks by direct edges to the target


def test_bad_inputs_raise_clear_errors(adapted):
    with pytest.raises(ValueError, match="not in the vocabulary"):
        attribute(adapted, TOKENS, "nonsense-token")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        attribute(adapted, TOKENS, 999)
    with pytest.raises(IndexError, match="out of range"):
        attribute(adapted, TOKENS, Token("w3", pos=40))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        attribute(adapted, torch.tensor([2, 5, 99]))
    with pytest.raises(ValueError, match="1-D integer"):
        attribute(adapted, torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="batch_size"):
        attribute(adapted, TOKENS, batch_size=0)


def test_linearized_mlp_is_the_specified_linear_map(adapted):
    """Gate x up -> 0.5 a sg(b) + 0.5 sg(a) b and SiLU(g) -> g sg(sigmoid(g)), checked analytically:
    perturbing the MLP input x by dx changes the MLP output by
    (0.5 (dx W_gate) sigmoid(g0) b0 + 0.5 SiLU(g0) (dx W_in)) W_out."""
    layer = 1
    mlp = adapted.model.blocks[layer].mlp
    frozen = record_frozen(adapted, TOKENS)
    g0 = frozen.values[f"blocks.{layer}.mlp.hook_pre"][0]
    b0 = frozen.values[f"blocks.{layer}.mlp.hook_pre_linear"][0]
    d = torch.randn(
        TOKENS.shape[0], adapted.model.cfg.d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    w = adapted.model.blocks[layer].ln2.w

    def perturb(x, hook):
        x = x.clone()
        x[1] += d / w  # the MLP input (normalized * w) moves by d
        return x

    out = {}
    with (
        torch.no_grad(),
        linearized(adapted, frozen),
        adapted.model.hooks(
            fwd_hooks=[
                (f"blocks.{layer}.ln2.hook_normalized", perturb),
                (f"blocks.{layer}.hook_mlp_out", lambda t, hook: out.setdefault("o", t)),
            ]
        ),
    ):
        adapted.model(TOKENS[None].expand(2, -1))
    change = out["o"][1] - out["o"][0]
    expected = (
        0.5 * (d @ mlp.W_gate) * torch.sigmoid(g0) * b0 + 0.5 * torch.nn.functional.silu(g0) * (d @ mlp.W_in)
    ) @ mlp.W_out
    torch.testing.assert_close(change, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize(
    "dtype,kw",
    [
        (
            torch.float64,
            dict(target=[Token("w8"), FeatureTarget(2, 5, pos=7)], max_feature_nodes=25, refresh_every=7, batch_size=5),
        ),
        (torch.float32, dict(target=None, batch_size=16)),
    ],
)
def test_layerwise_backward_gives_the_reference_graph(dtype, kw):
    """The layerwise pass (rows join at their own block, every prefix in one pass) against the
    reference path (one autograd call through the whole model per batch and prefix)."""
    adapted = tiny_adapted(seed=1, dtype=dtype, n_layers=3)
    reference = attribute(adapted, TOKENS, layerwise=False, **kw)
    fast = attribute(adapted, TOKENS, **kw)
    assert fast.meta["layerwise"] and not reference.meta["layerwise"]
    assert torch.equal(fast.features, reference.features)
    scale = reference.adjacency.abs().max()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(fast.adjacency, reference.adjacency, rtol=0, atol=float(tol * scale))
    torch.testing.assert_close(fast.values, reference.values, rtol=0, atol=float(tol * scale))
    assert (fast.adjacency != 0).sum() > 200
    assert fast.meta["n_backward"] <= reference.meta["n_backward"]
    if kw.get("max_feature_nodes") is None:  # one stream of rows: exactly the floor, prefixes and all
        assert fast.meta["n_backward"] == fast.meta["floor_backward"] < reference.meta["n_backward"]


def test_a_built_graph_leaves_nothing_behind_in_the_process(adapted):
    """The retained forwards are freed with the graph builder: a process that builds many graphs
    (the hesitation study builds one per prompt) holds no more tensors after the fifth than after
    the second. Saving an op's output as-is through a saved-tensor hook closes a cycle through the
    C++ autograd graph that Python's collector cannot see; every graph then stayed in memory."""
    import gc

    def live_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    graphs = [attribute(adapted, TOKENS, max_feature_nodes=16, prefix_buckets=4) for _ in range(2)]
    del graphs
    after_two = live_tensors()
    for _ in range(3):
        attribute(adapted, TOKENS, max_feature_nodes=16, prefix_buckets=4)
    assert live_tensors() == after_two
