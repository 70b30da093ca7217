"""How an SAE shares its latents among feature groups of different frequency: the capacity exponent,
and how well each group is represented (``group_allocation``, ``group_coverage``).

Paper A reports that TopK gives a group of features a number of latents proportional to p^alpha,
p the group's firing probability (alpha ~ 1.4). Fitting a line to log(latents per group) over the
groups that received any latent throws away the groups that received none, which are exactly the
evidence for a large alpha: when most groups are empty the line rests on two or three points and
its slope jumps between reruns (3.6 on one CPU, 5.2 on another for the same configuration).

Here alpha is the maximum-likelihood exponent of the share model share_g = p_g^alpha / sum_h p_h^alpha,
each latent placed independently in a group with that share. Every group counts, empty ones included;
alpha = 0 is an equal share (chance), and alpha is infinite only when every latent sits in the most
frequent group. The interval resamples seeds and then latents within each seed, so it carries the
seed-to-seed variation that a rerun on another machine (other rounding, hence another trajectory) shows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import brentq
from scipy.special import logsumexp

from paperlib.metrics.consistency import as_dictionary, match


def capacity_shares(alpha: float, p: np.ndarray) -> np.ndarray:
    """The share model's fraction of latents per group (an infinite alpha puts them all in the most,
    or least, frequent group)."""
    log_p = np.log(np.asarray(p, dtype=float))
    if math.isinf(alpha):
        return (log_p == (log_p.max() if alpha > 0 else log_p.min())).astype(float)
    return np.exp(alpha * log_p - logsumexp(alpha * log_p))


def _mean_log_p(alpha: float, log_p: np.ndarray) -> float:
    """Expected log p of a latent under the share model."""
    return float(capacity_shares(alpha, np.exp(log_p)) @ log_p)


def capacity_exponent(counts: np.ndarray, p: np.ndarray) -> float:
    """Maximum-likelihood alpha from latents per group ``counts`` ([groups] or [seeds, groups],
    pooled over seeds) and the groups' probabilities ``p``. The likelihood equation says the model's
    mean log p equals the latents' mean log p; its left side rises with alpha, so the root is unique."""
    counts = np.asarray(counts, dtype=float).reshape(-1, len(p)).sum(0)
    log_p = np.log(np.asarray(p, dtype=float))
    if (counts < 0).any() or counts.sum() == 0:
        raise ValueError(
            f"capacity_exponent needs non-negative latent counts per group with at least one latent, got {counts}"
        )
    if np.ptp(log_p) == 0:
        raise ValueError("capacity_exponent needs groups of different probabilities")
    target = float(counts @ log_p / counts.sum())
    if target >= log_p.max():
        return math.inf
    if target <= log_p.min():
        return -math.inf
    low, high = -1.0, 1.0
    while _mean_log_p(low, log_p) > target:
        low *= 2
    while _mean_log_p(high, log_p) < target:
        high *= 2
    return float(brentq(lambda a: _mean_log_p(a, log_p) - target, low, high, xtol=1e-10))


def capacity_exponent_interval(
    groups: np.ndarray, p: np.ndarray, *, n_rep: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap interval of ``capacity_exponent`` from each latent's group ``groups`` [seeds, latents]
    (integers in 0..len(p)-1): seeds resampled with replacement, then latents within each drawn seed."""
    groups = np.asarray(groups)
    if groups.ndim != 2 or groups.size == 0:
        raise ValueError(f"groups must be [seeds, latents] group indices, got shape {groups.shape}")
    rng = np.random.default_rng(seed)
    n_seeds, width = groups.shape
    estimates = []
    for _ in range(n_rep):
        drawn = groups[rng.integers(0, n_seeds, n_seeds)]
        resampled = np.take_along_axis(drawn, rng.integers(0, width, (n_seeds, width)), axis=1)
        estimates.append(capacity_exponent(np.bincount(resampled.ravel(), minlength=len(p)), p))
    tail = (1 - level) / 2
    low, high = np.quantile(estimates, [tail, 1 - tail], method="inverted_cdf")  # infinite estimates stay infinite
    return float(low), float(high)


def nearest_groups(W, truth, group) -> np.ndarray:
    """The group of each latent's nearest ground-truth atom (largest cosine): [..., latents] from
    decoder rows ``W`` [..., latents, d], atoms ``truth`` [atoms, d] and each atom's ``group``."""
    W, truth, group = np.asarray(W), np.asarray(truth), np.asarray(group)
    return group[(unit_rows(W) @ unit_rows(truth).T).argmax(-1)]


def unit_rows(rows: np.ndarray) -> np.ndarray:
    """Rows scaled to unit norm (an all-zero row stays zero)."""
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True).clip(1e-12)


def group_capacity(nearest: np.ndarray, n_groups: int) -> np.ndarray:
    """Latents per group [seeds, groups] from ``nearest_groups`` [seeds, latents]."""
    return np.stack([np.bincount(row, minlength=n_groups) for row in np.asarray(nearest)])


@dataclass(frozen=True)
class GroupAllocation:
    """Per seed [S, groups]: MCC of each group's atoms against all latents (``per_group``), the mean
    similarity of GT-MCC's matched pairs split by the atom's group (``split``, NaN for a group no pair
    falls in) and latents per group (``capacity``); and each latent's group (``nearest`` [S, latents])."""

    per_group: np.ndarray
    split: np.ndarray
    capacity: np.ndarray
    nearest: np.ndarray


def group_allocation(W_dec, truth, group, n_groups: int, *, signed: bool = True) -> GroupAllocation:
    """How the SAEs ``W_dec`` [S, latents, d] of an organism with feature groups (atoms ``truth`` [atoms, d],
    their ``group``) share out their latents and how well each group is recovered."""
    truth, group = np.asarray(truth), np.asarray(group)
    per_group, split = [], []
    for W in W_dec:
        per_group.append([match(truth[group == g], W, signed=signed).mcc for g in range(n_groups)])
        m = match(truth, W, signed=signed)
        of_pair = group[m.rows]
        split.append([m.similarity[of_pair == g].mean() if (of_pair == g).any() else np.nan for g in range(n_groups)])
    nearest = np.stack([nearest_groups(W, truth, group) for W in W_dec])
    return GroupAllocation(np.array(per_group), np.array(split), group_capacity(nearest, n_groups), nearest)


@dataclass(frozen=True)
class GroupCoverage:
    """Per seed and group [S, groups]: the mean over the group's atoms of each atom's best cosine to any
    latent (``coverage``), and the latents whose best atom is in the group with a cosine of at least
    the threshold (``clean``)."""

    coverage: np.ndarray
    clean: np.ndarray


def group_coverage(W_dec, truth, group, n_groups: int, *, clean_cosine: float, signed: bool = True) -> GroupCoverage:
    """How well each feature group of an organism (atoms ``truth`` [atoms, d], their ``group``) is
    represented by the SAEs ``W_dec`` [S, latents, d], without a matching: a frequent group can claim
    many latents, a rare one none. ``signed=False`` compares |cosine|."""
    truth_rows, group = torch.as_tensor(as_dictionary(truth)), np.asarray(group)
    coverage, clean = [], []
    for W in W_dec:
        cos = truth_rows @ torch.as_tensor(as_dictionary(W)).T  # [atoms, latents]
        if not signed:
            cos = cos.abs()
        best_of_atom = cos.max(1).values.numpy()
        best_of_latent, owner = (v.numpy() for v in cos.max(0))
        coverage.append([best_of_atom[group == g].mean() for g in range(n_groups)])
        clean.append(np.bincount(group[owner[best_of_latent >= clean_cosine]], minlength=n_groups))
    return GroupCoverage(np.array(coverage), np.array(clean))
