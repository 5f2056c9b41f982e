"""The chunked adapter and LoRA objectives against their plain full-logits paths: same loss, parts
and gradients, on a tiny random pair and on the shipped organism."""

import pytest
import torch

from mechdiff.adapters.lora import LoRAConfig, LoRAModel
from mechdiff.adapters.transcoder import AdaptedModel
from mechdiff.models import load_pair
from mechdiff.organism import corpus
from mechdiff.padding import pad
from mechdiff.training.adapter_objective import AdapterObjective, LossWeights
from mechdiff.training.lora_objective import (
    TraceBatches,
    chunked_distillation_loss,
    distillation_loss,
    make_loss_fn,
)


@pytest.fixture(scope="module")
def organism():
    return load_pair("organism")


def _tiny_pair(tiny_model_dir):
    pair = load_pair(
        "custom", base=str(tiny_model_dir("base", seed=0)), target=str(tiny_model_dir("target", seed=1)), device="cpu"
    )
    with torch.no_grad():  # random tiny models are near uniform: make the outputs matter
        pair.target.unembed.W_U.mul_(8)
    return pair


def _random_adapters(pair, seed=0):
    torch.manual_seed(seed)
    adapted = AdaptedModel.from_pair(pair, 32, "topk", 4)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapted.adapters:
            for p in (a.W_dec, a.b_dec, a.b_enc):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return adapted


def pair_and_batch(which: str, tiny_model_dir, organism):
    """``(pair, tokens, mask)``: a tiny random pair with four right-padded rows, or the shipped
    organism with six of its validation traces."""
    if which == "tiny":
        pair = _tiny_pair(tiny_model_dir)
        gen = torch.Generator().manual_seed(3)
        rows = [[2] + torch.randint(4, 64, (m,), generator=gen).tolist() for m in (5, 11, 8, 3)]
    else:
        pair = organism
        rows = corpus.reasoning_traces(6, "validation")["input_ids"]
    tokens, mask = pad(rows, pair.tokenizer.pad_token_id or 0, side="right")
    return pair, tokens, mask


def _grads(params):
    return [p.grad.clone() for p in params]


def _adapter_run(adapted, target, fast, tokens, mask, dead, checkpoint=False):
    objective = AdapterObjective(adapted, target, LossWeights(l1=0.01), fast=fast, checkpoint=checkpoint)
    adapted.adapters.zero_grad()
    calls = []
    handle = adapted.adapters[-1].register_forward_pre_hook(lambda *_: calls.append(1))
    loss, parts, stats = objective(tokens, mask, cutoff=1, dead=dead, k_aux=4)
    n_forward = len(calls)
    loss.backward()
    handle.remove()
    assert (len(calls) > n_forward) == checkpoint  # checkpointed blocks run again in backward
    return loss.detach(), parts, _grads(adapted.adapters.parameters()), stats["counts"]


@pytest.mark.parametrize("which,checkpoint", [("tiny", False), ("organism", False), ("tiny", True)])
def test_adapter_objective_fast_equals_plain(which, checkpoint, tiny_model_dir, organism):
    pair, tokens, mask = pair_and_batch(which, tiny_model_dir, organism)
    adapted = _random_adapters(pair)
    dead = torch.zeros(pair.n_layers, 32, dtype=torch.bool)
    dead[:, ::3] = True  # the AuxK part runs too
    fast = _adapter_run(adapted, pair.target, True, tokens, mask, dead, checkpoint)
    plain = _adapter_run(adapted, pair.target, False, tokens, mask, dead)
    torch.testing.assert_close(fast[0], plain[0], atol=1e-4, rtol=1e-5)
    assert fast[1].keys() == plain[1].keys() and {"bridge_a2t", "bridge_t2a", "aux"} <= fast[1].keys()
    for name in fast[1]:
        assert fast[1][name] == pytest.approx(plain[1][name], abs=1e-4), name
    assert plain[1]["kl"] > 1e-3 and plain[1]["bridge_a2t"] > 1e-3  # the KLs are not trivially zero
    for g_fast, g_plain in zip(fast[2], plain[2], strict=True):
        torch.testing.assert_close(g_fast, g_plain, atol=1e-5, rtol=1e-4)
    assert torch.equal(fast[3], plain[3])
    assert all("forward" not in vars(block) for block in adapted.model.blocks)  # blocks restored


@pytest.mark.parametrize("kl_weight", [0.0, 0.5])
def test_lora_chunked_loss_equals_plain(organism, kl_weight):
    lora = LoRAModel.from_base(organism.base, LoRAConfig(rank=2))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # B = 0 at the start: give the adapters a function and a gradient path
        for layer in lora.layers:
            for m in layer.B:
                layer.B[m].copy_(torch.randn(layer.B[m].shape, generator=gen) * 0.2)
    tokens, keep = TraceBatches(corpus.reasoning_traces(6, "validation"), 6).batch(0)
    target = organism.target if kl_weight else None
    loss, metrics = chunked_distillation_loss(lora.model, tokens, keep, target, kl_weight)
    loss.backward()
    g_fast = _grads(lora.layers.parameters())
    lora.layers.zero_grad()
    with torch.no_grad():
        t_logits = organism.target(tokens) if kl_weight else None
    ref, ref_metrics = distillation_loss(lora(tokens), tokens, keep, t_logits, kl_weight)
    ref.backward()
    torch.testing.assert_close(loss.detach(), ref.detach(), atol=1e-4, rtol=1e-5)
    assert metrics.keys() == ref_metrics.keys()
    for name in metrics:
        assert metrics[name] == pytest.approx(ref_metrics[name], abs=1e-4), name
    for a, b in zip(g_fast, _grads(lora.layers.parameters()), strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert any(g.abs().sum() > 0 for g in g_fast)


@pytest.mark.parametrize("fast", [True, False])
def test_lora_step_with_recomputed_blocks_equals_without(organism, fast):
    """``TrainConfig(checkpoint=True)``: each block recomputed in backward, the LoRA hooks with it;
    the same loss and adapter gradients, on both paths, and the blocks' own forward restored."""
    lora = LoRAModel.from_base(organism.base, LoRAConfig(rank=1))
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():  # B = 0 at the start: give every adapter a gradient
        for layer in lora.layers:
            for m in layer.B:
                layer.B[m].copy_(torch.randn(layer.B[m].shape, generator=gen) * 0.2)
    batches = TraceBatches(corpus.reasoning_traces(5, "validation"), 5)
    got, calls = [], []
    lora.model.add_hook(lora.act_name(1, "up"), lambda act, hook: calls.append(1))
    for checkpoint in (False, True):
        lora.layers.zero_grad()
        calls.clear()
        loss, _ = make_loss_fn(lora, batches, organism.target, kl_weight=0.5, fast=fast, checkpoint=checkpoint)(0)
        loss.backward()
        got.append((loss.detach(), _grads(lora.layers.parameters())))
        assert len(calls) == 1 + checkpoint  # recomputed: the adapter ran again in backward
        # the recomputation ran whole blocks: no delta waits in a hook, holding a block's graph
        assert not any(layer._pending for layer in lora.layers)
    lora.model.reset_hooks()
    assert all("forward" not in vars(block) for block in lora.model.blocks)
    torch.testing.assert_close(got[1][0], got[0][0], atol=1e-6, rtol=0)
    assert all(g.abs().sum() > 0 for g in got[0][1])
    for a, b in zip(got[1][1], got[0][1], strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
