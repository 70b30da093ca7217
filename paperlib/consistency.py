"""Paper A's consistency metrics: MCC, PW-MCC, GT-MCC, and the chance level they must beat.

A dictionary is a set of directions, one row per latent (an SAE's decoder rows), compared after
normalising each row to unit length. MCC(A, B) is the mean cosine over the best one-to-one
matching of size m = min(n_A, n_B), solved exactly as a linear assignment problem.

* Signed cosine is the default (the authors' code; for SAEs with non-negative codes an
  anti-parallel atom is a different feature); ``signed=False`` uses |cos| (the paper's formula).
  Every result says which one it used.
* A zero-norm row (a latent that never learned a direction) has cosine 0 with everything: it
  still takes part in the matching, so dead latents lower MCC rather than being silently dropped.
* Chance level: the MCC of two independent random Gaussian dictionaries of the same shapes
  (≈0.46 signed at d=16, n=32), which every consistency plot should show.

The exact dense solver here (scipy) is fine up to a few thousand latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def as_dictionary(D, name: str = "dictionary") -> np.ndarray:
    """A finite 2-D float64 array of directions, rows scaled to unit length (zero rows stay zero)."""
    if isinstance(D, torch.Tensor):
        D = D.detach().cpu().double().numpy()
    D = np.asarray(D, dtype=np.float64)
    if D.ndim != 2 or min(D.shape) == 0:
        raise ValueError(f"{name} must be a non-empty 2-D array [n_latents, d_model], got shape {D.shape}")
    if not np.isfinite(D).all():
        bad = int((~np.isfinite(D)).any(axis=1).sum())
        raise ValueError(f"{name} has {bad} rows with NaN/Inf entries; fix or drop those latents first")
    norms = np.linalg.norm(D, axis=1, keepdims=True)
    return np.divide(D, norms, out=np.zeros_like(D), where=norms > 0)


@dataclass(frozen=True)
class MatchResult:
    """The optimal matching: ``rows[i]`` of A is paired with ``cols[i]`` of B at ``similarity[i]``."""

    mcc: float
    similarity: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    signed: bool


def match(A, B, signed: bool = True) -> MatchResult:
    """Exact maximum-similarity one-to-one matching of the rows of A and B."""
    a, b = as_dictionary(A, "first dictionary"), as_dictionary(B, "second dictionary")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"dictionaries live in different spaces: d_model {a.shape[1]} vs {b.shape[1]}; "
            "compare SAEs trained on the same activations"
        )
    sim = a @ b.T
    if not signed:
        sim = np.abs(sim)
    rows, cols = linear_sum_assignment(sim, maximize=True)
    similarity = sim[rows, cols]
    return MatchResult(float(similarity.mean()), similarity, rows, cols, signed)


def mcc(A, B, signed: bool = True) -> float:
    """Mean matched cosine of dictionaries A and B (see the module docstring)."""
    return match(A, B, signed).mcc


def _as_runs(dictionaries) -> list:
    """A [R, n, d] stack or a sequence of [n_r, d] dictionaries as a list of runs."""
    return list(dictionaries.unbind(0) if isinstance(dictionaries, torch.Tensor) else dictionaries)


@dataclass(frozen=True)
class PairwiseMCC:
    """PW-MCC over R runs: mean and std over all R(R-1)/2 pairs, and each pair's (i, j, MCC)."""

    mean: float
    std: float
    pairs: list[tuple[int, int, float]]
    signed: bool


def pw_mcc(dictionaries, signed: bool = True) -> PairwiseMCC:
    """Pairwise MCC between independent runs (same data, architecture and width; other seeds)."""
    runs = _as_runs(dictionaries)
    if len(runs) < 2:
        raise ValueError(f"PW-MCC needs at least two runs, got {len(runs)}; train more seeds")
    pairs = [(i, j, mcc(runs[i], runs[j], signed)) for i, j in combinations(range(len(runs)), 2)]
    values = np.array([p[2] for p in pairs])
    return PairwiseMCC(float(values.mean()), float(values.std()), pairs, signed)


def gt_mcc(ground_truth, dictionaries, signed: bool = True) -> np.ndarray:
    """MCC of each run's dictionary against the ground-truth dictionary (one value per run)."""
    return np.array([mcc(ground_truth, run, signed) for run in _as_runs(dictionaries)])


@dataclass(frozen=True)
class Chance:
    """MCC of random Gaussian dictionaries of given shapes: mean and std over sampled pairs."""

    mean: float
    std: float
    n_samples: int
    signed: bool


def chance_mcc(n_a: int, n_b: int, d: int, n_samples: int = 100, seed: int = 0, signed: bool = True) -> Chance:
    """The MCC two unrelated dictionaries of shapes [n_a, d] and [n_b, d] reach by chance."""
    if min(n_a, n_b, d, n_samples) < 1:
        raise ValueError(f"chance_mcc needs positive sizes, got n_a={n_a}, n_b={n_b}, d={d}, n_samples={n_samples}")
    rng = np.random.default_rng(seed)
    values = np.array(
        [mcc(rng.standard_normal((n_a, d)), rng.standard_normal((n_b, d)), signed) for _ in range(n_samples)]
    )
    return Chance(float(values.mean()), float(values.std()), n_samples, signed)
