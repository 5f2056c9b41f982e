"""Non-trivial adapters (and a tiny adapted model) for tests, examples and benchmarks.

Freshly initialised adapters have ``W_dec = 0``: every feature edge would be zero. These helpers
give an adapted model sparse firing features with random decoders, from a fixed seed, so the
attribution code can be exercised without trained (shipped) adapter weights.

Example:
    >>> adapted = tiny_adapted(seed=0)
    >>> adapted.config.d_sae, adapted.model.cfg.n_layers
    (48, 2)
"""

from __future__ import annotations

import torch
from jaxtyping import Int
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import Tensor
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from mechdiff.adapters.transcoder import AdaptedModel, AdapterConfig
from mechdiff.models import hooked_from_hf

TINY_SPECIALS = ["<unk>", "<pad>", "<bos>", "<eos>"]


@torch.no_grad()
def randomize_adapters(
    adapted: AdaptedModel,
    seed: int = 0,
    density: float = 0.08,
    tokens: Int[Tensor, "batch pos"] | None = None,
    dec_norm: float = 0.5,
) -> AdaptedModel:
    """Give every adapter random decoder rows (norm ``dec_norm``), a small random ``b_dec``, and
    an encoder bias that makes each feature fire on about ``density`` of the tokens of ``tokens``
    (random ids when not given). Changes ``adapted`` in place and returns it.

    Example:
        >>> adapted = randomize_adapters(tiny_adapted(seed=1), seed=3, density=0.2)
    """
    gen = torch.Generator().manual_seed(seed)
    cfg = adapted.model.cfg
    if tokens is None:
        tokens = torch.randint(4 if cfg.d_vocab > 8 else 0, cfg.d_vocab, (8, min(cfg.n_ctx, 32)), generator=gen)
        tokens[:, 0] = getattr(adapted.model.tokenizer, "bos_token_id", None) or 0
    for layer, adapter in enumerate(adapted.adapters):  # layer by layer: inputs depend on earlier
        _, cache = adapted.model.run_with_cache(tokens, names_filter=f"blocks.{layer}.adapter.hook_pre")
        pre = cache[f"blocks.{layer}.adapter.hook_pre"][:, 1:].flatten(0, 1) - adapter.b_enc
        threshold = torch.quantile(pre.float(), 1.0 - density, dim=0).to(pre.dtype)
        adapter.b_enc.copy_(-threshold)
        dec = torch.randn(adapter.W_dec.shape, generator=gen, dtype=torch.float64)
        adapter.W_dec.copy_(dec / dec.norm(dim=-1, keepdim=True) * dec_norm)
        adapter.b_dec.copy_(0.05 * torch.randn(adapter.b_dec.shape, generator=gen, dtype=torch.float64))
    return adapted


def tiny_tokenizer(n_words: int) -> PreTrainedTokenizerFast:
    """WordLevel tokenizer: ``<unk> <pad> <bos> <eos>`` then ``w0 w1 ...``."""
    vocab = {t: i for i, t in enumerate(TINY_SPECIALS + [f"w{i}" for i in range(n_words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )


def tiny_adapted(
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    n_layers: int = 2,
    d_model: int = 32,
    d_mlp: int = 64,
    d_sae: int = 48,
    vocab: int = 32,
    density: float = 0.15,
    dec_norm: float = 4.0,
    n_ctx: int = 64,
) -> AdaptedModel:
    """A random tiny Qwen2 (RMSNorm, rotary, GQA with q/k/v biases, gated SiLU MLP) with
    :func:`randomize_adapters` adapters; float64 by default, for exactness tests.

    Example:
        >>> tiny_adapted(seed=0).model.cfg.d_model
        32
    """
    torch.manual_seed(seed)
    hf = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=vocab,
            hidden_size=d_model,
            intermediate_size=d_mlp,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=n_ctx,
            tie_word_embeddings=False,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=1,
        )
    ).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "embed_tokens" in name or "lm_head" in name:
                p.normal_(0, 1.0)
    model = hooked_from_hf(hf, tiny_tokenizer(vocab - len(TINY_SPECIALS)), dtype=dtype, device="cpu")
    config = AdapterConfig(d_model=d_model, d_sae=d_sae, n_layers=n_layers, base_name="tiny", target_name="tiny")
    adapted = AdaptedModel(model, config).to(dtype)
    return randomize_adapters(adapted, seed=seed, density=density, dec_norm=dec_norm)
