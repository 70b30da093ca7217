"""The statistics the figures share (``paperlib.metrics.stats``), against scipy and explicit loops."""

from itertools import permutations

import numpy as np
import pytest
from scipy.stats import spearmanr

from paperlib.metrics.stats import auc, mean_interval, partial_rank_correlation, spearman, spearman_test


def test_auc_is_the_rank_statistic():
    assert auc(np.array([0.1, 0.2, 0.8, 0.9]), np.array([0, 0, 1, 1])) == 1.0
    assert auc(np.array([0.9, 0.8, 0.2, 0.1]), np.array([0, 0, 1, 1])) == 0.0
    assert auc(np.ones(4), np.array([0, 1, 0, 1])) == 0.5
    assert auc(np.array([1.0, 2.0, 3.0]), np.array([1, 0, 1])) == 0.5
    assert np.isnan(auc(np.ones(3), np.ones(3)))
    with pytest.raises(ValueError, match="same 1-D shape"):
        auc(np.ones(3), np.ones(4))


def test_spearman_with_a_bootstrap_interval_over_pairs():
    rng = np.random.default_rng(0)
    x = rng.random(200)
    y = x + rng.normal(0, 0.3, 200)
    y[::17] = np.nan  # pairs without a score are left out
    result = spearman(x, y, n_boot=300)
    keep = ~np.isnan(y)
    assert result.rho == pytest.approx(spearmanr(x[keep], y[keep]).statistic, abs=1e-12)
    assert result.low < result.rho < result.high and result.n == keep.sum()
    # the interval is the percentiles of rho over resampled pairs, drawn as an explicit loop here
    draws = np.random.default_rng(0).integers(0, keep.sum(), size=(300, keep.sum()))
    loop = [spearmanr(x[keep][i], y[keep][i]).statistic for i in draws]
    assert (result.low, result.high) == pytest.approx(tuple(np.quantile(loop, [0.025, 0.975])), abs=1e-12)
    monotone = np.arange(50.0)
    exact = spearman(monotone, monotone**3)
    assert exact.rho == pytest.approx(1.0) and exact.low == pytest.approx(1.0) and exact.high == pytest.approx(1.0)
    assert spearman(x, -x, n_boot=50).rho == pytest.approx(-1)
    alone = spearman(x, y, n_boot=0)  # rho alone
    assert alone.rho == result.rho and np.isnan(alone.low) and np.isnan(alone.high)
    with pytest.raises(ValueError, match="at least 3 pairs"):
        spearman([1, 2], [1, 2])
    with pytest.raises(ValueError, match="one value per pair, got 50 and 49"):
        spearman(monotone, monotone[:-1])
    with pytest.raises(ValueError, match="x contains NaN"):
        spearman([np.nan, 1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="n_boot >= 1"):
        spearman(x, y, n_boot=-1)


def test_spearman_test_matches_every_pairing_by_hand():
    a = np.array([0.91, 0.94, 0.86, 0.71, 0.88, 0.93, 0.95])
    b = np.array([0.90, 0.92, 0.83, 0.70, 0.86, 0.93, 0.93])  # a tie, as real MCCs have
    result = spearman_test(a, b)
    assert result.exact and result.n == 7 and result.rho == pytest.approx(spearmanr(a, b).statistic)
    null = np.array([spearmanr(a[list(order)], b).statistic for order in permutations(range(7))])
    tol = 1e-12  # two-sided: twice the smaller tail, counting ties with the observed value
    want = min(1.0, 2 * min((null <= result.rho + tol).mean(), (null >= result.rho - tol).mean()))
    assert result.p == pytest.approx(want)
    assert np.isnan(spearman_test([1.0, 2.0], [2.0, 1.0]).rho)
    with pytest.raises(ValueError, match="same length"):
        spearman_test([1, 2, 3], [1, 2])


def test_partial_rank_correlation_removes_a_common_cause():
    rng = np.random.default_rng(0)
    z = rng.standard_normal(2000)
    x, y = z + 0.3 * rng.standard_normal(2000), z + 0.3 * rng.standard_normal(2000)
    assert spearman(x, y, n_boot=0).rho > 0.8  # both follow z
    assert abs(partial_rank_correlation(x, y, z)) < 0.1  # nothing left once z is accounted for
    w = x + 0.1 * rng.standard_normal(2000)
    assert partial_rank_correlation(x, w, z) > 0.5  # a direct link survives
    with pytest.raises(ValueError, match="same length"):
        partial_rank_correlation(x, y, z[:-1])


def test_mean_interval_is_the_percentile_bootstrap_and_covers_the_mean():
    values = np.random.default_rng(1).exponential(size=40)
    low, high = mean_interval(values, n_boot=500, rng=np.random.default_rng(7))
    draws = np.random.default_rng(7)
    loop = [values[draws.integers(0, 40, 40)].mean() for _ in range(500)]  # one resample after another
    assert (low, high) == pytest.approx(tuple(np.quantile(loop, [0.025, 0.975])), abs=1e-12)
    # a 95 % interval of the mean of 40 normal draws contains the true mean in most of 200 samples
    rng = np.random.default_rng(3)
    covered = [
        lo <= 0 <= hi for lo, hi in (mean_interval(rng.normal(size=40), n_boot=300, rng=rng) for _ in range(200))
    ]
    assert 0.88 <= np.mean(covered) <= 0.99
    with pytest.raises(ValueError, match="at least one value"):
        mean_interval(np.array([]), rng=rng)
    with pytest.raises(ValueError, match="n_boot >= 1"):
        mean_interval(values, n_boot=0, rng=rng)
