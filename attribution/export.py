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

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no torch import for the server, which only writes JSON
    from attribution.graph import Graph


def cantor(layer: int, feature: int) -> int:
    """The frontend's feature index of ``(layer, feature)`` (its ``util.cantorUnpair`` inverts it).

    >>> cantor(2, 3)
    18
    """
    return (layer + feature) * (layer + feature + 1) // 2 + feature


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` through a unique temporary file in the same folder (a reader sees
    the old or the new file, and two writers never share a temporary name)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _node(
    node_id: str,
    feature: int,
    layer: str,
    ctx_idx: int,
    feature_type: str,
    js: str,
    influence: float | None = None,
    activation: float | None = None,
    clerp: str = "",
    token_prob: float = 0.0,
    is_target_logit: bool = False,
) -> dict:
    return {
        "node_id": node_id,
        "feature": int(feature),
        "layer": layer,
        "ctx_idx": int(ctx_idx),
        "feature_type": feature_type,
        "token_prob": float(token_prob),
        "is_target_logit": bool(is_target_logit),
        "run_idx": 0,
        "reverse_ctx_idx": 0,
        "jsNodeId": js,
        "clerp": clerp,
        "influence": influence,
        "activation": activation,
    }


def graph_slug(graph: Graph, name: str = "") -> str:
    """The graph's name in the index, from its prompt and target: ``{name}-{target}-{tail}-{hash}``
    with the prompt's last tokens and a hash of all its token ids and targets, so two graphs of
    different prompts or targets never share a file, and the same graph exported again replaces
    itself.

    >>> from attribution.synthetic import tiny_adapted
    >>> from attribution.build import attribute
    >>> import torch
    >>> adapted = tiny_adapted(seed=0)
    >>> a = graph_slug(attribute(adapted, torch.tensor([2, 5, 9, 11]), "w3"), "demo")
    >>> b = graph_slug(attribute(adapted, torch.tensor([2, 5, 9, 12]), "w3"), "demo")
    >>> a.startswith("demo-w3-"), a != b
    (True, True)
    """
    key = json.dumps([graph.tokens.tolist(), [t["label"] for t in graph.targets]])
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    tail = "-".join(graph.token_strs[-3:])
    text = "-".join(x for x in (name, graph.targets[0]["label"], tail, digest) if x)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def to_circuit_tracer_json(
    graph: Graph,
    slug: str = "mechdiff-graph",
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    clerps: dict | None = None,
    scan: str | None = None,
    title: str = "",
) -> dict:
    """The pruned graph as circuit-tracer's graph JSON (a dict; see the module docstring).

    ``clerps`` optionally maps ``(layer, feature)`` to a feature description; ``scan`` names the
    feature set (the folder under ``features/`` its examples are in; default the graph's);
    ``title`` is shown before the prompt in the frontend's graph list.
    """
    pruned = graph.prune(node_threshold, edge_threshold)
    scores = pruned.cumulative_scores.tolist()
    n_layers, d_vocab, n_f = graph.info["n_layers"], graph.info["d_vocab"], graph.n_features
    clerps = clerps or {}
    nodes: dict[int, dict] = {}
    for i in pruned.node_mask.nonzero()[:, 0].tolist():
        if i < n_f:
            layer, pos, feat = graph.features[i].tolist()
            nodes[i] = _node(
                f"{layer}_{feat}_{pos}",
                cantor(layer, feat),
                str(layer),
                pos,
                "cross layer transcoder",
                f"{layer}_{feat}-0",
                scores[i],
                float(graph.activations[i]),
                clerps.get((layer, feat), ""),
            )
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
            nodes[i] = _node(
                f"{layer}_{vocab_idx}_{t['pos']}",
                vocab_idx,
                layer,
                t["pos"],
                "logit",
                f"L_{vocab_idx}-{t['pos']}",
                clerp=f'Output "{t["label"]}" (p={prob:.3f})',
                token_prob=prob,
                is_target_logit=k == 0,
            )
    dsts, srcs = pruned.edge_mask.nonzero(as_tuple=True)
    links = [
        {"source": nodes[s]["node_id"], "target": nodes[d]["node_id"], "weight": float(graph.adjacency[d, s])}
        for d, s in zip(dsts.tolist(), srcs.tolist())
        if s in nodes and d in nodes
    ]
    linked = {x for link in links for x in (link["source"], link["target"])}
    used = [n for n in nodes.values() if n["node_id"] in linked or n["feature_type"] in ("embedding", "logit")]
    metadata = {
        "slug": slug,
        "scan": scan or graph.info["scan"],
        "transcoder_list": [],
        "prompt_tokens": list(graph.token_strs),
        "prompt": " ".join(graph.token_strs),
        "node_threshold": node_threshold,
        "schema_version": 1,
    }
    if title:
        metadata["title_prefix"] = title
    qparams = {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""}
    return {"metadata": metadata, "qParams": qparams, "nodes": used, "links": links}


def write_circuit_tracer_files(
    graph: Graph,
    out_dir: str | Path,
    slug: str | None = None,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    scan: str | None = None,
    title: str = "",
    clerps: dict | None = None,
) -> Path:
    """Write ``out_dir/{slug}.json`` and add it to ``out_dir/graph-metadata.json`` (the index the
    frontend reads), keeping every other graph listed there. ``slug`` defaults to
    :func:`graph_slug`; ``clerps`` as in :func:`to_circuit_tracer_json`. Returns the graph file's path.

    Example:
        Not run as a doctest: it writes files into the repository's figures/ folder.
        >>> write_circuit_tracer_files(graph, "figures/attribution/circuit-tracer")  # doctest: +SKIP
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    slug = slug or graph_slug(graph)
    data = to_circuit_tracer_json(graph, slug, node_threshold, edge_threshold, clerps, scan=scan, title=title)
    path = out / f"{slug}.json"
    write_text_atomic(path, json.dumps(data, indent=1))
    index_path = out / "graph-metadata.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {"graphs": []}
    if not isinstance(index.get("graphs"), list):
        raise ValueError(f"{index_path} is not a graph index (no 'graphs' list); move it away")
    index["graphs"] = [g for g in index["graphs"] if g.get("slug") != slug] + [data["metadata"]]
    write_text_atomic(index_path, json.dumps(index, indent=1))
    return path
