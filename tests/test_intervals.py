"""Wilson and bootstrap intervals against independent references: scipy-free closed forms checked by
simulation coverage and by hand-computed values."""

import random

import pytest

from mechdiff.evaluation.intervals import bootstrap_mean, wilson


def test_wilson_matches_a_hand_computed_value_and_stays_in_range():
    # Wilson (1927) for 8 of 10 at 95%: 0.4902 .. 0.9433 (textbook value)
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 20)[0] == 0.0 and 0 < wilson(0, 20)[1] < 0.2
    assert wilson(20, 20)[1] == 1.0 and wilson(0, 0) is None
    with pytest.raises(ValueError):
        wilson(5, 4)


def test_wilson_covers_the_true_rate_about_95_percent_of_the_time():
    rng, p, n, trials = random.Random(0), 0.1, 48, 2000
    covered = 0
    for _ in range(trials):
        k = sum(rng.random() < p for _ in range(n))
        lo, hi = wilson(k, n)
        covered += lo <= p <= hi
    assert 0.92 <= covered / trials <= 0.99


def test_bootstrap_interval_brackets_the_mean_and_narrows_with_more_data():
    rng = random.Random(1)
    small = [rng.gauss(2.0, 1.0) for _ in range(10)]
    large = small * 10
    lo_s, hi_s = bootstrap_mean(small)
    lo_l, hi_l = bootstrap_mean(large)
    mean = sum(small) / len(small)
    assert lo_s < mean < hi_s and lo_l < mean < hi_l and (hi_l - lo_l) < (hi_s - lo_s) / 2
    assert bootstrap_mean([]) is None and bootstrap_mean([3.0, 3.0]) == (3.0, 3.0)
