"""The lean block forward against TransformerLens' own: outputs, gradients and hook values on tiny
models of each supported kind, with every padding case; the fallbacks; and the memory it saves."""

from contextlib import nullcontext

import pytest
import torch
from test_fast_objectives import _random_adapters, pair_and_batch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from mechdiff.adapters.transcoder import AdaptedModel
from mechdiff.models import load_pair
from mechdiff.training.adapter_objective import AdapterObjective, LossWeights
from mechdiff.training.block_recompute import checkpointed_blocks
from mechdiff.training.lean_blocks import lean_blocks, lean_unsupported


def _gpt2_like():
    """Learned positions, LayerNorm, a plain GELU MLP, no grouped heads."""
    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_ctx=32, d_head=8, n_heads=4, d_vocab=64, act_fn="gelu", seed=0
    )  # fmt: skip
    return HookedTransformer(cfg)


def _custom(tiny_model_dir, arch):
    path = str(tiny_model_dir(arch, arch=arch, seed=0))
    return load_pair("custom", base=path, target=path, device="cpu").target


@pytest.fixture(scope="module")
def organism():
    return load_pair("organism")


def _model(kind, tiny_model_dir, organism):
    """A frozen model (as the adapter objective's models are)."""
    if kind == "organism":
        model = organism.target
    else:
        model = _gpt2_like() if kind == "gpt2" else _custom(tiny_model_dir, kind)
    return model.requires_grad_(False)


def _masks(batch, pos):
    lengths = torch.tensor([pos, pos - 3, 2])[:batch]
    right = torch.arange(pos) < lengths[:, None]
    return {"none": None, "right": right.long(), "left": right.flip(1).long()}


def _relative_error(got, expected) -> float:
    """Of the whole tensor: float error spreads over elements of every size."""
    return float((got - expected).norm() / expected.norm())


def _forward_and_grad(model, resid, mask, lean, readout):
    resid = resid.clone().requires_grad_(True)
    with lean_blocks((model,)) if lean else nullcontext():
        logits = model(resid, start_at_layer=0, attention_mask=mask)
    (grad,) = torch.autograd.grad((logits * readout).sum(), resid)
    return logits.detach(), grad


@pytest.mark.parametrize("kind", ["qwen2", "llama", "gpt2", "organism"])
def test_lean_forward_and_gradients_equal_transformer_lens(kind, tiny_model_dir, organism):
    model = _model(kind, tiny_model_dir, organism)
    assert all(lean_unsupported(block) is None for block in model.blocks)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, model.cfg.d_vocab, (3, 12), generator=gen)
    resid = model.embed(tokens).detach()
    readout = torch.randn(3, 12, model.cfg.d_vocab, generator=gen)
    for name, mask in _masks(3, 12).items():
        if name != "none":
            readout = readout * mask[..., None]  # TransformerLens' logits at padding are not defined
        tl = _forward_and_grad(model, resid, mask, False, readout)
        lean = _forward_and_grad(model, resid, mask, True, readout)
        keep = slice(None) if mask is None else mask.bool()
        torch.testing.assert_close(lean[0][keep], tl[0][keep], atol=2e-5, rtol=1e-5, msg=f"logits, {name} padding")
        assert _relative_error(lean[1], tl[1]) < 1e-5, f"gradient, {name} padding"


HOOKS = (
    "blocks.1.hook_resid_pre",
    "blocks.1.ln1.hook_normalized",
    "blocks.1.attn.hook_q",
    "blocks.1.attn.hook_k",
    "blocks.1.attn.hook_v",
    "blocks.1.attn.hook_rot_q",
    "blocks.1.attn.hook_rot_k",
    "blocks.1.attn.hook_z",
    "blocks.1.hook_attn_out",
    "blocks.1.hook_resid_mid",
    "blocks.1.mlp.hook_pre",
    "blocks.1.mlp.hook_pre_linear",
    "blocks.1.mlp.hook_post",
    "blocks.1.hook_mlp_out",
    "blocks.1.adapter.hook_acts",
    "blocks.1.hook_resid_post",
)


def test_hooks_see_what_they_see_in_transformer_lens(tiny_model_dir):
    path = str(tiny_model_dir("llama", arch="llama"))
    pair = load_pair("custom", base=path, target=path, device="cpu")
    adapted = AdaptedModel.from_pair(pair, 16, "topk", 4)
    torch.nn.init.normal_(adapted.adapters[1].W_dec)
    tokens = torch.randint(4, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = _masks(2, 9)["left"]
    _, tl = adapted.model.run_with_cache(tokens, attention_mask=mask, names_filter=list(HOOKS))
    with lean_blocks((adapted.model,)):
        _, lean = adapted.model.run_with_cache(tokens, attention_mask=mask, names_filter=list(HOOKS))
    assert set(lean.keys()) == set(HOOKS)
    for name in HOOKS:
        torch.testing.assert_close(lean[name], tl[name], atol=1e-5, rtol=1e-5, msg=name)

    edit = lambda z, hook: z * 0  # a hook's output is used, as in TransformerLens
    with lean_blocks((adapted.model,)):
        edited = adapted.model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", edit)])
    torch.testing.assert_close(edited, adapted.model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_z", edit)]))


def test_a_hook_on_the_pattern_gets_transformer_lens_forward(tiny_model_dir):
    model = _custom(tiny_model_dir, "qwen2").requires_grad_(False)
    tokens = torch.randint(4, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    seen = []
    hooks = [("blocks.0.attn.hook_pattern", lambda p, hook: seen.append(p.shape))]
    with lean_blocks((model,)):
        lean = model.run_with_hooks(tokens, fwd_hooks=hooks)
    assert seen == [(2, 4, 7, 7)]
    torch.testing.assert_close(lean, model(tokens))

    grads = []  # a backward hook on the pattern too
    model.blocks[1].attn.hook_pattern.add_hook(lambda g, hook: grads.append(g.shape), dir="bwd")
    resid = model.embed(tokens).detach().requires_grad_(True)
    with lean_blocks((model,)):
        model(resid, start_at_layer=0).sum().backward()
    model.reset_hooks()
    assert grads == [(2, 4, 7, 7)]


def test_unsupported_blocks_and_restoring(tiny_model_dir):
    model = _custom(tiny_model_dir, "qwen2").requires_grad_(False)
    W_in = model.blocks[1].mlp.W_in.requires_grad_(True)  # a block whose weights train keeps TL's forward
    assert "train" in lean_unsupported(model.blocks[1])
    with torch.no_grad():
        assert lean_unsupported(model.blocks[1]) is None  # ...while gradients are on
    tokens = torch.tensor([[1, 2, 3, 4, 5]])
    model(tokens).sum().backward()
    want, W_in.grad = W_in.grad, None
    with lean_blocks((model,)):
        model(tokens).sum().backward()
    torch.testing.assert_close(W_in.grad, want)
    for outer, inner in ((lean_blocks, checkpointed_blocks), (checkpointed_blocks, lean_blocks)):
        with outer((model,)), inner((model,)):
            assert all("forward" in block.__dict__ for block in model.blocks)
        assert all("forward" not in block.__dict__ for block in model.blocks)
    model.cfg.use_attn_result = True  # a block kind the lean forward never covers is left as it is
    with lean_blocks((model,)):
        assert all("forward" not in block.__dict__ for block in model.blocks)
    model.cfg.use_attn_result = False


def _saved_bytes(fn) -> int:
    storages = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def test_lean_blocks_keep_half_as_much_for_backward(tiny_model_dir):
    model = _custom(tiny_model_dir, "llama").requires_grad_(False)
    resid = model.embed(torch.randint(4, 64, (4, 96))).detach().requires_grad_(True)
    forward = lambda: model(resid, start_at_layer=0)
    tl = _saved_bytes(forward)
    with lean_blocks((model,)):
        lean = _saved_bytes(forward)
    assert lean < 0.5 * tl, (lean, tl)


@pytest.mark.parametrize("which,checkpoint", [("tiny", False), ("organism", False), ("tiny", True)])
def test_adapter_objective_lean_equals_transformer_lens(which, checkpoint, tiny_model_dir, organism):
    pair, tokens, mask = pair_and_batch(which, tiny_model_dir, organism)
    adapted = _random_adapters(pair)
    params = list(adapted.adapters.parameters())
    got = {}
    for lean in (True, False):
        objective = AdapterObjective(adapted, pair.target, LossWeights(l1=0.01), lean=lean, checkpoint=checkpoint)
        loss, parts, _ = objective(tokens, mask, cutoff=1)
        got[lean] = (loss.detach(), parts, torch.autograd.grad(loss, params))
    torch.testing.assert_close(got[True][0], got[False][0], atol=1e-5, rtol=1e-5)
    assert {"bridge_a2t", "bridge_t2a"} <= got[True][1].keys()
    for name, value in got[False][1].items():
        assert got[True][1][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    for lean_grad, tl_grad in zip(got[True][2], got[False][2], strict=True):
        assert _relative_error(lean_grad, tl_grad) < 1e-5
