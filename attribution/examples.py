"""Feature examples for circuit-tracer's frontend: what each graph feature does on a corpus.

Clicking a feature node in circuit-tracer 0.5.0's graph page loads ``features/{scan}/{index}.json``
(``index`` the node's ``feature`` field, the Cantor pairing of layer and feature) and shows:

* ``top_logits`` / ``bottom_logits``: the tokens the feature's decoder row promotes and suppresses
  (logit lens, from the activation store's ``lens_*`` tensors);
* ``examples_quantiles``: groups of contexts, each ``tokens`` + ``tokens_acts_list`` (the
  feature's activation on every token) + ``train_token_ind`` (the token it is centred on). Here:
  the store's top activating contexts and a sample of its random firing tokens. When the corpus
  has ground-truth token labels (the organism), the top contexts are grouped by the label of their
  centre token ("top activations on 'hesitation' tokens") and each example carries ``label``;
* ``act_min`` / ``act_max`` (the colour scale), ``activation_frequency``, and ``histogram`` /
  ``quantile_values`` re-binned from the store's log-spaced activation histogram (so they are
  exact to its bin width, not per token).

:func:`feature_store` builds the store a graph's examples come from: one pass over the pair's
workload traces with every adapter layer hooked and the decoder's logit lens.

Example:
    >>> import torch, tempfile
    >>> from attribution.build import attribute
    >>> from attribution.synthetic import tiny_adapted
    >>> from mechdiff.features.classify import decoder_directions
    >>> from mechdiff.features.store import StoreConfig, build_store
    >>> adapted = tiny_adapted(seed=0)
    >>> graph = attribute(adapted, torch.tensor([2, 5, 9, 11, 7, 20]))
    >>> rows = [[2, 5, 9, 11, 7, 20], [2, 8, 8, 30, 6, 5, 9]]
    >>> store = build_store(adapted.model, rows, [adapted.acts_name(i) for i in range(2)],
    ...                     config=StoreConfig(top_k=2, n_random=2), decoder=decoder_directions(adapted))
    >>> folder = tempfile.mkdtemp()
    >>> paths = write_feature_examples(graph, store, adapted, folder, "demo", node_threshold=0.8)
    >>> sorted(json.loads(paths[0].read_text()))[:4]
    ['act_max', 'act_min', 'activation_frequency', 'bottom_logits']
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

from attribution.export import cantor, write_text_atomic
from attribution.graph import Graph
from mechdiff.features.store import ActivationStore, StoreConfig

N_BINS = 20


def adapters_scan(adapted) -> str:
    """A name for this set of adapters (model name + a hash of their weights), so examples of two
    adapter sets never share a folder. ``adapted.config.extra["scan"]`` wins when set."""
    if adapted.config.extra.get("scan"):
        return str(adapted.config.extra["scan"])
    digest = hashlib.sha256()
    for adapter in adapted.adapters:
        for p in (adapter.W_enc, adapter.W_dec):
            digest.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    name = str(adapted.model.cfg.model_name).replace("/", "-")
    return f"mechdiff-{name}-{digest.hexdigest()[:8]}"


def _tokens(tokenizer, ids: Sequence[int]) -> list[str]:
    if tokenizer is None:
        return [f"{int(i)} " for i in ids]
    from mechdiff.features.dashboard import token_strings

    return token_strings(tokenizer, ids)


def _distribution(store: ActivationStore, i: int, act_max: float) -> tuple[list[float], list[float]]:
    """``histogram`` (N_BINS linear bins on [0, act_max]) and ``quantile_values`` (percentiles 1..100)
    from the store's log-spaced histogram of firing activations (each bin at its geometric centre)."""
    lo, hi = store.config.act_log10_range
    counts = store.act_hist[i].double()
    edges = torch.logspace(lo, hi, len(counts) + 1, dtype=torch.float64)
    centres = (edges[:-1] * edges[1:]).sqrt()
    linear = torch.zeros(N_BINS, dtype=torch.float64)
    if act_max > 0:
        where = (centres / act_max * N_BINS).floor().long().clamp(0, N_BINS - 1)
        linear.index_add_(0, where, counts)
    total = float(counts.sum())
    if total == 0:
        return linear.tolist(), [0.0] * 100
    cum = counts.cumsum(0) / total
    pct = torch.arange(1, 101, dtype=torch.float64) / 100
    upper = edges[1:][torch.searchsorted(cum, pct).clamp(max=len(counts) - 1)]
    return linear.tolist(), upper.clamp(max=max(act_max, 0.0)).tolist()


def feature_json(
    store: ActivationStore, i: int, tokenizer, *, transcoder_id: str, index: int, n_random: int = 5
) -> dict:
    """Feature ``i`` of ``store`` as circuit-tracer's feature JSON (``feature_models.Model``; see
    the module docstring). ``index`` is the frontend's feature index."""
    names = store.config.label_names

    def example(e: dict) -> dict:
        out = {
            "tokens": _tokens(tokenizer, e["tokens"]),
            "tokens_acts_list": [round(a, 5) for a in e["acts"]],
            "train_token_ind": e["centre"],
            "is_repeated_datapoint": False,
        }
        if names and e["label"] >= 0:
            out["label"] = names[e["label"]]
        return out

    top = store.examples(i, "top")
    groups: dict[str, list[dict]] = {}
    for e in top:
        ex = example(e)
        key = f"Top activations on '{ex['label']}' tokens" if "label" in ex else "Top activations"
        groups.setdefault(key, []).append(ex)
    quantiles = [
        {"quantile_name": f"{name} ({len(exs)} of {len(top)})" if names else name, "examples": exs}
        for name, exs in groups.items()
    ]
    rand = [example(e) for e in store.examples(i, "rand")[:n_random]]
    if rand:
        quantiles.append({"quantile_name": "Random firing tokens", "examples": rand})
    act_max = float(store.act_max[i]) if math.isfinite(float(store.act_max[i])) else 0.0
    histogram, quantile_values = _distribution(store, i, act_max)

    def lens(side: str) -> list[str]:
        ids = [int(t) for t in store.t[f"lens_{side}_ids"][i] if int(t) >= 0] if store.meta.get("has_lens") else []
        return [s.strip() or repr(s) for s in _tokens(tokenizer, ids)] if ids else []

    return {
        "transcoder_id": transcoder_id,
        "index": int(index),
        "examples_quantiles": quantiles,
        "top_logits": lens("top"),
        "bottom_logits": lens("bottom"),
        "act_min": 0.0,
        "act_max": act_max,
        "quantile_values": quantile_values,
        "histogram": histogram,
        "activation_frequency": float(store.density[i]),
    }


def feature_examples(
    graph: Graph, store: ActivationStore, adapted, scan: str, node_threshold: float = 0.8, edge_threshold: float = 0.98
) -> dict[tuple[int, int], dict]:
    """The feature JSON (:func:`feature_json`) of every feature node of the pruned graph (the nodes
    :func:`attribution.export.to_circuit_tracer_json` exports), by ``(layer, feature)``."""
    pruned = graph.prune(node_threshold, edge_threshold)
    kept = pruned.node_mask[: graph.n_features].nonzero()[:, 0]
    pairs = sorted({(int(la), int(f)) for la, _, f in graph.features[kept].tolist()})
    tokenizer = adapted.model.tokenizer
    return {
        (la, f): feature_json(
            store, store.index(adapted.acts_name(la), f), tokenizer, transcoder_id=scan, index=cantor(la, f)
        )
        for la, f in pairs
    }


def clerps(examples: dict[tuple[int, int], dict], n: int = 3) -> dict[tuple[int, int], str]:
    """A one-line description per feature for the graph's node labels: the tokens it promotes."""
    return {key: "→ " + " ".join(data["top_logits"][:n]) for key, data in examples.items() if data["top_logits"]}


def write_feature_examples(
    graph: Graph,
    store: ActivationStore,
    adapted,
    out_dir: str | Path,
    scan: str,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    examples: dict[tuple[int, int], dict] | None = None,
) -> list[Path]:
    """Write ``out_dir/features/{scan}/{index}.json`` for every feature node of the pruned graph
    (``examples``: :func:`feature_examples`' result, when already made). Returns the paths."""
    folder = Path(out_dir) / "features" / scan
    folder.mkdir(parents=True, exist_ok=True)
    if examples is None:
        examples = feature_examples(graph, store, adapted, scan, node_threshold, edge_threshold)
    paths = []
    for data in examples.values():
        path = folder / f"{data['index']}.json"
        write_text_atomic(path, json.dumps(data))
        paths.append(path)
    return paths


def feature_store(
    adapted, workload, n_traces: int = 64, *, seed: int = 0, progress: bool = False, config: StoreConfig | None = None
) -> ActivationStore:
    """One activation-store pass over ``n_traces`` of the workload's training traces (``label_ids``
    and the organism's labels when it has them), every adapter layer hooked, decoder logit lens.

    Example:
        Not run as a doctest: it runs the adapted model over traces and keeps their activations
        (seconds per trace batch).
        >>> store = feature_store(adapted, for_pair(pair), n_traces=32)  # doctest: +SKIP
    """
    from mechdiff.features.classify import decoder_directions
    from mechdiff.features.store import build_store

    traces = workload.traces(n_traces, "train", seed=seed)
    labels = ()
    if "label_ids" in traces.column_names:
        from mechdiff.organism.task import LABELS

        labels = LABELS
    config = config or StoreConfig(top_k=10, n_random=5, batch_size=16, seed=seed, label_names=labels)
    hooks = [adapted.acts_name(layer) for layer in range(adapted.config.n_layers)]
    tokenizer = adapted.model.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer is not None and tokenizer.pad_token_id is not None else 0
    with torch.no_grad():
        return build_store(
            adapted.model,
            traces,
            hooks,
            config=config,
            decoder=decoder_directions(adapted),
            pad_id=pad_id,
            progress=progress,
        )
