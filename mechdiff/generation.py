"""Batched, masked, KV-cached generation on a ``HookedTransformer``, with hooks and logit processors.

Every behavioural measurement in mechdiff goes through :func:`generate`. Prompts of different
lengths are left-padded with an explicit attention mask (TransformerLens builds none for token
tensors without a tokenizer, so padding would leak into attention otherwise), and TransformerLens
offsets rotary positions by that mask, so a padded row yields exactly what it yields alone.

Forward hooks given in ``fwd_hooks`` stay active for the whole generation. With the KV cache, the
prompt is one forward and every later forward sees only the newest position: a hook that ablates
or steers features is applied once to every position, as in a plain forward.

Example:
    >>> from mechdiff.models import load_pair
    >>> pair = load_pair("organism")
    >>> prompt = pair.tokenizer("<bos> A 3 2 1 B 4 5 6 C 7 8 9 =")["input_ids"]
    >>> out = generate(pair.base, [prompt], max_new_tokens=8, eos_token_id=pair.tokenizer.eos_token_id)
    >>> len(out[0]) <= 8
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
from transformer_lens.hook_points import HookPoint

from mechdiff.padding import pad

LogitProcessor = Callable[[Float[Tensor, "batch vocab"], Int[Tensor, "batch done"]], Float[Tensor, "batch vocab"]]


def ban_tokens(token_ids: Sequence[int]) -> LogitProcessor:
    """A logit processor that makes ``token_ids`` impossible (e.g. ban "wait")."""
    ids = torch.tensor(list(token_ids), dtype=torch.long)

    def process(logits, generated):
        logits = logits.clone()
        logits[:, ids.to(logits.device)] = float("-inf")
        return logits

    return process


def check_context(model: HookedTransformer, prompt_len: int, max_new_tokens: int) -> None:
    """Rotary tables end at ``n_ctx``: refuse work that would run past them, saying by how much."""
    need = prompt_len + max_new_tokens
    if need > model.cfg.n_ctx:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {need} exceeds the "
            f"model's context n_ctx={model.cfg.n_ctx}; shorten the prompt or lower max_new_tokens"
        )


@torch.no_grad()
def _generate_batch(model, prompts, max_new_tokens, eos, pad_id, temperature, processors, gen, weights):
    tokens, mask = pad(prompts, pad_id, side="left")
    device = model.cfg.device
    tokens, mask = tokens.to(device), mask.to(device)
    if weights is not None:
        decoder = StaticCacheDecoder(model, tokens, mask, max_new_tokens, weights)
        logits, advance = decoder.prefill(), decoder.step
    else:  # TransformerLens' own cached forward: concatenating cache, mask and rotary rebuilt per step
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, len(prompts))
        logits = model(tokens, attention_mask=mask.long(), past_kv_cache=cache)[:, -1]
        step_mask = torch.ones((len(prompts), 1), dtype=torch.long, device=device)

        def advance(nxt):
            return model(nxt[:, None], attention_mask=step_mask, past_kv_cache=cache)[:, -1]

    out = torch.full((len(prompts), max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        logits = logits.float()
        for process in processors:
            logits = process(logits, out[:, :t])
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(1).to(device)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[:, t] = nxt
        if eos is not None:
            done |= nxt == eos
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        logits = advance(nxt)
    return [_trim(row, eos) for row in out[:, : t + 1].tolist()]


def _trim(row: list[int], eos: int | None) -> list[int]:
    """Cut after the first eos (kept), dropping the padding that follows a finished row."""
    if eos is not None and eos in row:
        return row[: row.index(eos) + 1]
    return row


def plan_batches(
    model: HookedTransformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    eos_token_id: int | None,
    pad_token_id: int | None,
    batch_size: int,
) -> tuple[int | None, int, list[list[int]]]:
    """What every generation loop checks and decides first: refuse empty prompts and prompts that
    overrun the context, default eos and pad to the model's tokenizer's, and group the prompts by
    length into batches (indices into ``prompts``) so little is padded."""
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (a BOS at least)")
    check_context(model, max(map(len, prompts)), max_new_tokens)
    tok = model.tokenizer
    eos = eos_token_id if eos_token_id is not None else getattr(tok, "eos_token_id", None)
    pad_id = pad_token_id if pad_token_id is not None else (getattr(tok, "pad_token_id", None) or 0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return eos, pad_id, [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def generate(
    model: HookedTransformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    temperature: float = 0.0,
    seed: int = 0,
    logit_processors: Sequence[LogitProcessor] = (),
    fwd_hooks: Sequence[tuple] = (),
    batch_size: int = 64,
    progress: bool = False,
    fast: bool = True,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids); returns the new tokens per prompt, in order.

    Greedy when ``temperature == 0``; otherwise sampling, repeatable for a given ``seed``. Rows stop
    at ``eos_token_id`` (kept in the output). Prompts are grouped by length to limit padding.
    ``fast`` decodes with :class:`StaticCacheDecoder` where :func:`fast_path_refusal` allows it
    (same tokens; hooks fire alike), else with TransformerLens' own cached forward.
    """
    if not prompts:
        return []
    eos, pad_id, chunks = plan_batches(model, prompts, max_new_tokens, eos_token_id, pad_token_id, batch_size)
    gen = torch.Generator().manual_seed(seed)
    results: list[list[int]] = [[] for _ in prompts]
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        fast = (
            fast
            and fast_path_refusal(model) is None
            and all(len(block.attn.rotary_cos) >= max(map(len, prompts)) + max_new_tokens for block in model.blocks)
        )
        with torch.no_grad():
            weights = DecoderWeights(model) if fast else None
        for chunk in tqdm(chunks, desc="generate", disable=not progress, leave=False):
            outs = _generate_batch(
                model,
                [list(prompts[i]) for i in chunk],
                max_new_tokens,
                eos,
                pad_id,
                temperature,
                list(logit_processors),
                gen,
                weights,
            )
            for i, row in zip(chunk, outs):
                results[i] = row
    return results


# ----------------------------------------------------------------------------- the fast decoder

_BLOCK_POINTS = (
    "hook_resid_pre",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_rot_q",
    "attn.hook_rot_k",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_pre_linear",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
_TOP_POINTS = ("hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out")


def _fire(point, x: Tensor) -> Tensor:
    """A HookPoint's hooks on ``x`` (skipping the module call when nothing is attached)."""
    return point(x) if point._forward_hooks else x


def fast_path_refusal(model: HookedTransformer) -> str | None:
    """Why :class:`StaticCacheDecoder` cannot run ``model`` with its current hooks (None: it can).

    It covers Qwen2/Llama-style models (RMSNorm, rotary, gated SiLU MLP, grouped-query attention)
    with hooks on the named hook points it calls, and plain forward hooks on ``block.mlp`` (the
    transcoder adapters). Anything else (a pre-hook on an attention module, as LoRA adds, a hook on
    a hook point it does not call) makes :func:`generate` use TransformerLens' own cached forward.
    """
    cfg = model.cfg
    flags = {
        "RMS normalization": cfg.normalization_type == "RMS",
        "rotary positions": cfg.positional_embedding_type == "rotary",
        "gated SiLU MLP": cfg.gated_mlp and cfg.act_fn == "silu",
        "plain attention inputs": not (
            cfg.use_attn_result
            or cfg.use_split_qkv_input
            or cfg.use_attn_in
            or cfg.use_hook_mlp_in
            or cfg.use_hook_tokens
        ),
        "pre-norm sequential blocks": not (
            cfg.parallel_attn_mlp
            or cfg.use_normalization_before_and_after
            or cfg.original_architecture not in ("Qwen2ForCausalLM", "LlamaForCausalLM")
        ),
        "no soft caps, QK norm or dynamic rotary": not (
            cfg.attn_scores_soft_cap > 0
            or cfg.output_logits_soft_cap > 0
            or cfg.use_qk_norm
            or cfg.use_dynamic_ntk_rope
            or cfg.use_logn_attn
            or cfg.rotary_adjacent_pairs
        ),
        "rotary over the whole head": cfg.rotary_dim == cfg.d_head,
        "one device": cfg.n_devices == 1,
    }
    missing = [name for name, ok in flags.items() if not ok]
    if missing:
        return "needs " + ", ".join(missing)
    if torch.nn.modules.module._global_forward_hooks or torch.nn.modules.module._global_forward_pre_hooks:
        return "global module hooks are set"
    points = {f"blocks.{i}.{p}" for i in range(cfg.n_layers) for p in _BLOCK_POINTS} | set(_TOP_POINTS)
    for name, module in model.named_modules():
        if isinstance(module, HookPoint):
            if module._forward_hooks and name in model.hook_dict and name not in points and not _inside_addon(name):
                return f"a hook on {name}, which the fast path does not run"
            continue
        is_mlp = name.endswith(".mlp") and name.count(".") == 2
        if module is model and _only_position_trackers(model):
            continue  # the decoder feeds them the positions of each step itself
        if (
            module._forward_pre_hooks
            or (module._forward_hooks and not is_mlp)
            or module._forward_hooks_with_kwargs
            or getattr(module, "_forward_hooks_always_called", None)
        ):
            return f"a module hook on {name or 'the model'}"
    return None


def _position_trackers(model: HookedTransformer) -> list:
    """Model-level hooks that only record each forward's token positions (objects with a
    ``record_positions`` method: :class:`mechdiff.adapters.edits.PositionTracker`)."""
    owners = [getattr(h, "__self__", h) for h in (*model._forward_pre_hooks.values(), *model._forward_hooks.values())]
    return list({id(o): o for o in owners if hasattr(o, "record_positions")}.values())


def _only_position_trackers(model: HookedTransformer) -> bool:
    hooks = (*model._forward_pre_hooks.values(), *model._forward_hooks.values())
    return all(hasattr(getattr(h, "__self__", h), "record_positions") for h in hooks)


def _inside_addon(name: str) -> bool:
    """Hook points of modules mechdiff attaches to a block (adapters, LoRA): they fire from module hooks."""
    parts = name.split(".")
    return len(parts) > 3 and parts[0] == "blocks" and parts[2] not in ("attn", "mlp", "ln1", "ln2")


def _bias(b: Tensor) -> Tensor | None:
    """None for an all-zero bias (adding it changes no value; skipping it saves a pass)."""
    return None if not b.any() else b


class DecoderWeights:
    """A model's weights as :class:`StaticCacheDecoder` reads them, built once per :func:`generate`
    call and shared by its batches.

    Only the query, key and value weights are copied (into one ``[d_model, q + k + v]`` matrix, a
    few percent of the model). Everything else is TransformerLens' own ``[in, out]`` tensor, read
    as ``x @ W`` without a copy: laying the MLP and unembedding out again cost a quarter of a
    second per call on SmolLM2, and the unembedding's GEMV at batch 1 runs faster from ``[d_model,
    vocab]`` than from its transpose (4.6 against 7.9 ms on one CPU thread).
    """

    def __init__(self, model: HookedTransformer):
        self.layers = [self._layout(block) for block in model.blocks]
        first = model.blocks[0].attn
        self.shared_rotary = all(
            torch.equal(b.attn.rotary_cos, first.rotary_cos) and torch.equal(b.attn.rotary_sin, first.rotary_sin)
            for b in model.blocks
        )
        self.W_U, self.b_U = model.W_U, _bias(model.b_U)

    @staticmethod
    def _layout(block) -> dict[str, Tensor]:
        attn, mlp = block.attn, block.mlp
        h, d_head = attn.W_Q.shape[0], attn.W_Q.shape[2]
        W_K = attn._W_K if hasattr(attn, "_W_K") else attn.W_K
        W_V = attn._W_V if hasattr(attn, "_W_V") else attn.W_V
        b_K = attn._b_K if hasattr(attn, "_b_K") else attn.b_K
        b_V = attn._b_V if hasattr(attn, "_b_V") else attn.b_V
        w = torch.cat([W.permute(1, 0, 2).reshape(W.shape[1], -1) for W in (attn.W_Q, W_K, W_V)], dim=1)
        return {
            "qkv": w,
            "b_qkv": _bias(torch.cat([attn.b_Q.flatten(), b_K.flatten(), b_V.flatten()])),
            "W_O": attn.W_O.reshape(h * d_head, -1),
            "b_O": _bias(attn.b_O),
            "W_gate": mlp.W_gate,
            "W_in": mlp.W_in,
            "W_out": mlp.W_out,
            "b_in": _bias(mlp.b_in),
            "b_out": _bias(mlp.b_out),
            "split": (h * d_head, W_K.shape[0] * d_head, W_V.shape[0] * d_head),
        }


def _matmul(x: Tensor, W: Tensor, b: Tensor | None) -> Tensor:
    """``x @ W (+ b)`` for ``W`` laid out ``[in, out]``."""
    return x @ W if b is None else torch.addmm(b, x.reshape(-1, x.shape[-1]), W).view(*x.shape[:-1], W.shape[1])


class StaticCacheDecoder:
    """One token per row per step on a ``HookedTransformer`` with a preallocated KV cache.

    The prompt (all positions at once, causal and padding masks) and then each new token run the
    same computation as TransformerLens' forward, keys and values written into a cache of
    ``[batch, kv_heads, prompt + new, d_head]`` per layer, the weights read in place (only QKV is
    fused, once per call: TransformerLens transposes and copies weights in every forward), rotary
    tables indexed by each row's position, attention over the filled part of the cache under the
    padding mask, and each named hook point called only when something is attached
    (in the same order and with the same shapes as in TransformerLens, so hooks can read and edit).
    Forward hooks on ``block.mlp`` (the transcoder adapters) run as the module call would run them.

    Example:
        Not run as a doctest: it needs a model, prompt tokens and mask from the caller (the
        generation tests check it against TransformerLens).
        >>> decoder = StaticCacheDecoder(pair.target, tokens, mask, max_new_tokens=8)  # doctest: +SKIP
        >>> logits = decoder.prefill()  # doctest: +SKIP
        >>> logits = decoder.step(logits.argmax(-1))  # doctest: +SKIP
    """

    def __init__(
        self,
        model: HookedTransformer,
        tokens: Int[Tensor, "batch pos"],
        mask: Bool[Tensor, "batch pos"],
        max_new_tokens: int,
        weights: DecoderWeights | None = None,
    ):
        cfg = self.cfg = model.cfg
        self.model, self.tokens = model, tokens
        batch, width = tokens.shape
        self.length = 0  # filled cache positions
        self.mask = torch.zeros(batch, width + max_new_tokens, dtype=torch.bool, device=tokens.device)
        self.mask[:, :width] = mask
        self.position = mask.long().sum(1)  # the next token's rotary position, per row
        kv = cfg.n_key_value_heads or cfg.n_heads
        shape = (batch, kv, width + max_new_tokens, cfg.d_head)
        self.keys = [torch.zeros(shape, dtype=cfg.dtype, device=tokens.device) for _ in model.blocks]
        self.values = [torch.zeros(shape, dtype=cfg.dtype, device=tokens.device) for _ in model.blocks]
        weights = weights or DecoderWeights(model)
        self.weights = weights
        self.trackers = _position_trackers(model)  # fed each step's absolute positions (feature edits)

    def _logits(self, x: Tensor) -> Tensor:
        unembed = self.model.unembed
        x = _fire(unembed.hook_in, x)
        return _fire(unembed.hook_out, _matmul(x, self.weights.W_U, self.weights.b_U))[:, -1]

    def _norm(self, ln, x: Tensor) -> Tensor:
        if self.cfg.dtype not in (torch.float32, torch.float64):
            x = x.to(torch.float32)
        scale = _fire(ln.hook_scale, (x.pow(2).mean(-1, keepdim=True) + ln.eps).sqrt())
        return _fire(ln.hook_normalized, x / scale).to(self.cfg.dtype) * ln.w

    def _rotary(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin

    def prefill(self) -> Float[Tensor, "batch vocab"]:
        """Run the prompt (every position at once, as TransformerLens would); the logits after it."""
        real = self.mask[:, : self.tokens.shape[1]]
        positions = real.long().cumsum(1) - 1
        return self._tracked(self.tokens, positions.clamp(min=0), torch.where(real, positions, -1))

    def step(self, nxt: Int[Tensor, " batch"]) -> Float[Tensor, "batch vocab"]:
        """Append one token per row; the logits that follow it."""
        self.mask[:, self.length] = True
        logits = self._tracked(nxt[:, None], self.position[:, None], self.position[:, None])
        self.position = self.position + 1
        return logits

    def _tracked(self, tokens, rotary_positions, absolute) -> Tensor:
        """:meth:`_forward` with the model's position trackers told the absolute positions (-1: padding)."""
        for tracker in self.trackers:
            tracker.record_positions(absolute)
        try:
            return self._forward(tokens, rotary_positions)
        finally:
            for tracker in self.trackers:
                tracker.record_positions(None)

    def _forward(self, tokens: Int[Tensor, "batch q"], positions: Int[Tensor, "batch q"]) -> Tensor:
        model, t, q = self.model, self.length, tokens.shape[1]
        resid = _fire(model.hook_embed, model.embed.W_E[tokens])
        allowed = self.mask[:, None, None, : t + q]  # padding; causal order within the new positions
        if q > 1:
            allowed = allowed & (
                torch.arange(t + q, device=tokens.device) <= t + torch.arange(q, device=tokens.device)[:, None]
            )
        tables = None
        for block, w, keys, values in zip(model.blocks, self.weights.layers, self.keys, self.values, strict=True):
            if tables is None or not self.weights.shared_rotary:  # one lookup per call when the layers share tables
                tables = (block.attn.rotary_cos[positions][:, :, None], block.attn.rotary_sin[positions][:, :, None])
            resid = self._block(block, w, keys, values, resid, t, tables, allowed)
        self.length += q
        return self._logits(self._norm(model.ln_final, resid)[:, -1:])

    def _block(self, block, w, keys, values, resid, t, tables, allowed):
        attn, (batch, q), d_head = block.attn, resid.shape[:2], self.cfg.d_head
        resid = _fire(block.hook_resid_pre, resid)
        x = self._norm(block.ln1, resid)
        q_width, k_width, _ = w["split"]
        n_q = q_width // d_head
        qkv = _matmul(x, w["qkv"], w["b_qkv"])
        qk = qkv[..., : q_width + k_width].view(batch, q, -1, d_head)
        v = _fire(attn.hook_v, qkv[..., q_width + k_width :].view(batch, q, -1, d_head))
        if attn.hook_q._forward_hooks or attn.hook_k._forward_hooks:
            qk = torch.cat([_fire(attn.hook_q, qk[:, :, :n_q]), _fire(attn.hook_k, qk[:, :, n_q:])], dim=2)
        qk = self._rotary(qk, *tables)  # queries and keys in one go
        queries, k = _fire(attn.hook_rot_q, qk[:, :, :n_q]), _fire(attn.hook_rot_k, qk[:, :, n_q:])
        keys[:, :, t : t + q] = k.transpose(1, 2)
        values[:, :, t : t + q] = v.transpose(1, 2)
        end, n_kv, n_q = t + q, keys.shape[1], queries.shape[2]
        queries = queries.transpose(1, 2)  # batch head q d_head
        if attn.hook_attn_scores._forward_hooks or attn.hook_pattern._forward_hooks:
            grouped = queries.reshape(batch, n_kv, n_q // n_kv, q, d_head)  # query head j reads key head j // group
            scores = (grouped @ keys[:, :, None, :end].transpose(-1, -2) / attn.attn_scale).view(batch, n_q, q, end)
            scores = _fire(attn.hook_attn_scores, scores.masked_fill(~allowed, float("-inf")))
            pattern = scores.softmax(-1)
            pattern = _fire(attn.hook_pattern, torch.where(torch.isnan(pattern), 0.0, pattern))  # as TransformerLens
            grouped = pattern.view(batch, n_kv, n_q // n_kv, q, end).to(values.dtype)
            z = (grouped @ values[:, :, None, :end]).view(batch, n_q, q, d_head)
        else:  # nothing reads the pattern: one fused kernel
            if q > 1:  # a padding query sees no key: let it see itself, then zero its output as TransformerLens does
                own = torch.arange(end, device=allowed.device) == t + torch.arange(q, device=allowed.device)[:, None]
                allowed = allowed | own
            z = F.scaled_dot_product_attention(
                queries,
                keys[:, :, :end],
                values[:, :, :end],
                attn_mask=allowed,
                scale=1 / attn.attn_scale,
                enable_gqa=n_kv != n_q,
            )
            if q > 1:
                z = z * self.mask[:, None, t:end, None]
        z = _fire(attn.hook_z, z.transpose(1, 2))
        attn_out = _fire(block.hook_attn_out, _matmul(z.reshape(batch, q, -1), w["W_O"], w["b_O"]))
        resid_mid = _fire(block.hook_resid_mid, resid + attn_out)
        mlp_out = self._mlp(block.mlp, w, self._norm(block.ln2, resid_mid))
        return _fire(block.hook_resid_post, resid_mid + _fire(block.hook_mlp_out, mlp_out))

    @staticmethod
    def _mlp(mlp, w, x):
        pre, pre_linear = x @ w["W_gate"], x @ w["W_in"]
        if not mlp.hook_pre._forward_hooks and mlp.act_fn is F.silu:  # no one holds `pre`: reuse it
            post = F.silu(pre, inplace=True)
        else:
            post = mlp.act_fn(_fire(mlp.hook_pre, pre))
        post = post.mul_(_fire(mlp.hook_pre_linear, pre_linear))  # the activation is ours to overwrite
        post = _fire(mlp.hook_post, post if w["b_in"] is None else post.add_(w["b_in"]))
        out = _matmul(post, w["W_out"], w["b_out"])
        for hook in mlp._forward_hooks.values():  # as Module.__call__ runs them (adapters)
            result = hook(mlp, (x,), out)
            out = out if result is None else result
        return out
