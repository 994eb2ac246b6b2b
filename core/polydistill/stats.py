"""Paired significance tests for ablation studies: Student t (with its own t distribution,
so no SciPy is needed) and an exact or sampled sign-flip permutation test."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

NAN = float("nan")
MAX_EXACT_FLIPS = 20  # 2^20 sign assignments; beyond that the permutation test samples them


def _beta_cf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < eps:
            break
    return h


def _betainc(a: float, b: float, x: float, y: float) -> float:
    """Regularized incomplete beta I_x(a, b); y = 1 - x is passed separately to keep its precision."""
    if x <= 0.0:
        return 0.0
    if y <= 0.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y))
    # The fraction converges quickly only below the mean; above it use I_x(a, b) = 1 - I_y(b, a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _beta_cf(a, b, x) / a
    return 1.0 - front * _beta_cf(b, a, y) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom."""
    if math.isnan(t) or math.isnan(df):
        return NAN
    if math.isinf(t):
        return 0.0
    t2 = t * t
    return min(1.0, _betainc(df / 2.0, 0.5, df / (df + t2), t2 / (df + t2)))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = t_two_sided_p(t, df) / 2.0
    return 1.0 - tail if t > 0 else tail


def t_ppf(q: float, df: float) -> float:
    """The q quantile of Student's t with df degrees of freedom (bisection on the CDF)."""
    if not 0.0 < q < 1.0:
        return -math.inf if q == 0.0 else math.inf if q == 1.0 else NAN
    if q < 0.5:
        return -t_ppf(1.0 - q, df)
    if q == 0.5:
        return 0.0
    target = 2.0 * (1.0 - q)  # bisect on the two-sided tail: no cancellation near q = 1
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > target:
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > target else (lo, mid)
        if hi - lo <= 1e-13 * hi:
            break
    return (lo + hi) / 2.0


@dataclass(frozen=True)
class PairedTest:
    """A paired comparison: mean difference, two-sided p-value and 95% t confidence interval."""

    n: int
    mean: float
    p_value: float
    ci: tuple[float, float]
    note: str = ""


def sign_flip_test(diffs: Sequence[float]) -> float:
    """Two-sided paired randomization p: share of sign assignments with |sum| >= the observed |sum|.

    Exact over all 2^n assignments up to n = 20 (the observed one included); beyond that 2^20 random ones.
    """
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        return NAN
    # Sums equal in exact arithmetic can differ by rounding; count them as ties, not as smaller.
    threshold = abs(d.sum()) - 1e-9 * max(1.0, float(np.abs(d).sum()))
    if d.size > MAX_EXACT_FLIPS:
        signs = np.random.default_rng(0).choice([-1.0, 1.0], size=(1 << 20, d.size))
        return float((np.count_nonzero(np.abs(signs @ d) >= threshold) + 1) / ((1 << 20) + 1))
    total, bits, hits = 1 << d.size, np.arange(d.size), 0
    for start in range(0, total, 1 << 16):
        k = np.arange(start, min(total, start + (1 << 16)))
        signs = 1 - 2 * ((k[:, None] >> bits) & 1)
        hits += int(np.count_nonzero(np.abs(signs @ d) >= threshold))
    return hits / total


def paired_test(diffs: Sequence[float], test: Literal["t", "permutation"] = "t") -> PairedTest:
    """Compare paired differences with 0: paired t-test or sign-flip test; the CI is always the t one."""
    d = [float(x) for x in diffs]
    n = len(d)
    if n == 0:
        return PairedTest(0, NAN, NAN, (NAN, NAN), "no paired seeds")
    mean = math.fsum(d) / n
    if n < 2:
        return PairedTest(n, mean, NAN, (NAN, NAN), "needs ≥2 paired seeds")
    note = "sampled sign flips" if test == "permutation" and n > MAX_EXACT_FLIPS else ""
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    scale = max(1.0, max(abs(x) for x in d))
    if sd <= 1e-12 * scale:  # identical differences: t is 0/0 or ±inf, neither a usable p
        if abs(mean) <= 1e-12 * scale:
            return PairedTest(n, mean, 1.0 if test == "t" else sign_flip_test(d), (mean, mean), note)
        return PairedTest(n, mean, NAN if test == "t" else sign_flip_test(d), (mean, mean), note or "zero variance")
    se = sd / math.sqrt(n)
    half = t_ppf(0.975, n - 1) * se
    p = t_two_sided_p(mean / se, n - 1) if test == "t" else sign_flip_test(d)
    return PairedTest(n, mean, p, (mean - half, mean + half), note)
