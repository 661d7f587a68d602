"""The statistics behind every interval: known quantiles, known widths, documents as units."""

from __future__ import annotations

import math

import numpy as np
import pytest

from longctx.eval.settings import BootstrapSettings
from longctx.eval.stats import (
    incomplete_beta,
    ratio_interval,
    ratio_intervals,
    student_t_quantile,
    wilson_interval,
)


@pytest.mark.parametrize(
    "p,dof,expected",
    [
        (0.975, 1, 12.7062),
        (0.975, 3, 3.1824),
        (0.975, 10, 2.2281),
        (0.95, 5, 2.0150),
        (0.025, 4, -2.7764),
        (0.975, 10**6, 1.9600),
    ],
)
def test_student_t_quantiles_match_the_tables(p, dof, expected):
    assert student_t_quantile(p, dof) == pytest.approx(expected, abs=1e-4)


def test_incomplete_beta_against_closed_forms():
    assert incomplete_beta(1.0, 1.0, 0.3) == pytest.approx(0.3)  # uniform
    assert incomplete_beta(2.0, 1.0, 0.3) == pytest.approx(0.09)  # x^a with b = 1
    assert incomplete_beta(0.5, 0.5, 0.5) == pytest.approx(0.5)  # arcsine, symmetric


def test_wilson_interval_of_known_cases():
    low, high = wilson_interval(0, 10, 0.95)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-4)
    low, high = wilson_interval(5, 10, 0.95)
    assert (low, high) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(2, 2, 0.95)[0] == pytest.approx(0.3424, abs=1e-4)  # 2/2 proves little
    assert wilson_interval(0, 0, 0.95) is None


def documents_with_means(means: np.ndarray, tokens_per_document: int):
    """Per-document NLL sums and token counts whose per-document mean losses are `means`."""
    tokens = np.full(len(means), float(tokens_per_document))
    return means * tokens, tokens


def test_bootstrap_interval_of_a_known_case_has_the_right_width():
    """Documents whose mean losses have spread s: the interval of the mean loss is the mean
    plus or minus t(D - 1) s / sqrt(D), however many tokens each document holds."""
    rng = np.random.default_rng(0)
    means = rng.normal(2.0, 0.5, 400)
    expected = student_t_quantile(0.975, 399) * means.std(ddof=1) / math.sqrt(400)
    settings = BootstrapSettings(resamples=4000)
    for tokens in (10, 10_000):
        estimate, low, high = ratio_interval(*documents_with_means(means, tokens), settings)
        assert estimate == pytest.approx(means.mean())
        assert (high - low) / 2 == pytest.approx(expected, rel=0.05)
        assert high - estimate == pytest.approx(estimate - low)


def test_few_documents_widen_the_interval_by_student_t():
    means = np.array([1.8, 2.0, 2.1, 2.3])
    estimate, low, high = ratio_interval(
        *documents_with_means(means, 1000), BootstrapSettings(resamples=20_000)
    )
    expected = 3.1824 * means.std(ddof=1) / 2  # t(3) = 3.18, not 1.96
    assert (high - low) / 2 == pytest.approx(expected, rel=0.05)


def test_intervals_cover_the_true_mean_about_as_often_as_they_claim():
    rng = np.random.default_rng(1)
    settings = BootstrapSettings(resamples=400)
    covered = 0
    for _ in range(200):
        sizes = rng.integers(50, 500, 30)
        means = rng.normal(3.0, 0.4, 30)
        _, low, high = ratio_interval(means * sizes, sizes.astype(float), settings)
        covered += low <= 3.0 <= high
    assert 0.88 <= covered / 200 <= 0.99


def test_identical_scores_give_a_zero_difference_with_zero_width():
    nll = np.array([120.0, 80.5, 301.25])
    tokens = np.array([50.0, 40.0, 100.0])
    assert ratio_interval(nll - nll, tokens, BootstrapSettings()) == (0.0, 0.0, 0.0)


def test_one_document_gives_no_interval_and_columns_share_the_resamples():
    assert ratio_interval(np.array([10.0]), np.array([5.0]), BootstrapSettings()) == (
        2.0,
        None,
        None,
    )
    rng = np.random.default_rng(2)
    nll = rng.uniform(1, 3, (20, 2)) * 100
    tokens = np.full((20, 2), 100.0)
    both = ratio_intervals(nll, tokens, BootstrapSettings())
    alone = ratio_interval(nll[:, 1], tokens[:, 1], BootstrapSettings())
    assert both[1] == pytest.approx(alone)
