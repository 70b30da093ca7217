"""Statistics of the papers' figures: AUC, Spearman's ρ with a bootstrap interval or a permutation
p-value, partial Spearman, and the percentile bootstrap interval of a mean that they share."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata


def paired(x, y, names: tuple[str, str] = ("x", "y")) -> tuple[np.ndarray, np.ndarray]:
    """``x`` and ``y`` as float64 vectors of one value per pair; ``x`` must be finite (``y`` may hold
    NaN for a pair without a score)."""
    x, y = (np.asarray(v, dtype=np.float64).reshape(-1) for v in (x, y))
    if len(x) != len(y):
        raise ValueError(f"{names[0]} and {names[1]} must have one value per pair, got {len(x)} and {len(y)}")
    if np.isnan(x).any():
        raise ValueError(f"{names[0]} contains NaN; every pair needs a finite value")
    return x, y


def check_bootstrap(n_boot: int, level: float) -> None:
    if not isinstance(n_boot, int) or isinstance(n_boot, bool) or n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < level < 1, got n_boot={n_boot!r}, level={level!r}")


def mean_interval(
    values: np.ndarray, *, n_boot: int = 1000, level: float = 0.95, rng: np.random.Generator
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement, ``n_boot``
    times, from ``rng``), so that every per-bin or per-class mean of a figure carries the same kind of
    interval."""
    check_bootstrap(n_boot, level)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if not len(values):
        raise ValueError("mean_interval needs at least one value")
    boots = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(1)
    tail = (1 - level) / 2
    return float(np.quantile(boots, tail)), float(np.quantile(boots, 1 - tail))


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Probability that a random positive has a higher ``score`` than a random negative (ties ½):
    how well a cheap score separates two classes (0.5 = chance)."""
    score, label = np.asarray(score, dtype=float), np.asarray(label, dtype=bool)
    if score.shape != label.shape or score.ndim != 1:
        raise ValueError(f"auc needs score and label of the same 1-D shape, got {score.shape} and {label.shape}")
    if label.all() or not label.any():
        return float("nan")
    ranks, n_pos = rankdata(score), int(label.sum())  # average ranks: ties count one half
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(label) - n_pos)))


@dataclass(frozen=True)
class Correlation:
    """Spearman's ``rho`` of ``n`` pairs and its percentile bootstrap interval [``low``, ``high``]."""

    rho: float
    low: float
    high: float
    n: int


def spearman(x, y, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> Correlation:
    """Spearman's rank correlation of the pairs with finite ``y``, and a percentile bootstrap
    interval over pairs (resampled with replacement); ``n_boot=0`` gives ρ alone (NaN bounds)."""
    x, y = paired(x, y)
    if n_boot != 0:
        check_bootstrap(n_boot, level)
    keep = ~np.isnan(y)
    x, y = x[keep], y[keep]
    if len(x) < 3:
        raise ValueError(f"spearman needs at least 3 pairs with a score, got {len(x)}")

    def rho(i: np.ndarray) -> np.ndarray:  # i: [..., n] resampled indices -> rank correlation per row
        rx, ry = (rankdata(v[i], axis=-1) for v in (x, y))
        rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (rx * ry).sum(-1) / np.sqrt((rx**2).sum(-1) * (ry**2).sum(-1))

    estimate = float(rho(np.arange(len(x))))
    if n_boot == 0:
        return Correlation(estimate, math.nan, math.nan, len(x))
    boots = rho(np.random.default_rng(seed).integers(0, len(x), size=(n_boot, len(x))))
    boots = boots[~np.isnan(boots)]  # a resample with all-equal values has no rank correlation
    tail = (1 - level) / 2
    lo, hi = (np.quantile(boots, tail), np.quantile(boots, 1 - tail)) if len(boots) else (math.nan, math.nan)
    return Correlation(estimate, float(lo), float(hi), len(x))


@dataclass(frozen=True)
class RankTest:
    """Spearman's ``rho`` of ``n`` pairs and its two-sided permutation ``p``-value (``exact``: over
    every pairing, else Monte Carlo)."""

    rho: float
    p: float
    n: int
    exact: bool


def spearman_test(a, b, *, n_resamples: int = 9_999) -> RankTest:
    """Spearman's ρ of ``a`` and ``b`` and its permutation p-value: exact (all n! pairings) when
    n! <= ``n_resamples``, e.g. for 7 architectures, else ``n_resamples`` seeded random pairings.
    Fewer than 3 pairs give NaN."""
    from scipy.stats import permutation_test

    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"spearman_test needs two 1-D arrays of the same length, got {a.shape} and {b.shape}")
    if len(a) < 3:
        return RankTest(math.nan, math.nan, len(a), False)
    rb = rankdata(b) - (len(b) + 1) / 2

    def rho(x, axis=-1):
        ra = rankdata(x, axis=-1) - (x.shape[-1] + 1) / 2
        denominator = np.sqrt((ra**2).sum(-1) * (rb**2).sum())
        return np.divide((ra * rb).sum(-1), denominator, out=np.full(ra.shape[:-1], np.nan), where=denominator > 0)

    test = permutation_test(
        (a,), rho, permutation_type="pairings", n_resamples=n_resamples, vectorized=True, random_state=0
    )
    return RankTest(float(test.statistic), float(test.pvalue), len(a), math.factorial(len(a)) <= n_resamples)


def partial_rank_correlation(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Spearman's ρ of ``x`` and ``y`` with ``z`` partialled out (the rank version of the first-order
    partial correlation): what is left of the association once both follow a common cause ``z``."""
    x, y, z = (np.asarray(v, dtype=float) for v in (x, y, z))
    if not x.shape == y.shape == z.shape or x.ndim != 1 or len(x) < 4:
        raise ValueError(
            f"partial_rank_correlation needs three 1-D arrays of the same length >= 4, got "
            f"{x.shape}, {y.shape}, {z.shape}"
        )
    r = np.corrcoef(np.stack([rankdata(x), rankdata(y), rankdata(z)]))
    rxy, rxz, ryz = r[0, 1], r[0, 2], r[1, 2]
    return float((rxy - rxz * ryz) / np.sqrt((1 - rxz**2) * (1 - ryz**2)))
