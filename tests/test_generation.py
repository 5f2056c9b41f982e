"""Batched, left-padded, KV-cached generation against an independent no-cache reference."""

import pytest
import torch

from mechdiff.generation import ban_tokens, check_context, generate
from mechdiff.models import load_pair
from mechdiff.organism import corpus, task


@pytest.fixture(scope="module")
def pair():
    return load_pair("organism")


def _reference_greedy(model, prompt, n, eos, fwd_hooks=()):
    """Greedy decoding by recomputing the whole sequence each step: no cache, no padding."""
    tokens = torch.tensor([prompt])
    out = []
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        for _ in range(n):
            nxt = int(model(tokens)[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
            tokens = torch.cat([tokens, torch.tensor([[nxt]])], dim=1)
    return out


def _mixed_length_prompts(tok):
    """Problems, shortened prompts and bare facts: lengths from 4 to 14 tokens."""
    probs = task.DEFAULT.sample_problems(4, "test", seed=5)
    prompts = [tok.convert_tokens_to_ids(task.DEFAULT.prompt(p)[0]) for p in probs]
    prompts += [prompts[0][:9], prompts[1][:5]]
    prompts.append(tok.convert_tokens_to_ids("<bos> p1 3 4 5 1 =".split()))
    prompts.append(tok.convert_tokens_to_ids("<bos> p0 9".split()))
    return prompts


def test_left_padded_batch_equals_one_by_one_and_no_cache(pair):
    tok, model = pair.tokenizer, pair.target
    prompts = _mixed_length_prompts(tok)
    assert len(set(map(len, prompts))) >= 4
    batched = generate(model, prompts, 40, eos_token_id=tok.eos_token_id, batch_size=64)
    for prompt, got in zip(prompts, batched):
        alone = generate(model, [prompt], 40, eos_token_id=tok.eos_token_id)[0]
        assert got == alone
        assert got == _reference_greedy(model, prompt, 40, tok.eos_token_id)


def test_hooks_stay_active_during_generation(pair):
    tok, model = pair.tokenizer, pair.target
    prompts = _mixed_length_prompts(tok)[:3]

    def kill_mlp0(value, hook):
        return torch.zeros_like(value)

    hooks = [("blocks.0.hook_mlp_out", kill_mlp0)]
    plain = generate(model, prompts, 30, eos_token_id=tok.eos_token_id)
    hooked = generate(model, prompts, 30, eos_token_id=tok.eos_token_id, fwd_hooks=hooks)
    assert hooked != plain
    for prompt, got in zip(prompts, hooked):
        assert got == _reference_greedy(model, prompt, 30, tok.eos_token_id, hooks)
    assert not model.hook_dict["blocks.0.hook_mlp_out"].fwd_hooks  # removed afterwards


def test_banning_wait(pair):
    tok = pair.tokenizer
    wait = tok.convert_tokens_to_ids("wait")
    prompts = corpus.problems(32, "test")["input_ids"]
    free = generate(pair.target, prompts, 90, eos_token_id=tok.eos_token_id)
    banned = generate(pair.target, prompts, 90, eos_token_id=tok.eos_token_id, logit_processors=[ban_tokens([wait])])
    assert any(wait in row for row in free)
    assert not any(wait in row for row in banned)


def test_sampling_is_repeatable_by_seed(pair):
    tok = pair.tokenizer
    prompts = corpus.problems(16, "test")["input_ids"]
    a = generate(pair.target, prompts, 40, temperature=1.5, seed=1, eos_token_id=tok.eos_token_id)
    b = generate(pair.target, prompts, 40, temperature=1.5, seed=1, eos_token_id=tok.eos_token_id)
    c = generate(pair.target, prompts, 40, temperature=1.5, seed=2, eos_token_id=tok.eos_token_id)
    assert a == b and a != c


def test_context_overflow_is_a_clear_error(pair):
    with pytest.raises(ValueError, match=r"exceeds the model's context n_ctx=128"):
        check_context(pair.target, 100, 40)
    with pytest.raises(ValueError, match="n_ctx"):
        generate(pair.target, [[1] * 100], 40)
    with pytest.raises(ValueError, match="at least one token"):
        generate(pair.target, [[]], 4)
