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
    with pytest.raises(ValueError, match="more than the teacher"):
        head_losses([Head(h, W)], teacher=Head(torch.randn(2, 4), W))
    with pytest.raises(ValueError, match="prompt_len"):
        next_token_keep(torch.ones(1, 3, dtype=torch.bool), torch.tensor([5]))


def test_students_on_a_prefix_of_the_rows_equal_their_own_call():
    """A student covering the first rows shares the teacher's chunks: its losses and gradients (to
    its rows, W and b) equal a call of its own on those rows, at chunk sizes that split it."""
    gen = torch.Generator().manual_seed(0)
    W, b = torch.randn(6, 13, generator=gen), torch.randn(13, generator=gen)
    rows = torch.randn(9, 6, generator=gen)
    teacher, labels = Head(torch.randn(9, 6, generator=gen), W * 1.5), torch.randint(0, 13, (9,), generator=gen)

    def run(heads, n_rows, chunk):
        leaves = [(h.clone().requires_grad_(True), w.clone().requires_grad_(True), c.clone().requires_grad_(True))
                  for h, w, c in heads]  # fmt: skip
        out = head_losses(
            [Head(*leaf) for leaf in leaves],
            labels=labels[:n_rows],
            teacher=Head(teacher.hidden[:n_rows], teacher.W),
            chunk=chunk,
        )
        (out.ce.sum() + 2 * out.kl.sum()).backward()
        return out, [[t.grad for t in leaf] for leaf in leaves]

    for chunk in (2, 4, 9):
        both, grads = run([(rows, W, b), (rows[:5] * 0.5, W, b)], 9, chunk)
        alone, alone_grads = run([(rows[:5] * 0.5, W, b)], 5, chunk)
        full, full_grads = run([(rows, W, b)], 9, chunk)
        for key in ("ce", "kl", "correct"):
            torch.testing.assert_close(getattr(both, key)[1], getattr(alone, key)[0])
            torch.testing.assert_close(getattr(both, key)[0], getattr(full, key)[0])
        for got, expected in zip(grads[1] + grads[0], alone_grads[0] + full_grads[0], strict=True):
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


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
