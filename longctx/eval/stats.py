"""Uncertainty of evaluation figures. The units are documents (or independent trials), never
tokens: the tokens of one document share its topic, style and difficulty, so counting them as
independent draws would make every interval far too narrow.

Losses, bits per byte and their paired differences are ratios over units, R = sum(x_u) / sum(n_u)
(x_u: a document's summed NLL, n_u: its token count). Their standard error comes from a seeded
bootstrap that resamples whole units with replacement, scaled by sqrt(U / (U - 1)) so that it
estimates the usual unbiased standard error, and the interval is R +- t(U - 1) * SE with Student's
t: with few units (a corpus of four long books has four) the t quantile widens the interval where
a normal or percentile interval would claim too much. Accuracies of independent trials use
Wilson's score interval, which stays inside [0, 1] and is not empty at 0/n or n/n.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np

from longctx.eval.settings import BootstrapSettings as Bootstrap


def _continued_fraction(a: float, b: float, x: float) -> float:
    """Lentz's evaluation of the continued fraction of the incomplete beta function."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        m2 = 2 * m
        for numerator in (
            m * (b - m) * x / ((qam + m2) * (a + m2)),
            -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return result


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, dof: float) -> float:
    tail = 0.5 * incomplete_beta(dof / 2.0, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t >= 0 else tail


def student_t_quantile(p: float, dof: float) -> float:
    """The p-quantile of Student's t with `dof` degrees of freedom (bisection on the CDF)."""
    low, high = -1.0, 1.0
    while student_t_cdf(low, dof) > p:
        low *= 2.0
    while student_t_cdf(high, dof) < p:
        high *= 2.0
    for _ in range(200):
        middle = 0.5 * (low + high)
        if student_t_cdf(middle, dof) < p:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)


def bootstrap_standard_errors(
    numerators: np.ndarray, denominators: np.ndarray, settings: Bootstrap
) -> np.ndarray:
    """Standard error of each column's ratio sum(num) / sum(den) over units (rows).

    numerators, denominators: [units] or [units, columns]. Columns share the resampled units.
    NaN where fewer than two units carry weight in a column.
    """
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    squeeze = num.ndim == 1
    num, den = num.reshape(len(num), -1), den.reshape(len(den), -1)
    units = len(num)
    present = (den > 0).sum(0)
    if units < 2:
        errors = np.full(num.shape[1], np.nan)
        return errors[0] if squeeze else errors
    rng = np.random.default_rng(settings.seed)
    ratios = []
    for start in range(0, settings.resamples, 256):
        count = min(256, settings.resamples - start)
        weights = rng.multinomial(units, np.full(units, 1.0 / units), size=count).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            ratios.append((weights @ num) / (weights @ den))
    ratios = np.concatenate(ratios)
    with np.errstate(invalid="ignore"):
        errors = np.nanstd(ratios, axis=0, ddof=1) * math.sqrt(units / (units - 1))
    errors = np.where(present >= 2, errors, np.nan)
    return errors[0] if squeeze else errors


def t_half_width(standard_error: float, units: int, confidence: float) -> float | None:
    if units < 2 or not math.isfinite(standard_error):
        return None
    return student_t_quantile(0.5 + confidence / 2.0, units - 1) * standard_error


def ratio_interval(
    numerators: np.ndarray, denominators: np.ndarray, settings: Bootstrap
) -> tuple[float | None, float | None, float | None]:
    """(estimate, low, high) of sum(num) / sum(den) over units; low/high None with < 2 units."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    if den.sum() <= 0:
        return None, None, None
    estimate = float(num.sum() / den.sum())
    units = int((den > 0).sum())
    half = t_half_width(
        float(bootstrap_standard_errors(num, den, settings)), units, settings.confidence
    )
    if half is None:
        return estimate, None, None
    return estimate, estimate - half, estimate + half


def ratio_intervals(
    numerators: np.ndarray, denominators: np.ndarray, settings: Bootstrap
) -> list[tuple[float | None, float | None, float | None]]:
    """ratio_interval per column of [units, columns] arrays (one bootstrap shared by columns)."""
    num = np.asarray(numerators, dtype=np.float64)
    den = np.asarray(denominators, dtype=np.float64)
    errors = bootstrap_standard_errors(num, den, settings)
    results = []
    for column, error in enumerate(np.atleast_1d(errors)):
        total = den[:, column].sum()
        if total <= 0:
            results.append((None, None, None))
            continue
        estimate = float(num[:, column].sum() / total)
        half = t_half_width(float(error), int((den[:, column] > 0).sum()), settings.confidence)
        results.append(
            (estimate, None, None) if half is None else (estimate, estimate - half, estimate + half)
        )
    return results


def wilson_interval(successes: int, trials: int, confidence: float) -> tuple[float, float] | None:
    """Wilson's score interval for a proportion of independent trials (None without trials)."""
    if trials <= 0:
        return None
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z / (1 + z * z / trials) * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials**2))
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high
