"""Load base/fine-tuned model pairs as TransformerLens ``HookedTransformer``s.

This is the only module in the project that constructs a ``HookedTransformer``;
everything else gets models from :func:`load_pair` / :func:`load_hooked`.

No weight processing: layer norms are not folded, writing weights and the
unembedding are not centred, value biases are not folded (``process_weights_``
is never called). Every hook carries the model's true activations
(``blocks.L.hook_resid_post`` equals the HF decoder layer L output), which is
what a base-vs-target diff must compare. Consequently ``ln_final`` must be
applied explicitly before unembedding a residual-stream vector.

Supported: Qwen2ForCausalLM and LlamaForCausalLM (no o_proj/MLP biases,
rotary scaling "default" or "llama3"); the config and weight conversion both ways
is :mod:`mechdiff.hf_conversion`. Weights are read only from safetensors;
pickle checkpoints are refused.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

# hooked_to_hf and SUPPORTED_ARCHITECTURES lived here and are still importable from here.
from mechdiff.hf_conversion import (
    SUPPORTED_ARCHITECTURES,
    check_supported,
    hooked_to_hf,
    to_hooked_config,
    to_hooked_state_dict,
    with_architecture,
)

ORGANISM_DIR: Path = Path(__file__).parent / "organism" / "shipped"
PRESETS: dict[str, tuple[str, str]] = {
    "r1-distill-qwen-7b": ("Qwen/Qwen2.5-Math-7B", "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B"),
    "s1.1-32b": ("Qwen/Qwen2.5-32B-Instruct", "simplescaling/s1.1-32B"),
}
HUB_PREFIX = "hf:"  # hub models are named explicitly: "hf:ORG/NAME"; anything else is a local folder
# Pair sources other packages register (``register_pair_source``); the modules named here register
# theirs when first needed, so this module imports none of them.
PairSource = Callable[[str], tuple[tuple, tuple[str, str]]]
_PAIR_SOURCES: dict[str, tuple[PairSource, str | None]] = {}
_PAIR_PROVIDERS: dict[str, str] = {"smollm2": "mechdiff.real.smollm2"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
_SHAPE_ATTRS = ("original_architecture", "d_model", "n_layers", "n_heads", "d_head", "d_mlp",
                "n_key_value_heads", "d_vocab")  # fmt: skip


class ModelPairMismatch(ValueError):
    """Base and target cannot be diffed; the message names the attribute and both values."""


@dataclass
class ModelPair:
    """A base model and its fine-tuned target, sharing one tokenizer.

    Example:
        >>> pair = load_pair("organism", device="cpu")
        >>> pair.n_layers, pair.d_model, pair.meta["architecture"]
        (3, 128, 'Qwen2ForCausalLM')
    """

    base: HookedTransformer
    target: HookedTransformer
    tokenizer: PreTrainedTokenizerBase
    meta: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return self.base.cfg.n_layers

    @property
    def d_model(self) -> int:
        return self.base.cfg.d_model

    def save_hf(self, directory: str | Path) -> tuple[Path, Path]:
        """Write ``directory/base`` and ``directory/target`` as HF folders; return both paths.

        Example:
            >>> import tempfile
            >>> pair = load_pair("organism")
            >>> base_dir, target_dir = pair.save_hf(tempfile.mkdtemp())
            >>> torch.equal(load_hooked(target_dir).W_E, pair.target.W_E)
            True
        """
        paths = (Path(directory) / "base", Path(directory) / "target")
        for path, model in zip(paths, (self.base, self.target), strict=True):
            path.mkdir(parents=True, exist_ok=True)
            hooked_to_hf(model).save_pretrained(path)
            self.tokenizer.save_pretrained(path)
        return paths


def load_pair(
    pair: str = "organism",
    *,
    base: str | None = None,
    target: str | None = None,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    n_devices: int = 1,
) -> ModelPair:
    """Load a base/target pair, after checking they can be diffed.

    ``pair`` is ``"organism"`` (folders ``ORGANISM_DIR/base`` and ``/target``),
    ``"smollm2"`` or ``"smollm2:RUN"`` (SmolLM2-135M-Instruct and its fine-tune run ``RUN``,
    default ``default``, from ``python -m mechdiff.real train``; see
    :func:`mechdiff.real.smollm2.pair_sources`; any name given to :func:`register_pair_source`
    works the same way), a ``PRESETS`` key (hub models: needs a network or a filled HF cache), or
    ``"custom"`` with ``base=``/``target=`` each a local HF folder or an explicit hub name
    ``"hf:ORG/NAME"``. A folder that does not exist is a ``FileNotFoundError``, never a hub lookup. Tokenizers and configs are compared before any weights are read.
    ``meta["workload"]`` names the data and grader of a pair that is not the organism's
    (see :func:`mechdiff.workloads.for_pair`).

    Example:
        >>> pair = load_pair("custom", base=ORGANISM_DIR / "base", target=ORGANISM_DIR / "target")
        >>> pair.meta["source"]
        'local'
    """
    sources, names = _pair_sources(pair, base, target)
    toks = [load_tokenizer(s) for s in sources]
    # Hub fine-tunes (e.g. R1-distill) rename special tokens at fixed ids: tolerated
    # for presets only (listed in meta); the target's tokenizer is the shared one.
    diffs = _check_tokenizers(toks[0], toks[1], allow_added=pair in PRESETS)
    _check_cfgs(*(_cfg_from_config(s) for s in sources))  # cheap: no weights yet
    kw = dict(dtype=dtype, device=device, n_devices=n_devices, tokenizer=toks[1])
    models = [load_hooked(s, **kw) for s in sources]
    _check_cfgs(models[0].cfg, models[1].cfg)
    hub = any(_source_kind(s)[0] == "hub" for s in sources)
    meta = {
        "base_name": names[0],
        "target_name": names[1],
        "source": "organism" if pair == "organism" else ("hub" if hub else "local"),
        "architecture": models[0].cfg.original_architecture,
        "dtype": str(models[0].cfg.dtype).removeprefix("torch."),
        "device": str(models[0].cfg.device),
        "n_devices": n_devices,
        "tokenizer_differences": diffs,
    }
    workload = _registered(pair)[1] if _registered(pair) else None
    if workload:  # organism meta stays as it was: its workload is the default
        meta["workload"] = workload
    task = _organism_task(sources)
    if task is not None:  # an organism of the family: its task says how to prompt and grade it
        meta["task"] = task
    return ModelPair(models[0], models[1], toks[1], meta)


def load_hooked(
    source: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    n_devices: int = 1,
    tokenizer: PreTrainedTokenizerBase | None = None,
    n_ctx: int | None = None,
) -> HookedTransformer:
    """Load one model from a local HF folder (with config.json) or a hub name.

    The tokenizer is read from the same place unless given (see :func:`load_tokenizer`).

    Example:
        >>> model = load_hooked(ORGANISM_DIR / "base", device="cpu")
        >>> model.to_str_tokens("A 3 B")
        ['<bos>', 'A', '3', 'B']
    """
    kind, where = _source_kind(source)
    torch_dtype = resolve_dtype(dtype)
    check_supported(_load_hf_config(where, kind), str(source))
    if kind == "local":
        _check_weight_files(where)
    try:
        hf_model, info = AutoModelForCausalLM.from_pretrained(
            str(where), dtype=torch_dtype, use_safetensors=True, trust_remote_code=False,
            output_loading_info=True,
        )  # fmt: skip
    except OSError as e:
        raise (_hub_error(source, e) if kind == "hub" else _weights_error(where, e)) from e
    except Exception as e:  # safetensors/JSON errors share no base class
        raise _weights_error(where, e) from e
    # HF fills absent weights with random values and only warns: refuse instead.
    bad = sorted(info["missing_keys"]) + [str(m[0]) for m in info["mismatched_keys"]]
    if bad:
        raise ValueError(f"Weights in {where} are incomplete or misshapen: {bad[:8]}")
    tokenizer = tokenizer if tokenizer is not None else _find_tokenizer(source)
    kw = dict(dtype=torch_dtype, device=device, n_devices=n_devices, n_ctx=n_ctx, tokenizer=tokenizer)
    cfg = to_hooked_config(with_architecture(hf_model), **kw)
    cfg.model_name = str(source)
    state_dict = to_hooked_state_dict(hf_model, cfg)
    del hf_model  # so each HF tensor is freed once copied (peak ~1x model, not 2x)
    return _build_hooked(cfg, state_dict, tokenizer)


def hooked_from_hf(
    hf_model: transformers.PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    n_devices: int = 1,
    n_ctx: int | None = None,
) -> HookedTransformer:
    """Convert an in-memory HF Qwen2/Llama causal LM to an unprocessed HookedTransformer.

    Example:
        >>> from transformers import Qwen2Config, Qwen2ForCausalLM
        >>> hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=64,
        ...     intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        ...     num_key_value_heads=2))
        >>> hooked_from_hf(hf, device="cpu").cfg.n_layers
        2
    """
    hf_config = with_architecture(hf_model)
    check_supported(hf_config, "hooked_from_hf")
    kw = dict(dtype=resolve_dtype(dtype), device=device, n_devices=n_devices, n_ctx=n_ctx, tokenizer=tokenizer)
    cfg = to_hooked_config(hf_config, **kw)
    return _build_hooked(cfg, to_hooked_state_dict(hf_model, cfg), tokenizer)


def check_pair(
    base: HookedTransformer,
    target: HookedTransformer,
    base_tokenizer: PreTrainedTokenizerBase | None,
    target_tokenizer: PreTrainedTokenizerBase | None,
    *,
    allow_added_token_differences: bool = False,
) -> list[str]:
    """Raise :class:`ModelPairMismatch` unless base and target can be diffed.

    Compares architecture, d_model, n_layers, heads, d_mlp, d_vocab and the
    tokenizers' vocabularies. Differing added/special tokens raise too, unless
    ``allow_added_token_differences``; they are returned as descriptions.

    Example:
        >>> pair = load_pair("organism")
        >>> check_pair(pair.base, pair.target, pair.tokenizer, pair.tokenizer)
        []
    """
    _check_cfgs(base.cfg, target.cfg)
    return _check_tokenizers(base_tokenizer, target_tokenizer, allow_added_token_differences)


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a local HF folder (or hub name) exactly as it was saved.

    Use this, not ``AutoTokenizer``, for the organism: for ``model_type: qwen2``
    folders transformers 5 ignores a saved generic ``tokenizer_class``
    ("TokenizersBackend") and rebuilds a Qwen2 BPE tokenizer from the vocab,
    silently breaking any non-Qwen tokenizer.

    Example:
        >>> load_tokenizer(ORGANISM_DIR / "base").bos_token
        '<bos>'
    """
    tokenizer = _find_tokenizer(source)
    if tokenizer is None:
        raise FileNotFoundError(f"{source} has no tokenizer files (any of {_TOKENIZER_FILES})")
    return tokenizer


def hybrid(pair: ModelPair, backbone: str = "target") -> HookedTransformer:
    """A new model: the target's embeddings, norms, unembedding and attention with the base's MLPs.

    ``backbone="base"`` takes the base's attention too (only embeddings, norms and
    unembedding stay the target's). Used by the transcoder adapters; the pair is untouched.
    The hybrid's weights are the pair's tensors, not copies (a third model would cost as much
    memory as the other two on SmolLM2), so they are frozen: ``requires_grad`` is off, and writing
    to them in place would change the pair's models too.

    Example:
        >>> pair = load_pair("organism")
        >>> model = hybrid(pair, backbone="target")
        >>> torch.equal(model.blocks[0].mlp.W_in, pair.base.blocks[0].mlp.W_in)
        True
    """
    if backbone not in ("target", "base"):
        raise ValueError(f"backbone must be 'target' or 'base', not {backbone!r}")
    _check_cfgs(pair.base.cfg, pair.target.cfg)
    from_base = ("mlp.", "attn.") if backbone == "base" else ("mlp.",)
    sources = dict(pair.target.named_parameters())
    for name, param in pair.base.named_parameters():
        if name.startswith("blocks.") and name.split(".", 2)[2].startswith(from_base):
            sources[name] = param
    cfg = dataclasses.replace(pair.target.cfg, model_name=f"hybrid-{backbone}")
    state_dict = {name: p.detach() for name, p in sources.items()}
    return _build_hooked(cfg, state_dict, pair.tokenizer, share=True)


# --------------------------------------------------------------------------- helpers


def _pair_sources(pair: str, base: str | None, target: str | None) -> tuple[tuple, tuple[str, str]]:
    if pair != "custom" and (base is not None or target is not None):
        raise ValueError(f"base=/target= are only used with pair='custom', not pair={pair!r}")
    if pair == "organism":
        if not all((ORGANISM_DIR / n / "config.json").is_file() for n in ("base", "target")):
            raise FileNotFoundError(f"No organism in {ORGANISM_DIR}; build it: python -m mechdiff.organism train")
        return (ORGANISM_DIR / "base", ORGANISM_DIR / "target"), ("organism-base", "organism-target")
    registered = _registered(pair)
    if registered:
        return registered[0](pair)
    if pair in PRESETS:
        return tuple(HUB_PREFIX + name for name in PRESETS[pair]), PRESETS[pair]
    if pair != "custom":
        names = sorted({*_PAIR_SOURCES, *_PAIR_PROVIDERS})
        choices = ["organism", *(c for n in names for c in (n, f"{n}:<run>")), "custom", *PRESETS]
        raise ValueError(f"Unknown pair {pair!r}; choose one of {choices}")
    if base is None or target is None:
        raise ValueError("pair='custom' needs both base= and target= (a folder or hub name each)")
    return (base, target), (str(base), str(target))


TASK_FILE = "mechdiff_task.json"  # written by mechdiff.organism.train beside an organism's weights


def _organism_task(sources) -> dict | None:
    """The organism task both folders record (``mechdiff_task.json``), None for other models; a pair
    whose two folders record different tasks cannot be diffed."""
    found = []
    for source in sources:
        path = Path(str(source)).expanduser() / TASK_FILE
        found.append(json.loads(path.read_text()) if path.is_file() else None)
    if found[0] != found[1]:
        raise ModelPairMismatch(
            f"base and target were trained on different organism tasks ({TASK_FILE}): {found[0]} vs {found[1]}"
        )
    return found[1]


def register_pair_source(name: str, sources: PairSource, workload: str | None = None) -> None:
    """Make ``load_pair(name)`` and ``load_pair(f"{name}:RUN")`` load ``sources(pair)``.

    ``sources`` returns ``((base_folder, target_folder), (base_name, target_name))``;
    ``workload`` is stored as the pair's ``meta["workload"]`` (see :mod:`mechdiff.workloads`).

    Example:
        >>> register_pair_source("mine", lambda pair: (("runs/b", "runs/t"), ("b", "t")))
        >>> _pair_sources("mine:x", None, None)
        (('runs/b', 'runs/t'), ('b', 't'))
    """
    _PAIR_SOURCES[name] = (sources, workload)


def _registered(pair: str) -> tuple[PairSource, str | None] | None:
    name = pair.partition(":")[0]
    if name not in _PAIR_SOURCES and name in _PAIR_PROVIDERS:
        importlib.import_module(_PAIR_PROVIDERS[name])  # registers itself on import
    return _PAIR_SOURCES.get(name)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"Unknown dtype {dtype!r}; use one of {list(_DTYPES)} or a torch.dtype")
    return _DTYPES[dtype]


def _source_kind(source: str | Path) -> tuple[str, Path | str]:
    """('hub', 'ORG/NAME') for ``"hf:ORG/NAME"``; else ('local', Path), which must be a folder."""
    text = str(source)
    if not isinstance(source, Path) and text.startswith(HUB_PREFIX):
        return "hub", text[len(HUB_PREFIX) :]
    path = Path(text).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"Model folder {path} does not exist (relative to {Path.cwd()}); a model on the "
            f"Hugging Face Hub needs the explicit form '{HUB_PREFIX}ORG/NAME'"
        )
    if not path.is_dir():
        raise FileNotFoundError(f"Model folder {path} is not a folder")
    return "local", path


def _hub_error(source: str | Path, err: Exception) -> FileNotFoundError:
    reason = (str(err).splitlines() or [""])[0]
    return FileNotFoundError(
        f"{str(source)!r} is not a local folder, and loading it from the Hugging Face Hub failed "
        f"({type(err).__name__}: {reason}). Offline (HF_HUB_OFFLINE=1) or without a network only "
        "models already in the HF cache load; pass a local HF folder (config.json, "
        "model.safetensors, tokenizer files) instead."
    )


def _weights_error(folder: Path | str, err: Exception) -> ValueError:
    return ValueError(f"Could not read the weights in {folder} (corrupt or truncated?): {err}")


def _load_hf_config(where: Path | str, kind: str) -> transformers.PretrainedConfig:
    if kind == "local" and not (Path(where) / "config.json").is_file():
        raise FileNotFoundError(f"{where} has no config.json; is it a Hugging Face model folder?")
    try:
        return AutoConfig.from_pretrained(str(where), trust_remote_code=False)
    except OSError as e:
        raise (_hub_error(where, e) if kind == "hub" else e) from e
    except ValueError as e:  # unknown model_type and the like
        raise ValueError(f"Unreadable config in {where}: {e}; supported: {SUPPORTED_ARCHITECTURES}") from e


def _check_weight_files(folder: Path) -> None:
    if any(folder.glob("*.safetensors")):
        return
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.pth")):
        raise ValueError(
            f"{folder} has only pickle weights (pytorch_model.bin); they are refused because "
            "unpickling can run arbitrary code. Re-save the model with safetensors "
            "(model.save_pretrained(folder)) somewhere you trust the file."
        )
    raise FileNotFoundError(f"{folder} has no model.safetensors weights")


def _find_tokenizer(source: str | Path) -> PreTrainedTokenizerBase | None:
    kind, where = _source_kind(source)
    if kind == "local":
        if not any((where / f).is_file() for f in _TOKENIZER_FILES):
            return None
        config = where / "tokenizer_config.json"
        declared = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
        if declared in ("TokenizersBackend", "PreTrainedTokenizerFast") and (where / "tokenizer.json").is_file():
            return transformers.PreTrainedTokenizerFast.from_pretrained(str(where))  # see load_tokenizer
    try:
        return AutoTokenizer.from_pretrained(str(where), trust_remote_code=False)
    except OSError as e:
        raise (_hub_error(source, e) if kind == "hub" else e) from e


def _cfg_from_config(source: str | Path) -> HookedTransformerConfig:
    kind, where = _source_kind(source)
    hf_config = _load_hf_config(where, kind)
    check_supported(hf_config, str(source))
    return to_hooked_config(hf_config, dtype=torch.float32, device="cpu")


def _build_hooked(cfg, state_dict: dict[str, torch.Tensor], tokenizer, share: bool = False) -> HookedTransformer:
    """``share``: the model's parameters are frozen views of ``state_dict``'s tensors (no copy)."""
    with warnings.catch_warnings():  # TL 3.x deprecation notice for HookedTransformer itself
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg, move_to_device=False)  # params: uninitialised torch.empty
    params = dict(model.named_parameters())
    missing, unexpected = sorted(set(params) - set(state_dict)), sorted(set(state_dict) - set(params))
    if missing or unexpected:
        raise ValueError(f"Weight conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():  # one tensor at a time, so each source can be freed as we go
        for name in list(state_dict):
            source = state_dict.pop(name)
            if source.shape != params[name].shape:
                raise ValueError(
                    f"Weight conversion mismatch: {name} is {tuple(source.shape)}, not {tuple(params[name].shape)}"
                )
            if share:
                owner, leaf = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
                owner._parameters[leaf] = torch.nn.Parameter(source, requires_grad=False)
            else:
                params[name].copy_(source)
    if tokenizer is not None:
        _attach_tokenizer(model, tokenizer)
    model.move_model_modules_to_device()
    return model.eval()


def _attach_tokenizer(model: HookedTransformer, tokenizer: PreTrainedTokenizerBase) -> None:
    """``set_tokenizer`` minus its reload of the tokenizer with ``add_bos_token=True``, which
    crashes on in-memory tokenizers and would make model.tokenizer differ from the pair's."""
    model.tokenizer = tokenizer
    tokenizer.padding_side = "left"  # batched generation needs left padding
    # If the tokenizer doesn't add BOS itself, to_tokens prepends bos_token exactly once.
    model.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token


def _check_cfgs(a: HookedTransformerConfig, b: HookedTransformerConfig) -> None:
    for attr in _SHAPE_ATTRS:
        va, vb = getattr(a, attr), getattr(b, attr)
        if va != vb:
            name = "architecture" if attr == "original_architecture" else attr
            raise ModelPairMismatch(f"base and target differ in {name}: base={va!r}, target={vb!r}")


def _check_tokenizers(a, b, allow_added: bool) -> list[str]:
    if (a is None) != (b is None):
        raise ModelPairMismatch("tokenizer: only one of base/target has a tokenizer")
    if a is None:
        return []
    va, vb = a.get_vocab(), b.get_vocab()
    added = set(a.get_added_vocab()) | set(b.get_added_vocab())
    diff = {t: f"{t!r}: base={va.get(t)}, target={vb.get(t)}" for t in set(va) ^ set(vb)}
    diff.update({t: f"{t!r}: base={va[t]}, target={vb[t]}" for t in set(va) & set(vb) if va[t] != vb[t]})
    regular = [d for t, d in sorted(diff.items()) if t not in added]
    if regular:
        raise ModelPairMismatch(f"tokenizer vocab differs between base and target: {regular[:5]}")
    special = [d for t, d in sorted(diff.items()) if t in added]
    for role in ("bos_token", "eos_token", "pad_token", "unk_token"):
        if getattr(a, role) != getattr(b, role):
            special.append(f"{role}: base={getattr(a, role)!r}, target={getattr(b, role)!r}")
    if special and not allow_added:
        raise ModelPairMismatch(f"tokenizer special/added tokens differ: {special[:5]}")
    return special
