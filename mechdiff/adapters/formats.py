"""Saving and loading transcoder adapters: one folder, safetensors + JSON, SAELens-compatible.

Layout of an adapters folder::

    adapters.json              format tag, AdapterConfig, the hybrid's shape and fingerprint,
                               the training recipe and any metrics
    layer_0/cfg.json           SAELens TranscoderConfig (architecture "transcoder", or
    layer_0/sae_weights.safetensors    "topk_transcoder" for TopK adapters) + W_enc b_enc W_dec b_dec
    layer_1/...

Each ``layer_L`` folder loads on its own with ``sae_lens.SAE.load_from_disk(folder / "layer_L")``
as a SAELens ``Transcoder`` whose encode/decode equal the adapter's (TopK adapters load as
:class:`TopKTranscoder`, registered with SAELens when this module is imported). Its
``metadata.hook_name`` is ``blocks.L.adapter.hook_in`` (the MLP's input: ``ln2`` output with the
norm weight) and ``hook_name_out`` is ``blocks.L.hook_mlp_out``; ``metadata.output_mode`` records
that the output is *added* to the base MLP's output, not a replacement of it.

:func:`load_adapted` refuses adapters made for another pair: the shapes must match and the
hybrid's weights must match the fingerprint stored at save time (per-parameter norms), so stale
adapters for a retrained model fail loudly instead of running.

Example:
    >>> from mechdiff.models import load_pair
    >>> pair = load_pair("organism")
    >>> adapted = load_adapted(pair, SHIPPED_DIR)
    >>> adapted.config.n_layers == pair.n_layers
    True
    >>> from sae_lens import SAE
    >>> SAE.load_from_disk(SHIPPED_DIR / "layer_0").cfg.d_sae == adapted.config.d_sae
    True
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import sae_lens
import torch
from sae_lens import register_sae_class
from sae_lens.saes.topk_sae import TopK
from sae_lens.saes.transcoder import Transcoder, TranscoderConfig
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer

from mechdiff.adapters.transcoder import SHIPPED_DIR, AdaptedModel, AdapterConfig
from mechdiff.atomic import atomic_folder
from mechdiff.models import ModelPair, hybrid

FORMAT = "mechdiff-transcoder-adapters"
VERSION = 1
CONFIG_FILE = "adapters.json"
SAE_CFG, SAE_WEIGHTS = "cfg.json", "sae_weights.safetensors"
WEIGHT_NAMES = ("W_enc", "b_enc", "W_dec", "b_dec")
__all__ = [
    "SHIPPED_DIR",
    "AdapterFormatError",
    "save_adapters",
    "load_adapted",
    "read_config",
    "TopKTranscoder",
    "TopKTranscoderConfig",
]


class AdapterFormatError(ValueError):
    """An adapters folder is missing, corrupt, or made for another model pair."""


@dataclass
class TopKTranscoderConfig(TranscoderConfig):
    """SAELens config of a transcoder whose activation keeps the ``k`` largest (ReLU'd) features."""

    k: int = 8

    @classmethod
    def architecture(cls) -> str:
        return "topk_transcoder"

    def to_dict(self) -> dict:
        return {**super().to_dict(), "k": self.k}


class TopKTranscoder(Transcoder):
    """A SAELens ``Transcoder`` with TopK activation (what ``activation="topk"`` adapters are)."""

    cfg: TopKTranscoderConfig

    def get_activation_fn(self):
        return TopK(self.cfg.k)

    @classmethod
    def from_dict(cls, config_dict: dict) -> TopKTranscoder:
        return cls(TopKTranscoderConfig.from_dict(config_dict))


register_sae_class("topk_transcoder", TopKTranscoder, TopKTranscoderConfig)


def fingerprint(model: HookedTransformer) -> dict[str, float]:
    """Norm of every (non-adapter) parameter: identifies the weights an adapter set was made for."""
    return {name: float(p.detach().float().norm()) for name, p in model.named_parameters() if ".adapter." not in name}


def sae_lens_config(config: AdapterConfig, layer: int) -> dict:
    """The SAELens ``cfg.json`` dictionary of one layer's adapter."""
    arch = {"relu": "transcoder", "topk": "topk_transcoder"}[config.activation]
    cfg = {
        "architecture": arch, "d_in": config.d_model, "d_sae": config.d_sae,
        "d_out": config.d_model, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": False, "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": sae_lens.__version__,
            "sae_lens_training_version": None,
            "model_name": config.target_name,
            "hook_name": f"blocks.{layer}.adapter.hook_in",
            "hook_name_out": f"blocks.{layer}.hook_mlp_out",
            "hook_layer": layer, "hook_layer_out": layer, "hook_head_index": None,
            "hook_name_in_plain_model": f"blocks.{layer}.ln2 output (hook_normalized * ln2.w)",
            "output_mode": "added to the base MLP output (mlp_out = MLP_base(x) + transcoder(x))",
            "mechdiff_backbone": config.backbone, "base_model": config.base_name,
            "target_model": config.target_name, "prepend_bos": True,
        },
    }  # fmt: skip
    if config.activation == "topk":
        cfg["k"] = config.k
    return cfg


def save_adapters(
    adapted: AdaptedModel, folder: str | Path, *, recipe: dict | None = None, metrics: dict | None = None
) -> Path:
    """Write ``adapted``'s adapters to ``folder`` (replaced atomically); returns the folder.

    Example:
        >>> import tempfile
        >>> from mechdiff.models import load_pair
        >>> adapted = load_adapted(load_pair("organism"))
        >>> folder = save_adapters(adapted, Path(tempfile.mkdtemp()) / "copy", recipe={"note": "a copy"})
        >>> read_config(folder)["recipe"]
        {'note': 'a copy'}
    """
    folder = Path(folder)
    with atomic_folder(folder) as tmp:  # a unique temporary: concurrent saves all succeed
        _write_adapters(adapted, tmp, recipe, metrics)
    return folder


def _write_adapters(adapted: AdaptedModel, tmp: Path, recipe: dict | None, metrics: dict | None) -> None:
    config = adapted.config
    for layer, adapter in enumerate(adapted.adapters):
        layer_dir = tmp / f"layer_{layer}"
        layer_dir.mkdir()
        weights = {n: getattr(adapter, n).detach().float().contiguous().cpu() for n in WEIGHT_NAMES}
        save_file(weights, str(layer_dir / SAE_WEIGHTS))
        (layer_dir / SAE_CFG).write_text(json.dumps(sae_lens_config(config, layer), indent=1))
    cfg = adapted.model.cfg
    meta = {
        "format": FORMAT, "version": VERSION, "adapter": config.to_dict(),
        "model": {"d_model": cfg.d_model, "n_layers": cfg.n_layers, "d_mlp": cfg.d_mlp,
                  "d_vocab": cfg.d_vocab, "architecture": cfg.original_architecture,
                  "dtype": str(cfg.dtype).removeprefix("torch.")},
        "fingerprint": fingerprint(adapted.model),
        "layers": [f"layer_{i}" for i in range(config.n_layers)],
        "recipe": recipe or {}, "metrics": metrics or {},
    }  # fmt: skip
    (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1))


def read_config(folder: str | Path) -> dict:
    """The folder's ``adapters.json`` as a dict, with clear errors for missing or corrupt files."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise AdapterFormatError(f"adapters folder {folder} does not exist")
    if not path.is_file():
        raise AdapterFormatError(
            f"{folder} has no {CONFIG_FILE}; is it an adapters folder "
            "(written by mechdiff.adapters.formats.save_adapters)?"
        )
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise AdapterFormatError(f"{path} is not valid JSON ({err})") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise AdapterFormatError(
            f"{path} is not a {FORMAT} config (format={meta.get('format')!r})"
            if isinstance(meta, dict)
            else f"{path} is not a JSON object"
        )
    if meta.get("version", 0) > VERSION:
        raise AdapterFormatError(f"{path} has format version {meta['version']}; this mechdiff reads up to {VERSION}")
    for key in ("adapter", "model", "layers"):
        if key not in meta:
            raise AdapterFormatError(f"{path} lacks the {key!r} entry")
    _check_layer_names(meta["layers"], path)
    return meta


def _check_layer_names(layers, path: Path) -> None:
    """Each ``layers`` entry must name a sub-folder of the adapters folder, nothing outside it."""
    if not isinstance(layers, list):
        raise AdapterFormatError(f"{path}: 'layers' must be a list of sub-folder names")
    for name in layers:
        if (
            not isinstance(name, str)
            or not name
            or name in (".", "..")
            or "/" in name
            or "\\" in name
            or Path(name).is_absolute()
            or Path(name).name != name
        ):
            raise AdapterFormatError(
                f"{path}: layer entry {name!r} is not a plain sub-folder name (no '..', no '/', no absolute paths)"
            )


def check_compatible(meta: dict, model: HookedTransformer, folder: Path, *, rtol: float = 1e-4) -> None:
    """Raise :class:`AdapterFormatError` unless ``model`` is the hybrid the adapters were made for."""
    cfg, want = model.cfg, meta["model"]
    for key, have in (
        ("d_model", cfg.d_model),
        ("n_layers", cfg.n_layers),
        ("d_mlp", cfg.d_mlp),
        ("d_vocab", cfg.d_vocab),
    ):
        if key in want and want[key] != have:
            raise AdapterFormatError(
                f"adapters in {folder} are for {key}={want[key]}, but the pair has {key}={have} "
                f"(adapters made for base={meta['adapter'].get('base_name')!r}, "
                f"target={meta['adapter'].get('target_name')!r})"
            )
    stored = meta.get("fingerprint") or {}
    if not stored:
        return
    rtol = _fingerprint_rtol(meta, model, rtol)
    have = fingerprint(model)
    differ = [n for n, v in stored.items() if n not in have or abs(have[n] - v) > rtol * max(abs(v), 1e-6)]
    if differ or set(have) - set(stored):
        raise AdapterFormatError(
            f"adapters in {folder} were trained for other weights (base="
            f"{meta['adapter'].get('base_name')!r}, target={meta['adapter'].get('target_name')!r}): "
            f"{len(differ)} of {len(stored)} parameters differ, e.g. {differ[:3]}. Retrain them for "
            "this pair, or pass check_weights=False to load them anyway."
        )


def _fingerprint_rtol(meta: dict, model: HookedTransformer, rtol: float) -> float:
    """The same weights in a coarser dtype (a bfloat16 pair, adapters saved from float32) have
    norms within that dtype's rounding (eps / 2): tolerate it, not a retrained model."""
    saved = getattr(torch, str(meta["model"].get("dtype", "float32")), torch.float32)
    dtypes = [d for d in (saved, model.cfg.dtype) if isinstance(d, torch.dtype) and d.is_floating_point]
    return max([rtol] + [torch.finfo(d).eps for d in dtypes])


def _load_layer(layer_dir: Path, d_model: int, d_sae: int) -> dict[str, torch.Tensor]:
    path = layer_dir / SAE_WEIGHTS
    if not path.is_file():
        raise AdapterFormatError(f"missing adapter weights {path}")
    try:
        weights = load_file(str(path))
    except Exception as err:  # safetensors raises several unrelated types on corrupt files
        raise AdapterFormatError(f"could not read {path}: {err}") from err
    shapes = {"W_enc": (d_model, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_model), "b_dec": (d_model,)}
    for name, shape in shapes.items():
        if name not in weights:
            raise AdapterFormatError(f"{path} lacks {name} (has {sorted(weights)})")
        if tuple(weights[name].shape) != shape:
            raise AdapterFormatError(f"{path}: {name} has shape {tuple(weights[name].shape)}, expected {shape}")
    return weights


def load_adapted(
    pair: ModelPair,
    folder: str | Path = SHIPPED_DIR,
    *,
    check_weights: bool = True,
) -> AdaptedModel:
    """Build the hybrid of ``pair`` and attach the adapters saved in ``folder``, on the pair's
    device and in its dtype (e.g. bfloat16 adapters on a bfloat16 pair).

    Raises :class:`AdapterFormatError` when the folder is missing or corrupt, or was made for a
    pair of other shapes or (unless ``check_weights=False``) other weights.

    Example:
        >>> from mechdiff.models import load_pair
        >>> load_adapted(load_pair("organism")).config.activation  # the shipped adapters
        'topk'
    """
    folder = Path(folder)
    meta = read_config(folder)
    try:
        config = AdapterConfig(**meta["adapter"])
    except (TypeError, ValueError) as err:
        raise AdapterFormatError(f"{folder / CONFIG_FILE}: bad adapter config ({err})") from err
    if pair.d_model != config.d_model or pair.n_layers != config.n_layers:
        raise AdapterFormatError(
            f"adapters in {folder} are for n_layers={config.n_layers}, d_model={config.d_model} "
            f"({config.base_name!r} -> {config.target_name!r}); the pair has "
            f"n_layers={pair.n_layers}, d_model={pair.d_model} ({pair.meta.get('base_name')!r} -> "
            f"{pair.meta.get('target_name')!r})"
        )
    model = hybrid(pair, config.backbone)
    check_compatible(meta if check_weights else {**meta, "fingerprint": {}}, model, folder)
    adapted = AdaptedModel(model, config)
    layers = meta["layers"]
    if len(layers) != config.n_layers:
        raise AdapterFormatError(f"{folder / CONFIG_FILE} lists {len(layers)} layers, expected {config.n_layers}")
    with torch.no_grad():
        for adapter, name in zip(adapted.adapters, layers, strict=True):
            weights = _load_layer(folder / name, config.d_model, config.d_sae)
            for key in WEIGHT_NAMES:
                getattr(adapter, key).copy_(weights[key])
    adapted.meta = meta
    return adapted
