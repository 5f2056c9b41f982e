"""Keeping only a feature set with the others at zero, at their mean, or with the set patched from
the full model: each checked against the same edit made independently, through the edit API one
prompt at a time (no padding, no batch halves)."""

import pytest
import torch

from attribution.synthetic import tiny_adapted
from mechdiff.adapters import edits
from mechdiff.evaluation.sufficiency import OTHERS, kept_only_next_token, mean_activations

PROMPTS = [[2, 5, 9, 11, 7, 4], [2, 7, 3], [2, 12, 13, 14, 15]]
IDS = [4, 6]


@pytest.fixture(scope="module")
def adapted():
    return tiny_adapted(seed=3, density=0.4)


def _reference(adapted, prompt, hooks):
    with adapted.model.hooks(fwd_hooks=hooks):
        p = adapted.model(torch.tensor([prompt]))[0, -1].softmax(-1)
    return p[IDS].sum(), p.argmax()


def _alive(adapted, k):
    acts = edits.record(adapted, torch.tensor([PROMPTS[0]]))
    pairs = [(la, int(f)) for la, a in acts.items() for f in (a[0].amax(0) > 0).nonzero()[:, 0]]
    return pairs[:: max(1, len(pairs) // k)][:k]


@pytest.mark.parametrize("others", OTHERS)
def test_keeping_every_feature_is_the_full_model(adapted, others):
    every = [(la, f) for la in range(adapted.config.n_layers) for f in range(adapted.config.d_sae)]
    means = torch.randn(adapted.config.n_layers, adapted.config.d_sae, dtype=torch.float64)  # unused: all kept
    p, top = kept_only_next_token(adapted, PROMPTS, every, IDS, others=others, means=means, batch_size=2)
    for i, prompt in enumerate(PROMPTS):
        ref_p, ref_top = _reference(adapted, prompt, [])
        assert p[i].item() == pytest.approx(ref_p.item(), abs=1e-6) and top[i] == ref_top


def test_each_variant_matches_the_edit_api_made_prompt_by_prompt(adapted):
    kept = _alive(adapted, 6)
    n_layers, d_sae = adapted.config.n_layers, adapted.config.d_sae
    others = [(la, f) for la in range(n_layers) for f in range(d_sae) if (la, f) not in kept]
    means = mean_activations(adapted, PROMPTS, batch_size=2)
    assert means.shape == (n_layers, d_sae) and (means >= 0).all() and means.sum() > 0
    results = {
        o: kept_only_next_token(adapted, PROMPTS, kept, IDS, others=o, means=means, batch_size=2) for o in OTHERS
    }
    for i, prompt in enumerate(PROMPTS):
        full = edits.record(adapted, torch.tensor([prompt]))
        refs = {
            "zero": edits.keep_only(kept),
            "mean": edits.mean_ablate(others, means.to(torch.float64)),
            "patch": edits.keep_only(kept) + edits.patch(kept, full),
        }
        for name, edit in refs.items():
            ref_p, ref_top = _reference(adapted, prompt, edits.edit_hooks(adapted, edit))
            p, top = results[name]
            assert p[i].item() == pytest.approx(ref_p.item(), abs=1e-6), (name, i)  # returned in float32
            assert top[i] == ref_top
    # The three are different questions: on a random model they give different answers.
    assert not torch.allclose(results["zero"][0], results["patch"][0])
    assert not torch.allclose(results["zero"][0], results["mean"][0])


def test_mean_activations_weigh_every_real_token_once(adapted):
    one_batch = mean_activations(adapted, PROMPTS, batch_size=8)
    chunked = mean_activations(adapted, PROMPTS, batch_size=1)
    tokens = sum(len(p) for p in PROMPTS)
    by_hand = (
        sum(torch.stack(list(edits.record(adapted, torch.tensor([p])).values()))[:, 0].sum(1) for p in PROMPTS) / tokens
    )
    assert torch.allclose(one_batch, by_hand, atol=1e-9) and torch.allclose(chunked, by_hand, atol=1e-9)


def test_unknown_choice_and_missing_means_are_refused(adapted):
    with pytest.raises(ValueError, match="others must be one of"):
        kept_only_next_token(adapted, PROMPTS, [], IDS, others="half")
    with pytest.raises(ValueError, match="needs means"):
        kept_only_next_token(adapted, PROMPTS, [], IDS, others="mean")
