"""mechdiff.adapters.edits: each edit does what it says, at absolute positions that survive the KV
cache and left padding, and a deep copy of an adapted model runs its own adapters."""

import copy

import pytest
import torch

from attribution.synthetic import tiny_adapted
from mechdiff.adapters.edits import (
    ablate,
    edit_hooks,
    feature_means,
    keep_only,
    mean_ablate,
    patch,
    record,
    steer,
)
from mechdiff.generation import generate

PROMPT = [2, 5, 9, 11, 7, 20, 30]


@pytest.fixture(scope="module")
def adapted():
    return tiny_adapted(seed=0)


def greedy_without_cache(adapted, prompt, n, hooks):
    """The reference: a full forward over the whole sequence for every new token (to the eos)."""
    seq, eos = list(prompt), adapted.model.tokenizer.eos_token_id
    with torch.no_grad(), adapted.model.hooks(fwd_hooks=hooks):
        for _ in range(n):
            seq.append(int(adapted.model(torch.tensor([seq]))[0, -1].argmax()))
            if seq[-1] == eos:
                break
    return seq[len(prompt) :]


def spy_on(adapted, layer, feature, seen):
    def spy(acts, hook):
        seen.append(acts[:, :, feature].clone())

    return (adapted.acts_name(layer), spy)


def test_positions_count_across_cached_generation(adapted):
    """positions=[0] edits the BOS only; before the fix it hit every generated token too."""
    hooks = edit_hooks(adapted, steer([(1, f) for f in range(12)], 25.0, "add", positions=[0, 8]))
    got = generate(adapted.model, [PROMPT], 6, eos_token_id=None, fwd_hooks=hooks)[0]
    assert got == greedy_without_cache(adapted, PROMPT, 6, hooks)
    clean = generate(adapted.model, [PROMPT], 6, eos_token_id=None)[0]
    everywhere = edit_hooks(adapted, steer([(1, f) for f in range(12)], 25.0, "add"))
    assert got != generate(adapted.model, [PROMPT], 6, eos_token_id=None, fwd_hooks=everywhere)[0]
    seen = []
    generate(adapted.model, [PROMPT], 4, eos_token_id=None, fwd_hooks=hooks + [spy_on(adapted, 1, 0, seen)])
    base = []
    generate(adapted.model, [PROMPT], 4, eos_token_id=None, fwd_hooks=[spy_on(adapted, 1, 0, base)])
    edited = [(a - b).abs() > 1 for a, b in zip(seen, base)]
    # the prompt forward: its position 0 only; then the cached steps: position 7 (no), 8 (yes), 9 (no)
    assert edited[0][0].nonzero()[:, 0].tolist() == [0]
    assert [bool(e.any()) for e in edited[1:]] == [False, True, False]
    assert got != clean


def test_left_padded_rows_count_their_own_positions(adapted):
    hooks = edit_hooks(adapted, ablate([(0, f) for f in range(16)], positions=[1, 3, 9]))
    short = PROMPT[:4]
    together = generate(adapted.model, [PROMPT, short], 5, eos_token_id=None, fwd_hooks=hooks, pad_token_id=1)
    alone = [greedy_without_cache(adapted, p, 5, hooks) for p in (PROMPT, short)]
    assert together == alone


def test_hooks_are_reusable_across_runs(adapted):
    hooks = edit_hooks(adapted, ablate([(1, 2), (1, 5)], positions=[3]))
    tokens = torch.tensor([PROMPT])
    with torch.no_grad():
        first = adapted.model.run_with_hooks(tokens, fwd_hooks=hooks)
        generate(adapted.model, [PROMPT], 3, eos_token_id=None, fwd_hooks=hooks)  # cached forwards between
        second = adapted.model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert torch.equal(first, second)


def test_a_deep_copy_runs_its_own_adapters(adapted):
    twin = copy.deepcopy(adapted)
    tokens = torch.tensor([PROMPT])
    with torch.no_grad():
        before = adapted.model(tokens)
        for a in twin.adapters:
            a.W_dec.zero_()
            a.b_dec.zero_()
        hybrid = adapted.model.run_with_hooks(tokens, fwd_hooks=adapted.bypass_hooks())
        torch.testing.assert_close(twin.model(tokens), hybrid, rtol=0, atol=0)  # the copy's (zeroed) adapters
        torch.testing.assert_close(adapted.model(tokens), before, rtol=0, atol=0)  # the original's, untouched
    assert not torch.equal(before, hybrid)
    # and edits built for the copy follow the copy's positions
    hooks = edit_hooks(twin, steer([(0, 1)], 3.0, positions=[0]))
    assert generate(twin.model, [PROMPT], 3, eos_token_id=None, fwd_hooks=hooks) == [
        greedy_without_cache(twin, PROMPT, 3, hooks)
    ]


def test_keep_only_equals_ablating_everything_else(adapted):
    kept = [(0, 3), (0, 9), (1, 4)]
    others = [
        (la, f) for la in range(adapted.config.n_layers) for f in range(adapted.config.d_sae) if (la, f) not in kept
    ]
    tokens = torch.tensor([PROMPT])
    with torch.no_grad():
        a = adapted.model.run_with_hooks(tokens, fwd_hooks=edit_hooks(adapted, keep_only(kept)))
        b = adapted.model.run_with_hooks(tokens, fwd_hooks=edit_hooks(adapted, ablate(others)))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_mean_ablation_sets_the_mean_and_patching_copies_the_other_run(adapted):
    row = [2, 8, 8, 13, 24, 3, 17]
    tokens, other = torch.tensor([PROMPT]), torch.tensor([row])
    means = feature_means(adapted, torch.tensor([PROMPT, row]))
    want = torch.cat([record(adapted, tokens)[1][0], record(adapted, other)[1][0]]).mean(0)
    torch.testing.assert_close(means[1], want)  # every position of both rows
    seen = []
    with torch.no_grad():
        adapted.model.run_with_hooks(
            tokens,
            fwd_hooks=edit_hooks(adapted, mean_ablate([(1, 6)], means, positions=[2])) + [spy_on(adapted, 1, 6, seen)],
        )
    clean = record(adapted, tokens)[1][0, :, 6]
    assert seen[0][0, 2] == means[1, 6] and torch.equal(seen[0][0, :2], clean[:2])
    source = record(adapted, other)
    seen = []
    with torch.no_grad():
        adapted.model.run_with_hooks(
            tokens,
            fwd_hooks=edit_hooks(adapted, patch([(0, f) for f in range(16)], source)) + [spy_on(adapted, 0, 5, seen)],
        )
    torch.testing.assert_close(seen[0][0], source[0][0, :, 5], rtol=0, atol=0)


def test_bad_edits_are_refused(adapted):
    with pytest.raises(IndexError, match="out of range"):
        edit_hooks(adapted, ablate([(7, 3)]))
    with pytest.raises(IndexError, match="out of range"):
        edit_hooks(adapted, keep_only([(0, 10_000)]))
    with pytest.raises(ValueError, match="mode"):
        steer([(0, 1)], 1.0, mode="multiply")
    with pytest.raises(ValueError, match="absolute"):
        ablate([(0, 1)], positions=[-1])
