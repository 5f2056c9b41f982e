"""One script per measured figure, each printing its throughput beside a baseline from the same run."""

import time


def mean_seconds(fn, repeats: int = 1) -> float:
    """Wall seconds per call of ``fn``, averaged over ``repeats`` calls after one warm-up call."""
    fn()  # warm-up: lazy allocations and kernel selection are not the steady state
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats
