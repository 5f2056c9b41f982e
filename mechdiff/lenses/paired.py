"""Greedy generation in which one model's forward is edited from a second model's activations.

Some lenses cannot edit a model from its own activations alone: a crosscoder's latents are read
from the base *and* the target at the same token, and a SAE on the whole LoRA state needs every
layer's LoRA activations before it can edit the first. :func:`paired_generate` therefore runs a
*reader* (the base; or the unedited model itself) beside the generating *model*, each with its own
KV cache, over the same tokens: at every forward (the prompt, then each new token) the reader goes
first, its activations at ``reader_names`` for those positions are handed to ``edit_hooks``, and
the hooks it returns run during the model's forward. Greedy; rows stop at ``eos``.

The reader may be the model object itself (its forward runs without the edit hooks and with its
own cache): then the edit at a token uses the unedited model's activations on the same prefix.

Example:
    >>> from mechdiff.models import load_pair
    >>> from mechdiff.organism import corpus
    >>> pair = load_pair("organism")
    >>> prompts = corpus.problems(2, "test")["input_ids"]
    >>> keep = lambda acts: []  # no edit: the target's own greedy replies
    >>> rows = paired_generate(pair.target, pair.base, prompts, 96, keep, reader_names=["blocks.1.hook_resid_post"])
    >>> from mechdiff.generation import generate
    >>> rows == generate(pair.target, prompts, 96)
    True
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from mechdiff.generation import plan_batches
from mechdiff.padding import pad

EditHooks = Callable[[dict[str, Tensor]], list[tuple[str, Callable]]]


@torch.no_grad()
def paired_generate(
    model: HookedTransformer,
    reader: HookedTransformer,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    edit_hooks: EditHooks,
    *,
    reader_names: Sequence[str],
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    batch_size: int = 128,
    progress: bool = False,
) -> list[list[int]]:
    """New tokens per prompt (eos kept), in order; ``edit_hooks(reader_acts)`` gives the model's
    hooks for each forward, ``reader_acts[name]`` being ``[batch new_pos ...]``. ``eos_token_id``
    and ``pad_token_id`` default to the model's tokenizer's, as in :func:`mechdiff.generation.generate`."""
    if not prompts:
        return []
    eos, pad_id, chunks = plan_batches(model, prompts, max_new_tokens, eos_token_id, pad_token_id, batch_size)
    names = set(reader_names)
    out: list[list[int]] = [[] for _ in prompts]
    for chunk in tqdm(chunks, desc="paired generate", disable=not progress, leave=False):
        rows = _paired_batch(
            model, reader, [list(prompts[i]) for i in chunk], max_new_tokens, edit_hooks, names, eos, pad_id
        )
        for i, row in zip(chunk, rows):
            out[i] = row
    return out


def _paired_batch(model, reader, prompts, max_new_tokens, edit_hooks, names, eos, pad_id) -> list[list[int]]:
    device = model.cfg.device
    tokens, mask = pad(prompts, pad_id, side="left")
    tokens, mask = tokens.to(device), mask.long().to(device)
    caches = [TransformerLensKeyValueCache.init_cache(m.cfg, device, len(prompts)) for m in (reader, model)]

    def forward(tok, m):
        _, acts = reader.run_with_cache(
            tok, attention_mask=m, past_kv_cache=caches[0], names_filter=lambda n: n in names
        )
        with model.hooks(fwd_hooks=edit_hooks({n: acts[n] for n in names})):
            return model(tok, attention_mask=m, past_kv_cache=caches[1])[:, -1].float()

    logits = forward(tokens, mask)
    new = torch.full((len(prompts), max_new_tokens), pad_id, dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    for t in range(max_new_tokens):
        nxt = torch.where(done, torch.full_like(done, pad_id, dtype=torch.long), logits.argmax(-1))
        new[:, t] = nxt
        if eos is not None:
            done |= nxt == eos
        if bool(done.all()) or t == max_new_tokens - 1:
            break
        logits = forward(nxt[:, None], torch.ones((len(prompts), 1), dtype=torch.long, device=device))
    rows = new[:, : t + 1].tolist()
    return [row[: row.index(eos) + 1] if eos is not None and eos in row else row for row in rows]
