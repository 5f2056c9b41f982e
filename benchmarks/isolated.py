"""Each path of a benchmark measured in a fresh process, so each peak memory is its own.

A benchmark's ``main`` re-runs its own module with ``--measure PATH`` and reads back the one JSON
object the child prints last. ``child_argv`` drops the parent-only options (its output format and
file), so the child sees the same model, batch and threads as the parent was given.

Example:
    >>> child_argv(["--pair", "smollm2", "--json", "--out", "r.json", "--repeats", "2"])
    ['--pair', 'smollm2', '--repeats', '2']
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable

PARENT_FLAGS = ("--json", "--generation")
PARENT_OPTIONS = ("--out",)


def child_argv(argv: list[str]) -> list[str]:
    """``argv`` without the options only the parent acts on."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in PARENT_OPTIONS:
            skip = True
        elif arg not in PARENT_FLAGS and arg.split("=")[0] not in PARENT_OPTIONS:
            kept.append(arg)
    return kept


def measure_in_child(module: str, argv: list[str], path: str) -> dict:
    """Run ``python -m module *argv --measure path`` and return the JSON object it printed last."""
    done = subprocess.run(
        [sys.executable, "-m", module, *child_argv(argv), "--measure", path], capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(f"the {path} measurement of {module} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def add_path_options(parser: argparse.ArgumentParser, paths: tuple[str, ...] = ("fast", "plain")) -> None:
    """``--out`` and ``--json`` for the parent, and the hidden ``--measure PATH`` of a child
    (``paths``: the ones the benchmark measures)."""
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--json", action="store_true", help="print one JSON object only")
    parser.add_argument("--measure", choices=list(paths), help=argparse.SUPPRESS)


def fast_and_plain(module: str, args, argv: list[str] | None, measure: Callable) -> tuple[dict, dict] | None:
    """In a child (``--measure``): print ``measure(args, path)`` as JSON and return None. In the
    parent: each path measured in a child of its own, ``(fast, plain)``."""
    if args.measure:
        print(json.dumps(measure(args, args.measure)))
        return None
    argv = argv if argv is not None else sys.argv[1:]
    fast, plain = (measure_in_child(module, argv, path) for path in ("fast", "plain"))
    return fast, plain
