"""Confidence intervals against hand-computed and textbook values."""

import math

import pytest

from nanoseek.eval.stats import mean_ci, paired_diff_ci, wilson


def test_wilson_matches_textbook_values():
    # Newcombe (1998), Table I: 81/263 -> 0.2553 to 0.3662; 15/148 -> 0.0624 to 0.1605
    lo, hi = wilson(81, 263)
    assert (round(lo, 4), round(hi, 4)) == (0.2553, 0.3662)
    lo, hi = wilson(15, 148)
    assert (round(lo, 4), round(hi, 4)) == (0.0624, 0.1605)
    lo, hi = wilson(0, 10)                      # never below 0, and the upper end is z^2 / (n + z^2)
    assert lo == 0 and math.isclose(hi, 1.959963984540054 ** 2 / (10 + 1.959963984540054 ** 2))
    assert wilson(0, 0) == (0.0, 1.0)


def test_mean_ci_by_hand():
    m, lo, hi = mean_ci([0.0, 0.5, 1.0, 0.5])  # mean 0.5, s = sqrt(1/6), half = 1.96 * s / 2
    half = 1.959963984540054 * math.sqrt(1 / 6) / 2
    assert m == 0.5 and lo == pytest.approx(0.5 - half) and hi == pytest.approx(0.5 + half)
    assert mean_ci([0.3]) == (0.3, 0.3, 0.3)
    with pytest.raises(ValueError):
        mean_ci([])


def test_paired_difference_is_tighter_than_unpaired_when_correlated():
    a = [1, 1, 0, 1, 0, 1, 1, 0, 1, 1] * 5
    b = [1, 1, 0, 1, 0, 1, 0, 0, 1, 1] * 5      # b fails one more problem in ten, else equal
    d, lo, hi = paired_diff_ci(a, b)
    assert d == pytest.approx(0.1) and lo > 0   # paired: the difference is significant
    (_, alo, _), (_, _, bhi) = mean_ci(a), mean_ci(b)
    assert alo < bhi                            # separate intervals overlap
    with pytest.raises(ValueError):
        paired_diff_ci([1], [1, 0])
