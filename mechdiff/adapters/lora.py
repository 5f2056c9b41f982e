"""Rank-r LoRA on q, k, v, o, gate, up and down of every layer of a HookedTransformer, via hooks.

Each adapted projection ``W`` (HF orientation, ``out x in``) becomes ``W + scale * B @ A`` with
``A`` (``r x in``, Kaiming-uniform as in PEFT) and ``B`` (``out x r``, zero), ``scale = alpha /
sqrt(r)`` (rsLoRA, alpha 16) or ``alpha / r``. The base weights are never touched: the LoRA adds
``scale * B (A x)`` to the projection's output through PyTorch hooks on a *copy* of the base model.

========  ===========================================  ====================================
module    input x (true value, norm weight included)   its output is added to
========  ===========================================  ====================================
q, k, v   the attention input ``ln1(resid_pre)``       ``attn.hook_q / hook_k / hook_v``
o         ``attn.hook_z`` flattened to (head d_head)   ``hook_attn_out``
gate, up  the MLP input ``ln2(resid_mid)``             ``mlp.hook_pre`` / ``mlp.hook_pre_linear``
down      ``mlp.hook_post`` (the gated hidden)         ``hook_mlp_out``
========  ===========================================  ====================================

The *LoRA activation* ``A x`` of each adapter is a TransformerLens hook point,
``blocks.{L}.lora.hook_{module}_act`` ``[batch pos rank]``, so caching, ablation and steering are
ordinary hooks; :meth:`LoRAModel.state` returns the whole ``(n_layers, 7)`` state per token.
The adders run before any hook you add on the same point (your ``hook_q`` sees the adapted q) and
the readers of ``hook_z`` / ``hook_post`` run after yours (ablating a neuron at ``hook_post`` is
seen by the down adapter), exactly as in the merged model (:func:`merge`).

Example:
    >>> from mechdiff.models import load_pair
    >>> pair = load_pair("organism")
    >>> lora = LoRAModel.from_base(pair.base, LoRAConfig(rank=1))
    >>> tokens = pair.tokenizer("<bos> A 3 2 1 B 4 5 6 C 7 8 9 =", return_tensors="pt")["input_ids"]
    >>> lora.state(tokens).shape  # batch pos n_layers 7
    torch.Size([1, 14, 3, 7])
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import partial

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

MODULES = ("q", "k", "v", "o", "gate", "up", "down")
ATTENTION_MODULES = ("q", "k", "v", "o")
MLP_MODULES = ("gate", "up", "down")


@dataclass
class LoRAConfig:
    """Rank, scaling and which projections are adapted (saved beside the weights)."""

    rank: int = 1
    alpha: float = 16.0
    rslora: bool = True
    modules: tuple[str, ...] = MODULES
    seed: int = 0

    def __post_init__(self):
        self.modules = tuple(self.modules)
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, not {self.rank}")
        unknown = [m for m in self.modules if m not in MODULES]
        if unknown or not self.modules:
            raise ValueError(f"modules must be a non-empty subset of {MODULES}; got {self.modules}")
        self.modules = tuple(m for m in MODULES if m in self.modules)  # canonical order

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def to_dict(self) -> dict:
        return {**asdict(self), "modules": list(self.modules)}


def module_shapes(cfg) -> dict[str, tuple[int, int]]:
    """``{module: (in_features, out_features)}`` of each projection for a TransformerLens config."""
    n_kv = cfg.n_key_value_heads or cfg.n_heads
    d_attn = cfg.n_heads * cfg.d_head
    return {"q": (cfg.d_model, d_attn), "k": (cfg.d_model, n_kv * cfg.d_head),
            "v": (cfg.d_model, n_kv * cfg.d_head), "o": (d_attn, cfg.d_model),
            "gate": (cfg.d_model, cfg.d_mlp), "up": (cfg.d_model, cfg.d_mlp),
            "down": (cfg.d_mlp, cfg.d_model)}  # fmt: skip


class LoRALayer(nn.Module):
    """One layer's adapters: ``A[m]`` (rank x in), ``B[m]`` (out x rank) and ``hook_{m}_act``."""

    def __init__(self, shapes: dict[str, tuple[int, int]], config: LoRAConfig, d_head: int):
        super().__init__()
        self.modules_, self.scale, self.d_head = config.modules, config.scale, d_head
        self.A = nn.ParameterDict()
        self.B = nn.ParameterDict()
        for m in config.modules:
            d_in, d_out = shapes[m]
            self.A[m] = nn.Parameter(torch.empty(config.rank, d_in))
            nn.init.kaiming_uniform_(self.A[m], a=math.sqrt(5))  # as PEFT's lora_A
            self.B[m] = nn.Parameter(torch.zeros(d_out, config.rank))
        for m in MODULES:  # hook points exist for every module, so names never depend on config
            setattr(self, f"hook_{m}_act", HookPoint())
        self._pending: dict[str, Tensor] = {}
        self._hook_ids: dict[str, int] = {}

    def activation(self, module: str, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... rank"]:
        """``A x`` through the module's hook point."""
        A = self.A[module]
        return getattr(self, f"hook_{module}_act")(x.to(A.dtype) @ A.T)

    def delta(self, module: str, act: Float[Tensor, "... rank"]) -> Float[Tensor, "... d_out"]:
        return self.scale * (act @ self.B[module].T)

    # ---- PyTorch hooks (bound methods, so a deepcopy of the model rebinds them to the copy) ----
    def _attn_pre(self, attn, args, kwargs):
        for m, key in (("q", "query_input"), ("k", "key_input"), ("v", "value_input")):
            if m in self.modules_:
                _order(getattr(attn, f"hook_{m}"), self._hook_ids[m], first=True)
                d = self.delta(m, self.activation(m, kwargs[key]))
                self._pending[m] = d.unflatten(-1, (-1, self.d_head))
        if "o" in self.modules_:
            _order(attn.hook_z, self._hook_ids["o_read"], first=False)
            _order(self._targets["o"], self._hook_ids["o"], first=True)

    def _mlp_pre(self, mlp, args):
        x = args[0]
        for m, hook in (("gate", mlp.hook_pre), ("up", mlp.hook_pre_linear)):
            if m in self.modules_:
                _order(hook, self._hook_ids[m], first=True)
                self._pending[m] = self.delta(m, self.activation(m, x))
        if "down" in self.modules_:
            _order(mlp.hook_post, self._hook_ids["down_read"], first=False)
            _order(self._targets["down"], self._hook_ids["down"], first=True)

    def _read_z(self, hook, inputs, z):
        self._pending["o"] = self.delta("o", self.activation("o", z.flatten(-2)))

    def _read_post(self, hook, inputs, post):
        self._pending["down"] = self.delta("down", self.activation("down", post))

    def _add(self, module: str, hook, inputs, out):
        return out + self._pending.pop(module).to(out.dtype)

    def attach(self, block: nn.Module) -> None:
        """Register this layer's hooks on a TransformerLens block."""
        attn, mlp = block.attn, block.mlp
        targets = {
            "q": attn.hook_q,
            "k": attn.hook_k,
            "v": attn.hook_v,
            "o": block.hook_attn_out,
            "gate": mlp.hook_pre,
            "up": mlp.hook_pre_linear,
            "down": block.hook_mlp_out,
        }
        self.__dict__["_targets"] = targets  # a plain dict: not registered as submodules
        ids = self._hook_ids
        for m in self.modules_:
            ids[m] = targets[m].register_forward_hook(partial(self._add, m)).id
        if "o" in self.modules_:
            ids["o_read"] = attn.hook_z.register_forward_hook(self._read_z).id
        if "down" in self.modules_:
            ids["down_read"] = mlp.hook_post.register_forward_hook(self._read_post).id
        attn.register_forward_pre_hook(self._attn_pre, with_kwargs=True)
        mlp.register_forward_pre_hook(self._mlp_pre)


def _order(module: nn.Module, hook_id: int, first: bool) -> None:
    """Move our hook to the front (adders) or back (readers) of the module's forward hooks."""
    hooks = module._forward_hooks
    if hook_id in hooks:
        hooks.move_to_end(hook_id, last=not first)


class LoRAModel(nn.Module):
    """A copy of a base HookedTransformer with a :class:`LoRALayer` on every block.

    ``model`` runs the adapted network (``model(tokens)``, ``run_with_cache``, ``hooks``...);
    ``layers`` holds the only trainable parameters, so ``layers.state_dict()`` is the adapter.
    Each layer's adapters live on its block's device, in the model's dtype unless ``dtype`` is
    given (float32 adapters on a bfloat16 model: full-precision training, as PEFT's default).
    """

    def __init__(self, model: HookedTransformer, config: LoRAConfig, dtype: torch.dtype | None = None):
        super().__init__()
        if getattr(model.cfg, "original_architecture", None) not in ("Qwen2ForCausalLM", "LlamaForCausalLM"):
            raise ValueError(f"LoRA supports Qwen2/Llama HookedTransformers, not {model.cfg.original_architecture}")
        if not model.cfg.gated_mlp or model.cfg.use_split_qkv_input or model.cfg.use_attn_in:
            raise ValueError("LoRA needs a gated MLP and unsplit q/k/v inputs (the Qwen2/Llama layout)")
        self.config = config
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        torch.manual_seed(config.seed)
        shapes = module_shapes(model.cfg)
        self.layers = nn.ModuleList(LoRALayer(shapes, config, model.cfg.d_head) for _ in model.blocks)
        for block, layer in zip(model.blocks, self.layers, strict=True):
            # Initialised on the CPU in float32 (above), then moved: the same seed gives the same
            # adapters on every device and in every dtype. Per block: models may span devices.
            layer.to(next(block.parameters()).device, dtype or model.cfg.dtype)
            block.lora = layer  # registers blocks.{L}.lora.hook_*_act
            layer.attach(block)
        model.setup()  # rebuild TransformerLens' hook_dict with the new hook points

    @classmethod
    def from_base(
        cls, base: HookedTransformer, config: LoRAConfig | None = None, dtype: torch.dtype | None = None
    ) -> LoRAModel:
        """Deep-copy ``base`` (left untouched) and attach fresh adapters (B = 0: same function)."""
        return cls(copy.deepcopy(base), config or LoRAConfig(), dtype)

    def forward(self, tokens: Int[Tensor, "batch pos"], **kwargs) -> Float[Tensor, "batch pos vocab"]:
        return self.model(tokens, **kwargs)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @staticmethod
    def act_name(layer: int, module: str) -> str:
        if module not in MODULES:
            raise ValueError(f"module must be one of {MODULES}, not {module!r}")
        return f"blocks.{layer}.lora.hook_{module}_act"

    def act_names(self) -> list[str]:
        """Hook names of every adapter, layer-major, modules in config order."""
        return [self.act_name(L, m) for L in range(self.n_layers) for m in self.config.modules]

    @torch.no_grad()
    def state(
        self,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        fwd_hooks: Sequence[tuple] = (),
    ) -> Float[Tensor, "batch pos n_layers state"]:
        """Every adapter's activation per token: ``[batch pos n_layers len(modules) * rank]``.

        At rank 1 with all modules the last axis is ``MODULES`` (q k v o gate up down), the paper's
        L x 7 state; at rank r each module contributes r consecutive entries.
        """
        names = set(self.act_names())
        with self.model.hooks(fwd_hooks=list(fwd_hooks)):
            _, cache = self.model.run_with_cache(
                tokens, attention_mask=attention_mask, names_filter=lambda n: n in names
            )
        per_layer = [
            torch.cat([cache[self.act_name(L, m)] for m in self.config.modules], dim=-1) for L in range(self.n_layers)
        ]
        return torch.stack(per_layer, dim=2)

    def ablation_hooks(self, adapters: Iterable[tuple[int, str]]) -> list[tuple[str, callable]]:
        """Hooks zeroing the activation (hence the whole update) of ``(layer, module)`` adapters."""
        names = []
        for layer, module in adapters:
            if module not in self.config.modules or not 0 <= int(layer) < self.n_layers:
                raise ValueError(
                    f"no adapter ({layer}, {module!r}); layers 0..{self.n_layers - 1}, modules {self.config.modules}"
                )
            names.append(self.act_name(int(layer), module))
        return [(name, _zero) for name in names]

    def merged_deltas(self) -> dict[tuple[int, str], Float[Tensor, "d_out d_in"]]:
        """``scale * B @ A`` of every adapter, in HF ``(out, in)`` orientation."""
        return {
            (L, m): (layer.scale * layer.B[m] @ layer.A[m]).detach()
            for L, layer in enumerate(self.layers)
            for m in self.config.modules
        }


def _zero(act, hook):
    return torch.zeros_like(act)


HF_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
           "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj",
           "down": "mlp.down_proj"}  # fmt: skip


def merge(lora: LoRAModel) -> HookedTransformer:
    """A plain HookedTransformer with every ``W + scale * B @ A`` merged into the weights.

    Goes through the HF weight layout (``hooked_to_hf``, edit ``*_proj.weight``, ``hooked_from_hf``),
    an independent path from the hooks, so comparing the two checks the hook semantics.

    Example:
        Not run as a doctest: it needs a trained LoRA from the caller
        (:func:`mechdiff.lora.train_lora`).
        >>> merged = merge(lora)  # doctest: +SKIP
        >>> torch.allclose(merged(tokens), lora(tokens), atol=1e-5)  # doctest: +SKIP
        True
    """
    from mechdiff.hf_conversion import hooked_to_hf
    from mechdiff.models import hooked_from_hf

    hf = hooked_to_hf(lora.model)  # reads only the base weights (the LoRA keys have no HF slot)
    with torch.no_grad():
        for (L, m), delta in lora.merged_deltas().items():
            hf.get_submodule(f"model.layers.{L}.{HF_PROJ[m]}").weight += delta.to(hf.dtype).cpu()
    return hooked_from_hf(
        hf,
        lora.model.tokenizer,
        dtype=lora.model.cfg.dtype,
        device=str(lora.model.cfg.device),
        n_ctx=lora.model.cfg.n_ctx,
    )
