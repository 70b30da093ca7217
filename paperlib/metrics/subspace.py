"""Subspace agreement: latents that do not reappear one by one may still span a reproducible subspace.

A latent is unstable between two runs when its matched cosine in the other run (the exact one-to-one
matching behind PW-MCC, ``paperlib.metrics.stability``) is below a threshold. Gerasimov et al. (2026) report
that such latents, individually non-reproducible, span low-rank subspaces that two runs share:
basis ambiguity, where data fix a span but not the directions within it. To test that, each pair of
runs (a, b) gets the principal angles between the spans of a's unstable decoder directions and of
b's, at equal dimension k = min(#unstable in a, #unstable in b, d): each run's span is the top-k right
singular subspace of its unstable unit rows, and the cosines of the principal angles are the
singular values of Q_a Q_b^T, in decreasing order.

Chance is two independent uniformly random k-dimensional subspaces of R^d (``random_subspace_cosines``):
their overlap, the mean squared cosine, has expectation exactly k / d, and the Monte Carlo spectrum
gives an interval for every position.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np

from paperlib.metrics.consistency import _as_runs, as_dictionary
from paperlib.metrics.stability import LatentStability


def _right_singular(rows: np.ndarray) -> tuple[np.ndarray, int]:
    """Right singular vectors [min(n, d), d] of unit rows, strongest first, and their numerical rank."""
    _, s, vt = np.linalg.svd(rows, full_matrices=False)
    rank = int((s > s[0] * max(rows.shape) * np.finfo(np.float64).eps).sum()) if s.size and s[0] > 0 else 0
    return vt, rank


def span(rows, dim: int | None = None) -> np.ndarray:
    """Orthonormal basis [dim, d] of the top-``dim`` right singular subspace of ``rows`` [n, d], each
    scaled to unit length first (``dim`` defaults to the rows' numerical rank)."""
    vt, rank = _right_singular(as_dictionary(rows, "rows"))
    dim = rank if dim is None else dim
    if not 1 <= dim <= rank:
        raise ValueError(f"span dimension must be in [1, rank={rank}] for these rows, got {dim}")
    return vt[:dim]


def principal_cosines(basis_a: np.ndarray, basis_b: np.ndarray) -> np.ndarray:
    """Cosines of the principal angles between the row spans of two orthonormal bases [k_a, d] and
    [k_b, d], in decreasing order (min(k_a, k_b) of them)."""
    if basis_a.ndim != 2 or basis_b.ndim != 2 or basis_a.shape[1] != basis_b.shape[1]:
        raise ValueError(f"principal_cosines needs two bases [k, d] of one d, got {basis_a.shape} and {basis_b.shape}")
    return np.clip(np.linalg.svd(basis_a @ basis_b.T, compute_uv=False), 0.0, 1.0)


def random_subspace_cosines(k: int, d: int, *, n_samples: int = 200, seed: int = 0) -> np.ndarray:
    """[n_samples, k] principal cosines between pairs of independent uniformly random k-dimensional
    subspaces of R^d (Gaussian matrices orthonormalised: Haar-distributed spans)."""
    if not 1 <= k <= d or n_samples < 1:
        raise ValueError(
            f"random_subspace_cosines needs 1 <= k <= d and n_samples >= 1, got k={k}, d={d}, n_samples={n_samples}"
        )
    rng = np.random.default_rng(seed)
    out = np.empty((n_samples, k))
    for i in range(n_samples):
        qa, _ = np.linalg.qr(rng.standard_normal((d, k)))
        qb, _ = np.linalg.qr(rng.standard_normal((d, k)))
        out[i] = principal_cosines(qa.T, qb.T)
    return out


@dataclass(frozen=True)
class PairAgreement:
    """One pair of runs: its unstable latents on each side, the common dimension k and the principal
    cosines (decreasing) between the two k-dimensional spans."""

    runs: tuple[int, int]
    unstable: tuple[np.ndarray, np.ndarray]
    cosines: np.ndarray

    @property
    def dim(self) -> int:
        return len(self.cosines)

    @property
    def overlap(self) -> float:
        """Mean squared principal cosine: 1 for equal spans, k / d expected for random ones."""
        return float(np.mean(self.cosines**2)) if self.dim else float("nan")


@dataclass(frozen=True)
class SubspaceAgreement:
    """Principal cosines between the unstable latents' spans of every pair of runs, at ``threshold``."""

    threshold: float
    d: int
    pairs: list[PairAgreement]

    def overlap(self) -> np.ndarray:
        """Per pair, the mean squared principal cosine (NaN where a side has no unstable latent)."""
        return np.array([p.overlap for p in self.pairs])

    def chance_overlap(self) -> np.ndarray:
        """Per pair, the overlap two random subspaces of its dimension have in expectation: k / d."""
        return np.array([p.dim / self.d if p.dim else np.nan for p in self.pairs])


def subspace_agreement(
    dictionaries, stability: LatentStability, *, threshold: float, max_dim: int | None = None
) -> SubspaceAgreement:
    """For every pair of runs, principal cosines between the spans of the latents whose matched
    cosine in the other run is below ``threshold`` (latents left out of the matching, NaN in
    ``stability``, are not counted). ``max_dim`` caps the common dimension."""
    runs = [as_dictionary(r, f"run {i}") for i, r in enumerate(_as_runs(dictionaries))]
    if len(runs) != len(stability.cosines) or any(len(r) != len(c) for r, c in zip(runs, stability.cosines)):
        raise ValueError(
            "stability must come from these runs (same number of runs and widths, in their order); "
            "compute it with latent_stability on their pw_mcc"
        )
    d = runs[0].shape[1]
    cap = d if max_dim is None else max_dim
    pairs = []
    for i, j in combinations(range(len(runs)), 2):
        below = (
            np.flatnonzero(stability.cosines[i][:, j - 1] < threshold),  # NaN compares False: left out
            np.flatnonzero(stability.cosines[j][:, i] < threshold),
        )
        sides = [_right_singular(runs[r][idx]) if len(idx) else (np.zeros((0, d)), 0) for r, idx in zip((i, j), below)]
        k = min(sides[0][1], sides[1][1], cap)
        cosines = principal_cosines(sides[0][0][:k], sides[1][0][:k]) if k else np.zeros(0)
        pairs.append(PairAgreement((i, j), below, cosines))
    return SubspaceAgreement(float(threshold), d, pairs)
