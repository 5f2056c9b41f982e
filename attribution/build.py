"""Build an attribution graph: batched backward passes through the linearized adapted model.

Nodes are the active adapter features (layer, position, feature) with activation > 0, the token
embeddings (one per position) and the targets. The edge from source s to target t is
``activation(s) * d target / d activation(s)`` in the linearized model (:mod:`attribution.linearize`),
which is affine in the sources, so each target's incoming edges plus its frozen terms (biases, the
BOS position, dropped features) sum to its value exactly. The first (BOS) position is zeroed:
no nodes and no edges from it.

The linearized forward is run once (once per prompt-prefix bucket, see ``prefix_buckets``) and
its autograd graph kept; each backward pass (one ``torch.autograd.grad`` call) then computes
``batch_size`` rows at once, every batch row of the injected gradient carrying one target. By
default the forward runs at batch 1 and the backward is vmapped over the injected gradients
(``is_grads_batched``); ``vmap=False`` instead repeats the prompt ``batch_size`` times along the
batch dimension (same rows, more memory). Target rows
come first; features are then visited greedily by their influence on the targets (recomputed
every ``refresh_every`` rows, independent of the batch size) up to ``max_feature_nodes``.

Example:
    >>> import torch
    >>> from attribution.synthetic import tiny_adapted
    >>> adapted = tiny_adapted(seed=0)
    >>> graph = attribute(adapted, torch.tensor([2, 5, 9, 11, 7, 20]), target="w3", batch_size=8)
    >>> graph.n_targets, graph.adjacency.shape[0] == graph.n_features + 6 + 1
    (1, True)
"""

from __future__ import annotations

import math
import time

import torch
from jaxtyping import Float, Int
from torch import Tensor

from attribution.graph import Graph, partial_influence
from attribution.linearize import Leaves, _as_prompt, check_supported, linearized
from attribution.targets import TargetRow, resolve_targets
from mechdiff.adapters.transcoder import AdaptedModel


def attribute(
    adapted: AdaptedModel,
    tokens: Int[Tensor, " pos"],
    target=None,
    *,
    max_feature_nodes: int | None = 4096,
    batch_size: int = 64,
    refresh_every: int = 1024,
    zero_bos: bool = True,
    vmap: bool = True,
    prefix_buckets: int = 8,
    layerwise: bool = True,
) -> Graph:
    """Attribution graph of ``target`` (see :func:`attribution.targets.resolve_targets`) on one prompt.

    ``max_feature_nodes``: keep at most this many features, the most influential first (all when
    ``None``); the edge rows take ``(targets + max_feature_nodes) x (active features + n_pos)``
    floats. ``batch_size``: rows per backward pass (backward memory grows linearly with it).
    ``vmap``: batch the injected gradients with ``is_grads_batched`` over a batch-1 forward
    (default; less memory) instead of repeating the prompt along the batch (same result).
    ``prefix_buckets``: rows injected at early positions run on prompt prefixes (same rows,
    less work; each bucket may add one partial backward pass). 1 turns this off.

    Example:
        Not run as a doctest: it needs trained adapters and prompt tokens from the caller (the
        attribution tests build a graph on the organism).
        >>> graph = attribute(adapted, tokens, target="wait", max_feature_nodes=500)  # doctest: +SKIP
        >>> graph.top_features("wait", k=5)  # doctest: +SKIP
    """
    check_supported(adapted)
    if batch_size < 1 or refresh_every < 1:
        raise ValueError(f"batch_size and refresh_every must be >= 1, got {batch_size}, {refresh_every}")
    start = time.perf_counter()
    tokens = _as_prompt(adapted, tokens)
    model, n_layers, n_pos = adapted.model, adapted.model.cfg.n_layers, int(tokens.shape[0])
    names = [adapted.acts_name(layer) for layer in range(n_layers)]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens[None], names_filter=lambda n: n in names)
    acts = torch.stack([cache[name][0] for name in names])  # [layer pos d_sae]
    if zero_bos:
        acts[:, 0] = 0
    found = (acts > 0).nonzero()  # [n_active, 3] sorted by (layer, pos, feature)
    dtype = torch.float64 if acts.dtype == torch.float64 else torch.float32  # edge storage (CPU)
    feats, feat_acts = found.cpu(), acts[tuple(found.T)].to("cpu", dtype)
    targets = resolve_targets(adapted, tokens, target, logits[0])
    n_active, n_t = len(feats), len(targets)
    max_f = n_active if max_feature_nodes is None else min(int(max_feature_nodes), n_active)
    if max_f < 0:
        raise ValueError(f"max_feature_nodes must be >= 0, got {max_feature_nodes}")
    engine = _RowEngine(
        adapted, tokens, feats, feat_acts, min(batch_size, n_t + max_f), zero_bos, vmap, prefix_buckets, layerwise
    )
    t_sites, t_pos, t_vecs = _target_inputs(targets)

    def feature_inputs(idx: Tensor):
        """(layer, pos, encoder row) of features ``idx``: their injection sites and vectors."""
        layer, pos, feat = feats[idx].T
        vecs = torch.zeros(len(idx), model.cfg.d_model, dtype=model.cfg.dtype, device=model.cfg.device)
        for la in layer.unique().tolist():
            m = layer == la
            W_enc = adapted.adapters[la].W_enc.detach()
            vecs[m.to(vecs.device)] = W_enc[:, feat[m].to(W_enc.device)].T
        return layer, pos, vecs

    edges = torch.zeros(n_t + max_f, n_active + n_pos, dtype=dtype)
    row_node = torch.zeros(n_t + max_f, dtype=torch.long)  # node index of each row
    row_node[:n_t] = n_active + n_pos + torch.arange(n_t)
    visited = torch.zeros(n_active, dtype=torch.bool)
    if max_f == n_active:  # every feature: no ranking, so targets and features share batches
        f_sites, f_pos, f_vecs = feature_inputs(torch.arange(n_active))
        engine.rows(torch.cat([t_sites, f_sites]), torch.cat([t_pos, f_pos]), torch.cat([t_vecs, f_vecs]), out=edges)
        row_node[n_t:] = torch.arange(n_active)
        visited[:] = True
    else:
        engine.rows(t_sites, t_pos, t_vecs, out=edges[:n_t])
        filled, weights = n_t, torch.tensor([t.weight for t in targets], dtype=edges.dtype)
        while filled < n_t + max_f:
            infl = partial_influence(edges[:filled], row_node[:filled], weights, n_active + n_pos)
            order = torch.argsort(infl[:n_active], descending=True, stable=True)
            pending = order[~visited[order]][: min(refresh_every, n_t + max_f - filled)]
            engine.rows(*feature_inputs(pending), out=edges[filled : filled + len(pending)])
            row_node[filled : filled + len(pending)] = pending
            visited[pending] = True
            filled += len(pending)

    t_values = engine.values(t_sites, t_pos, t_vecs) + torch.tensor([t.bias for t in targets], dtype=edges.dtype)
    selected = visited.nonzero()[:, 0]
    row_of = torch.full((n_active,), -1, dtype=torch.long)
    row_of[row_node[n_t:]] = torch.arange(n_t, n_t + max_f)
    b_enc = torch.stack([a.b_enc.detach() for a in adapted.adapters]).to("cpu", dtype)  # [layer d_sae]
    f_values = engine.values(*feature_inputs(selected)) + b_enc[feats[selected, 0], feats[selected, 2]]
    graph = Graph.assemble(
        adapted=adapted,
        tokens=tokens,
        features=feats[selected],
        activations=feat_acts[selected],
        edges=edges,
        feature_rows=row_of[selected],
        selected=selected,
        n_active=n_active,
        targets=targets,
        target_values=t_values,
        feature_values=f_values,
        meta={
            "n_backward": engine.n_backward,
            "batch_size": engine.batch,
            "n_rows": n_t + max_f,
            "floor_backward": math.ceil((n_t + max_f) / engine.batch),
            "refresh_every": refresh_every,
            "zero_bos": zero_bos,
            "vmap": vmap,
            "layerwise": engine.layerwise,
            "prefix_buckets": len(engine.lengths),
            "time_s": time.perf_counter() - start,
        },
    )
    return graph


def _target_inputs(targets: list[TargetRow]):
    sites = torch.tensor([t.site for t in targets], dtype=torch.long)
    pos = torch.tensor([t.pos for t in targets], dtype=torch.long)
    return sites, pos, torch.stack([t.vector for t in targets])


class _SharedConstants:
    """Saved-tensor hooks for the retained forwards: a tensor autograd saves that needs no gradient
    and equals one saved before is kept once. TransformerLens saves a fresh transposed copy of each
    weight matrix in every forward (``F.linear(x, W.T.contiguous())``), about two thirds of what a
    retained forward holds; with one forward per prefix they would be held once per prefix."""

    def __init__(self, min_numel: int = 1 << 14):
        self.min_numel, self.seen = min_numel, {}

    def pack(self, t: Tensor) -> Tensor:
        if t.requires_grad:
            # An activation, often the op's own output: kept detached. Returned as-is it would close
            # a cycle through the C++ graph (node -> saved t -> t.grad_fn -> node) that Python's
            # collector cannot see, and every graph built in a process stayed in memory (0.7 GB
            # each on SmolLM2). The backward reads only its values; no double backward runs here.
            return t.detach()
        base = t if t._base is None else t._base  # autograd often saves a view (W.T) of the copy
        if (
            base.requires_grad
            or base.numel() < self.min_numel
            or not base.is_contiguous()
            or base.storage_offset() != 0
        ):
            return t
        shared = self._shared(base.detach())
        return t if shared is None else shared.as_strided(t.shape, t.stride(), t.storage_offset())

    def _shared(self, base: Tensor) -> Tensor | None:
        """A tensor saved before that equals ``base``, or None (then ``base`` is remembered)."""
        flat = base.reshape(-1)
        sample = tuple(flat[:: max(1, flat.numel() // 31)][:32].tolist())  # a cheap fingerprint
        key = (tuple(base.shape), base.dtype, base.device, sample)
        for old in self.seen.setdefault(key, []):
            if old.data_ptr() == base.data_ptr():
                return None
            if torch.equal(old, base):
                return old
        self.seen[key].append(base)
        return None

    @staticmethod
    def unpack(t: Tensor) -> Tensor:
        return t


class _RowEngine:
    """Retained forwards of the linearized model; edge rows from batched backward passes.

    ``vmap=True``: each forward runs at batch 1 and each backward is ``torch.autograd.grad`` with
    ``is_grads_batched`` (the injected gradients carry the batch dimension; saved activations are
    not repeated). ``vmap=False``: the prompt is repeated ``batch`` times along the batch and each
    batch row carries its own injected gradient. Both give the same rows.

    ``layerwise`` (with ``vmap``): the forward's autograd graph is cut after every block and a
    backward pass walks down the blocks, one ``autograd.grad`` call per block and prefix. A row
    joins at its own site (rows sorted deepest first, so the rows alive at a block are a prefix
    of the batch) and gradients are projected on the decoder rows as soon as each block is done:
    a row injected at layer L costs L blocks, not the depth of the deepest row in its batch, and
    one pass serves rows of every prefix. Otherwise one ``autograd.grad`` call runs the whole
    model for a batch of rows of one prefix (the reference path).

    ``buckets`` prefixes (lengths ``ceil(n_pos * k / buckets)``) each get a forward, run when a row
    first needs it: a row injected at position p is computed on the shortest prefix containing p
    (the model is causal, so the prefix's values are the full prompt's), which makes rows at early
    positions cheaper.
    """

    def __init__(
        self,
        adapted: AdaptedModel,
        tokens: Tensor,
        feats: Tensor,
        acts: Tensor,
        batch: int,
        zero_bos: bool,
        vmap: bool = True,
        buckets: int = 1,
        layerwise: bool = True,
    ):
        self.adapted, self.batch, self.zero_bos, self.vmap = adapted, max(batch, 1), zero_bos, vmap
        self.layerwise = layerwise and vmap
        self.n_layers = adapted.model.cfg.n_layers
        self.n_pos, self.n_active = int(tokens.shape[0]), len(feats)
        self.dtype, self.device = acts.dtype, adapted.model.cfg.device
        self.n_backward = 0
        buckets = max(1, min(buckets, self.n_pos))
        self.lengths = sorted({math.ceil(self.n_pos * (k + 1) / buckets) for k in range(buckets)})
        self.tokens, self._shared, self._leaves = tokens, _SharedConstants(), {}
        self.embed_values = self.leaves(len(self.lengths) - 1).embed[0].detach()
        self.blocks = [self._decoder_block(adapted, feats, acts, layer) for layer in range(self.n_layers)]

    def leaves(self, k: int) -> Leaves:
        """The retained forward of prefix ``k``, run on first use (prefixes no row needs never run)."""
        if k not in self._leaves:
            with torch.autograd.graph.saved_tensors_hooks(self._shared.pack, self._shared.unpack):
                self._leaves[k] = self._forward(self.tokens[: self.lengths[k]])
        return self._leaves[k]

    def _forward(self, tokens: Tensor) -> Leaves:
        leaves = Leaves()
        with torch.enable_grad(), linearized(self.adapted, leaves=leaves, cut_layers=self.layerwise):
            resid = self.adapted.model(
                tokens[None].expand(1 if self.vmap else self.batch, -1), stop_at_layer=self.n_layers
            )
            leaves.final = self.adapted.model.ln_final(resid)
        return leaves

    def _decoder_block(self, adapted, feats, acts, layer):
        """Active features of ``layer`` as padded blocks ``[pos, slot, d_model]`` of ``a_j W_dec[f_j]``,
        so one batched matmul projects gradients on every active decoder row of every position."""
        idx = (feats[:, 0] == layer).nonzero()[:, 0]
        pos, feat = feats[idx, 1], feats[idx, 2]
        counts = torch.bincount(pos, minlength=self.n_pos)
        slot = torch.arange(len(idx)) - (torch.cumsum(counts, 0) - counts)[pos]  # rank within position
        W_dec = adapted.adapters[layer].W_dec.detach()
        dev = W_dec.device
        block = torch.zeros(
            self.n_pos, int(counts.max()) if len(idx) else 0, W_dec.shape[1], dtype=W_dec.dtype, device=dev
        )
        block[pos.to(dev), slot.to(dev)] = W_dec[feat.to(dev)] * acts[idx, None].to(dev, W_dec.dtype)
        return idx, pos, slot.to(dev), block

    def values(self, sites: Tensor, positions: Tensor, vectors: Tensor) -> Float[Tensor, " n"]:
        """``vector . x[site, pos]`` of each row, in the (unperturbed) linearized forward."""
        out = torch.zeros(len(sites), dtype=self.dtype)
        for site in sites.unique().tolist():
            m = sites == site
            x = self.leaves(len(self.lengths) - 1).site(site, self.n_layers)[0].detach()
            dot = (x[positions[m].to(x.device)] * vectors[m].to(x.device, x.dtype)).sum(-1)
            out[m] = dot.to("cpu", out.dtype)
        return out

    def rows(self, sites: Tensor, positions: Tensor, vectors: Tensor, out: Tensor) -> None:
        """Write into ``out`` the edge rows (sources: active features, then embeddings) of
        ``vectors`` injected at ``(sites, positions)``, ``batch`` rows per backward pass: grouped
        by prefix, and (``layerwise``) ordered by position, so a pass spans few prefixes."""
        bucket = torch.bucketize(positions.contiguous(), torch.tensor(self.lengths), right=True)
        if self.layerwise:
            order = torch.argsort(positions, stable=True)
            for i in range(0, len(order), self.batch):
                j = order[i : i + self.batch]
                out[j] = self._pass(bucket[j], sites[j], positions[j], vectors[j])
            return
        for k in bucket.unique().tolist():
            rows = (bucket == k).nonzero()[:, 0]
            for i in range(0, len(rows), self.batch):
                j = rows[i : i + self.batch]
                out[j] = self._batch(k, sites[j], positions[j], vectors[j])

    def _project(self, row: Tensor, layer: int, grad: Tensor, P: int) -> None:
        """Edges into ``row`` from layer ``layer``'s active features at positions < ``P``, given
        the gradient ``grad`` ``[n, P, d_model]`` of that layer's adapter output."""
        idx, pos, slot, block = self.blocks[layer]
        here = pos < P
        if here.any():  # [pos, n, d] @ [pos, d, slot] -> [pos, n, slot]
            projected = torch.bmm(grad.transpose(0, 1), block[:P].transpose(1, 2))
            row[:, idx[here]] = projected[pos[here].to(self.device), :, slot[here]].T.to(self.dtype)

    def _project_embed(self, row: Tensor, grad: Tensor, P: int) -> None:
        row[:, self.n_active : self.n_active + P] = (grad * self.embed_values[:P]).sum(-1).to(self.dtype)
        if self.zero_bos:
            row[:, self.n_active] = 0

    def _pass(
        self,
        bucket: Tensor,
        sites: Tensor,
        positions: Tensor,
        vectors: Tensor,
    ) -> Float[Tensor, "n n_active+n_pos"]:
        """One layerwise backward pass for rows of any prefixes (see the class docstring)."""
        row = torch.zeros(len(sites), self.n_active + self.n_pos, dtype=self.dtype, device=self.device)
        for k in bucket.unique().tolist():
            j = (bucket == k).nonzero()[:, 0]
            j = j[torch.argsort(sites[j], descending=True, stable=True)]  # alive rows: a prefix
            part = torch.zeros(len(j), row.shape[1], dtype=self.dtype, device=self.device)
            self._walk(self.leaves(k), self.lengths[k], sites[j], positions[j], vectors[j], part)
            row[j.to(self.device)] = part
        self.n_backward += 1
        return row.cpu()

    def _walk(self, leaves: Leaves, P: int, sites: Tensor, positions: Tensor, vectors: Tensor, row: Tensor) -> None:
        """Down the blocks of one prefix's forward, rows sorted by site (deepest first)."""
        grad, d = None, vectors.shape[-1]  # gradient of the current block's output, alive rows
        for layer in range(int(sites[0]), -1, -1):  # block ``n_layers``: ln_final
            alive = int((sites >= layer).sum())
            first = 0 if grad is None else grad.shape[0]  # rows joining here: first..alive
            outputs, grads = [], []
            if grad is not None:  # from the block above; zero for the rows joining here
                outputs.append(leaves.resid_out[layer])
                grads.append(torch.cat([grad, grad.new_zeros(alive - first, *grad.shape[1:])]))
            if alive > first:  # rows injected at this site
                x = leaves.site(layer, self.n_layers)
                inject = torch.zeros(alive, *x.shape, dtype=x.dtype, device=x.device)
                inject[torch.arange(first, alive), 0, positions[first:alive].to(x.device)] = vectors[first:alive].to(
                    x.device, x.dtype
                )
                outputs.append(x)
                grads.append(inject)
            inputs = [leaves.block_input(layer)]
            if layer < self.n_layers and len(self.blocks[layer][0]):
                inputs.append(leaves.adapter_out[layer])
            got = torch.autograd.grad(
                outputs, inputs, grads, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
            if len(got) > 1 and got[1] is not None:
                self._project(row[:alive], layer, got[1].reshape(alive, P, d), P)
            grad = (
                got[0]
                if got[0] is not None
                else torch.zeros(alive, *inputs[0].shape, dtype=inputs[0].dtype, device=inputs[0].device)
            )
        self._project_embed(row[: len(sites)], grad.reshape(len(sites), P, d), P)

    def _batch(
        self,
        k: int,
        sites: Tensor,
        positions: Tensor,
        vectors: Tensor,
    ) -> Float[Tensor, "n n_active+n_pos"]:
        n, B, P, leaves = len(sites), self.batch, self.lengths[k], self.leaves(k)
        outputs, grads = [], []
        for site in sites.unique().tolist():
            m = sites == site
            x = leaves.site(site, self.n_layers)
            g = torch.zeros(B, *x.shape[1:], dtype=x.dtype, device=x.device)
            g[torch.arange(n)[m].to(x.device), positions[m].to(x.device)] = vectors[m].to(x.device, x.dtype)
            outputs.append(x)
            grads.append(g[:, None] if self.vmap else g)
        depth = min(int(sites.max()), self.n_layers)  # adapters below the deepest site
        inputs = [leaves.embed] + [leaves.adapter_out[la] for la in range(depth)]
        got = torch.autograd.grad(
            outputs, inputs, grads, retain_graph=True, allow_unused=True, is_grads_batched=self.vmap
        )
        self.n_backward += 1
        row = torch.zeros(B, self.n_active + self.n_pos, dtype=self.dtype, device=self.device)
        if got[0] is not None:
            self._project_embed(row, got[0].reshape(B, P, -1), P)
        for layer, grad in enumerate(got[1:]):
            if grad is not None:
                self._project(row, layer, grad.reshape(B, P, -1), P)
        return row[:n].cpu()
