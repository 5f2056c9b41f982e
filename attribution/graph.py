"""The attribution :class:`Graph`: adjacency, influence, pruning, scores, rankings, save/load.

Nodes are ordered ``[features (n_features) | embeddings (n_pos) | targets (n_targets)]``;
``adjacency[t, s]`` is the edge from source s to target t (rows: targets of edges). Embedding
rows are empty. Each row node also carries its ``value`` in the linearized model, its
``constant`` (frozen terms: biases and the BOS position, the value with every source zeroed)
and what the features left out by ``max_feature_nodes`` contributed (``dropped``), so that
``adjacency[r].sum() + dropped[r] + constant[r] == value[r]`` for every row r.

Influence (as in circuit-tracer): ``w @ (N + N^2 + ...)`` with ``N`` the row-normalized ``|A|``
and ``w`` the target weights; the series ends because the graph is acyclic.

Example:
    >>> import torch
    >>> from attribution.build import attribute
    >>> from attribution.synthetic import tiny_adapted
    >>> graph = attribute(tiny_adapted(seed=0), torch.tensor([2, 5, 9, 11, 7, 20]), target="w3")
    >>> pruned = graph.prune(node_threshold=0.8, edge_threshold=0.98)
    >>> bool(pruned.node_mask[graph.target_slice].all())
    True
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Bool, Float, Int
from safetensors.torch import load_file, save_file
from torch import Tensor

from mechdiff.atomic import atomic_file, write_text

FORMAT_VERSION = 1
_CHUNK = 1024
_TENSORS = (
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
)


@dataclass
class PruneResult:
    """Masks of a pruned graph. ``node_share`` / ``edge_share``: the fraction of the total node
    influence / edge score that the kept nodes / edges carry; ``threshold_*_share``: the same
    before features without kept in- and out-edges are dropped (>= the thresholds by construction)."""

    node_mask: Bool[Tensor, " n_nodes"]
    edge_mask: Bool[Tensor, "n_nodes n_nodes"]
    node_influence: Float[Tensor, " n_nodes"]
    cumulative_scores: Float[Tensor, " n_nodes"]
    threshold_node_share: float
    threshold_edge_share: float
    node_share: float
    edge_share: float


@dataclass
class GraphScores:
    """Replacement / completeness in circuit-tracer's sense, with the features left out by
    ``max_feature_nodes`` in the role of error nodes (no error nodes exist here: base MLPs are
    linearized, not replaced). ``constant_share``: influence-weighted share of the frozen terms."""

    replacement: float
    completeness: float
    constant_share: float


def normalize_rows(
    matrix: Float[Tensor, "r c"],
    extra: Float[Tensor, " r"] | None = None,
) -> Float[Tensor, "r c"]:
    """``|matrix|`` with rows divided by their sums (plus ``extra`` mass, e.g. dropped features)."""
    out = matrix.abs()
    total = out.sum(1) if extra is None else out.sum(1) + extra
    return out / total.clamp(min=1e-30)[:, None]


def compute_influence(
    normalized: Float[Tensor, "n n"], weights: Float[Tensor, " n"], max_iter: int = 1000
) -> Float[Tensor, " n"]:
    """``weights @ (N + N^2 + ...)`` for a nilpotent (acyclic) ``N``."""
    current = weights @ normalized
    total = current.clone()
    for _ in range(max_iter):
        if not current.any():
            return total
        current = current @ normalized
        total += current
    raise RuntimeError("influence did not converge: the adjacency is not acyclic")


def partial_influence(
    rows: Float[Tensor, "r c"], row_node: Int[Tensor, " r"], weights: Float[Tensor, " t"], n_cols: int
) -> Float[Tensor, " c"]:
    """Influence of the column nodes (features, embeddings) through the rows computed so far.

    Rows are identified by their node index (targets are nodes ``n_cols ...``); rows not yet
    computed count as empty. Used by the builder to visit features in order of influence.
    Works through ``rows`` in chunks, so no temporary as large as ``rows`` is made.
    """
    scale = 1.0 / torch.cat([rows[i : i + _CHUNK].norm(p=1, dim=1) for i in range(0, len(rows), _CHUNK)]).clamp(
        min=1e-30
    )
    x = torch.zeros(n_cols + len(weights), dtype=rows.dtype)
    x[n_cols:] = weights.to(rows.dtype)
    total = torch.zeros(n_cols, dtype=rows.dtype)
    for _ in range(1000):
        w = x[row_node] * scale
        y = sum(
            (w[i : i + _CHUNK] @ rows[i : i + _CHUNK].abs() for i in range(0, len(rows), _CHUNK)),
            torch.zeros(n_cols, dtype=rows.dtype),
        )
        if not y.any():
            return total
        total += y
        x = torch.zeros_like(x)
        x[:n_cols] = y
    raise RuntimeError("influence did not converge")


def _cutoff(scores: Tensor, share: float) -> Tensor:
    """Smallest score among the top scores holding ``share`` of the total."""
    ordered = torch.sort(scores.flatten(), descending=True).values
    total = ordered.sum()
    if total <= 0:
        return ordered.new_tensor(float("inf"))
    cum = torch.cumsum(ordered, 0) / total
    index = min(int(torch.searchsorted(cum, cum.new_tensor(share))), len(ordered) - 1)
    return ordered[index]


class Graph:
    """An attribution graph of one prompt; build it with :func:`attribution.build.attribute`."""

    def __init__(
        self,
        *,
        tokens,
        token_strs,
        features,
        activations,
        adjacency,
        values,
        constants,
        dropped,
        dropped_abs,
        selected,
        target_vectors,
        targets,
        info,
        meta=None,
    ):
        self.tokens, self.token_strs = tokens, list(token_strs)
        self.features, self.activations, self.adjacency = features, activations, adjacency
        self.values, self.constants = values, constants
        self.dropped, self.dropped_abs = dropped, dropped_abs
        self.selected, self.target_vectors = selected, target_vectors
        self.targets: list[dict] = [dict(t) for t in targets]
        self.info, self.meta = dict(info), dict(meta or {})

    @classmethod
    def assemble(
        cls,
        *,
        adapted,
        tokens,
        features,
        activations,
        edges,
        feature_rows,
        selected,
        n_active,
        targets,
        target_values,
        feature_values,
        meta,
    ) -> Graph:
        """Cut full edge rows (``edges[:n_targets]`` for the targets, ``edges[feature_rows]`` for
        the selected features; columns: every active feature, then embeddings) to the graph."""
        n_f, n_pos, n_t = len(features), int(tokens.shape[0]), len(targets)
        cols = torch.cat([selected, n_active + torch.arange(n_pos)])
        row_index = torch.cat([feature_rows, torch.arange(n_t)])  # graph row order
        n = n_f + n_pos + n_t
        adjacency = torch.zeros(n, n, dtype=edges.dtype)
        for i in range(0, n_f, _CHUNK):  # in row chunks: bounded temporaries
            k = min(i + _CHUNK, n_f)
            adjacency[i:k, : n_f + n_pos] = edges[feature_rows[i:k, None], cols]
        adjacency[n_f + n_pos :, : n_f + n_pos] = edges[:n_t, cols]
        row_ids = torch.cat([torch.arange(n_f), n_f + n_pos + torch.arange(n_t)])

        def per_node(x: Tensor) -> Tensor:
            out = torch.zeros(n, dtype=edges.dtype)
            out[row_ids] = x.to(edges.dtype)
            return out

        total, total_abs = per_node(edges.sum(1)[row_index]), per_node(edges.norm(p=1, dim=1)[row_index])
        values = per_node(torch.cat([feature_values, target_values]))
        model = adapted.model
        tok = model.tokenizer
        strs = tok.convert_ids_to_tokens(tokens.tolist()) if tok is not None else [str(int(t)) for t in tokens]
        info = {
            "n_layers": model.cfg.n_layers,
            "d_model": model.cfg.d_model,
            "d_sae": adapted.config.d_sae,
            "d_vocab": model.cfg.d_vocab,
            "n_active": n_active,
            "model_name": str(model.cfg.model_name),
            "base_name": adapted.config.base_name,
            "target_name": adapted.config.target_name,
            "activation": adapted.config.activation,
            "scan": adapted.config.extra.get("scan", f"mechdiff-adapters-{model.cfg.model_name}"),
        }
        return cls(
            tokens=tokens.cpu(),
            token_strs=strs,
            features=features.cpu(),
            activations=activations.cpu(),
            adjacency=adjacency,
            values=values,
            constants=values - total,
            dropped=total - adjacency.sum(1),
            dropped_abs=(total_abs - adjacency.norm(p=1, dim=1)).clamp(min=0),
            selected=selected.cpu(),
            target_vectors=torch.stack([t.vector for t in targets]).cpu(),
            targets=[t.info() for t in targets],
            info=info,
            meta=meta,
        )

    # ------------------------------------------------------------------ layout

    @property
    def n_features(self) -> int:
        return int(self.features.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_targets(self) -> int:
        return len(self.targets)

    @property
    def embed_slice(self) -> slice:
        return slice(self.n_features, self.n_features + self.n_pos)

    @property
    def target_slice(self) -> slice:
        return slice(self.n_features + self.n_pos, self.n_features + self.n_pos + self.n_targets)

    @property
    def target_weights(self) -> Float[Tensor, " n_nodes"]:
        """Influence seed: each target's weight at its node, zero elsewhere."""
        w = torch.zeros(self.adjacency.shape[0], dtype=self.adjacency.dtype)
        w[self.target_slice] = torch.tensor([t["weight"] for t in self.targets], dtype=w.dtype)
        return w

    def node_label(self, index: int) -> str:
        """``L{layer}F{feature}@{pos}``, ``E@{pos}:{token}`` or the target's label."""
        if index < self.n_features:
            layer, pos, feat = self.features[index].tolist()
            return f"L{layer}F{feat}@{pos}"
        if index < self.target_slice.start:
            pos = index - self.n_features
            return f"E@{pos}:{self.token_strs[pos]}"
        return self.targets[index - self.target_slice.start]["label"]

    def target_index(self, target: int | str = 0) -> int:
        """Index among the targets of ``target``: an index, or a target label (e.g. ``"wait"``)."""
        if isinstance(target, str):
            labels = [t["label"] for t in self.targets]
            if target not in labels:
                raise KeyError(f"no target labelled {target!r}; targets: {labels}")
            return labels.index(target)
        if not -self.n_targets <= int(target) < self.n_targets:
            raise IndexError(f"target index {target} out of range ({self.n_targets} targets)")
        return int(target) % self.n_targets

    # ------------------------------------------------------------------ influence, pruning, scores

    def node_influence(self, target: int | str | None = None) -> Float[Tensor, " n_nodes"]:
        """Influence of every node on the targets (all, weighted, or the one named)."""
        weights = self.target_weights
        if target is not None:
            weights = torch.zeros_like(weights)
            weights[self.target_slice.start + self.target_index(target)] = 1.0
        return compute_influence(normalize_rows(self.adjacency), weights)

    def prune(self, node_threshold: float = 0.8, edge_threshold: float = 0.98) -> PruneResult:
        """Keep the nodes holding ``node_threshold`` of the influence (embeddings and targets
        always) and the edges holding ``edge_threshold`` of the edge scores, then drop features
        left without a kept incoming or outgoing edge (circuit-tracer's procedure)."""
        for name, v in (("node_threshold", node_threshold), ("edge_threshold", edge_threshold)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        A, w, n_f = self.adjacency, self.target_weights, self.n_features
        influence = compute_influence(normalize_rows(A), w)
        node_mask = influence >= _cutoff(influence, node_threshold)
        total = influence.sum().clamp(min=1e-30)
        threshold_share = float(influence[node_mask].sum() / total)
        node_mask[n_f:] = True
        pruned = A * node_mask[:, None] * node_mask[None, :]
        normalized = normalize_rows(pruned)
        edge_scores = normalized * (compute_influence(normalized, w) + w)[:, None]
        edge_mask = (edge_scores >= _cutoff(edge_scores, edge_threshold)) & (pruned != 0)
        edge_total = edge_scores.sum().clamp(min=1e-30)
        threshold_edge_share = float(edge_scores[edge_mask].sum() / edge_total)
        while True:
            has_out, has_in = edge_mask[:, :n_f].any(0), edge_mask[:n_f].any(1)
            new = node_mask.clone()
            new[:n_f] &= has_out & has_in
            edge_mask &= new[:, None] & new[None, :]
            if torch.equal(new, node_mask):
                break
            node_mask = new
        order = torch.argsort(influence, descending=True)
        cumulative = torch.zeros_like(influence)
        cumulative[order] = torch.cumsum(influence[order], 0) / total
        return PruneResult(
            node_mask,
            edge_mask,
            influence,
            cumulative,
            threshold_share,
            threshold_edge_share,
            float(influence[node_mask].sum() / total),
            float(edge_scores[edge_mask].sum() / edge_total),
        )

    def scores(self) -> GraphScores:
        """Replacement and completeness scores (see :class:`GraphScores`)."""
        rows = self.adjacency.abs().sum(1)
        denom = (rows + self.dropped_abs).clamp(min=1e-30)
        normalized = self.adjacency.abs() / denom[:, None]
        w = self.target_weights
        influence = compute_influence(normalized, w)
        through = influence + w  # total influence reaching each row node
        has_row = (rows + self.dropped_abs) > 0
        dropped_frac = torch.where(has_row, self.dropped_abs / denom, torch.zeros_like(denom))
        token = influence[self.embed_slice].sum()
        dropped = (through * dropped_frac).sum()
        const_frac = self.constants.abs() / (rows + self.dropped_abs + self.constants.abs()).clamp(min=1e-30)
        weight = through * has_row
        return GraphScores(
            replacement=float(token / (token + dropped).clamp(min=1e-30)),
            completeness=float((weight * (1 - dropped_frac)).sum() / weight.sum().clamp(min=1e-30)),
            constant_share=float((weight * const_frac).sum() / weight.sum().clamp(min=1e-30)),
        )

    # ------------------------------------------------------------------ rankings

    def top_features(self, target: int | str = 0, k: int = 10, by: str = "influence") -> list[dict]:
        """The ``k`` features with the largest influence on ``target`` (``by="influence"``) or
        the largest direct edges into it (``by="direct"``, signed, ranked by magnitude)."""
        if by not in ("influence", "direct"):
            raise ValueError(f"by must be 'influence' or 'direct', not {by!r}")
        row = self.target_slice.start + self.target_index(target)
        score = (self.node_influence(target) if by == "influence" else self.adjacency[row])[: self.n_features]
        order = torch.argsort(score.abs(), descending=True, stable=True)[:k]
        return [self._feature_record(int(i), float(score[i])) for i in order]

    def feature_ranking(self, target: int | str = 0, aggregate: bool = False) -> list[dict]:
        """All features ordered for ablation by influence on ``target``: (layer, pos, feature)
        nodes, or with ``aggregate`` (layer, feature) pairs with influence summed over positions
        (and ``positions`` listed), the form ablation throughout generation uses."""
        influence = self.node_influence(target)[: self.n_features]
        order = torch.argsort(influence, descending=True, stable=True)
        if not aggregate:
            return [self._feature_record(int(i), float(influence[i])) for i in order]
        groups: dict[tuple[int, int], dict] = {}
        for i in order.tolist():
            layer, pos, feat = self.features[i].tolist()
            g = groups.setdefault((layer, feat), {"layer": layer, "feature": feat, "score": 0.0, "positions": []})
            g["score"] += float(influence[i])
            g["positions"].append(pos)
        return sorted(groups.values(), key=lambda g: -g["score"])

    def _feature_record(self, i: int, score: float) -> dict:
        layer, pos, feat = self.features[i].tolist()
        return {
            "layer": layer,
            "pos": pos,
            "feature": feat,
            "node": i,
            "activation": float(self.activations[i]),
            "score": score,
        }

    # ------------------------------------------------------------------ io

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write ``path.safetensors`` (tensors) and ``path.json`` (targets, tokens, info)."""
        stem = Path(path).with_suffix("")
        stem.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).contiguous() for name in _TENSORS}
        # atomically, tensors first: a kill mid-save leaves no JSON, and so no graph that half loads
        with atomic_file(f"{stem}.safetensors") as tmp:
            save_file(tensors, str(tmp))
        doc = {
            "format_version": FORMAT_VERSION,
            "token_strs": self.token_strs,
            "targets": self.targets,
            "info": self.info,
            "meta": self.meta,
        }
        write_text(f"{stem}.json", json.dumps(doc, indent=1))
        return Path(f"{stem}.safetensors"), Path(f"{stem}.json")

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        """Read a graph written by :meth:`save`."""
        stem = Path(path).with_suffix("")
        doc = json.loads(Path(f"{stem}.json").read_text())
        if doc.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{stem}.json has format {doc.get('format_version')}, expected {FORMAT_VERSION}")
        return cls(
            **load_file(f"{stem}.safetensors"),
            token_strs=doc["token_strs"],
            targets=doc["targets"],
            info=doc["info"],
            meta=doc["meta"],
        )

    def to_circuit_tracer_json(
        self, slug: str = "mechdiff-graph", node_threshold: float = 0.8, edge_threshold: float = 0.98
    ) -> dict:
        """The pruned graph in circuit-tracer's frontend JSON (see :mod:`attribution.export`)."""
        from attribution.export import to_circuit_tracer_json

        return to_circuit_tracer_json(self, slug, node_threshold, edge_threshold)
