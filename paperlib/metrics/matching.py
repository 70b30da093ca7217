"""Exact maximum-weight one-to-one matching of two dictionaries of unit vectors.

This is the core of the PW-MCC consistency metric: rows ``a_i`` of A [n_A, d] and
``b_j`` of B [n_B, d] are normalised, ``w_ij = cos(a_i, b_j)`` (or ``|cos|``), and we
want the matching of size ``m = min(n_A, n_B)`` with the largest total weight
(``MCC = total / m``). The dense scipy solver needs the full n x n cost matrix; here
the n^2 similarities are only *streamed*, never stored.

Method (internally the smaller side is called "rows", the other "columns"):

1. **Scan.** Similarities are computed blockwise with a low-precision torch matmul
   (bfloat16 on CPUs with AVX512-BF16, else float32). A reference vector ``r`` (0 in
   the first scan, later the current duals of the other side) is folded into the matmul
   as an extra coordinate, so each block holds ``s_ij - r_j``. Each scanned vector keeps
   its ``4 * top_c`` largest entries and the smallest kept value ``T`` (which bounds all
   the others). A rigorous a-priori bound ``e`` on the rounding error (input rounding,
   fp32 accumulation, output rounding) turns stored values into upper bounds on ``w``.
2. **Sparse solve.** The candidate graph (each row's and each column's ``top_c`` best
   kept entries, plus every edge promoted later) gets float64 weights and is solved
   exactly by scipy's sparse Jonker-Volgenant (LAPJVsp); edges are added if it has no
   row-saturating matching. LP duals ``u`` (rows), ``v`` (columns; ``v >= 0`` and 0 on
   unmatched columns when rectangular) are the shortest-path potentials of the residual
   graph (a vectorised Bellman-Ford, which only terminates if the matching is optimal
   on its graph).
3. **Certificate.** By LP duality the matching is optimal over *all* n_A x n_B pairs
   iff ``w_ij <= u_i + v_j`` for every pair. Graph edges are checked in float64. A kept
   entry outside the graph passes if its rounding-safe upper bound does, otherwise it is
   promoted into the graph. Every other pair (i, j) is covered by row i's record if
   ``T_i + e + r_j - v_j <= u_i`` or by column j's record (if it has one) if
   ``T_j + e + r_i - u_i <= v_j``; this is checked for all pairs at once with sorting and
   prefix maxima. When rows fail, the cheapest mix of column scans and row rescans
   (reference = current duals) is done; a vector failing again under the same duals is
   rescanned one precision up (fp32 after bfloat16: a bound ``e`` 33x narrower at d = 4,096),
   and failing there too, in float64, where every pair within ``2e`` of tight goes into
   the graph.
   Promoted edges that violate the duals trigger a re-solve. The loop stops when
   nothing fails: then every pair satisfies the dual constraint and ``certified=True``.
   The floating-point defect of the final duals (complementary slackness, sign) is
   reported as ``stats["gap_bound"]``, an upper bound on (optimum - our total); the
   certificate requires it to be <= 1e-9.

Nothing is approximated silently: if the loop hits its round limit the result is
returned with ``certified=False`` and a warning.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from paperlib.metrics import _sparse_lap as _lap
from paperlib.runtime import cpu_has_native_bf16, resolve_device

__all__ = ["Matching", "match"]

_GAP_TOL = 1e-9  # certified only if optimum - total <= this (absolute, on the total)
_MAX_ROUNDS = 60


@dataclass(frozen=True)
class Matching:
    """Result of :func:`match`; ``rows`` index A (ascending), ``cols`` index B."""

    rows: np.ndarray
    cols: np.ndarray
    weights: np.ndarray
    certified: bool
    stats: dict = field(default_factory=dict)

    @property
    def mcc(self) -> float:
        """Mean matched similarity (PW-MCC)."""
        return float(self.weights.mean())


class _UnitRows:
    """One side's rows, normalised, read in float64. A side of up to ``KEEP_BYTES`` of float64 is normalised once
    and kept; a larger one keeps the rows as given (float32 stays float32) and their float64 norms, and normalises
    the rows it is asked for, with the same arithmetic (row / its norm, in float64): at 131,072 x 4,096 a kept
    float64 copy would be 4.3 GB per side."""

    KEEP_BYTES = 2**30
    CHUNK = 8192  # rows normalised at a time on the large path

    def __init__(self, t: torch.Tensor, side: str) -> None:
        self.t, self.shape = t, (int(t.shape[0]), int(t.shape[1]))
        t64 = t.to(torch.float64) if t.shape[0] * t.shape[1] * 8 <= self.KEEP_BYTES else None
        if t64 is not None:
            parts = [self._norms(t64)]
        else:
            parts = [self._norms(t[s : s + self.CHUNK].to(torch.float64)) for s in range(0, t.shape[0], self.CHUNK)]
        bad, zero = sum(b for _, b, _ in parts), sum(z for _, _, z in parts)
        if bad:
            raise ValueError(f"{side} has {bad} rows with NaN/Inf entries")
        if zero:
            raise ValueError(f"{side} has {zero} zero-norm rows; drop dead latents before matching")
        self.norms = torch.cat([n for n, _, _ in parts])
        self.kept = None if t64 is None else (t64 / self.norms[:, None]).numpy()

    @staticmethod
    def _norms(t64: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """Row norms of ``t64``, and how many rows hold a NaN/Inf and how many are zero."""
        bad = ~torch.isfinite(t64.sum(1))  # cheap screen; confirmed entrywise below
        if bad.any():
            bad[bad.clone()] = ~torch.isfinite(t64[bad]).all(1)
            if bad.any():
                return t64.new_empty(0), int(bad.sum()), 0
        norms = torch.linalg.vector_norm(t64, dim=1)
        return norms, 0, int((norms == 0).sum())

    def __getitem__(self, index) -> np.ndarray:
        """Unit rows ``index`` (an integer array or a slice), float64 [k, d]."""
        if self.kept is not None:
            return self.kept[index]
        picked = torch.as_tensor(index) if isinstance(index, np.ndarray) else index
        return (self.t[picked].to(torch.float64) / self.norms[picked, None]).numpy()

    def all(self) -> np.ndarray:
        """Every unit row, float64 (the dense path, on small sides)."""
        return self[: self.shape[0]]

    def scan_copy(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Every unit row in ``dtype`` on ``device`` with a last column of ones, [n, d + 1]: the scan's one
        low-precision copy of this side (the ones fold the other side's reference into the matmul)."""
        n, d = self.shape
        out = torch.empty(n, d + 1, dtype=dtype, device=device)
        out[:, d] = 1
        step = n if self.kept is not None else self.CHUNK
        for s in range(0, n, step):
            rows = self[s : s + step]
            out[s : s + len(rows), :d] = torch.from_numpy(rows).to(device, dtype)
        return out

    def times(self, rows: np.ndarray) -> np.ndarray:
        """``rows @ unit_rows.T`` in float64 [len(rows), n]."""
        if self.kept is not None:
            return rows @ self.kept.T
        out = np.empty((rows.shape[0], self.shape[0]))
        for s in range(0, self.shape[0], self.CHUNK):
            chunk = self[s : s + self.CHUNK]
            out[:, s : s + len(chunk)] = rows @ chunk.T
        return out


def _unit(x, side: str) -> _UnitRows:
    """Validate one side; its rows normalised (``_UnitRows``)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to("cpu")
    else:
        array = np.asarray(x)  # float32 stays float32: no float64 copy of a large side
        t = torch.from_numpy(
            np.ascontiguousarray(array, dtype=array.dtype if array.dtype == np.float32 else np.float64)
        )
    if t.ndim != 2:
        raise ValueError(f"{side} must be 2-D [n, d], got shape {tuple(t.shape)}")
    if t.shape[0] == 0 or t.shape[1] == 0:
        raise ValueError(f"{side} is empty (shape {tuple(t.shape)})")
    if t.dtype not in (torch.float32, torch.float64):
        t = t.to(torch.float64)
    return _UnitRows(t.contiguous(), side)


def _scan_dtype(dev: torch.device) -> torch.dtype:
    """bfloat16 where the CPU has native bf16 dot products (fp32 accumulation), else fp32."""
    return torch.bfloat16 if dev.type == "cpu" and cpu_has_native_bf16() else torch.float32


def _scan_tiers(dev: torch.device) -> tuple[torch.dtype, ...]:
    """The precisions a vector's low-precision scans escalate through before float64: the first is the full scan's.
    After a bfloat16 scan fp32 comes next: its error bound (~1.25 (d + 2) 2^-24, 3.1e-4 at d = 4,096) is 33x narrower
    than bfloat16's 0.010, and its matmul several times faster than numpy's float64 one."""
    first = _scan_dtype(dev)
    return (first,) if first == torch.float32 else (first, torch.float32)


@dataclass(frozen=True)
class _Precision:
    """Rounding constants of a scan in ``dtype`` with fp32 accumulation over ``d + 2`` terms: ``u_in`` of the
    inputs, ``gamma`` of the accumulation, ``c_out`` of the output relative to the stored value."""

    dtype: torch.dtype
    u_in: float
    gamma: float
    c_out: float

    @classmethod
    def of(cls, dtype: torch.dtype, d: int) -> _Precision:
        u_in, u_acc, k = (2.0**-8 if dtype == torch.bfloat16 else 2.0**-24), 2.0**-24, d + 2
        gamma = k * u_acc / (1 - k * u_acc)
        if gamma > 0.01:
            raise ValueError(f"d={d} too large for the fp32-accumulation error bound")
        return cls(dtype, u_in, gamma, u_in / (1 - u_in))

    def error(self, big: float) -> float:
        """Bound on |stored - (s - r)| before output rounding, for references up to ``big`` in magnitude."""
        u = self.u_in
        return 1.25 * (2 * u + u**2 + self.gamma * ((1 + u) ** 2 + big)) + 1e-30


def _dense(a: np.ndarray, b: np.ndarray, signed: bool, t0: float) -> Matching:
    w = a @ b.T
    if not signed:
        np.abs(w, out=w)
    r, c = linear_sum_assignment(w, maximize=True)
    stats = dict(
        candidate_edges=int(w.size),
        rounds=1,
        rows_rechecked=0,
        seconds=time.perf_counter() - t0,
        method="dense-scipy",
        gap_bound=0.0,
    )
    return Matching(r.astype(np.int64), c.astype(np.int64), w[r, c].astype(np.float64), True, stats)


class _Side:
    """Scan records of one side ("own" vectors against the "other" side): for each own
    vector the ``k`` largest stored values of ``s - r[other]`` (``r``: the reference
    of the scan), their indices, and the ``k``-th value ``thr`` bounding all the rest."""

    def __init__(self, k: int, own64: _UnitRows, other64: _UnitRows, is_rows: bool) -> None:
        n = own64.shape[0]
        self.own64, self.other64, self.is_rows = own64, other64, is_rows
        self.idx = np.zeros((n, k), np.int64)
        self.val = np.full((n, k), -np.inf)
        self.thr = np.full(n, np.inf)  # no record yet: bounds nothing
        self.ref_id = np.full(n, -1)
        self.scan_sol = np.full(n, -1)  # id of the solve whose duals were the reference
        self.tier = np.full(n, -1)  # index into _Problem.tiers of the last scan; len(tiers): a float64 scan
        self.refs: list[tuple[np.ndarray, float, float]] = []  # (reference r, error e, c_out)


class _Problem:
    """Rows X [nr, d] (smaller side), columns Y [nc, d], both unit rows read in float64."""

    u: np.ndarray  # the current duals of rows and columns, set by each solve (_sparse)
    v: np.ndarray

    def __init__(
        self, x: _UnitRows, y: _UnitRows, signed: bool, dev: torch.device, top_c: int, block_rows: int
    ) -> None:
        self.x, self.y, self.signed, self.dev = x, y, signed, dev
        self.nr, self.nc = x.shape[0], y.shape[0]
        self.tiers = tuple(_Precision.of(dt, x.shape[1]) for dt in _scan_tiers(dev))
        self.dt = self.tiers[0].dtype
        self.k_top = max(1, min(top_c, self.nc))
        self.block = max(1, block_rows // (1 if signed else 2))
        # the full scan's copies of both sides (unit rows and a column of ones), read in both roles
        self.lp = {id(x): x.scan_copy(dev, self.dt), id(y): y.scan_copy(dev, self.dt)}
        mult = 1 if signed else 2
        self.rows = _Side(min(4 * self.k_top, self.nc * mult), x, y, True)
        self.cols = _Side(min(4 * self.k_top, self.nr * mult), y, x, False)
        self.violated = False  # set when scan64 adds an edge that breaks the current duals

    def scan(self, side: _Side, ids: np.ndarray, ref: np.ndarray, sol_id: int = -1, tier: int = 0) -> None:
        """Low-precision rescan of ``ids`` of ``side`` against reference ``ref``, in ``self.tiers[tier]``."""
        prec = self.tiers[tier]
        r_lp = torch.from_numpy(ref - np.median(ref)).to(self.dev, prec.dtype)
        r_used = r_lp.double().cpu().numpy()  # the reference actually folded into the matmul
        side.refs.append((r_used, prec.error(float(np.abs(r_used).max())), prec.c_out))
        k, n_oth = side.idx.shape[1], side.other64.shape[0]
        if tier == 0:
            own, other = self.lp[id(side.own64)], self.lp[id(side.other64)][:, :-1]
            ob = torch.cat([other, -r_lp[:, None]], 1)
            if not self.signed:
                ob = torch.cat([ob, torch.cat([-other, -r_lp[:, None]], 1)], 0)
            block = self.block
            buf = torch.empty(min(block, ids.size), ob.shape[0], dtype=prec.dtype, device=self.dev)
        else:  # own rows are made per block; a copy of the other side, made for this scan (at 131,072 x 4,096 an
            # fp32 one is 2.1 GB: kept, it would raise the peak by that), takes the reference in its last column
            ob = side.other64.scan_copy(self.dev, prec.dtype)
            ob[:, -1] = -r_lp
            block = max(1, self.block * 2 // prec.dtype.itemsize)  # the same output bytes as the bfloat16 scan
        ot = ob.T.contiguous() if self.dev.type != "cpu" else ob.T
        ids_t = torch.from_numpy(ids).to(self.dev)
        for s in range(0, ids.size, block):
            blk = ids[s : s + block]
            if tier == 0:
                out = buf[: blk.size]
                torch.matmul(own[ids_t[s : s + block]], ot, out=out)
                v, i = torch.topk(out, k, dim=1)
                i = i % n_oth
            else:
                v, i = self._signed_topk(side.own64[blk], ot, k, prec.dtype)
            side.val[blk] = v.double().cpu().numpy()
            side.idx[blk] = i.cpu().numpy()
            side.thr[blk] = side.val[blk, -1] if k < n_oth * (1 if self.signed else 2) else -np.inf
        side.ref_id[ids] = len(side.refs) - 1
        side.scan_sol[ids] = sol_id
        side.tier[ids] = tier

    def _signed_topk(
        self, own: np.ndarray, ot: torch.Tensor, k: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` largest of ``s - r`` (and, unsigned, of ``-s - r``) for float64 unit rows ``own``; indices
        of the other side."""
        lp = torch.empty(own.shape[0], own.shape[1] + 1, dtype=dtype, device=self.dev)
        lp[:, :-1] = torch.from_numpy(own).to(self.dev, dtype)
        lp[:, -1] = 1
        if self.signed:
            return torch.topk(torch.matmul(lp, ot), k, dim=1)
        flip = torch.ones(lp.shape[1], dtype=dtype, device=self.dev)
        flip[:-1] = -1  # [-a, 1]: the same reference, -s
        both = torch.matmul(torch.cat([lp, lp * flip]), ot)
        n_own, n_oth = own.shape[0], ot.shape[1]
        halves = [torch.topk(h, min(k, n_oth), dim=1) for h in (both[:n_own], both[n_own:])]
        v, pos = torch.topk(torch.cat([h.values for h in halves], 1), k, dim=1)
        return v, torch.gather(torch.cat([h.indices for h in halves], 1), 1, pos)

    def scan64(
        self, side: _Side, ids: np.ndarray, d_own: np.ndarray, d_oth: np.ndarray, es: _lap.EdgeSet, sol_id: int
    ) -> None:
        """float64 rescan of ``ids`` against duals: every pair within 2e of being tight
        is put into the graph ``es``; the record threshold bounds only the rest."""
        n_oth, kk = side.other64.shape[0], side.idx.shape[1]
        k = min(kk, n_oth)
        e = 4.0 * (self.x.shape[1] + 2) * 2.0**-53 * (2.0 + float(np.abs(d_oth).max()))
        side.refs.append((d_oth.copy(), e, 2.0**-52))
        for s in range(0, ids.size, 256):  # 2048 rows cut 131k x 4096 random from 1453 s to 1027 s, at 15.1 GiB not 8.8
            blk = ids[s : s + 256]
            red = side.other64.times(side.own64[blk])
            if not self.signed:
                np.abs(red, out=red)
            red -= d_oth
            near = red > (d_own[blk] - 2 * e)[:, None]
            po, pt = np.nonzero(near)
            pr, pc = es.missing(*((blk[po], pt) if side.is_rows else (pt, blk[po])))
            pw = self.exact(pr, pc)
            es.add(pr, pc, pw)
            self.violated |= bool((pw > self.u[pr] + self.v[pc]).any())
            top = np.argpartition(-red, k - 1, axis=1)[:, :k]
            side.idx[blk] = np.pad(top, ((0, 0), (0, kk - k)), mode="edge")
            side.val[blk] = np.take_along_axis(red, side.idx[blk], 1)
            red[near] = -np.inf
            np.put_along_axis(red, top, -np.inf, 1)
            side.thr[blk] = red.max(1)
        side.ref_id[ids] = len(side.refs) - 1
        side.scan_sol[ids] = sol_id
        side.tier[ids] = len(self.tiers)

    def exact(self, ri: np.ndarray, cj: np.ndarray) -> np.ndarray:
        """float64 weights of the given pairs."""
        out = np.empty(ri.size)
        for s in range(0, ri.size, 8192):
            out[s : s + 8192] = np.einsum("ij,ij->i", self.x[ri[s : s + 8192]], self.y[cj[s : s + 8192]])
        return out if self.signed else np.abs(out)


def _upper(val: np.ndarray, c: float) -> np.ndarray:
    """Largest pre-rounding value consistent with a stored (rounded) value."""
    out = val.copy()
    f = np.isfinite(val)
    out[f] += c * np.abs(val[f])
    return out


def _bounds(side: _Side, d_own: np.ndarray, d_oth: np.ndarray, skip: np.ndarray | None):
    """Upper bounds of ``w - d_own - d_oth`` from one side's records.

    Returns (listed pairs whose bound exceeds 0 as (own, other), per-own slack of the
    bound on every non-listed pair; ``skip`` masks other-side items covered elsewhere).
    """
    n, k = side.idx.shape
    own, oth = np.repeat(np.arange(n), k), side.idx.ravel()
    ub = np.full(own.size, -np.inf)
    slack = np.full(n, -np.inf)
    for q in np.unique(side.ref_id[side.ref_id >= 0]):
        r, e, c = side.refs[q]
        m = side.ref_id == q
        mm = np.repeat(m, k)
        ub[mm] = _upper(side.val.ravel()[mm], c) + e + r[oth[mm]]
        diff = r - d_oth if skip is None else (r - d_oth)[~skip]
        slack[m] = d_own[m] - (_upper(side.thr[m], c) + e + (diff.max() if diff.size else -np.inf))
    bad = ub > d_own[own] + d_oth[oth]
    return own[bad], oth[bad], slack


def _row_slack(p: _Problem, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Per row, how much room is left for all its pairs listed by neither side.

    A pair (i, j) is safe if row i's record bounds it (``A_i + rho_j <= 0``) or column
    j's record does (``B_j + kappa_i <= 0``); for each row we take the max of ``rho_j``
    over the columns that do not cover it, via prefix maxima over columns sorted by B.
    """
    rs, cs = p.rows, p.cols
    a_i = np.empty(p.nr)
    for q in np.unique(rs.ref_id):
        m = rs.ref_id == q
        a_i[m] = _upper(rs.thr[m], rs.refs[q][2]) + rs.refs[q][1] - u[m]
    b_j = np.full(p.nc, np.inf)
    for g in np.unique(cs.ref_id[cs.ref_id >= 0]):
        m = cs.ref_id == g
        b_j[m] = _upper(cs.thr[m], cs.refs[g][2]) + cs.refs[g][1] - v[m]
    worst = np.full(p.nr, -np.inf)
    for g in np.unique(cs.ref_id):
        cols = np.flatnonzero(cs.ref_id == g)
        order = cols[np.argsort(-b_j[cols], kind="stable")]
        if g < 0:
            cnt = np.full(p.nr, order.size)
        else:
            cnt = np.searchsorted(-b_j[order], cs.refs[g][0] - u, side="left")
        for q in np.unique(rs.ref_id):
            m = rs.ref_id == q
            pm = np.maximum.accumulate((rs.refs[q][0] - v)[order])
            c = cnt[m]
            worst[m] = np.maximum(worst[m], np.where(c > 0, pm[np.maximum(c - 1, 0)], -np.inf))
    return -(a_i + worst)


def _initial_edges(p: _Problem) -> tuple[np.ndarray, np.ndarray]:
    """Each row's top_c kept entries plus each column's top_c among all kept entries."""
    k, side = p.k_top, p.rows
    kk = side.idx.shape[1]
    r1 = np.repeat(np.arange(p.nr), k)
    c1 = side.idx[:, :k].ravel()
    rr, cc, vv = np.repeat(np.arange(p.nr), kk), side.idx.ravel(), side.val.ravel()
    order = np.lexsort((-vv, cc))
    cc_s = cc[order]
    start = np.searchsorted(cc_s, cc_s, side="left")
    keep = order[np.arange(cc_s.size) - start < k]
    return np.concatenate([r1, rr[keep]]), np.concatenate([c1, cc[keep]])


def _pick_columns(
    p: _Problem, v: np.ndarray, fail: np.ndarray, slack: np.ndarray, col_ok: np.ndarray, sol_id: int
) -> np.ndarray:
    """Columns worth rescanning: the cheapest mix of column scans (cost nr each, 8x that
    for a float64 rescan) and row rescans (cost nc each) letting the failing rows pass."""
    side, cs = p.rows, p.cols
    badness = np.full(p.nc, -np.inf)
    for q in np.unique(side.ref_id[fail]):
        badness = np.maximum(badness, side.refs[q][0] - v)
    open_ = ~col_ok
    exact = (cs.scan_sol == sol_id) & (cs.tier == len(p.tiers))  # scanned in float64 under these duals
    cand = np.flatnonzero(open_ & ~exact)
    rest = open_ & exact
    floor = badness[rest].max() if rest.any() else -np.inf
    order = cand[np.argsort(-badness[cand], kind="stable")]
    level = np.maximum(np.append(badness[order], -np.inf), floor)  # max badness left after p picks
    base = slack[fail].copy()  # the rows' slack without their max term
    for q in np.unique(side.ref_id[fail]):
        m = side.ref_id[fail] == q
        base[m] += (side.refs[q][0] - v)[open_].max()
    still = np.searchsorted(np.sort(base), level, side="left")  # rows failing after p picks
    unit = np.where(cs.scan_sol[order] == sol_id, 8 * p.nr, p.nr)
    cost = np.append(0, np.cumsum(unit)) + still * p.nc
    return order[: int(np.argmin(cost))]


def _sparse(p: _Problem, t0: float) -> tuple[np.ndarray, np.ndarray, bool, dict]:
    """Certified sparse solve; returns (col of each row, float64 weights, certified, stats)."""
    tm = dict(scan=0.0, solve=0.0, lapjvsp=0.0, duals=0.0, exact=0.0, check=0.0)
    t = time.perf_counter()
    p.scan(p.rows, np.arange(p.nr), np.zeros(p.nc))
    tm["scan"] += time.perf_counter() - t
    es = _lap.EdgeSet(p.nr, p.nc)
    r0, c0 = es.missing(*_initial_edges(p))
    es.add(r0, c0, p.exact(r0, c0))
    st: dict[str, Any] = dict(rounds=0, rows_rechecked=0, cols_rechecked=0, promoted=0, solves=0, bf_iters=0)
    sol: dict[str, Any] | None = None
    cap, certified, dirty, sol_id = None, False, True, 0
    for _ in range(_MAX_ROUNDS):
        st["rounds"] += 1
        t = time.perf_counter()
        if dirty:
            while True:  # make sure a row-saturating matching exists
                fr, fc = _lap.filler_edges(es)
                if fr.size == 0:
                    break
                fr, fc = es.missing(fr, fc)
                es.add(fr, fc, p.exact(fr, fc))
            sol = _lap.solve(es, cap)
            sol_id = st["solves"] = st["solves"] + 1
            st["bf_iters"] += sol["iters"]
            tm["lapjvsp"] += sol["t_lap"]
            tm["duals"] += sol["t_duals"]
            u, v = sol["u"], sol["v"]
            if not sol["converged"]:
                break
            cap, dirty = v, False
        t1 = time.perf_counter()
        tm["solve"] += t1 - t
        # listed but unused pairs whose rounding-safe upper bound fails are promoted
        cr, cc, cslack = _bounds(p.cols, v, u, None)
        col_ok = cslack >= 0
        rr, rc, _ = _bounds(p.rows, u, v, None)
        rslack = _row_slack(p, u, v)
        pr, pc = np.concatenate([rr, cc]), np.concatenate([rc, cr])
        keep = ~es.contains(pr, pc)
        tm["check"] += time.perf_counter() - t1
        if keep.any():
            t = time.perf_counter()
            pr, pc = es.missing(pr[keep], pc[keep])
            pw = p.exact(pr, pc)
            es.add(pr, pc, pw)
            st["promoted"] += pr.size
            tm["exact"] += time.perf_counter() - t
            if (pw > u[pr] + v[pc]).any():
                dirty = True
                continue
        fail = np.flatnonzero(rslack < 0)  # rows whose non-listed pairs are not all covered
        if fail.size == 0:
            certified = True
            break
        t = time.perf_counter()
        pick = _pick_columns(p, v, fail, rslack, col_ok, sol_id)
        p.u, p.v, p.violated = u, v, False
        for side, ids, d_own, d_oth, name in ((p.cols, pick, v, u, "cols"), (p.rows, fail, u, v, "rows")):
            if ids.size == 0 or (name == "rows" and pick.size):
                continue
            st[name + "_rechecked"] += ids.size
            # a vector failing again under the same duals is rescanned one tier up, then in float64
            level = np.where(side.scan_sol[ids] != sol_id, 0, side.tier[ids] + 1)
            for tier in range(len(p.tiers) + 1):
                picked = ids[np.minimum(level, len(p.tiers)) == tier]
                if picked.size == 0:
                    continue
                if tier == len(p.tiers):
                    st[name + "_exact"] = st.get(name + "_exact", 0) + picked.size
                    p.scan64(side, picked, d_own, d_oth, es, sol_id)
                    continue
                p.scan(side, picked, d_oth, sol_id, tier)
                if tier:
                    key = f"{name}_{str(p.tiers[tier].dtype).replace('torch.', '')}"
                    st[key] = st.get(key, 0) + picked.size
        dirty = p.violated
        tm["scan"] += time.perf_counter() - t
    assert sol is not None  # the first round always solves
    sig = sol["sig"]
    w = es.w[np.searchsorted(es.key, np.arange(p.nr) * p.nc + sig)]  # float64, as solved
    viol = max(0.0, float((es.w - u[es.rows] - v[es.cols]).max()))
    gap = sol["slack"] + p.nr * viol + p.nc * max(0.0, -sol["min_v"])
    certified = certified and sol["converged"] and gap <= _GAP_TOL
    st.update(
        candidate_edges=len(es),
        gap_bound=gap,
        scan_dtype=str(p.dt).replace("torch.", ""),
        eps=p.rows.refs[0][1],
        timing={k: round(x, 3) for k, x in tm.items()},
    )
    if not certified:
        warnings.warn(
            f"paperlib.metrics.matching: optimality could not be certified (stats={st}); result may be suboptimal",
            RuntimeWarning,
            stacklevel=3,
        )
    return sig, w, certified, st


def match(
    a,
    b,
    *,
    signed: bool = True,
    device: str | None = None,
    top_c: int = 8,
    block_rows: int = 4096,
    dense_limit: int = 2048,
) -> Matching:
    """Exact maximum-weight matching between the rows of ``a`` [n_A, d] and ``b`` [n_B, d].

    Rows are normalised here; ``signed=False`` uses ``|cos|``. Below ``dense_limit``
    on both sides the dense float64 scipy solver is used; otherwise the certified
    sparse method of the module docstring. ``device`` is where the scan matmuls run (default
    ``paperlib.device()``: the GPU when present; the dense path always runs on the CPU).
    """
    t0 = time.perf_counter()
    # checked even where the dense path ignores it, so a device this machine lacks is never accepted silently
    dev = resolve_device(device)
    x, y = _unit(a, "a"), _unit(b, "b")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"dimension mismatch: a has d={x.shape[1]}, b has d={y.shape[1]}")
    if max(x.shape[0], y.shape[0]) <= dense_limit:
        return _dense(x.all(), y.all(), signed, t0)
    swap = x.shape[0] > y.shape[0]
    if swap:
        x, y = y, x
    prec = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # the error bound assumes true fp32
    try:
        p = _Problem(x, y, signed, dev, top_c, block_rows)
        sig, w, certified, st = _sparse(p, t0)
    finally:
        torch.set_float32_matmul_precision(prec)
    rows, cols = (sig, np.arange(x.shape[0])) if swap else (np.arange(x.shape[0]), sig)
    order = np.argsort(rows)
    st.update(seconds=time.perf_counter() - t0, method="sparse-certified")
    return Matching(rows[order].astype(np.int64), cols[order].astype(np.int64), w[order], certified, st)
