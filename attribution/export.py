"""Export a pruned :class:`~attribution.graph.Graph` in circuit-tracer's frontend JSON.

The schema is circuit-tracer's (``circuit_tracer/frontend/graph_models.py`` and
``utils/create_graph_files.py``): ``metadata`` (slug, scan, transcoder_list, prompt_tokens,
prompt, node_threshold, schema_version), ``qParams`` (pinnedIds, supernodes, linkType, clickedId,
sg_pos), ``nodes`` and ``links`` (source, target, weight). Feature nodes have node_id
``"{layer}_{feature}_{pos}"`` and feature_type ``"cross layer transcoder"`` (the frontend's name
for transcoder features); embeddings ``"E_{token_id}_{pos}"`` / ``"embedding"``; targets are
``"logit"`` nodes at layer ``n_layers + 1`` whose clerp ``Output "tok" (p=0.123)`` the frontend
parses. Targets that are not one token get virtual ids ``d_vocab + index``, as circuit-tracer does.

Example:
    >>> import torch
    >>> from attribution.build import attribute
    >>> from attribution.synthetic import tiny_adapted
    >>> graph = attribute(tiny_adapted(seed=0), torch.tensor([2, 5, 9, 11, 7, 20]))
    >>> data = to_circuit_tracer_json(graph, slug="demo")
    >>> sorted(data)
    ['links', 'metadata', 'nodes', 'qParams']
"""

from __future__ import annotations

import json
from pathlib import Path

from attribution.graph import Graph


def _cantor(x: int, y: int) -> int:
    return (x + y) * (x + y + 1) // 2 + y


def _node(node_id: str, feature: int, layer: str, ctx_idx: int, feature_type: str, js: str,
          influence: float | None = None, activation: float | None = None, clerp: str = "",
          token_prob: float = 0.0, is_target_logit: bool = False) -> dict:
    return {"node_id": node_id, "feature": int(feature), "layer": layer, "ctx_idx": int(ctx_idx),
            "feature_type": feature_type, "token_prob": float(token_prob),
            "is_target_logit": bool(is_target_logit), "run_idx": 0, "reverse_ctx_idx": 0,
            "jsNodeId": js, "clerp": clerp, "influence": influence, "activation": activation}


def to_circuit_tracer_json(graph: Graph, slug: str = "mechdiff-graph", node_threshold: float = 0.8,
                           edge_threshold: float = 0.98, clerps: dict | None = None) -> dict:
    """The pruned graph as circuit-tracer's graph JSON (a dict; see the module docstring).

    ``clerps`` optionally maps ``(layer, feature)`` to a feature description.
    """
    pruned = graph.prune(node_threshold, edge_threshold)
    scores = pruned.cumulative_scores.tolist()
    n_layers, d_vocab, n_f = graph.info["n_layers"], graph.info["d_vocab"], graph.n_features
    clerps = clerps or {}
    nodes: dict[int, dict] = {}
    for i in pruned.node_mask.nonzero()[:, 0].tolist():
        if i < n_f:
            layer, pos, feat = graph.features[i].tolist()
            nodes[i] = _node(f"{layer}_{feat}_{pos}", _cantor(layer, feat), str(layer), pos,
                             "cross layer transcoder", f"{layer}_{feat}-0", scores[i],
                             float(graph.activations[i]), clerps.get((layer, feat), ""))
        elif i < graph.target_slice.start:
            pos = i - n_f
            tok = int(graph.tokens[pos])
            nodes[i] = _node(f"E_{tok}_{pos}", pos, "E", pos, "embedding", f"E_{tok}-{pos}", scores[i])
        else:
            k = i - graph.target_slice.start
            t = graph.targets[k]
            vocab_idx = t["token_id"] if t["token_id"] is not None else d_vocab + k
            prob = t["prob"] if t["prob"] is not None else t["weight"]
            layer = str(n_layers + 1)
            nodes[i] = _node(f"{layer}_{vocab_idx}_{t['pos']}", vocab_idx, layer, t["pos"], "logit",
                             f"L_{vocab_idx}-{t['pos']}", clerp=f'Output "{t["label"]}" (p={prob:.3f})',
                             token_prob=prob, is_target_logit=k == 0)
    dsts, srcs = pruned.edge_mask.nonzero(as_tuple=True)
    links = [{"source": nodes[s]["node_id"], "target": nodes[d]["node_id"],
              "weight": float(graph.adjacency[d, s])}
             for d, s in zip(dsts.tolist(), srcs.tolist()) if s in nodes and d in nodes]
    linked = {x for link in links for x in (link["source"], link["target"])}
    used = [n for n in nodes.values()
            if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    metadata = {"slug": slug, "scan": graph.info["scan"], "transcoder_list": [],
                "prompt_tokens": list(graph.token_strs), "prompt": " ".join(graph.token_strs),
                "node_threshold": node_threshold, "schema_version": 1}
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}


def write_circuit_tracer_files(graph: Graph, out_dir: str | Path, slug: str = "mechdiff-graph",
                               node_threshold: float = 0.8, edge_threshold: float = 0.98) -> Path:
    """Write ``out_dir/{slug}.json`` and add it to ``out_dir/graph-metadata.json`` (the index
    circuit-tracer's local server reads). Returns the graph file's path.

    Example:
        >>> write_circuit_tracer_files(graph, "figures/attribution/graphs", "wait-0")  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = to_circuit_tracer_json(graph, slug, node_threshold, edge_threshold)
    path = out / f"{slug}.json"
    path.write_text(json.dumps(data, indent=1))
    index_path = out / "graph-metadata.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"graphs": []}
    index["graphs"] = [g for g in index["graphs"] if g.get("slug") != slug] + [data["metadata"]]
    index_path.write_text(json.dumps(index, indent=1))
    return path
