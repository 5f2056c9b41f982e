"""Interventions change what they should and nothing else; linearized edits match graph edges."""

import pytest
import torch

from attribution.build import attribute
from attribution.interventions import (
    Edit,
    ablate,
    edit_hooks,
    generate_with_edits,
    intervene,
    steer,
)
from attribution.synthetic import tiny_adapted
from mechdiff.generation import generate

TOKENS = torch.tensor([2, 5, 9, 11, 7, 20, 30, 4, 8, 9, 13, 6])


@pytest.fixture(scope="module")
def adapted():
    return tiny_adapted(seed=0)


@pytest.fixture(scope="module")
def acts(adapted):
    _, cache = adapted.model.run_with_cache(TOKENS[None])
    return torch.stack([cache[adapted.acts_name(la)][0] for la in range(2)])  # [layer pos d_sae]


def active_at(acts, layer, pos, n=3):
    return acts[layer, pos].nonzero()[:n, 0].tolist()


@pytest.mark.parametrize("linearized", [False, True])
def test_ablation_at_p_leaves_earlier_positions_unchanged(adapted, acts, linearized):
    p = 6
    feats = [(0, f) for f in active_at(acts, 0, p)] + [(1, f) for f in active_at(acts, 1, p)]
    assert len(feats) >= 4
    clean = intervene(adapted, TOKENS, [], linearized=linearized)
    edited = intervene(adapted, TOKENS, ablate(feats, positions=[p]), linearized=linearized)
    assert torch.equal(clean[:p], edited[:p])
    assert (clean[p] - edited[p]).abs().max() > 1e-3
    assert (clean[p + 1 :] - edited[p + 1 :]).abs().max() > 1e-6  # later positions attend to p


def test_edits_that_change_nothing(adapted, acts):
    clean = intervene(adapted, TOKENS, [])
    inactive = (acts[1, 5] == 0).nonzero()[:5, 0].tolist()
    assert torch.equal(intervene(adapted, TOKENS, ablate([(1, f) for f in inactive], positions=[5])), clean)
    active = active_at(acts, 0, 4)
    torch.testing.assert_close(
        intervene(adapted, TOKENS, steer([(0, f) for f in active], 1.0, "scale")), clean, rtol=0, atol=0
    )
    assert torch.equal(intervene(adapted, TOKENS, steer([(0, 4, active[0])], 0.0, "add")), clean)


def test_steering_modes_act_on_the_feature(adapted, acts):
    f = active_at(acts, 0, 4, 1)[0]
    seen = {}

    def keep(t, hook):
        seen["a"] = t[0, 4, f].item()

    for edits, expected in (
        (steer([(0, 4, f)], 2.5, "set"), 2.5),
        (steer([(0, 4, f)], 3.0, "scale"), 3.0 * acts[0, 4, f].item()),
        (steer([(0, f)], 1.0, "add", positions=[4]), acts[0, 4, f].item() + 1.0),
    ):
        with torch.no_grad():
            adapted.model.run_with_hooks(
                TOKENS[None], fwd_hooks=edit_hooks(adapted, edits) + [(adapted.acts_name(0), keep)]
            )
        assert seen["a"] == pytest.approx(expected)


def test_linearized_ablation_equals_minus_the_graph_edge(adapted):
    graph = attribute(adapted, TOKENS, "w8")
    row = graph.adjacency[graph.target_slice.start, : graph.n_features]
    for i in torch.argsort(row.abs(), descending=True)[:3].tolist():
        layer, pos, feat = graph.features[i].tolist()
        clean = intervene(adapted, TOKENS, [], linearized=True)[-1]
        edited = intervene(adapted, TOKENS, ablate([(layer, pos, feat)]), linearized=True)[-1]
        demeaned = lambda x: x[12] - x.mean()  # noqa: E731  (w8 has id 12)
        assert float(demeaned(clean) - demeaned(edited)) == pytest.approx(float(row[i]), rel=1e-6)
    true_edited = intervene(adapted, TOKENS, ablate([(layer, pos, feat)]))[-1]
    assert not torch.allclose(true_edited, edited)  # the true model also moves later features


def test_positioned_edits_during_cached_generation_match_full_recomputation(adapted, acts):
    """The KV-cached generation applies a positioned edit at the right absolute positions."""
    prompt = TOKENS[:8].tolist()
    feats = list(range(adapted.config.d_sae))
    edits = steer([(1, f) for f in feats[:24]], 2.0, "set", positions=[8, 10])
    got = generate_with_edits(adapted, [prompt, prompt[:7]], edits, 5, eos_token_id=None)
    for p, out in zip((prompt, prompt[:7]), got):
        seq = list(p)
        for _ in range(5):  # a full forward each step, with the edits at positions seen so far
            n = len(seq)
            upto = [
                Edit(e.layer, e.features, e.op, e.value, tuple(q for q in e.positions if q < n))
                for e in edits
                if min(e.positions) < n
            ]
            logits = intervene(adapted, torch.tensor(seq), upto)
            seq.append(int(logits[-1].argmax()))
        assert out == seq[len(p) :]
    clean = generate(adapted.model, [prompt], 5, eos_token_id=None)
    assert got[0] != clean[0]  # the edit matters


def test_generation_with_edits_everywhere_and_linearized(adapted):
    prompt = TOKENS[:8].tolist()
    edits = ablate([(0, f) for f in range(10)])
    true = generate_with_edits(adapted, [prompt], edits, 4, eos_token_id=None)
    hooks = adapted.steering_hooks([(0, f) for f in range(10)], 0.0, mode="set")
    assert true == generate(adapted.model, [prompt], 4, eos_token_id=None, fwd_hooks=hooks)
    lin_clean = generate_with_edits(adapted, [prompt], [], 4, linearized=True, eos_token_id=None)
    assert lin_clean == generate(adapted.model, [prompt], 4, eos_token_id=None)  # same values
    lin = generate_with_edits(adapted, [prompt], edits, 1, linearized=True)
    assert lin[0][0] == int(intervene(adapted, torch.tensor(prompt), edits, linearized=True)[-1].argmax())


def test_bad_edits_raise(adapted):
    with pytest.raises(IndexError, match="out of range"):
        intervene(adapted, TOKENS, ablate([(0, 3)], positions=[40]))
    with pytest.raises(IndexError, match="out of range"):
        intervene(adapted, TOKENS, ablate([(7, 3)]))
    with pytest.raises(ValueError, match="mode"):
        steer([(0, 1)], 1.0, mode="multiply")
    with pytest.raises(ValueError, match="triples"):
        ablate([(0, 1, 2)], positions=[3])
    with pytest.raises(ValueError, match="greedy"):
        generate_with_edits(adapted, [[2, 5]], [], 2, linearized=True, temperature=1.0)
