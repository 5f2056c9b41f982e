"""PEFT folder format for :class:`~mechdiff.adapters.lora.LoRAModel`: export and import.

A PEFT LoRA folder holds ``adapter_config.json`` (written here by ``peft.LoraConfig`` itself) and
``adapter_model.safetensors`` with HF module names::

    base_model.model.model.layers.{L}.self_attn.q_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{L}.self_attn.q_proj.lora_B.weight   [out, r]

(``o_proj``, ``mlp.gate_proj``, ``mlp.up_proj``, ``mlp.down_proj`` likewise), which is what
``peft.PeftModel.from_pretrained(hf_model, folder)`` loads onto the HF export of the base model
(:func:`mechdiff.hf_conversion.hooked_to_hf`). Importing accepts LoRAs trained elsewhere with PEFT on a
Qwen2/Llama model, so the lens runs on real LoRAs: plain LoRA or rsLoRA, any subset of the seven
projections, every layer. Anything else (DoRA, biases, per-module ranks, embeddings, pickles) is
refused with a message saying what and why.

Where PEFT finds the base model: a folder written by ``python -m mechdiff.lora train`` records the
base's absolute path (:func:`base_reference`), so ``peft.AutoPeftModelForCausalLM.from_pretrained``
loads it offline from any directory. Folders shipped inside the repository cannot know where the
repository will be: they record the base folder's path relative to the repository root (e.g.
``mechdiff/organism/shipped/base``), which ``AutoPeftModelForCausalLM`` resolves from the repository
root, where the README's commands run; :func:`load_peft` loads any of them from anywhere, resolving a
relative base path against the repository root.

Example:
    >>> model = load_peft("mechdiff/adapters/shipped/lora_r1")  # a peft.PeftModel, offline
    >>> type(model).__name__, model.peft_config["default"].r
    ('PeftModelForCausalLM', 1)
    >>> export_peft(lora, "out/lora_r1")  # doctest: +SKIP
    >>> again = import_peft("out/lora_r1", pair.base)  # doctest: +SKIP
    >>> torch.allclose(again(tokens), lora(tokens))  # doctest: +SKIP
    True
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformer_lens import HookedTransformer

from mechdiff.adapters.lora import HF_PROJ, MODULES, LoRAConfig, LoRAModel, module_shapes

REPO = Path(__file__).resolve().parents[2]  # the folder holding the mechdiff package (the repository root)
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."
PROJ_TO_MODULE = {proj.split(".")[-1]: m for m, proj in HF_PROJ.items()}  # q_proj -> q
_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
# Config fields that change what the weights mean; each must be off for an import.
_REFUSED = {
    "use_dora": "DoRA (magnitude vectors) is not a plain LoRA",
    "modules_to_save": "fully trained extra modules are not LoRA adapters",
    "rank_pattern": "per-module ranks are not supported (one rank for all adapters)",
    "alpha_pattern": "per-module alphas are not supported (one alpha for all adapters)",
    "lora_bias": "LoRA biases are not supported",
    "trainable_token_indices": "trained token embeddings are not supported",
    "layer_replication": "layer replication is not supported",
    "fan_in_fan_out": "fan_in_fan_out (Conv1D weights) does not apply to Qwen2/Llama",
    "use_qalora": "QA-LoRA is not supported",
}


def base_reference(pair) -> str:
    """What a PEFT folder should record as ``base_model_name_or_path`` for ``pair``'s base, so that
    ``peft.AutoPeftModelForCausalLM.from_pretrained(folder)`` finds it offline: the absolute path
    of a local HF folder (the organism's, or a custom pair's), else the name the pair was loaded
    by (a hub name; SmolLM2's GGUF has no HF folder to point to).

    Example:
        >>> base_reference(load_pair("organism"))  # doctest: +SKIP
        '/.../mechdiff/organism/shipped/base'
    """
    from mechdiff.models import ORGANISM_DIR

    name = str(pair.meta.get("base_name") or "")
    if pair.meta.get("source") == "organism":
        return str((ORGANISM_DIR / "base").resolve())
    path = Path(name).expanduser()
    return str(path.resolve()) if name and (path / "config.json").is_file() else name


def resolve_base(folder: str | Path) -> str:
    """The base model a PEFT folder's ``base_model_name_or_path`` names, made usable from any
    directory: an absolute path as is; a relative one that is a model folder from here, or else
    from the repository root (:data:`REPO`; shipped folders record such paths), made absolute; a
    name that is neither (a hub name) as is.

    Example:
        >>> resolve_base("mechdiff/adapters/shipped/lora_r1") == str(REPO / "mechdiff/organism/shipped/base")
        True
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; a PEFT LoRA folder has {CONFIG_FILE} + {WEIGHTS_FILE}")
    name = json.loads(path.read_text()).get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{path}: base_model_name_or_path is missing; cannot tell which model the LoRA adapts")
    given = Path(name).expanduser()
    if given.is_absolute():
        return str(given)
    for root in (Path.cwd(), REPO):
        if (root / given / "config.json").is_file():
            return str((root / given).resolve())
    return name


def load_peft(folder: str | Path, **from_pretrained):
    """Load a PEFT LoRA folder with ``peft`` itself, on its base model (:func:`resolve_base`):
    ``transformers.AutoModelForCausalLM`` then ``peft.PeftModel.from_pretrained``, as
    ``peft.AutoPeftModelForCausalLM.from_pretrained(folder)`` does, but from any directory.
    Keyword arguments go to the base model's ``from_pretrained`` (``torch_dtype``, ``device_map``...).
    Returns the ``peft.PeftModel`` in eval mode.

    Example:
        >>> load_peft("mechdiff/organism/family/hmm/lora_r1").peft_config["default"].r
        1
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve_base(folder), **from_pretrained)
    return PeftModel.from_pretrained(base, str(folder)).eval()


def export_peft(lora: LoRAModel, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write ``lora`` as a PEFT LoRA folder; returns the folder. ``base_model_name_or_path``:
    where PEFT finds the base model (:func:`base_reference`); a relative folder is made absolute.

    Example:
        >>> export_peft(lora, "out/lora_r1")  # doctest: +SKIP
        PosixPath('out/lora_r1')
    """
    from peft import LoraConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = lora.config
    base = base_model_name_or_path or str(lora.model.cfg.model_name)
    if (Path(base).expanduser() / "config.json").is_file():  # a folder: valid from any directory
        base = str(Path(base).expanduser().resolve())
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    peft_cfg = LoraConfig(
        r=cfg.rank, lora_alpha=alpha, use_rslora=cfg.rslora, lora_dropout=0.0, bias="none",
        target_modules=sorted(HF_PROJ[m].split(".")[-1] for m in cfg.modules), task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    )  # fmt: skip
    peft_cfg.save_pretrained(str(folder))
    tensors = {}
    for L, layer in enumerate(lora.layers):
        for m in cfg.modules:
            key = f"{PREFIX}model.layers.{L}.{HF_PROJ[m]}"
            tensors[f"{key}.lora_A.weight"] = layer.A[m].detach().cpu().contiguous()
            tensors[f"{key}.lora_B.weight"] = layer.B[m].detach().cpu().contiguous()
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder


def read_peft_config(folder: str | Path) -> tuple[LoRAConfig, bool]:
    """Validate ``adapter_config.json``; returns ``(LoRAConfig, modules_known)``.

    ``modules_known`` is False when ``target_modules`` is a regex: the weight keys decide then.
    Raises ``FileNotFoundError`` without the config, ``ValueError`` for anything unsupported.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found; a PEFT LoRA folder has {CONFIG_FILE} + {WEIGHTS_FILE}")
    raw = json.loads(path.read_text())
    if str(raw.get("peft_type", "")).upper() != "LORA":
        raise ValueError(f"{path}: peft_type is {raw.get('peft_type')!r}; only LORA adapters can be imported")
    bad = [f"{k} ({why})" for k, why in _REFUSED.items() if raw.get(k)]
    if raw.get("init_lora_weights") not in (None, True, False, "gaussian"):
        bad.append(f"init_lora_weights={raw['init_lora_weights']!r} (changes the base weights)")
    if bad:
        raise ValueError(f"{path}: unsupported LoRA options: {'; '.join(bad)}")
    modules = _target_modules(raw.get("target_modules"), path)
    rank, alpha = int(raw.get("r", 8)), float(raw.get("lora_alpha", 8))
    return LoRAConfig(
        rank=rank, alpha=alpha, rslora=bool(raw.get("use_rslora", False)), modules=modules or MODULES
    ), modules is not None


def _target_modules(targets, path: Path) -> tuple[str, ...] | None:
    """Modules named by the config (None: a regex, decided later by the weight keys)."""
    if targets is None:
        raise ValueError(f"{path}: target_modules is missing")
    if isinstance(targets, str):
        return MODULES if targets == "all-linear" else None
    out = []
    for name in targets:
        short = str(name).split(".")[-1]
        if short not in PROJ_TO_MODULE:
            raise ValueError(
                f"{path}: target module {name!r} is not supported; mechdiff LoRAs adapt only {sorted(PROJ_TO_MODULE)}"
            )
        out.append(PROJ_TO_MODULE[short])
    return tuple(out)


def import_peft(folder: str | Path, base: HookedTransformer) -> LoRAModel:
    """Load a PEFT LoRA folder onto a copy of ``base``; returns the :class:`LoRAModel`, whose
    adapters take ``base``'s device and dtype (the stored weights are cast, e.g. to bfloat16).

    Only ``adapter_model.safetensors`` is read (pickled ``adapter_model.bin`` is refused). Every
    adapted module must be present in every layer, with the shapes ``base`` implies.

    Example:
        >>> lora = import_peft("runs/my_peft_lora", pair.base)  # doctest: +SKIP
        >>> lora.state(tokens).shape  # doctest: +SKIP
    """
    folder = Path(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        extra = (
            " (adapter_model.bin is a pickle and is refused; convert it to safetensors)"
            if (folder / "adapter_model.bin").exists()
            else ""
        )
        raise FileNotFoundError(f"{weights} not found{extra}")
    config, modules_known = read_peft_config(folder)
    tensors = load_file(str(weights))
    found: dict[tuple[int, str, str], torch.Tensor] = {}
    for key, value in tensors.items():
        match = _KEY.match(key)
        if not match or match.group(2) not in PROJ_TO_MODULE:
            raise ValueError(
                f"{weights}: unexpected tensor {key!r}; expected LoRA A/B weights of "
                f"{sorted(PROJ_TO_MODULE)} in model.layers.N"
            )
        found[(int(match.group(1)), PROJ_TO_MODULE[match.group(2)], match.group(3))] = value
    modules = tuple(m for m in MODULES if any(k[1] == m for k in found))
    if modules_known and set(modules) != set(config.modules):
        raise ValueError(f"{weights}: weights cover {modules} but the config targets {config.modules}")
    config = LoRAConfig(rank=config.rank, alpha=config.alpha, rslora=config.rslora, modules=modules)
    _check_complete(found, config, base, weights)
    lora = LoRAModel.from_base(base, config)
    with torch.no_grad():
        for L, layer in enumerate(lora.layers):
            for m in config.modules:
                layer.A[m].copy_(found[(L, m, "A")])
                layer.B[m].copy_(found[(L, m, "B")])
    return lora


def _check_complete(found: dict, config: LoRAConfig, base: HookedTransformer, where: Path) -> None:
    n_layers, shapes = base.cfg.n_layers, module_shapes(base.cfg)
    extra = sorted({k[0] for k in found if k[0] >= n_layers})
    if extra:
        raise ValueError(f"{where}: adapters for layers {extra}, but the model has {n_layers} layers")
    missing = [
        f"layer {L} {m}.{ab}" for L in range(n_layers) for m in config.modules for ab in "AB" if (L, m, ab) not in found
    ]
    if missing:
        raise ValueError(
            f"{where}: missing adapters ({missing[:6]}...); every adapted module must be "
            "present in every layer (layers_to_transform is not supported)"
        )
    for L in range(n_layers):
        for m in config.modules:
            d_in, d_out = shapes[m]
            want = {"A": (config.rank, d_in), "B": (d_out, config.rank)}
            for ab, shape in want.items():
                got = tuple(found[(L, m, ab)].shape)
                if got != shape:
                    raise ValueError(
                        f"{where}: layer {L} {HF_PROJ[m]}.lora_{ab} has shape {got}, expected {shape} "
                        f"(rank {config.rank}, {'in' if ab == 'A' else 'out'} features from the base "
                        "model); is this LoRA for another model?"
                    )
