"""Confidence intervals for evaluation results: how sure a pass@1 or a difference between two models is.

    from nanoseek.eval.stats import wilson, mean_ci, paired_diff_ci
    wilson(37, 50)                 # 95% Wilson score interval of a proportion -> (lo, hi)
    mean_ci(per_problem_accuracy)  # mean with a normal-approximation 95% interval -> (mean, lo, hi)
    paired_diff_ci(a, b)           # mean of a - b over the same problems, with its 95% interval
    mean_ci(per_seed, t95(3))      # a mean over a few seeds: Student's t instead of the normal's 1.96
    with_ci(row, "pass@1")         # "74.8% [70.1, 79.2]" from an evaluation row's rate and interval

pass@1 averages k correlated samples per problem, so its interval is taken over problems (the
per-problem mean accuracy), not over the n*k samples; a comparison of two models on the same
problems uses the paired differences, which is tighter than two separate intervals.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959963984540054  # the two-sided 95% quantile of the standard normal


def wilson(successes: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion successes / n (Wilson 1927); (0, 1) when n == 0."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_ci(xs: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """Mean of xs with a normal-approximation interval mean +- z * s / sqrt(n) (s: sample std)."""
    n = len(xs)
    if n == 0:
        raise ValueError("no values")
    m = sum(xs) / n
    if n == 1:
        return m, m, m
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    half = z * s / math.sqrt(n)
    return m, m - half, m + half


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond, the normal's 1.96 is close)
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t95(n: int) -> float:
    """The 95% multiplier for a mean of n values: Student's t with n - 1 degrees of freedom (few seeds)."""
    if n < 2:
        raise ValueError("an interval needs at least 2 values")
    return T95[n - 2] if n - 1 <= len(T95) else Z95


def paired_diff_ci(a: Sequence[float], b: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """Mean of a[i] - b[i] (two models scored on the same problems) with its 95% interval."""
    if len(a) != len(b):
        raise ValueError("paired samples need equal lengths")
    return mean_ci([x - y for x, y in zip(a, b)], z)


def _is_rate(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def with_ci(row: dict, key: str) -> str:
    """An evaluation row's rate with its 95% interval when the row recorded one: 74.8% [70.1, 79.2]."""
    x, ci = row.get(key), row.get(f"{key}_ci")
    if not _is_rate(x):
        return "–"
    if not (isinstance(ci, list) and len(ci) == 2 and all(map(_is_rate, ci))):
        return f"{100 * x:.1f}%"
    return f"{100 * x:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
