"""Timing and memory measurement, one copy for the benchmarks, the estimator and the studies.

Example:
    >>> seconds = mean_seconds(lambda: sum(range(1000)), repeats=3)
    >>> seconds > 0
    True
    >>> sorted(interleaved_seconds({"a": lambda: None, "b": lambda: sum(range(100))}, repeats=2))
    ['a', 'b']
    >>> peak_rss_gib() > 0
    True
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Callable


def mean_seconds(
    fn: Callable[[], object], repeats: int = 1, *, warmup: bool = True, sync: Callable[[], object] | None = None
) -> float:
    """Wall seconds per call of ``fn``, averaged over ``repeats`` calls after one warm-up call
    (lazy allocations and kernel selection are not the steady state). ``sync`` (e.g.
    ``torch.cuda.synchronize``) runs before each clock read, so queued GPU work is counted."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, not {repeats}")
    sync = sync or (lambda: None)
    if warmup:
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def interleaved_seconds(timed: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Mean wall seconds per call of each function, called in turn ``repeats`` rounds (so all of
    them see the same machine load; a ratio of two is fair on a shared machine). No warm-up: give
    each one its own first."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, not {repeats}")
    times = {name: 0.0 for name in timed}
    for _ in range(repeats):
        for name, fn in timed.items():
            t0 = time.perf_counter()
            fn()
            times[name] += time.perf_counter() - t0
    return {name: total / repeats for name, total in times.items()}


def peak_rss_gib() -> float:
    """This process's peak resident memory so far, in GiB (``getrusage``; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)
