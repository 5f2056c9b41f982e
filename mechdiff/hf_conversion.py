"""Convert between Hugging Face Qwen2/Llama causal LMs and unprocessed TransformerLens models.

Configs and state dicts, both ways, and the HF model written from a ``HookedTransformer``.
Building the ``HookedTransformer`` itself is :mod:`mechdiff.models`' job (:func:`~mechdiff.models.load_hooked`,
:func:`~mechdiff.models.hooked_from_hf`), which calls the functions here; this module constructs no
``HookedTransformer`` and imports nothing else from mechdiff.

Supported: Qwen2ForCausalLM and LlamaForCausalLM (no o_proj/MLP biases, rotary scaling "default" or
"llama3"). Weights are unprocessed both ways (no folded layer norms, no centring).

Example:
    >>> from transformers import Qwen2Config, Qwen2ForCausalLM
    >>> hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=128,
    ...     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    >>> cfg = to_hooked_config(with_architecture(hf), device="cpu")
    >>> cfg.n_layers, cfg.n_key_value_heads, sorted(to_hooked_state_dict(hf, cfg))[:2]
    (2, 2, ['blocks.0.attn.W_O', 'blocks.0.attn.W_Q'])
"""

from __future__ import annotations

import einops
import torch
import transformers
from jaxtyping import Float
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformer_lens.pretrained.weight_conversions import (
    convert_llama_weights,
    convert_qwen2_weights,
)
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase
from transformers.initialization import no_init_weights  # transformers-internal; pinned <6

SUPPORTED_ARCHITECTURES = ("Qwen2ForCausalLM", "LlamaForCausalLM")
_CONVERTERS = {"Qwen2ForCausalLM": convert_qwen2_weights, "LlamaForCausalLM": convert_llama_weights}
_HF_CONFIGS = {"Qwen2ForCausalLM": "Qwen2Config", "LlamaForCausalLM": "LlamaConfig"}


def with_architecture(hf_model: transformers.PreTrainedModel) -> transformers.PretrainedConfig:
    """The model's config, with ``architectures`` filled in from its class where it is missing
    (in-memory models built from a bare config have ``architectures=None``)."""
    if not getattr(hf_model.config, "architectures", None):
        hf_model.config.architectures = [type(hf_model).__name__]
    return hf_model.config


def check_supported(hf_config: transformers.PretrainedConfig, what: str) -> None:
    """Raise ValueError (naming ``what``) for a config this module cannot convert faithfully.

    Example:
        >>> from transformers import LlamaConfig
        >>> check_supported(LlamaConfig(architectures=["LlamaForCausalLM"], mlp_bias=True), "demo")
        Traceback (most recent call last):
        ...
        ValueError: demo: Llama with attention_bias/mlp_bias=True is not supported
    """
    arch = (getattr(hf_config, "architectures", None) or ["unknown"])[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{what}: unsupported architecture {arch}; supported: {SUPPORTED_ARCHITECTURES}")
    # TL's Llama converter silently drops these biases, and TL does not model Qwen2 windowing.
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
        raise ValueError(f"{what}: Llama with attention_bias/mlp_bias=True is not supported")
    if getattr(hf_config, "use_sliding_window", False):
        raise ValueError(f"{what}: Qwen2 with use_sliding_window=True is not supported")


def to_hooked_config(
    hf_config: transformers.PretrainedConfig,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
    n_devices: int = 1,
    n_ctx: int | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> HookedTransformerConfig:
    """The ``HookedTransformerConfig`` of an HF Qwen2/Llama config (with ``architectures`` set).

    Built here, not by TL's ``get_pretrained_model_config``: that needs a folder on disk and routes
    by *path name* (a folder whose path contains "llama"/"gemma" is misrouted). ``n_ctx`` defaults to
    the trained context; ``tokenizer`` only decides whether ``to_tokens`` prepends BOS.

    Example:
        >>> from transformers import LlamaConfig
        >>> cfg = to_hooked_config(LlamaConfig(architectures=["LlamaForCausalLM"], hidden_size=64,
        ...     num_attention_heads=4, num_hidden_layers=2, intermediate_size=128), device="cpu")
        >>> cfg.d_head, cfg.n_key_value_heads, cfg.rotary_base
        (16, None, 10000.0)
    """
    arch, n_heads = hf_config.architectures[0], hf_config.num_attention_heads
    n_kv = getattr(hf_config, "num_key_value_heads", None) or n_heads
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    return HookedTransformerConfig(
        model_name=str(getattr(hf_config, "_name_or_path", "") or arch), original_architecture=arch,
        d_model=hf_config.hidden_size, d_head=d_head, n_heads=n_heads,
        d_mlp=hf_config.intermediate_size, n_layers=hf_config.num_hidden_layers,
        d_vocab=hf_config.vocab_size, eps=hf_config.rms_norm_eps, act_fn=hf_config.hidden_act,
        # TL's Qwen2 converter always writes grouped K/V (`_W_K`); Llama's only under GQA.
        n_key_value_heads=n_kv if arch == "Qwen2ForCausalLM" or n_kv != n_heads else None,
        # TL 3.9 builds the causal mask per forward and grows the rotary cache lazily, so
        # the full trained context costs no memory up front: no cap needed.
        n_ctx=n_ctx or hf_config.max_position_embeddings,
        normalization_type="RMS", final_rms=True, gated_mlp=True, use_attn_scale=True,
        positional_embedding_type="rotary", rotary_dim=d_head, rotary_adjacent_pairs=False,
        initializer_range=getattr(hf_config, "initializer_range", 0.02),
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        # to_tokens prepends BOS only if there is one (Qwen2 hub tokenizers have none).
        default_prepend_bos=tokenizer is not None and tokenizer.bos_token is not None,
        init_weights=False, dtype=dtype, device=device, n_devices=n_devices,
        **_rope_fields(hf_config),
    )  # fmt: skip


def to_hooked_state_dict(
    hf_model: transformers.PreTrainedModel, cfg: HookedTransformerConfig
) -> dict[str, Float[torch.Tensor, "..."]]:
    """HF weights under TL's names and shapes (TL's own converter for the architecture)."""
    return _CONVERTERS[cfg.original_architecture](hf_model, cfg)


def hooked_to_hf(model: HookedTransformer) -> transformers.PreTrainedModel:
    """Convert an unprocessed Qwen2/Llama HookedTransformer back to an HF model (on CPU).

    Raises ValueError for non-zero biases HF has no slot for (attention output,
    MLP, unembedding; q/k/v too for Llama). Embeddings are tied iff W_U == W_E.T.

    Example:
        >>> from transformers import LlamaConfig, LlamaForCausalLM
        >>> from mechdiff.models import hooked_from_hf
        >>> hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64,
        ...     intermediate_size=128, num_hidden_layers=2, num_attention_heads=4))
        >>> type(hooked_to_hf(hooked_from_hf(hf, device="cpu"))).__name__
        'LlamaForCausalLM'
    """
    cfg = model.cfg
    if cfg.original_architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"hooked_to_hf supports {SUPPORTED_ARCHITECTURES}, not {cfg.original_architecture}")
    state_dict = to_hf_state_dict(model)
    tied = torch.equal(state_dict["lm_head.weight"], state_dict["model.embed_tokens.weight"])
    with no_init_weights():  # the random init would be overwritten anyway
        hf_model = AutoModelForCausalLM.from_config(to_hf_config(cfg, model.tokenizer, tied), dtype=cfg.dtype)
    # assign=True adopts our fresh CPU copies instead of copying them a second time
    hf_model.load_state_dict(state_dict, strict=True, assign=True)
    if tied:
        hf_model.tie_weights()
    return hf_model.eval()


def to_hf_state_dict(model: HookedTransformer) -> dict[str, Float[torch.Tensor, "..."]]:
    """TL names/shapes -> HF Qwen2/Llama names/shapes (fresh CPU copies): the inverse of TL's converters.

    Raises ValueError for a non-zero bias the HF architecture has no slot for.
    """
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    is_qwen = model.cfg.original_architecture == "Qwen2ForCausalLM"
    no_slot = ("attn.b_O", "mlp.b_in", "mlp.b_out", "unembed.b_U")
    no_slot += () if is_qwen else ("attn.b_Q", "attn.b_K", "attn.b_V", "attn._b_K", "attn._b_V")
    for key in (k for k in sd if k.endswith(no_slot)):
        if sd[key].abs().max() > 0:
            raise ValueError(f"{key} is non-zero, but {model.cfg.original_architecture} has no such bias")
    out = {
        "model.embed_tokens.weight": sd["embed.W_E"],
        "model.norm.weight": sd["ln_final.w"],
        "lm_head.weight": sd["unembed.W_U"].T,
    }
    for layer in range(model.cfg.n_layers):
        tl, hf = f"blocks.{layer}.", f"model.layers.{layer}."
        g = "_" if f"{tl}attn._W_K" in sd else ""  # TL stores grouped (GQA) K/V as `_W_K`, `_W_V`
        for proj, w in (("q", "W_Q"), ("k", f"{g}W_K"), ("v", f"{g}W_V")):
            out[f"{hf}self_attn.{proj}_proj.weight"] = einops.rearrange(sd[tl + "attn." + w], "n m h -> (n h) m")
            if is_qwen:
                bias = sd[tl + "attn." + w.replace("W_", "b_")]
                out[f"{hf}self_attn.{proj}_proj.bias"] = einops.rearrange(bias, "n h -> (n h)")
        out[f"{hf}self_attn.o_proj.weight"] = einops.rearrange(sd[f"{tl}attn.W_O"], "n h m -> m (n h)")
        out[f"{hf}mlp.up_proj.weight"] = sd[f"{tl}mlp.W_in"].T
        out[f"{hf}mlp.gate_proj.weight"] = sd[f"{tl}mlp.W_gate"].T
        out[f"{hf}mlp.down_proj.weight"] = sd[f"{tl}mlp.W_out"].T
        out[f"{hf}input_layernorm.weight"] = sd[f"{tl}ln1.w"]
        out[f"{hf}post_attention_layernorm.weight"] = sd[f"{tl}ln2.w"]
    # Fresh contiguous copies: the HF model adopts them, and must not share TL's storage.
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in out.items()}


def to_hf_config(
    cfg: HookedTransformerConfig, tokenizer: PreTrainedTokenizerBase | None, tied: bool
) -> transformers.PretrainedConfig:
    """The HF Qwen2/Llama config of a TL config: the inverse of :func:`to_hooked_config`.

    Example:
        >>> from transformers import Qwen2Config
        >>> src = Qwen2Config(architectures=["Qwen2ForCausalLM"], hidden_size=64, num_attention_heads=4,
        ...     num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128, vocab_size=64)
        >>> back = to_hf_config(to_hooked_config(src, device="cpu"), None, tied=False)
        >>> type(back).__name__, back.num_key_value_heads, back.head_dim, back.max_position_embeddings
        ('Qwen2Config', 2, 16, 32768)
    """
    rope = {"rope_type": "default", "rope_theta": float(cfg.rotary_base)}
    if cfg.use_NTK_by_parts_rope:
        rope.update(
            rope_type="llama3", factor=cfg.NTK_by_parts_factor,
            low_freq_factor=cfg.NTK_by_parts_low_freq_factor,
            high_freq_factor=cfg.NTK_by_parts_high_freq_factor,
            original_max_position_embeddings=cfg.NTK_original_ctx_len,
        )  # fmt: skip
    ids = {}
    if tokenizer is not None:
        ids = {f"{r}_token_id": getattr(tokenizer, f"{r}_token_id") for r in ("bos", "eos", "pad")}
    return getattr(transformers, _HF_CONFIGS[cfg.original_architecture])(
        vocab_size=cfg.d_vocab, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_key_value_heads or cfg.n_heads, head_dim=cfg.d_head,
        hidden_act=cfg.act_fn, max_position_embeddings=cfg.n_ctx, rms_norm_eps=cfg.eps,
        rope_parameters=rope, tie_word_embeddings=tied, architectures=[cfg.original_architecture],
        **ids,
    )  # fmt: skip


def _rope_fields(hf_config: transformers.PretrainedConfig) -> dict:
    # transformers 5 keeps theta and scaling in `rope_parameters` (`rope_scaling` is an
    # alias); older configs have a top-level `rope_theta`.
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return {"rotary_base": theta}
    if rope_type == "llama3":
        return {
            "rotary_base": theta, "use_NTK_by_parts_rope": True,
            "NTK_original_ctx_len": params["original_max_position_embeddings"],
            "NTK_by_parts_low_freq_factor": params.get("low_freq_factor", 1.0),
            "NTK_by_parts_high_freq_factor": params.get("high_freq_factor", 4.0),
            "NTK_by_parts_factor": params.get("factor", 1.0),
        }  # fmt: skip
    raise ValueError(f"Unsupported rope scaling {rope_type!r}; supported: 'default', 'llama3'")
