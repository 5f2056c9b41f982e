"""Gradient attribution (activation x gradient) against interventions on the organism."""

import random

import pytest
import torch

from attribution.gradient import feature_attribution, log_odds
from mechdiff.adapters.formats import SHIPPED_DIR, load_adapted
from mechdiff.evaluation import feature_sets
from mechdiff.evaluation import hesitation as H
from mechdiff.models import load_pair
from mechdiff.organism import corpus


@pytest.fixture(scope="module")
def setup():
    pair = load_pair("organism")
    adapted = load_adapted(pair, SHIPPED_DIR)
    hes, _ = H.hesitation_prompts(pair.target, pair.tokenizer, corpus.problems(40, "validation"))
    wait = pair.tokenizer.convert_tokens_to_ids("wait")
    return adapted, hes, wait


def _log_odds_wait(adapted, prompt, wait, hooks=()):
    with torch.no_grad(), adapted.model.hooks(fwd_hooks=list(hooks)):
        logits = adapted.model(torch.tensor([prompt]))
    return float(log_odds(logits[:, -1].double(), [wait])[0])


def _scale(adapted, layer, feature, factor):
    def hook(acts, hook):
        acts = acts.clone()
        acts[:, 1:, feature] *= factor  # every position but the first, as the score counts them
        return acts

    return [(adapted.acts_name(layer), hook)]


def test_log_odds_is_the_logit_of_the_target_probability():
    logits = torch.randn(3, 11, dtype=torch.float64)
    p = logits.softmax(-1)[:, [2, 5]].sum(-1)
    torch.testing.assert_close(log_odds(logits, [2, 5]).double(), torch.log(p / (1 - p)), atol=1e-5, rtol=1e-5)


def test_scores_match_a_finite_difference_of_scaling_the_feature(setup):
    adapted, hes, wait = setup
    prompt = hes.tokens[0]
    scores = feature_attribution(adapted, [prompt], wait)[0]
    top = torch.topk(scores.abs().flatten(), 5).indices
    assert scores.abs().max() > 1e-3  # something to check
    eps = 1e-3
    for i in top.tolist():
        layer, feature = divmod(i, scores.shape[1])
        up = _log_odds_wait(adapted, prompt, wait, _scale(adapted, layer, feature, 1 + eps))
        down = _log_odds_wait(adapted, prompt, wait, _scale(adapted, layer, feature, 1 - eps))
        assert (up - down) / (2 * eps) == pytest.approx(float(scores[layer, feature]), rel=0.05, abs=1e-4)
    inactive = scores == 0  # features silent on the prompt score exactly zero
    assert inactive.any()


def test_batched_left_padded_scores_equal_one_prompt_at_a_time(setup):
    adapted, hes, wait = setup
    prompts = [hes.tokens[i] for i in range(5)]
    assert len({len(p) for p in prompts}) > 1  # padding is exercised
    batched = feature_attribution(adapted, prompts, [wait], batch_size=5)
    for prompt, got in zip(prompts, batched):
        torch.testing.assert_close(got, feature_attribution(adapted, [prompt], wait)[0], atol=1e-5, rtol=1e-4)


def test_top_ranked_features_cut_wait_more_than_random_ones(setup):
    adapted, hes, wait = setup
    scores = feature_attribution(adapted, hes.tokens, wait).sum(0)
    order = torch.argsort(scores.flatten(), descending=True)[:10]
    top = [divmod(int(i), scores.shape[1]) for i in order]
    alive = [tuple(ij) for ij in (scores != 0).nonzero().tolist()]
    full = H.next_token_probability(adapted.model, hes.tokens, wait).mean()
    ranked = H.next_token_probability(adapted.model, hes.tokens, wait, fwd_hooks=adapted.ablation_hooks(top)).mean()
    rng = random.Random(0)
    randoms = [
        H.next_token_probability(
            adapted.model, hes.tokens, wait, fwd_hooks=adapted.ablation_hooks(rng.sample(alive, 10))
        ).mean()
        for _ in range(3)
    ]
    assert ranked < 0.5 * full
    assert all(ranked < r for r in randoms)


def test_bad_targets_are_refused(setup):
    adapted, hes, _ = setup
    with pytest.raises(ValueError, match="vocabulary"):
        feature_attribution(adapted, [hes.tokens[0]], [10**6])
    with pytest.raises(ValueError, match="empty"):
        feature_attribution(adapted, [hes.tokens[0]], [])
    with pytest.raises(ValueError, match="empty prompt"):
        feature_attribution(adapted, [[]], 3)
    with pytest.raises(ValueError, match="longer than the model's context"):
        feature_attribution(adapted, [[2] * (adapted.model.cfg.n_ctx + 1)], 3)


def test_normalized_positive_counts_each_prompt_once():
    scores = torch.zeros(2, 2, 3)
    scores[0, 0, 0], scores[0, 1, 2], scores[0, 1, 1] = 3.0, 1.0, -5.0  # prompt 0: 0.75 / 0.25
    scores[1, 1, 2] = 100.0  # prompt 1: 1.0
    agg = feature_sets.normalized_positive(scores)
    assert list(agg) == [(1, 2), (0, 0)]  # negative and silent features left out
    assert agg == pytest.approx({(1, 2): 1.25, (0, 0): 0.75})


def test_smallest_ablating_prefix_is_the_first_k_that_meets_the_goal(setup):
    adapted, hes, wait = setup
    prompts = hes.tokens[:24]
    ranked = list(feature_sets.normalized_positive(feature_attribution(adapted, prompts, wait)))[:64]
    k, curve = feature_sets.smallest_ablating_prefix(adapted, ranked, prompts, wait, share=0.8)
    assert 0 < k < len(ranked) and len(curve) < 17  # found by a search, not a scan
    p = (
        lambda n: float(
            H.next_token_probability(  # noqa: E731
                adapted.model, prompts, wait, fwd_hooks=adapted.ablation_hooks(ranked[:n]) if n else []
            ).mean()
        )
    )
    floor = p(len(ranked))  # what ablating every ranked feature leaves
    assert curve[len(ranked)] == pytest.approx(floor, abs=1e-6)
    goal = floor + 0.2 * (p(0) - floor)
    assert p(k) <= goal < p(k - 1)  # checked by direct forwards, outside the search
    assert curve[k] == pytest.approx(p(k), abs=1e-6)
    with pytest.raises(ValueError, match="share"):
        feature_sets.smallest_ablating_prefix(adapted, ranked, prompts, wait, share=1.5)
