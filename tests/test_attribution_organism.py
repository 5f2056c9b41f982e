"""Attribution on the shipped organism (skipped until it is shipped): a graph of "wait" on a real
reasoning trace is complete, and its strongest edges match linearized ablations."""

import random

import pytest
import torch

from attribution.build import attribute
from attribution.interventions import ablate, intervene
from mechdiff.models import ORGANISM_DIR

pytestmark = pytest.mark.skipif(
    not (ORGANISM_DIR / "target" / "config.json").exists(), reason="the organism is not shipped yet"
)


@pytest.fixture(scope="module")
def adapted():
    from mechdiff.adapters.formats import load_adapted
    from mechdiff.models import load_pair

    return load_adapted(load_pair("organism"))  # the shipped adapters; an error here is a failure


def trace_before_wait(tokenizer):
    from mechdiff.organism import task
    from mechdiff.organism.tokenizer import encode_words

    rng = random.Random(0)
    for problem in task.DEFAULT.sample_problems(50, "test", 0):
        words = task.DEFAULT.prompt(problem)[0] + task.DEFAULT.reasoning_trace(problem, rng)[0]
        if "wait" in words:
            return torch.tensor(encode_words(tokenizer, words[: words.index("wait")]))
    pytest.skip("no trace with a wait")


def test_wait_graph_is_complete_and_matches_ablations(adapted):
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokens = trace_before_wait(adapted.model.tokenizer)
        graph = attribute(adapted, tokens, "wait", max_feature_nodes=200, batch_size=32)
        row = graph.target_slice.start
        logits = adapted.model(tokens[None])[0, -1].detach()
        wait = adapted.model.tokenizer.convert_tokens_to_ids("wait")
        assert float(graph.values[row]) == pytest.approx(float(logits[wait] - logits.mean()), abs=1e-4)
        total = graph.adjacency[row].sum() + graph.dropped[row] + graph.constants[row]
        assert float(total) == pytest.approx(float(graph.values[row]), abs=1e-4)
        edges = graph.adjacency[row, : graph.n_features]
        clean = intervene(adapted, tokens, [], linearized=True)[-1]
        for i in torch.argsort(edges.abs(), descending=True)[:3].tolist():
            layer, pos, feat = graph.features[i].tolist()
            edited = intervene(adapted, tokens, ablate([(layer, pos, feat)]), linearized=True)[-1]
            change = (clean[wait] - clean.mean()) - (edited[wait] - edited.mean())
            assert float(change) == pytest.approx(float(edges[i]), rel=1e-3, abs=1e-5)
    finally:
        torch.set_num_threads(old)
