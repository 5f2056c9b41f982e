"""The static-cache decoder (mechdiff.generation's fast path) against transformers' generate and
TransformerLens' own cached forward, on tiny random Qwen2/Llama models, left-padded, with hooks."""

import pytest
import torch
from conftest import make_tiny_hf, make_tiny_tokenizer
from transformers import AutoModelForCausalLM

from mechdiff.adapters.lora import LoRAConfig, LoRAModel
from mechdiff.adapters.transcoder import AdaptedModel
from mechdiff.generation import StaticCacheDecoder, fast_path_refusal, generate
from mechdiff.models import ModelPair, load_hooked
from mechdiff.padding import pad

PAD = 1


@pytest.fixture(params=["qwen2", "llama"])
def models(request, tmp_path):
    """(HookedTransformer, transformers model) with the same weights; outputs sharpened so greedy
    decoding has clear winners (random tiny models are near uniform)."""
    hf = make_tiny_hf(request.param, seed=4)
    with torch.no_grad():
        hf.lm_head.weight.mul_(6)
    hf.save_pretrained(tmp_path / "m")
    make_tiny_tokenizer().save_pretrained(tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    return load_hooked(tmp_path / "m", device="cpu"), hf


def _prompts():
    gen = torch.Generator().manual_seed(0)
    return [[2] + torch.randint(4, 64, (n,), generator=gen).tolist() for n in (9, 3, 6, 1, 12)]


def _hf_greedy(hf, prompts, new):
    tokens, mask = pad(prompts, PAD, side="left")
    out = hf.generate(
        tokens,
        attention_mask=mask.long(),
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=PAD,
        eos_token_id=None,
    )
    return out[:, tokens.shape[1] :].tolist()


def _both(model, prompts, new, hooks=()):
    kw = dict(eos_token_id=-1, pad_token_id=PAD, batch_size=len(prompts), fwd_hooks=hooks)
    return generate(model, prompts, new, **kw), generate(model, prompts, new, fast=False, **kw)


def test_fast_equals_transformers_and_the_slow_path_left_padded(models):
    model, hf = models
    assert fast_path_refusal(model) is None
    prompts = _prompts()
    fast, slow = _both(model, prompts, 20)
    assert fast == slow == _hf_greedy(hf, prompts, 20)
    assert len({tuple(row) for row in fast}) > 1  # not one degenerate answer
    alone = [generate(model, [p], 20, eos_token_id=-1, pad_token_id=PAD)[0] for p in prompts]
    assert alone == fast


def test_hooks_fire_and_edit_on_the_fast_path(models):
    model, _ = models
    prompts = _prompts()
    seen = []

    def halve(x, hook):
        return x * 0.5

    def flat_pattern(pattern, hook):  # reads and edits the attention pattern (explicit-scores branch)
        seen.append(pattern.shape)
        return torch.ones_like(pattern) / pattern.shape[-1] * (pattern > 0)

    def steer_keys(k, hook):
        return k + 0.3

    hooks = [
        ("blocks.0.hook_mlp_out", halve),
        ("blocks.1.attn.hook_pattern", flat_pattern),
        ("blocks.0.attn.hook_rot_k", steer_keys),
        ("blocks.1.attn.hook_q", halve),
        ("ln_final.hook_normalized", halve),
        ("blocks.1.hook_resid_mid", halve),
    ]
    fast = generate(model, prompts, 16, eos_token_id=-1, pad_token_id=PAD, fwd_hooks=hooks)
    fast_seen, seen[:] = list(seen), []
    slow = generate(model, prompts, 16, eos_token_id=-1, pad_token_id=PAD, fwd_hooks=hooks, fast=False)
    plain = generate(model, prompts, 16, eos_token_id=-1, pad_token_id=PAD)
    assert fast == slow and fast != plain
    assert fast_seen == seen  # the same shapes, step by step: prompt, then one query per new token
    assert len(fast_seen) == 16 and fast_seen[0][2] == 13 and fast_seen[-1][2:] == (1, 13 + 15)


def test_mlp_pre_hooks_see_the_gate_before_the_in_place_activation(models):
    """Without a hook on ``hook_pre`` the fast path applies SiLU in place; with one, a stored gate
    must stay the gate (not its activation), and an edit must take effect, as on the slow path."""
    model, _ = models
    prompts = _prompts()
    kept = {"fast": [], "slow": []}
    for path in ("fast", "slow"):

        def keep(x, hook, into=kept[path]):
            into.append(x)

        def negate(x, hook):
            return -x

        hooks = [("blocks.0.mlp.hook_pre", keep), ("blocks.1.mlp.hook_pre", negate)]
        kept[path + "_out"] = generate(
            model, prompts, 6, eos_token_id=-1, pad_token_id=PAD, fwd_hooks=hooks, fast=path == "fast"
        )
    assert kept["fast_out"] == kept["slow_out"] != generate(model, prompts, 6, eos_token_id=-1, pad_token_id=PAD)
    assert len(kept["fast"]) == len(kept["slow"]) == 6
    for fast, slow in zip(kept["fast"], kept["slow"], strict=True):
        assert fast.shape == slow.shape and (fast < 0).any()  # the gate, negative entries and all
        torch.testing.assert_close(fast, slow, atol=1e-5, rtol=1e-5)


def test_adapters_on_the_fast_path_and_lora_falls_back(models):
    model, _ = models
    pair = ModelPair(model, model, model.tokenizer, {})
    adapted = AdaptedModel.from_pair(pair, 16, "topk", 4)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for a in adapted.adapters:
            a.W_dec.copy_(torch.randn(a.W_dec.shape, generator=gen) * 0.5)
    assert fast_path_refusal(adapted.model) is None  # the adapters' MLP forward hooks are run
    prompts = _prompts()
    fast, slow = _both(adapted.model, prompts, 12)
    ablated, ablated_slow = _both(adapted.model, prompts, 12, adapted.ablation_hooks([(0, 3), (1, 5)]))
    assert fast == slow and ablated == ablated_slow
    bypass, _ = _both(adapted.model, prompts, 12, adapted.bypass_hooks())
    assert bypass != fast
    lora = LoRAModel.from_base(model, LoRAConfig(rank=1))
    assert "module hook" in fast_path_refusal(lora.model)
    assert _both(lora.model, prompts, 8)[0] == _both(model, prompts, 8)[0]  # B = 0: same function


def test_prefill_fills_the_cache_with_rotated_keys(models):
    model, _ = models
    tokens, mask = pad(_prompts(), PAD, side="left")
    decoder = StaticCacheDecoder(model, tokens, mask, max_new_tokens=2)
    with torch.no_grad():
        logits = decoder.prefill()
        _, cache = model.run_with_cache(tokens, attention_mask=mask.long(), names_filter="blocks.1.attn.hook_rot_k")
        full = model(tokens, attention_mask=mask.long())[:, -1]
    torch.testing.assert_close(
        decoder.keys[1][:, :, : tokens.shape[1]], cache["blocks.1.attn.hook_rot_k"].transpose(1, 2)
    )
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
