"""Chunked CE/KL (mechdiff.training.losses.head_losses) against the plain full-logits path."""

import pytest
import torch

from mechdiff.training.losses import Head, head_losses, masked_kl, next_token_ce, next_token_keep


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_losses_and_gradients_equal_plain(chunk):
    torch.manual_seed(0)
    n, d, v = 10, 8, 37
    h1, h2, W1, b1, W2 = _leaves(
        torch.randn(n, d), torch.randn(n, d), torch.randn(d, v), torch.randn(v), torch.randn(d, v)
    )
    t_h, t_W = torch.randn(n, d), torch.randn(d, v)
    labels = torch.randint(0, v, (n,))
    weights = torch.tensor([[0.3, 1.0], [0.0, 2.0]])  # (ce, kl) per student

    out = head_losses([Head(h1, W1, b1), Head(h2, W2)], labels=labels, teacher=Head(t_h, t_W), chunk=chunk)
    (weights[:, 0] * out.ce + weights[:, 1] * out.kl).sum().backward()
    fast = [out.ce.detach(), out.kl.detach()] + [t.grad.clone() for t in (h1, h2, W1, b1, W2)]
    for t in (h1, h2, W1, b1, W2):
        t.grad = None

    t_logits = (t_h @ t_W)[None]
    z1, z2 = (h1 @ W1 + b1)[None], (h2 @ W2)[None]
    tokens = torch.cat([torch.zeros(1, 1, dtype=torch.long), labels[None]], 1)  # position t predicts t+1
    pad = torch.zeros(1, 1, v)
    keep, mask = torch.ones(1, n, dtype=torch.bool), torch.ones(1, n, dtype=torch.bool)
    ce = torch.stack([next_token_ce(torch.cat([z, pad], 1), tokens, keep) for z in (z1, z2)])
    kl = torch.stack([masked_kl(t_logits, z, mask) for z in (z1, z2)])
    (weights[:, 0] * ce + weights[:, 1] * kl).sum().backward()
    plain = [ce.detach(), kl.detach()] + [t.grad for t in (h1, h2, W1, b1, W2)]
    for a, b in zip(fast, plain, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    argmax = (z1[0].argmax(-1) == labels).sum()
    assert int(out.correct[0]) == int(argmax)


def test_grad_flows_only_where_asked_and_no_grad_mode_works():
    torch.manual_seed(1)
    (h,) = _leaves(torch.randn(4, 6))
    W = torch.randn(6, 9)  # frozen unembedding
    out = head_losses([Head(h, W)], teacher=Head(torch.randn(4, 6), W))
    out.kl.sum().backward()
    assert h.grad is not None and W.grad is None
    assert float(out.ce[0].detach()) == 0.0  # no labels: no CE
    with torch.no_grad():
        again = head_losses([Head(h, W)], teacher=Head(torch.randn(4, 6), W))
    assert not again.kl.requires_grad


def test_bad_input_is_refused():
    h, W = torch.randn(3, 4), torch.randn(4, 5)
    with pytest.raises(ValueError, match="nothing to compute"):
        head_losses([Head(h, W)])
    with pytest.raises(ValueError, match="same rows"):
        head_losses([Head(h, W)], teacher=Head(torch.randn(2, 4), W))
    with pytest.raises(ValueError, match="prompt_len"):
        next_token_keep(torch.ones(1, 3, dtype=torch.bool), torch.tensor([5]))


@pytest.mark.parametrize("tied", [False, True])
def test_causal_lm_ce_equals_plain_with_gradients(tied):
    """The HF trainers' loss (organism recipe, SmolLM2 fine-tune) against full logits, on a tiny
    Llama whose unembedding trains (tied to the embedding or not)."""
    from conftest import make_tiny_hf

    from mechdiff.training.losses import causal_lm_ce

    model = make_tiny_hf("llama", seed=2, tie_word_embeddings=tied).train()
    tokens = torch.randint(4, 64, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 6:] = False  # right padding
    prompt_len = torch.tensor([3, 2, 5])
    fast = causal_lm_ce(model, tokens, mask, prompt_len)
    fast.backward()
    g_fast = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model(input_ids=tokens, attention_mask=mask.long()).logits
    plain = next_token_ce(logits, tokens, next_token_keep(mask, prompt_len))
    plain.backward()
    torch.testing.assert_close(fast, plain, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(g_fast[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    keep = next_token_keep(mask, prompt_len)
    assert keep[1, 5:].sum() == 0 and keep[0, :2].sum() == 0 and keep[0, 2:].all()
