"""Confidence intervals for the study's headline numbers: a rate over prompts (Wilson score
interval) and a mean over items (percentile bootstrap), so that no number rests on a handful of
cases without saying so.

Example:
    >>> lo, hi = wilson(45, 48)
    >>> round(lo, 3), round(hi, 3)
    (0.832, 0.979)
    >>> lo, hi = bootstrap_mean([1.0, 0.0, 2.0, 1.0, 1.0, 0.0, 1.0, 2.0])
    >>> lo < 1.0 < hi
    True
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959963984540054  # two-sided 95%


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval of ``successes / n`` (None when ``n == 0``): unlike the normal
    approximation it stays inside [0, 1] and is honest at rates near 0 or 1 with few trials."""
    if n == 0:
        return None
    if not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if successes == 0 else lo), (1.0 if successes == n else hi)  # exact ends, no rounding


def bootstrap_mean(
    values: Sequence[float], n_resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean of ``values`` (None when empty); seeded."""
    if not len(values):
        return None
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_resamples))
    lo = means[int((1 - level) / 2 * n_resamples)]
    hi = means[min(n_resamples - 1, int((1 + level) / 2 * n_resamples))]
    return lo, hi


def bootstrap_paired(
    before: Sequence[float],
    after: Sequence[float],
    statistic,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of ``statistic(sum(before), sum(after))`` resampling items
    (problems) in pairs: both conditions were measured on the same items, so their noise is shared.
    None when empty, or when the statistic is undefined (None) in more than half the resamples.

    >>> cut = lambda b, a: None if b == 0 else 1 - a / b
    >>> lo, hi = bootstrap_paired([2, 1, 2, 1, 2, 2], [0, 0, 1, 0, 0, 0], cut)
    >>> 0.5 < lo < 1 - 1 / 10 < hi <= 1
    True
    """
    if len(before) != len(after):
        raise ValueError(f"paired samples differ in length: {len(before)} and {len(after)}")
    if not len(before):
        return None
    rng, n = random.Random(seed), len(before)
    values = []
    for _ in range(n_resamples):
        idx = [rng.randrange(n) for _ in range(n)]
        v = statistic(sum(before[i] for i in idx), sum(after[i] for i in idx))
        if v is not None:
            values.append(v)
    if len(values) < n_resamples / 2:
        return None
    values.sort()
    return values[int((1 - level) / 2 * len(values))], values[min(len(values) - 1, int((1 + level) / 2 * len(values)))]
