"""Library pieces of the hesitation study, checked against direct computations."""

import pytest
import torch

from attribution.synthetic import randomize_adapters
from mechdiff.adapters.transcoder import AdaptedModel
from mechdiff.evaluation import feature_roles, feature_sets, sufficiency
from mechdiff.evaluation import hesitation as H
from mechdiff.models import load_pair
from mechdiff.organism import corpus


@pytest.fixture(scope="module")
def pair():
    return load_pair("organism")


@pytest.fixture(scope="module")
def adapted(pair):
    return randomize_adapters(AdaptedModel.from_pair(pair, d_sae=64), seed=0, density=0.1)


def test_covering_set_and_aggregation():
    rankings = [
        [{"layer": 0, "feature": 1, "score": 3.0}, {"layer": 1, "feature": 2, "score": 1.0}],
        [{"layer": 1, "feature": 2, "score": 5.0}, {"layer": 2, "feature": 0, "score": -4.0}],
    ]
    agg = feature_sets.aggregate_influence(rankings)  # each prompt normalised to 1; negatives ignored
    assert agg == pytest.approx({(0, 1): 0.75, (1, 2): 1.25, (2, 0): 0.0})
    assert feature_sets.covering_set(agg, share=0.6) == [(1, 2)]
    assert feature_sets.covering_set(agg, share=1.0) == [(1, 2), (0, 1)]
    with pytest.raises(ValueError, match="share"):
        feature_sets.covering_set(agg, share=0)


def test_keep_only_equals_ablating_the_complement(adapted):
    tokens = torch.tensor([corpus.reasoning_traces(1, "test")[0]["input_ids"]])
    keep = [(0, 3), (1, 5), (2, 7)]
    every = [(layer, f) for layer in range(3) for f in range(64)]
    complement = [f for f in every if f not in keep]
    a = adapted.model.run_with_hooks(tokens, fwd_hooks=sufficiency.keep_only_hooks(adapted, keep))
    b = adapted.model.run_with_hooks(tokens, fwd_hooks=adapted.ablation_hooks(complement))
    torch.testing.assert_close(a, b)
    full = adapted.model(tokens)
    kept_all = adapted.model.run_with_hooks(tokens, fwd_hooks=sufficiency.keep_only_hooks(adapted, every))
    torch.testing.assert_close(full, kept_all)


def test_next_token_probability_matches_unpadded_forward(pair):
    prompts = [r for r in corpus.reasoning_traces(6, "test")["input_ids"]]
    prompts = [p[: 14 + 5 * i] for i, p in enumerate(prompts)]  # different lengths
    wait = pair.tokenizer.convert_tokens_to_ids("wait")
    got = H.next_token_probability(pair.target, prompts, wait, batch_size=4)
    for p, g in zip(prompts, got):
        with torch.no_grad():
            ref = pair.target(torch.tensor([p]))[0, -1].softmax(-1)[wait]
        assert float(g) == pytest.approx(float(ref), abs=1e-5)


def test_hesitation_prompts_end_before_wait_and_controls_before_separator(pair):
    tok = pair.tokenizer
    hes, ctl = H.hesitation_prompts(pair.target, tok, corpus.problems(30, "validation"))
    assert len(hes) >= 20 and len(ctl) == len(hes)
    wait = tok.convert_tokens_to_ids("wait")
    p_wait = H.next_token_probability(pair.target, hes.tokens, wait)
    p_ctl = H.next_token_probability(pair.target, ctl.tokens, wait)
    assert float(p_wait.min()) > 0.5 and float(p_ctl.max()) < 0.5  # the model hesitates only at cuts
    assert all(hes.after_error)  # the organism's waits all follow a real slip
    assert all(lab[-1] == "slip" for lab in hes.labels)


def test_activation_mass_by_label_is_a_distribution(adapted):
    rows = corpus.reasoning_traces(4, "test")
    acts = feature_roles.feature_activations(adapted, rows["input_ids"])
    from mechdiff.organism import task

    labels = [[task.LABELS[i] for i in r] for r in rows["label_ids"]]
    alive = (torch.stack([a.amax(0) for a in acts]).amax(0) > 0).nonzero().tolist()[:5]
    mass = feature_roles.activation_mass_by_label(acts, labels, [tuple(f) for f in alive])
    for shares in mass.values():
        assert sum(shares.values()) == pytest.approx(1.0)
    ref = feature_roles.feature_activations(adapted, rows["input_ids"][:1])[0]
    assert torch.allclose(acts[0], ref, atol=1e-5)  # batching and padding change nothing


def test_set_decides_generation_takes_only_the_decisions_from_the_kept_copy(pair):
    """Checked token by token against teacher-forced forwards of the full and the kept-only model."""
    from mechdiff.adapters.formats import SHIPPED_DIR, load_adapted
    from mechdiff.evaluation.behaviour import responses

    adapted = load_adapted(pair, SHIPPED_DIR)
    tok, problems = pair.tokenizer, corpus.problems(12, "test", seed=3)
    every = [(layer, f) for layer in range(3) for f in range(adapted.config.d_sae)]
    assert sufficiency.set_decides_generation(adapted, tok, problems, every) == responses(adapted.model, tok, problems)

    wait = tok.convert_tokens_to_ids("wait")
    effect = feature_roles.decoder_logit_effect(adapted, wait)
    top = torch.topk(effect.flatten(), 20).indices.tolist()
    kept = [divmod(i, effect.shape[1]) for i in top]
    words = sufficiency.set_decides_generation(adapted, tok, problems, kept)
    decisions, choices = set(tok.convert_tokens_to_ids(["wait", ";"])), {"wait": 0, ";": 0}
    for prompt, response in zip(problems["input_ids"], words):
        ids = list(prompt) + tok.convert_tokens_to_ids(response)
        x = torch.tensor([ids])
        with torch.no_grad():
            full = adapted.model(x)[0, len(prompt) - 1 : -1]
            only = adapted.model.run_with_hooks(x, fwd_hooks=sufficiency.keep_only_hooks(adapted, kept))[
                0, len(prompt) - 1 : -1
            ]
        for t, token in enumerate(ids[len(prompt) :]):
            greedy = int(full[t].argmax())
            if greedy in decisions:  # a decision: the kept-only copy's preference between the two
                other = (decisions - {token}).pop()
                assert token in decisions and only[t, token] >= only[t, other]
                choices[tok.convert_ids_to_tokens(token)] += 1
            else:
                assert token == greedy
    assert choices["wait"] > 0 and choices[";"] > 0  # both kinds of decision were exercised


def test_organism_hesitation_is_the_wait_word_and_the_step_separator(pair, adapted):
    from mechdiff.evaluation.behaviour import MAX_NEW_TOKENS
    from mechdiff.workloads import OrganismWorkload, for_pair

    spec, tok = for_pair(pair), pair.tokenizer
    assert isinstance(spec, OrganismWorkload) and spec.word == "wait" and spec.max_new_tokens == MAX_NEW_TOKENS
    assert spec.decisions == tuple(tok.convert_tokens_to_ids(["wait", ";"])) and spec.variants == (spec.target,)
    prompts = corpus.reasoning_traces(3, "test")["input_ids"]
    one = H.next_token_probability(adapted.model, prompts, spec.target)
    assert torch.equal(H.next_token_probability(adapted.model, prompts, spec.variants), one)  # a set of one
    both = H.next_token_probability(adapted.model, prompts, spec.decisions)
    assert torch.allclose(both, one + H.next_token_probability(adapted.model, prompts, spec.go_on))
