"""
The statistics behind eval.py's intervals and study.py's verdicts, in numpy and the standard library: the
percentile bootstrap, McNemar's exact test of two trained models, the paired t-test on per-seed differences (the
study's test of one method against another), Holm's correction, and the paired t-test's power.
"""

import math
from functools import lru_cache

import numpy as np


def bootstrap_ci(metric, hypotheses, references, n_resamples=1000, confidence=0.95, seed=0):
    """Percentile bootstrap interval (Efron) of a corpus-level metric(hypotheses, references) -> float: the metric
    on n_resamples draws of n (hypothesis, reference) pairs with replacement, s_1..s_B; with a = 1 - confidence,
        (a/2 quantile of s, 1 - a/2 quantile of s)       (numpy's linear interpolation, as scipy's "percentile")
    """
    n = len(hypotheses)
    if n != len(references) or n == 0:
        raise ValueError(f"need equally many hypotheses and references, got {n} and {len(references)}")
    if n_resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_resamples >= 1 and 0 < confidence < 1, got {n_resamples} and {confidence}")
    rng = np.random.default_rng(seed)
    scores = [metric([hypotheses[i] for i in idx], [references[i] for i in idx])
              for idx in rng.integers(0, n, size=(n_resamples, n)).tolist()]
    alpha = 1 - confidence
    low, high = np.quantile(scores, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def paired_difference(correct_a, correct_b):
    """Accuracy of A minus accuracy of B on the same N examples, (b - c) / N, where only A gets b of them right and
    only B c, with McNemar's two-sided exact test of "equally accurate": under it b ~ Binomial(n = b + c, 1/2), so
        p = min(1, 2 * sum_{k=0}^{min(b, c)} C(n, k) / 2^n)       (p = 1.0 when n = 0: no evidence either way)
    """
    if len(correct_a) != len(correct_b) or len(correct_a) == 0:
        raise ValueError(f"need two equally long, non-empty lists, got {len(correct_a)} and {len(correct_b)}")
    b = sum(bool(x) and not y for x, y in zip(correct_a, correct_b))
    c = sum(bool(y) and not x for x, y in zip(correct_a, correct_b))
    n = b + c
    term = tail = 1  # C(n, 0), in exact integers: no rounding however large n is
    for k in range(min(b, c)):
        term = term * (n - k) // (k + 1)  # C(n, k + 1) = C(n, k) (n - k) / (k + 1)
        tail += term
    return {"difference": (b - c) / len(correct_a), "p_value": min(1.0, 2 * tail / 2 ** n),
            "only_a_correct": b, "only_b_correct": c, "n": len(correct_a)}


def t_tail(t, df):
    """P(|T| >= |t|) for Student's t with an integer df >= 1, in closed form (Abramowitz & Stegun 26.7.3-4):
    with theta = atan(|t| / sqrt(df)), c = cos(theta), s = sin(theta), P(|T| < |t|) is
        odd df:  (2 / pi) (theta + s (c + 2/3 c^3 + ... + (2 4 .. df-3) / (1 3 .. df-2) c^(df-2)))
        even df: s (1 + 1/2 c^2 + 1 3 / (2 4) c^4 + ... + (1 3 .. df-3) / (2 4 .. df-2) c^(df-2))"""
    theta = math.atan(abs(t) / math.sqrt(df))
    cos2 = math.cos(theta) ** 2
    j, term, total = (1, math.cos(theta), 0.0) if df % 2 else (0, 1.0, 0.0)
    while j <= df - 2:
        total += term
        term *= (j + 1) / (j + 2) * cos2
        j += 2
    inside = 2 / math.pi * (theta + math.sin(theta) * total) if df % 2 else math.sin(theta) * total
    return max(0.0, 1.0 - inside)


def solve(increasing, target, steps=100):
    """The x >= 0 at which an increasing function reaches `target`: doubling to bracket it, then bisection."""
    low, high = 0.0, 1.0
    while increasing(high) < target:
        high *= 2
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if increasing(middle) < target else (low, middle)
    return (low + high) / 2


def t_quantile(q, df):
    """The t with P(T <= t) = q (0.5 <= q < 1) for df degrees of freedom: P(T <= t) = 1 - t_tail(t) / 2, solved."""
    return solve(lambda t: 1 - t_tail(t, df) / 2, q)


def t_test(values, confidence=0.95):
    """Student's t for the mean of S values (on per-seed differences: the paired t-test), S - 1 degrees of freedom:
        t = mean / (sd / sqrt(S)),   p = P(|T| >= |t|),   interval = mean -+ t_quantile(1 - a/2, S - 1) sd / sqrt(S)
    One value gives no interval and no p-value (None): its spread is unknown."""
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return {"difference": mean, "ci95": None, "p_value": None}
    se = float(values.std(ddof=1)) / math.sqrt(len(values))
    half = t_quantile(1 - (1 - confidence) / 2, len(values) - 1) * se
    p = t_tail(mean / se, len(values) - 1) if se > 0 else float(mean == 0)
    return {"difference": mean, "ci95": [mean - half, mean + half], "p_value": p}


def holm(p_values):
    """Holm's (1979) step-down correction for m comparisons, in the order given. With p_(1) <= ... <= p_(m),
        adjusted p_(i) = max over j <= i of min(1, (m - j + 1) p_(j))
    so "adjusted p < 0.05" keeps the chance of any false "told apart" among the m at 5% or less."""
    m = len(p_values)
    adjusted, largest = [0.0] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        largest = max(largest, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = largest
    return adjusted


@lru_cache(maxsize=None)
def detectable_shift(n, alpha, power):
    """The true mean, in standard errors, that the two-sided t-test on n values (df = n - 1) rejects at level alpha
    with probability `power`. With c = t_quantile(1 - alpha/2, df) and X ~ chi(df) (the sd's randomness),
        power(shift) = E_X[ Phi(shift - c X / sqrt(df)) + Phi(-shift - c X / sqrt(df)) ]   (the noncentral t's tails)
    integrated over chi's density x^(df-1) e^(-x^2/2) / (2^(df/2-1) Gamma(df/2)) by the trapezoid rule, solved."""
    df = n - 1
    x = np.linspace(0.0, math.sqrt(df) + 12, 2001)
    density = np.exp((df - 1) * np.log(np.maximum(x, 1e-300)) - x ** 2 / 2 - (df / 2 - 1) * math.log(2)
                     - math.lgamma(df / 2))
    edge = t_quantile(1 - alpha / 2, df) * x / math.sqrt(df)
    phi = np.vectorize(lambda z: 0.5 * math.erfc(-z / math.sqrt(2)))
    return solve(lambda shift: float(np.trapezoid((phi(shift - edge) + phi(-shift - edge)) * density, x)), power,
                 steps=40)


def smallest_detectable(sd, n, alpha=0.05, power=0.8):
    """The smallest true mean difference a two-sided paired t-test on n per-seed differences with standard
    deviation sd finds with probability `power` at level alpha: detectable_shift * sd / sqrt(n). None for n < 2."""
    return None if n < 2 else detectable_shift(n, alpha, power) * sd / math.sqrt(n)
