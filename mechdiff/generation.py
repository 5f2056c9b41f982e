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
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

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
            f"model's context n_ctx={model.cfg.n_ctx}; shorten the prompt or lower max_new_tokens")


@torch.no_grad()
def _generate_batch(model, prompts, max_new_tokens, eos, pad_id, temperature, processors, gen):
    tokens, mask = pad(prompts, pad_id, side="left")
    device = model.cfg.device
    tokens, mask = tokens.to(device), mask.to(device)
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, len(prompts))
    logits = model(tokens, attention_mask=mask.long(), past_kv_cache=cache)[:, -1]
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
        step_mask = torch.ones((len(prompts), 1), dtype=torch.long, device=device)
        logits = model(nxt[:, None], attention_mask=step_mask, past_kv_cache=cache)[:, -1]
    return [_trim(row, eos) for row in out[:, : t + 1].tolist()]


def _trim(row: list[int], eos: int | None) -> list[int]:
    """Cut after the first eos (kept), dropping the padding that follows a finished row."""
    if eos is not None and eos in row:
        return row[: row.index(eos) + 1]
    return row


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
) -> list[list[int]]:
    """Continue each prompt (a list of token ids); returns the new tokens per prompt, in order.

    Greedy when ``temperature == 0``; otherwise sampling, repeatable for a given ``seed``. Rows stop
    at ``eos_token_id`` (kept in the output). Prompts are grouped by length to limit padding.
    """
    if not prompts:
        return []
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (a BOS at least)")
    check_context(model, max(map(len, prompts)), max_new_tokens)
    tok = model.tokenizer
    eos = eos_token_id if eos_token_id is not None else getattr(tok, "eos_token_id", None)
    pad_id = pad_token_id if pad_token_id is not None else (getattr(tok, "pad_token_id", None) or 0)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    gen = torch.Generator().manual_seed(seed)
    results: list[list[int]] = [[] for _ in prompts]
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        for chunk in tqdm(chunks, desc="generate", disable=not progress, leave=False):
            outs = _generate_batch(model, [list(prompts[i]) for i in chunk], max_new_tokens, eos,
                                   pad_id, temperature, list(logit_processors), gen)
            for i, row in zip(chunk, outs):
                results[i] = row
    return results
