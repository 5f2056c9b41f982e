"""What every training-step benchmark reports: its step beside its floor (from the fast path's
process) and beside the plain path (from the other process), written and printed one way.

Example:
    >>> fast = {"step_s": 3.0, "floor_s": 2.0, "peak_gib": 1.5, "loaded_gib": 1.0, "loss": 2.5}
    >>> plain = {"step_s": 6.0, "peak_gib": 4.0, "loss": 2.5}
    >>> r = compare(fast, plain)
    >>> r["step_over_floor"], r["speedup_vs_baseline"], r["loss_abs_diff"]
    (1.5, 2.0, 0.0)
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from mechdiff.measure import interleaved_seconds, peak_rss_gib


def time_after_warm_up(warm_up: Callable[[], object], timed: dict[str, Callable[[], object]], repeats: int) -> dict:
    """Every step benchmark's protocol in one process: ``warm_up()`` (the step's first call), then
    ``peak_gib``, the peak resident memory through it (the step's own: read before any other
    function first runs), one warm-up call of each function in ``timed`` other than ``"step"``,
    and all of ``timed`` interleaved ``repeats`` rounds (so all see the same machine load), as
    ``{name}_s`` mean seconds."""
    warm_up()
    out = {"peak_gib": peak_rss_gib()}
    for name, fn in timed.items():
        if name != "step":
            fn()
    out.update({f"{name}_s": seconds for name, seconds in interleaved_seconds(timed, repeats).items()})
    return out


def pair_header(args, fast: dict) -> dict:
    """The keys a pair's step benchmark starts with: the pair, how it loaded, and the batch."""
    return {
        "pair": args.pair,
        "note": fast["note"],
        "batch": args.batch,
        "positions": fast["positions"],
        "tokens": fast["tokens"],
        "threads": fast["threads"],
    }


def pair_title(result: dict, detail: str = "") -> str:
    """The table's title line for a :func:`pair_header` result (``detail``: the benchmark's own settings)."""
    return (
        f"{result['pair']}: {result['note']}; batch {result['batch']} x {result['positions']} positions, "
        f"{detail}{result['threads']} thread(s)"
    )


def compare(fast: dict, plain: dict) -> dict:
    """The shared keys: ``step_s``, ``floor_s``, ``step_over_floor``, ``peak_gib``, ``loaded_gib``,
    ``baseline_step_s``, ``baseline_peak_gib``, ``speedup_vs_baseline`` and, where both paths
    measured their loss on the batch, ``loss`` and ``loss_abs_diff``."""
    out = {
        "step_s": fast["step_s"],
        "floor_s": fast["floor_s"],
        "step_over_floor": fast["step_s"] / fast["floor_s"],
        "peak_gib": fast["peak_gib"],
        "loaded_gib": fast["loaded_gib"],
        "baseline_step_s": plain["step_s"],
        "baseline_peak_gib": plain["peak_gib"],
        "speedup_vs_baseline": plain["step_s"] / fast["step_s"],
    }
    if "loss" in fast and "loss" in plain:
        out.update(loss=fast["loss"], loss_abs_diff=abs(fast["loss"] - plain["loss"]))
    return out


def emit(result: dict, out: str | None, as_json: bool) -> bool:
    """Write ``result`` to ``out`` (if given) and print it with ``as_json``; True when printed."""
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(result, indent=1))
    if as_json:
        print(json.dumps(result, indent=1))
    return as_json


def print_table(title: str, rows: list[tuple[str, float, float | None]], result: dict) -> None:
    """``title``, then ``(label, seconds per step, peak GiB or None)`` rows, then the ratios."""
    print(title)
    width = max(34, *(len(label) for label, _, _ in rows))
    print(f"{'':<{width}} {'s/step':>8} {'peak GiB':>9}")
    for label, seconds, peak in rows:
        print(f"{label:<{width}} {seconds:>8.3f} {'' if peak is None else f'{peak:.2f}':>9}")
    tail = f"step / floor {result['step_over_floor']:.2f}x   baseline / step {result['speedup_vs_baseline']:.2f}x"
    if "loss_abs_diff" in result:
        tail += f"   |loss - baseline loss| {result['loss_abs_diff']:.1e}"
    print(tail)
