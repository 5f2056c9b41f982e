"""Transcoder adapters: a sparse, trainable MLP beside each frozen base MLP of a hybrid model.

The *hybrid* takes the target's embeddings, attention, norms and unembedding with the *base*
model's MLPs (``backbone="target"``; ``backbone="base"`` keeps the base attention too). At every
layer an adapter reads the MLP's true input ``x`` (the normalised residual, norm weight included)
and adds its output to the MLP's::

    mlp_out = MLP_base(x) + W_dec . act(W_enc . x + b_enc) + b_dec

``W_dec`` and ``b_dec`` start at zero, so the adapted model starts as the hybrid. The adapters are
attached with PyTorch forward hooks on each ``blocks.{L}.mlp`` (which see its input and output),
and each adapter is a submodule ``blocks.{L}.adapter`` with TransformerLens hook points:

* ``blocks.{L}.adapter.hook_in``   - the MLP input it reads      [batch pos d_model]
* ``blocks.{L}.adapter.hook_pre``  - encoder pre-activations      [batch pos d_sae]
* ``blocks.{L}.adapter.hook_acts`` - feature activations          [batch pos d_sae]
* ``blocks.{L}.adapter.hook_out``  - what it adds to the MLP out  [batch pos d_model]

so caching is plain TransformerLens, edits (ablate, steer, keep only, mean-ablate, patch) are
:mod:`mechdiff.adapters.edits`, and ``blocks.{L}.hook_mlp_out`` is the whole MLP layer's output
(base plus adapter). ``copy.deepcopy`` of an adapted model gives an independent one: its MLPs
run the copied adapters.

Example:
    >>> from mechdiff.models import load_pair
    >>> pair = load_pair("organism")
    >>> adapted = AdaptedModel.from_pair(pair, d_sae=64)
    >>> tokens = pair.tokenizer("<bos> A 3 2 1 B 4 5 6 C 7 8 9 =", return_tensors="pt")["input_ids"]
    >>> logits, cache = adapted.model.run_with_cache(tokens)
    >>> cache["blocks.0.adapter.hook_acts"].shape[-1]
    64
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn
from transformer_lens import HookedTransformer
from transformer_lens.hook_points import HookPoint

from mechdiff.adapters.edits import PositionTracker, ablate, edit_hooks, steer
from mechdiff.models import ModelPair, hybrid

ACTIVATIONS = ("relu", "topk")
SHIPPED_DIR: Path = Path(__file__).parent / "shipped" / "organism"  # adapters for load_pair("organism")


@dataclass
class AdapterConfig:
    """Shape and kind of the adapters of one adapted model (saved beside the weights)."""

    d_model: int
    d_sae: int
    n_layers: int
    activation: str = "relu"  # "relu" (published) or "topk" (k active features per token)
    k: int = 8  # only for "topk"
    backbone: str = "target"
    base_name: str = ""
    target_name: str = ""
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, not {self.activation!r}")
        if self.backbone not in ("target", "base"):
            raise ValueError(f"backbone must be 'target' or 'base', not {self.backbone!r}")

    def to_dict(self) -> dict:
        return asdict(self)


class TranscoderAdapter(nn.Module):
    """One layer's adapter: ``act(x W_enc + b_enc) W_dec + b_dec`` with named hook points.

    ``device`` / ``dtype``: where its parameters live (default: CPU, float32).
    """

    def __init__(
        self,
        d_model: int,
        d_sae: int,
        activation: str = "relu",
        k: int = 8,
        enc_bias_init: float = 0.0,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.activation, self.k = activation, k
        # Drawn in float32 on the CPU, then moved: a seed gives the same adapter on every device
        # and in every dtype (CUDA's generator draws other numbers).
        W_enc = torch.empty(d_model, d_sae)
        nn.init.kaiming_uniform_(W_enc.T, a=5**0.5)  # as nn.Linear(d_model, d_sae)
        put = dict(device=device, dtype=dtype)
        self.W_enc = nn.Parameter(W_enc.to(**put))
        self.b_enc = nn.Parameter(torch.full((d_sae,), float(enc_bias_init)).to(**put))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_model, **put))
        self.b_dec = nn.Parameter(torch.zeros(d_model, **put))
        self.hook_in, self.hook_pre = HookPoint(), HookPoint()
        self.hook_acts, self.hook_out = HookPoint(), HookPoint()

    @property
    def d_sae(self) -> int:
        return self.W_enc.shape[1]

    def encode(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_sae"]:
        pre = self.hook_pre(x @ self.W_enc + self.b_enc)
        if self.activation == "topk":
            top = pre.topk(min(self.k, pre.shape[-1]), dim=-1)
            acts = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        else:
            acts = pre.relu()
        return self.hook_acts(acts)

    def decode(self, acts: Float[Tensor, "... d_sae"]) -> Float[Tensor, "... d_model"]:
        return acts @ self.W_dec + self.b_dec

    def forward(self, x: Float[Tensor, "... d_model"]) -> Float[Tensor, "... d_model"]:
        return self.hook_out(self.decode(self.encode(self.hook_in(x))))


class _AdapterOutput:
    """The forward hook of a base MLP: adds its adapter's output. An object, not a closure, so a
    ``copy.deepcopy`` of the model copies it along with (and pointing to) the copied adapter."""

    def __init__(self, adapter: TranscoderAdapter):
        self.adapter = adapter

    def __call__(self, module, inputs, output):
        # Casts are no-ops when the adapter has the model's dtype; they let float32 adapters
        # (e.g. master weights for training) run on a bfloat16 model.
        adapter = self.adapter
        return output + adapter(inputs[0].to(adapter.W_enc.dtype)).to(output.dtype)


class AdaptedModel(nn.Module):
    """A hybrid ``HookedTransformer`` with one :class:`TranscoderAdapter` per layer.

    ``model`` is the runnable HookedTransformer (adapters included); only ``adapters`` train.
    Each adapter is created on its block's device, in the model's dtype unless ``dtype`` is given
    (float32 adapters on a bfloat16 model train with full-precision weights, as PEFT does).
    """

    def __init__(
        self,
        model: HookedTransformer,
        config: AdapterConfig,
        enc_bias_init: float = 0.0,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if model.cfg.n_layers != config.n_layers or model.cfg.d_model != config.d_model:
            raise ValueError(
                f"adapters are for n_layers={config.n_layers}, d_model={config.d_model}; the model has "
                f"n_layers={model.cfg.n_layers}, d_model={model.cfg.d_model}"
            )
        self.config = config
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        self.adapters = nn.ModuleList(
            TranscoderAdapter(
                config.d_model,
                config.d_sae,
                config.activation,
                config.k,
                enc_bias_init,
                device=next(block.mlp.parameters()).device,
                dtype=dtype or model.cfg.dtype,
            )
            for block in model.blocks
        )  # a block's device: models may span several (n_devices)
        for block, adapter in zip(model.blocks, self.adapters, strict=True):
            block.adapter = adapter  # registers blocks.{L}.adapter.* hook points
            block.mlp.register_forward_hook(_AdapterOutput(adapter))
        # absolute token positions of each forward, across KV-cached generation (for edits)
        self.positions = PositionTracker()
        model.register_forward_pre_hook(self.positions, with_kwargs=True)
        model.register_forward_hook(self.positions.done, with_kwargs=True)
        model.setup()  # rebuild TransformerLens' hook_dict with the new hook points

    @classmethod
    def from_pair(
        cls,
        pair: ModelPair,
        d_sae: int,
        activation: str = "relu",
        k: int = 8,
        backbone: str = "target",
        enc_bias_init: float = 0.0,
        dtype: torch.dtype | None = None,
    ) -> AdaptedModel:
        """Build the hybrid of ``pair`` and attach freshly initialised adapters (on the pair's
        device, in its dtype unless ``dtype`` is given)."""
        cfg = AdapterConfig(
            d_model=pair.d_model,
            d_sae=d_sae,
            n_layers=pair.n_layers,
            activation=activation,
            k=k,
            backbone=backbone,
            base_name=pair.meta.get("base_name", ""),
            target_name=pair.meta.get("target_name", ""),
        )
        return cls(hybrid(pair, backbone), cfg, enc_bias_init, dtype)

    @classmethod
    def load(cls, pair: ModelPair, folder: str | Path = SHIPPED_DIR) -> AdaptedModel:
        """Adapters saved in ``folder`` (default: the shipped organism ones) on ``pair``'s hybrid.

        Same as :func:`mechdiff.adapters.formats.load_adapted`.
        """
        from mechdiff.adapters.formats import load_adapted

        return load_adapted(pair, folder)

    def save(self, folder: str | Path, **kwargs) -> Path:
        """Write the adapters (SAELens-compatible folder); see :func:`~mechdiff.adapters.formats.save_adapters`."""
        from mechdiff.adapters.formats import save_adapters

        return save_adapters(self, folder, **kwargs)

    def forward(self, tokens, **kwargs):
        return self.model(tokens, **kwargs)

    @property
    def n_features(self) -> int:
        return self.config.d_sae * self.config.n_layers

    @staticmethod
    def acts_name(layer: int) -> str:
        return f"blocks.{layer}.adapter.hook_acts"

    def bypass_hooks(self, layers: Iterable[int] | None = None) -> list[tuple[str, callable]]:
        """Hooks zeroing the adapters' outputs (all layers, or ``layers``): the model is then the hybrid."""
        layers = range(self.config.n_layers) if layers is None else layers
        return [(f"blocks.{layer}.adapter.hook_out", _zero) for layer in layers]

    def ablation_hooks(
        self,
        features: Iterable[Sequence[int]],
        positions: Sequence[int] | None = None,
    ) -> list[tuple[str, callable]]:
        """Hooks zeroing ``(layer, feature)`` pairs (at absolute ``positions``, or everywhere);
        :func:`mechdiff.adapters.edits.ablate` as hooks."""
        return edit_hooks(self, ablate(features, positions))

    def steering_hooks(
        self,
        features: Iterable[Sequence[int]],
        value: float,
        positions: Sequence[int] | None = None,
        mode: str = "add",
    ) -> list[tuple[str, callable]]:
        """Hooks that ``add`` ``value`` to, ``set`` to ``value`` or ``scale`` by ``value`` features;
        :func:`mechdiff.adapters.edits.steer` as hooks.

        Returned as ``(hook_name, fn)`` pairs for ``model.hooks(fwd_hooks=...)``,
        ``run_with_hooks`` or :func:`mechdiff.generation.generate`. ``positions`` are absolute
        (0: each prompt's first token) and count on through KV-cached generation.
        """
        return edit_hooks(self, steer(features, value, mode, positions))


def _zero(out, hook):
    return torch.zeros_like(out)
