"""Graph export into a shared folder, and the feature examples circuit-tracer's frontend reads."""

import json
import os
import types
import zipfile

import pytest
import torch

from attribution.build import attribute
from attribution.examples import (
    adapters_scan,
    clerps,
    feature_examples,
    feature_store,
    write_feature_examples,
)
from attribution.export import cantor, graph_slug, write_circuit_tracer_files
from attribution.serve import Frontend
from attribution.synthetic import tiny_adapted
from mechdiff.features.classify import decoder_directions
from mechdiff.features.store import StoreConfig, build_store

ROWS = [[2, 5, 9, 11, 7, 20, 30, 4], [2, 8, 8, 30, 6, 5, 9, 13, 6], [2, 9, 9, 4, 11, 7, 6]]
LABELS = ("a", "b", "c")


@pytest.fixture(scope="module")
def adapted():
    torch.set_num_threads(1)
    return tiny_adapted(seed=2)


@pytest.fixture(scope="module")
def graph(adapted):
    """The graph of the first corpus row (its features' examples then include its own contexts)."""
    return attribute(adapted, torch.tensor(ROWS[0]), None, max_feature_nodes=30, batch_size=16)


@pytest.fixture(scope="module")
def store(adapted):
    corpus = [{"input_ids": r, "label_ids": [(i * 7 + len(r)) % 3 for i in range(len(r))]} for r in ROWS]
    config = StoreConfig(top_k=3, n_random=2, before=3, after=2, batch_size=2, label_names=LABELS)
    hooks = [adapted.acts_name(layer) for layer in range(adapted.config.n_layers)]
    return build_store(adapted.model, corpus, hooks, config=config, decoder=decoder_directions(adapted)), corpus


def test_a_second_export_into_one_folder_keeps_the_first(adapted, graph, tmp_path):
    other_prompt = attribute(adapted, torch.tensor(ROWS[1]), None, max_feature_nodes=30, batch_size=16)
    other_target = attribute(adapted, torch.tensor(ROWS[0]), "w3", max_feature_nodes=30, batch_size=16)
    folder = tmp_path / "ct"
    folder.mkdir()
    (folder / "graph-metadata.json").write_text(json.dumps({"graphs": [{"slug": "someone-elses"}]}))
    first = write_circuit_tracer_files(graph, folder)
    for g in (other_prompt, other_target):
        write_circuit_tracer_files(g, folder)
    slugs = [g["slug"] for g in json.loads((folder / "graph-metadata.json").read_text())["graphs"]]
    assert len(set(slugs)) == 4 and slugs[0] == "someone-elses"
    assert slugs[1:] == [graph_slug(g) for g in (graph, other_prompt, other_target)]
    assert all((folder / f"{s}.json").is_file() for s in slugs[1:])
    before = first.read_text()
    write_circuit_tracer_files(graph, folder)  # the same graph again: replaced, not listed twice
    again = [g["slug"] for g in json.loads((folder / "graph-metadata.json").read_text())["graphs"]]
    assert sorted(again) == sorted(slugs) and first.read_text() == before
    assert not [p for p in os.listdir(folder) if p.endswith(".tmp")]


def test_feature_examples_match_an_independent_forward(adapted, graph, store, tmp_path):
    store, corpus = store
    scan = adapters_scan(adapted)
    examples = feature_examples(graph, store, adapted, scan)
    paths = write_feature_examples(graph, store, adapted, tmp_path, scan, examples=examples)
    path = write_circuit_tracer_files(graph, tmp_path, scan=scan, clerps=clerps(examples))
    nodes = [n for n in json.loads(path.read_text())["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert nodes and {tmp_path / "features" / scan / f"{n['feature']}.json" for n in nodes} == set(paths)
    # independently: every corpus row's activations, the unembedding, the labels
    acts = {}
    for r, row in enumerate(corpus):
        _, cache = adapted.model.run_with_cache(torch.tensor([row["input_ids"]]))
        for layer in range(adapted.config.n_layers):
            acts[r, layer] = cache[adapted.acts_name(layer)][0]
    w_u = adapted.model.W_U.detach().double()
    w_u = w_u - w_u.mean(1, keepdim=True)
    tok = adapted.model.tokenizer
    for n in nodes:
        layer, feat = int(n["layer"]), int(n["node_id"].split("_")[1])
        data = json.loads((tmp_path / "features" / scan / f"{cantor(layer, feat)}.json").read_text())
        assert data["index"] == n["feature"] == cantor(layer, feat) and data["transcoder_id"] == scan
        assert n["clerp"] == "→ " + " ".join(data["top_logits"][:3])
        column = [acts[r, layer][1:, feat] for r in range(len(corpus))]  # position 0 (BOS) skipped
        assert data["act_max"] == pytest.approx(max(float(c.max()) for c in column), rel=1e-5)
        fired = sum(int((c > 0).sum()) for c in column)
        assert data["activation_frequency"] == pytest.approx(fired / sum(len(c) for c in column))
        lens = (adapted.adapters[layer].W_dec[feat].detach().double() * adapted.model.ln_final.w.double()) @ w_u
        top = [tok.decode([int(i)]) for i in lens.topk(len(data["top_logits"])).indices]
        assert data["top_logits"] == top
        tops = [e for q in data["examples_quantiles"] if q["quantile_name"].startswith("Top") for e in q["examples"]]
        assert tops
        for e in tops:  # each context is a window of a corpus row, with that row's activations
            centre = e["train_token_ind"]
            assert len(e["tokens"]) == len(e["tokens_acts_list"]) and 0 <= centre < len(e["tokens"])
            words = [w.strip() for w in e["tokens"]]
            matches = [
                (r, start)
                for r, row in enumerate(corpus)
                for start in range(len(row["input_ids"]))
                if [tok.decode([t]) for t in row["input_ids"][start : start + len(words)]] == words
                and torch.allclose(
                    acts[r, layer][start : start + len(words), feat],
                    torch.tensor(e["tokens_acts_list"]).to(acts[r, layer].dtype),
                    atol=1e-4,
                )
            ]
            assert matches, e
            r, start = matches[0]
            assert e["label"] == LABELS[corpus[r]["label_ids"][start + centre]]
            assert e["tokens_acts_list"][centre] == pytest.approx(max(e["tokens_acts_list"]), abs=1e-5)
        assert sum(data["histogram"]) == fired
        assert data["quantile_values"] == sorted(data["quantile_values"]) and len(data["quantile_values"]) == 100


def test_feature_store_uses_the_organisms_labels():
    from mechdiff.adapters.formats import load_adapted
    from mechdiff.models import load_pair
    from mechdiff.organism.task import LABELS
    from mechdiff.workloads import for_pair

    pair = load_pair("organism", device="cpu")
    adapted = load_adapted(pair)
    store = feature_store(adapted, for_pair(pair), n_traces=4)
    assert store.config.label_names == LABELS and store.n_features == adapted.n_features
    i = int(store.act_max.argmax())
    e = store.examples(i)[0]
    assert LABELS[e["label"]] in LABELS and e["acts"][e["centre"]] == pytest.approx(float(store.act_max[i]))


def _schema(frontend: Frontend, module: str):
    """circuit-tracer 0.5.0's own pydantic model, read from its wheel (in the serve cache)."""
    if frontend.wheel is None:
        pytest.skip(f"no circuit-tracer wheel in {frontend.root}: run .ci/install-frontend")
    with zipfile.ZipFile(frontend.wheel) as wheel:
        source = wheel.read(f"circuit_tracer/frontend/{module}.py").decode()
    namespace = types.ModuleType(module)
    exec(compile(source, module, "exec"), namespace.__dict__)
    return namespace.Model


def test_exported_files_validate_against_circuit_tracers_models(adapted, graph, store, tmp_path):
    store, _ = store
    frontend = Frontend()
    feature_model, graph_model = _schema(frontend, "feature_models"), _schema(frontend, "graph_models")
    paths = write_feature_examples(graph, store, adapted, tmp_path, "scan")
    path = write_circuit_tracer_files(graph, tmp_path, scan="scan")
    graph_model.model_validate_json(path.read_text())
    for p in paths:
        feature_model.model_validate_json(p.read_text())
