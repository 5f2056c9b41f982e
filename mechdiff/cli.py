"""What every mechdiff command line shares: which pair, on which device and dtype, and how errors read.

Each CLI builds its parser, calls :func:`add_pair_options`, and in ``main``:

1. :func:`offline_environment` (no hub, no dataset downloads, no wandb: set here, never at import);
2. :func:`check_pair_options` before any model is loaded or anything is written, so a bad flag is a
   one-line ``error: ...`` and exit status 2, not a traceback from deep inside TransformerLens;
3. :func:`load_pair_from_args` to load the pair the flags name.

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> add_pair_options(p)
    >>> args = p.parse_args(["--pair", "organism", "--device", "cpu", "--dtype", "bfloat16"])
    >>> check_pair_options(args).device, args.dtype
    ('cpu', 'bfloat16')
    >>> check_pair_options(p.parse_args(["--device", "tpu"]))
    Traceback (most recent call last):
    ...
    mechdiff.cli.UsageError: --device tpu: not a torch device (use cpu, cuda, cuda:N or mps)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

DTYPES = ("float32", "bfloat16", "float16")
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "TOKENIZERS_PARALLELISM": "false",
}


class UsageError(ValueError):
    """A user's input is wrong; the CLIs print it as one line (no traceback) and exit with status 2."""


def offline_environment() -> None:
    """Keep Hugging Face and wandb offline unless the user's environment says otherwise."""
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)


def add_pair_options(parser: argparse.ArgumentParser, *, default_pair: str = "organism") -> None:
    """``--pair/--base/--target/--device/--dtype/--threads``, the same in every command."""
    g = parser.add_argument_group("model pair")
    g.add_argument(
        "--pair",
        default=default_pair,
        help="organism (the shipped pair, default), smollm2 or smollm2:RUN (SmolLM2-135M-"
        "Instruct and its fine-tune RUN: python -m mechdiff.real train), a preset "
        "name, or custom (with --base and --target)",
    )
    g.add_argument("--base", help="with --pair custom: the base model's local HF folder (or hf:ORG/NAME)")
    g.add_argument("--target", help="with --pair custom: the fine-tune's local HF folder (or hf:ORG/NAME)")
    g.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:N or mps (default: cuda when a GPU is visible, else cpu)"
    )
    g.add_argument(
        "--dtype",
        default="float32",
        choices=DTYPES,
        help="dtype of the models and everything trained on them (default float32; bfloat16 halves memory on a GPU)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (0: torch's default; 1 is fastest on a busy 2-core machine)",
    )


def check_device(name: str | None) -> str:
    """The device ``name`` resolved and checked to exist here (``None``: cuda if visible, else cpu)."""
    import torch

    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name}: not a torch device (use cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible on this machine (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {name}: mechdiff runs on cpu, cuda or mps, not {device.type}")
    return str(device)


def check_pair_options(args: argparse.Namespace) -> argparse.Namespace:
    """Validate the pair flags in place (``args.device`` resolved); raise :class:`UsageError`."""
    if (args.base or args.target) and args.pair != "custom":
        raise UsageError(f"--base/--target go with --pair custom, not --pair {args.pair}")
    if args.pair == "custom":
        for flag in ("base", "target"):
            folder = getattr(args, flag)
            if not folder:
                raise UsageError(f"--pair custom needs --{flag} FOLDER")
            if not folder.startswith("hf:") and not os.path.isdir(os.path.expanduser(folder)):
                raise UsageError(f"--{flag} {folder}: no such folder")
    if args.threads < 0:
        raise UsageError(f"--threads {args.threads}: must be >= 0")
    args.device = check_device(args.device)
    return args


def apply_threads(args: argparse.Namespace) -> None:
    if getattr(args, "threads", 0):
        import torch

        torch.set_num_threads(args.threads)


def load_pair_from_args(args: argparse.Namespace):
    """The :class:`~mechdiff.models.ModelPair` that checked pair flags name."""
    from mechdiff.models import load_pair

    apply_threads(args)
    where = dict(device=args.device, dtype=args.dtype)
    if args.pair == "custom":
        return load_pair("custom", base=args.base, target=args.target, **where)
    return load_pair(args.pair, **where)


def shown_path(path: str | Path, root: str | Path | None = None) -> str:
    """``path`` relative to ``root`` (default: the working folder) when inside it, as summaries
    record paths, so they read the same on every machine.

    >>> shown_path(Path.cwd() / "runs" / "x")
    'runs/x'
    """
    base = Path(root).resolve() if root is not None else Path.cwd().resolve()
    try:
        return str(Path(path).resolve().relative_to(base))
    except ValueError:
        return str(path)


def run(main: Callable[[list[str] | None], object], argv: list[str] | None = None) -> None:
    """Call a CLI's ``main`` and turn a :class:`UsageError` into ``error: ...`` and exit status 2."""
    try:
        main(argv)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
