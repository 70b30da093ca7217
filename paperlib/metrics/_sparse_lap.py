"""Sparse exact assignment with LP duals (internal helper of :mod:`paperlib.metrics.matching`).

Conventions: ``nr <= nc``; every row must be matched, columns at most once. Edge
weights are *maximised*. Duals ``u`` (rows, free sign) and ``v`` (columns) satisfy,
when :func:`solve` reports ``converged``::

    u[i] + v[j] >= w[i, j]   for every edge (u[i] is recomputed as a row maximum),
    u[i] + v[sigma[i]] == w[i, sigma[i]]   up to ``tol`` (reported as ``slack``),
    v >= 0 and v == 0 on unmatched columns (rectangular case; after normalisation).
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import maximum_bipartite_matching, min_weight_full_bipartite_matching


class EdgeSet:
    """Growing set of weighted edges, kept sorted by (row, col) without duplicates."""

    def __init__(self, nr: int, nc: int) -> None:
        self.nr, self.nc = nr, nc
        self.key = np.zeros(0, np.int64)
        self.w = np.zeros(0, np.float64)

    def __len__(self) -> int:
        return int(self.key.size)

    @property
    def rows(self) -> np.ndarray:
        return self.key // self.nc

    @property
    def cols(self) -> np.ndarray:
        return self.key % self.nc

    def contains(self, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        k = rows.astype(np.int64) * self.nc + cols
        pos = np.searchsorted(self.key, k)
        pos[pos == self.key.size] = 0
        return self.key[pos] == k if self.key.size else np.zeros(k.shape, bool)

    def missing(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Unique (row, col) pairs not yet stored."""
        k = np.unique(rows.astype(np.int64) * self.nc + cols)
        if self.key.size:
            k = k[~self.contains(k // self.nc, k % self.nc)]
        return k // self.nc, k % self.nc

    def add(self, rows: np.ndarray, cols: np.ndarray, w: np.ndarray) -> None:
        """Add edges that are not present yet (callers pass the output of :meth:`missing`)."""
        k = np.concatenate([self.key, rows.astype(np.int64) * self.nc + cols])
        ww = np.concatenate([self.w, w])
        order = np.argsort(k, kind="stable")
        k, ww = k[order], ww[order]
        keep = np.ones(k.size, bool)
        keep[1:] = k[1:] != k[:-1]
        self.key, self.w = k[keep], ww[keep]

    def indptr(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(np.bincount(self.rows, minlength=self.nr))]).astype(np.int64)


def filler_edges(es: EdgeSet) -> tuple[np.ndarray, np.ndarray]:
    """Extra (row, col) pairs that make a row-saturating matching exist in the graph."""
    g = sp.csr_matrix((np.ones(len(es), np.int8), es.cols, es.indptr()), shape=(es.nr, es.nc))
    col_of_row = maximum_bipartite_matching(g, perm_type="column")
    lonely = np.flatnonzero(col_of_row < 0)
    used = np.zeros(es.nc, bool)
    used[col_of_row[col_of_row >= 0]] = True
    free = np.flatnonzero(~used)[: lonely.size]
    return lonely, free


def _segments(indptr: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Flat edge positions of the CSR segments of ``rows`` and the start of each segment."""
    starts, lens = indptr[rows], indptr[rows + 1] - indptr[rows]
    ends = np.cumsum(lens)
    flat = np.arange(ends[-1] if ends.size else 0) + np.repeat(starts - (ends - lens), lens)
    return flat, ends - lens


def solve(es: EdgeSet, cap: np.ndarray | None, tol: float = 1e-14, max_iter: int = 100000) -> dict:
    """Maximum-weight row-saturating matching on ``es`` plus LP duals.

    The matching comes from scipy's LAPJVsp (``min_weight_full_bipartite_matching``);
    the duals are the greatest solution ``v <= cap`` of the difference constraints of
    the residual graph, found by a frontier Bellman-Ford (which would not terminate on
    a negative cycle, i.e. if the matching were not optimal on the graph).
    """
    nr, nc = es.nr, es.nc
    indptr, cols, w = es.indptr(), es.cols, es.w
    rowid = np.repeat(np.arange(nr), np.diff(indptr))
    cost = sp.csr_matrix((2.0 - w, cols, indptr), shape=(nr, nc))  # in [1, 3]: no explicit zeros
    t0 = time.perf_counter()
    mr, mc = min_weight_full_bipartite_matching(cost)
    t_lap = time.perf_counter() - t0
    sig = np.empty(nr, np.int64)
    sig[mr] = mc
    wmatch = np.empty(nr)
    is_m = cols == sig[rowid]
    wmatch[rowid[is_m]] = w[is_m]
    free = np.ones(nc, bool)
    free[sig] = False
    free_idx = np.flatnonzero(free)
    # column -> rows adjacency (CSC) for the frontier
    order = np.argsort(cols, kind="stable")
    col_rows = rowid[order]
    col_ptr = np.concatenate([[0], np.cumsum(np.bincount(cols, minlength=nc))]).astype(np.int64)

    v = np.zeros(nc) if cap is None else np.array(cap, dtype=np.float64)
    u = np.maximum.reduceat(w - v[cols], indptr[:-1])
    active = np.arange(nr)
    it, converged = 0, False
    while it < max_iter:
        it += 1
        if it > 1:
            flat, seg = _segments(indptr, active)
            u[active] = np.maximum.reduceat(w[flat] - v[cols[flat]], seg)
        cand = wmatch[active] - u[active]
        dec = cand < v[sig[active]] - tol
        changed = sig[active[dec]]
        v[changed] = cand[dec]
        if free_idx.size:
            z = v.min()
            fdec = free_idx[v[free_idx] > z + tol]
            v[fdec] = z
            changed = np.concatenate([changed, fdec])
        if changed.size == 0:
            converged = True
            break
        flat, _ = _segments(col_ptr, changed)
        mask = np.zeros(nr, bool)
        mask[col_rows[flat]] = True
        active = np.flatnonzero(mask)
        if active.size == 0:
            converged = True
            break
    if free_idx.size:  # normalise: free columns at 0, all v >= 0
        shift = v[free_idx].max()
        v -= shift
    u = np.maximum.reduceat(w - v[cols], indptr[:-1])
    slack = u + v[sig] - wmatch  # >= 0; complementary slackness defect
    return dict(
        sig=sig,
        u=u,
        v=v,
        wmatch=wmatch,
        converged=converged,
        iters=it,
        t_lap=t_lap,
        t_duals=time.perf_counter() - t0 - t_lap,
        slack=float(slack.sum()),
        min_v=float(v.min()) if free_idx.size else 0.0,
        free=free_idx,
    )
