"""Random subsets of exactly ``s`` features with exactly prescribed inclusion probabilities.

The organisms need two things at once: every sample switches on *exactly* ``s`` features (so a
TopK SAE with k = s can be exact), and feature i fires with a *known* probability p_i (so group
frequencies follow the requested law exactly, not just roughly as with weighted sampling without
replacement, whose inclusion probabilities have no closed form). A fixed-size design with
sum(p) = s and every p_i <= 1 does both:

* ``systematic_sample`` — randomised systematic sampling (Madow 1949): lay the units' masses end to
  end in a random order, draw u ~ U[0, 1) and take the units hit by the points u, u+1, ..., u+s-1.
  A unit of mass m is hit floor(m) or ceil(m) times, m times on average, and the s hits sum to s.
  Units may have mass > 1 (a group of features). Drawing a fresh order per row costs an argsort of
  n_units per row; above ``per_row_limit`` units an order is shared by a block of rows instead
  (every row still draws its own u), which keeps every marginal exact and only couples the joint
  inclusions of rows in the same block.
* ``select_members`` — given how many features each group contributes to a row, pick that many
  members by the largest scores. Exchangeable scores (i.i.d., or Gaussian with equal-size
  clusters sharing a common factor) make every member of a group equally likely, so each feature's
  inclusion probability is its group's mass / group size, exactly; the shared factor makes
  features of one cluster fire together (correlated features) without moving any marginal.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def check_probabilities(probability: Tensor, s: int, owner: str) -> None:
    """Raise a clear error unless ``probability`` is a valid fixed-size-s inclusion vector."""
    if not torch.isfinite(probability).all() or (probability < 0).any():
        raise ValueError(f"{owner}: feature probabilities must be finite and >= 0")
    top = float(probability.max())
    if top > 1 + 1e-12:
        raise ValueError(
            f"{owner}: the most frequent feature would need probability {top:.3f} > 1 to keep s={s} active "
            "features per sample; lower s, flatten the law (smaller exponent) or add features"
        )
    total = float(probability.sum())
    if abs(total - s) > 1e-6 * max(1, s):
        raise ValueError(f"{owner}: feature probabilities sum to {total:.6f}, expected s={s}")


def systematic_sample(
    mass: Tensor, n_rows: int, generator: torch.Generator, per_row_limit: int = 64, block_rows: int = 64
) -> Tensor:
    """[n_rows, s] indices of the units hit in each row (sorted; a unit of mass > 1 may repeat).

    ``mass`` [U] sums to the integer s. E[times unit j is hit] = mass[j] exactly."""
    mass = mass.double()
    s = round(float(mass.sum()))
    if s < 1 or abs(float(mass.sum()) - s) > 1e-6 * s:
        raise ValueError(f"unit masses must sum to a positive integer s, got {float(mass.sum())}")
    mass = mass * (s / float(mass.sum()))
    n_units = mass.numel()
    offsets = torch.arange(s, dtype=torch.float64)
    hits = torch.empty(n_rows, s, dtype=torch.long)
    per_row = n_units <= per_row_limit
    block = max(1, 16_384 // n_units) if per_row else block_rows
    for start in range(0, n_rows, block):
        rows = min(block, n_rows - start)
        if per_row:
            order = torch.rand(rows, n_units, generator=generator).argsort(dim=1)
            cum = mass[order].cumsum(dim=1)
            cum[:, -1] = s  # exact end point: no point can fall past the last unit
        else:
            order = torch.randperm(n_units, generator=generator)
            cum = mass[order].cumsum(dim=0)
            cum[-1] = s
        points = torch.rand(rows, 1, generator=generator, dtype=torch.float64) + offsets
        if per_row:
            position = torch.searchsorted(cum, points, right=True).clamp_(max=n_units - 1)
            hits[start : start + rows] = order.gather(1, position)
        else:
            position = torch.searchsorted(cum, points, right=True).clamp_(max=n_units - 1)
            hits[start : start + rows] = order[position]
    return hits.sort(dim=1).values


def clustered_scores(n_rows: int, cluster: Tensor, correlation: float, generator: torch.Generator) -> Tensor:
    """[n_rows, len(cluster)] Gaussian scores; members of one cluster correlate by ``correlation``."""
    noise = torch.randn(n_rows, cluster.numel(), generator=generator)
    if correlation == 0:
        return noise
    n_clusters = int(cluster.max()) + 1
    shared = torch.randn(n_rows, n_clusters, generator=generator)
    return math.sqrt(1 - correlation) * noise + math.sqrt(correlation) * shared[:, cluster]


def select_members(
    counts: Tensor,
    groups: list[Tensor],
    n_features: int,
    s: int,
    generator: torch.Generator,
    cluster: Tensor | None = None,
    correlation: float = 0.0,
) -> Tensor:
    """[n_rows, s] sorted feature indices: ``counts[r, g]`` members of ``groups[g]`` in row r.

    Members are the top scores within their group (i.i.d. Gaussian, or clustered when
    ``correlation`` > 0, with ``cluster`` [n_features] giving each feature's cluster id)."""
    n_rows = counts.shape[0]
    candidates = []
    for g, members in enumerate(groups):
        count = counts[:, g]
        most = int(count.max()) if n_rows else 0
        if most == 0:
            continue
        if most > members.numel():
            raise ValueError(f"group {g} has {members.numel()} features but a row asks for {most}")
        if cluster is not None and correlation > 0:
            local = cluster[members].unique(return_inverse=True)[1]
            scores = clustered_scores(n_rows, local, correlation, generator)
        else:
            scores = torch.rand(n_rows, members.numel(), generator=generator)
        chosen = members[scores.topk(most, dim=1).indices]
        chosen[torch.arange(most) >= count[:, None]] = n_features  # sentinel: not chosen
        candidates.append(chosen)
    active = torch.cat(candidates, dim=1).sort(dim=1).values[:, :s]
    if (active >= n_features).any():
        raise RuntimeError("internal error: a row received fewer than s features")
    return active
