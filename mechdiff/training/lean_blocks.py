"""A block forward for training through frozen models that keeps far less for the backward pass.

Training adapters runs the frozen model (and the frozen target, for bridging) with gradients
on, only to reach the adapters and the residuals. TransformerLens' block then keeps, per
layer, a ``[batch, head, pos, pos]`` softmax and a copy of it, the keys and values repeated to
every query head, and a transposed copy of each weight matrix that it builds on every call
(``W.T.contiguous()`` inside ``F.linear``: autograd keeps that copy for the input's gradient).
On SmolLM2 at 4 x 228 tokens that is 1.7 GiB per forward, three times what the gradient needs.

Within :func:`lean_blocks`, each supported block runs the same computation another way:

* queries, keys and values in one matmul with a weight that is built on the fly and rebuilt in
  backward (:class:`_FrozenLinear`), so no copy of it is kept; the other frozen matmuls use the
  parameters as they are, which autograd keeps by reference;
* attention as one fused kernel (``scaled_dot_product_attention``, grouped heads unrepeated),
  which keeps queries, keys, values, its output and a log-sum-exp row, never the pattern;
* the gated MLP's ``silu(gate) * up`` as one function (:class:`_SiluTimesUp`) that keeps its
  two inputs and recomputes the sigmoid in backward.

Every hook point fires as in TransformerLens, with two exceptions: ``hook_attn_scores`` and
``hook_pattern`` do not exist in a fused kernel, so a block with hooks on them runs
TransformerLens' own forward; and ``ln1`` runs once, where TransformerLens runs it three times
(for queries, keys and values) on the same input. Module hooks on the MLP (the adapters) run as
``Module.__call__`` runs them. Blocks this does not cover (see :func:`lean_unsupported`) run
TransformerLens' forward unchanged. Outputs and gradients equal TransformerLens' to float error.

Example:
    >>> import torch
    >>> from transformer_lens import HookedTransformer, HookedTransformerConfig
    >>> cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_vocab=7,
    ...     act_fn="silu", gated_mlp=True, normalization_type="RMS", positional_embedding_type="rotary",
    ...     n_key_value_heads=2, seed=0)
    >>> model = HookedTransformer(cfg)
    >>> tokens = torch.tensor([[0, 1, 2, 3]])
    >>> with lean_blocks((model,)):
    ...     lean = model(tokens)
    >>> torch.allclose(lean, model(tokens), atol=1e-5)
    True
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor
from transformer_lens import HookedTransformer
from transformer_lens.components import GatedMLP, GroupedQueryAttention

from mechdiff.training.block_forwards import replaced_forwards

_UNSUPPORTED_FLAGS = (
    "use_attn_result",
    "use_split_qkv_input",
    "use_attn_in",
    "use_hook_mlp_in",
    "parallel_attn_mlp",
    "attn_only",
    "use_normalization_before_and_after",
    "use_logn_attn",
    "use_attention_sinks",
    "ungroup_grouped_query_attention",
    "load_in_4bit",
    "clip_qkv",
)


def lean_unsupported(block) -> str | None:
    """Why ``block`` (a TransformerLens ``TransformerBlock``) must run TransformerLens' own
    forward under :func:`lean_blocks` now; None when the lean forward covers it."""
    return _config_unsupported(block) or _call_unsupported(block, _weights_train(block))


def _config_unsupported(block) -> str | None:
    """What the lean forward never covers: checked once, on entering :func:`lean_blocks`."""
    cfg, attn, mlp = block.cfg, block.attn, block.mlp
    for flag in _UNSUPPORTED_FLAGS:
        if getattr(cfg, flag, None):
            return f"cfg.{flag} is set"
    if cfg.attn_scores_soft_cap > 0:  # TransformerLens' "off" is -1
        return "soft-capped attention scores"
    if cfg.positional_embedding_type not in ("rotary", "standard"):
        return f"positional embedding {cfg.positional_embedding_type!r}"
    if cfg.attention_dir != "causal" or getattr(attn, "_attention_dir_override", None) not in (None, "causal"):
        return "attention is not causal"
    if cfg.original_architecture in ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM"):
        return "query/key norms"
    if type(mlp).__name__ not in ("GatedMLP", "MLP") or getattr(mlp, "ln", None) is not None:
        return f"MLP kind {type(mlp).__name__}"
    return None


def _weights_train(block) -> bool:
    return any(p.requires_grad for module in (block.attn, block.mlp, block.ln1, block.ln2) for p in module.parameters())


def _call_unsupported(block, trains: bool) -> str | None:
    """What rules the lean forward out for one call: weights that train (``trains``) while
    gradients are on, and hooks (checked on every call: hooks come and go, gradients switch on
    and off)."""
    if trains and torch.is_grad_enabled():
        return "its weights train (the lean forward keeps no input for a weight's gradient)"
    return _hooks_unsupported(block)


def _hooks_unsupported(block) -> str | None:
    """The hooks that need TransformerLens' forward (checked on every call: hooks come and go)."""
    attn, mlp = block.attn, block.mlp
    if any(point._forward_hooks or _has_backward_hooks(point) for point in (attn.hook_attn_scores, attn.hook_pattern)):
        return "hooks on the attention scores or pattern"
    if attn._forward_hooks or attn._forward_pre_hooks or mlp._forward_pre_hooks:
        return "module hooks on the attention or pre-hooks on the MLP"
    if mlp._forward_hooks_with_kwargs or any(_has_backward_hooks(m) for m in (attn, mlp)):
        return "keyword or backward module hooks"
    return None


def _has_backward_hooks(module) -> bool:
    return bool(module._backward_hooks or module._backward_pre_hooks)


@contextmanager
def lean_blocks(models: tuple[HookedTransformer, ...]):
    """Within the context, every supported block of ``models`` runs the lean forward (module
    docstring); the others, and any block called with a key-value cache or shortformer position
    embeddings, run TransformerLens' own."""

    def make(block, fallback):
        trains = _weights_train(block)  # once per context, not per call (a walk over submodules)

        def run(resid_pre, *args, **kwargs):
            if args or kwargs.get("past_kv_cache_entry") is not None or kwargs.get("shortformer_pos_embed") is not None:
                return fallback(resid_pre, *args, **kwargs)
            if _call_unsupported(block, trains) is not None:
                return fallback(resid_pre, **kwargs)
            return lean_block_forward(block, resid_pre, kwargs.get("attention_mask"))

        return run

    blocks = [block for model in models for block in model.blocks if _config_unsupported(block) is None]
    with replaced_forwards(blocks, make):
        yield


def lean_block_forward(
    block, resid_pre: Float[Tensor, "batch pos d_model"], attention_mask: Int[Tensor, "batch pos"] | None
) -> Float[Tensor, "batch pos d_model"]:
    """One TransformerLens block (checked by :func:`lean_unsupported`) the lean way."""
    resid_pre = block.hook_resid_pre(resid_pre)
    attn_out = block.hook_attn_out(_attention(block.attn, block.ln1(resid_pre), attention_mask))
    resid_mid = block.hook_resid_mid(resid_pre + attn_out)
    mlp_out = block.hook_mlp_out(_mlp(block.mlp, block.ln2(resid_mid)))
    return block.hook_resid_post(resid_mid + mlp_out)


def _attention(attn, x: Tensor, attention_mask: Tensor | None) -> Tensor:
    batch, pos, _ = x.shape
    grouped = isinstance(attn, GroupedQueryAttention)
    W_K, W_V = (attn._W_K, attn._W_V) if grouped else (attn.W_K, attn.W_V)
    b_K, b_V = (attn._b_K, attn._b_V) if grouped else (attn.b_K, attn.b_V)
    n_q, n_kv, d_head = attn.W_Q.shape[0], W_K.shape[0], attn.W_Q.shape[2]
    weights = (attn.W_Q, W_K, W_V)  # each [head, d_model, d_head]

    def qkv_weight() -> Tensor:  # [d_model, (q + k + v heads) * d_head], rebuilt in backward
        return torch.cat([w.permute(1, 0, 2).flatten(1) for w in weights], dim=1)

    bias = torch.cat([b.flatten() for b in (attn.b_Q, b_K, b_V)])
    qkv = _FrozenLinear.apply(x, qkv_weight, bias)
    q, k, v = qkv.split([n_q * d_head, n_kv * d_head, n_kv * d_head], dim=-1)
    q = attn.hook_q(q.view(batch, pos, n_q, d_head))
    k = attn.hook_k(k.view(batch, pos, n_kv, d_head))
    v = attn.hook_v(v.view(batch, pos, n_kv, d_head))
    if attn.cfg.positional_embedding_type == "rotary":
        q = attn.hook_rot_q(attn.apply_rotary(q, 0, attention_mask))
        k = attn.hook_rot_k(attn.apply_rotary(k, 0, attention_mask))
    z = attn.hook_z(_fused_attention(q, k, v, attention_mask, 1 / attn.attn_scale))
    return z.flatten(2) @ attn.W_O.flatten(0, 1) + attn.b_O  # W_O [head, d_head, d_model]: a view


def _fused_attention(q, k, v, attention_mask: Tensor | None, scale: float) -> Tensor:
    """Causal attention over ``[batch, pos, head, d_head]`` with TransformerLens' padding rule: a
    query sees the keys at or before it that ``attention_mask`` keeps, and one that sees none
    outputs zeros (TransformerLens' softmax gives NaN there and zeroes it)."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # batch head pos d_head
    grouped = q.shape[1] != k.shape[1]
    if attention_mask is None:
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=grouped)
        return z.transpose(1, 2)
    pos = q.shape[2]
    keep = attention_mask.bool().to(q.device)
    causal = torch.ones(pos, pos, dtype=torch.bool, device=q.device).tril()
    allowed = causal & keep[:, None, None, :]  # batch 1 query key
    blind = ~allowed.any(-1)  # batch 1 query: queries with no key (left padding)
    if blind.any():  # let them see themselves, then zero their output
        allowed = allowed | (torch.eye(pos, dtype=torch.bool, device=q.device) & blind[..., None])
    z = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=grouped)
    if blind.any():
        z = z.masked_fill(blind[..., None], 0.0)
    return z.transpose(1, 2)


def _mlp(mlp, x: Tensor) -> Tensor:
    if isinstance(mlp, GatedMLP):
        gate = mlp.hook_pre(x @ mlp.W_gate)
        up = mlp.hook_pre_linear(x @ mlp.W_in)
        if mlp.act_fn is F.silu:
            post = _SiluTimesUp.apply(gate, up)
        else:
            post = mlp.act_fn(gate) * up
    else:
        post = mlp.act_fn(mlp.hook_pre(x @ mlp.W_in + mlp.b_in))
    post = mlp.hook_post(post + mlp.b_in if isinstance(mlp, GatedMLP) else post)
    out = post @ mlp.W_out + mlp.b_out
    for hook in mlp._forward_hooks.values():  # as Module.__call__ runs them (the adapters)
        result = hook(mlp, (x,), out)
        out = out if result is None else result
    return out


class _FrozenLinear(torch.autograd.Function):
    """``x @ weight_of() + bias`` for a frozen weight that has to be built (reshaped) first:
    the built weight is dropped after the forward and built again in backward, where
    ``F.linear`` would keep it for the whole backward pass."""

    @staticmethod
    def forward(ctx, x: Tensor, weight_of: Callable[[], Tensor], bias: Tensor) -> Tensor:
        ctx.weight_of = weight_of
        weight = weight_of()
        return x @ weight.to(x.dtype) + bias.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight = ctx.weight_of()
        return grad @ weight.to(grad.dtype).T, None, None


class _SiluTimesUp(torch.autograd.Function):
    """``silu(gate) * up``, keeping only ``gate`` and ``up`` (autograd would also keep
    ``silu(gate)``)."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor) -> Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        silu = gate * sig
        d_gate = grad * up * (sig + silu * (1 - sig))
        return d_gate, grad * silu
