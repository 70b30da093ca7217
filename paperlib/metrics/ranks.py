"""Rank statistics of the papers' figures: AUC, Spearman's ρ with a bootstrap interval, partial Spearman."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


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


def rank_correlation(
    x: np.ndarray, y: np.ndarray, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Spearman's ρ of ``x`` and ``y`` and a percentile bootstrap interval (pairs resampled)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise ValueError(f"rank_correlation needs two 1-D arrays of the same length >= 3, got {x.shape} and {y.shape}")
    rng = np.random.default_rng(seed)
    rx, ry = rankdata(x), rankdata(y)
    rho = float(np.corrcoef(rx, ry)[0, 1])
    boots = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(x), len(x))
        boots.append(np.corrcoef(rankdata(x[pick]), rankdata(y[pick]))[0, 1])
    tail = (1 - level) / 2
    return rho, float(np.nanquantile(boots, tail)), float(np.nanquantile(boots, 1 - tail))


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
