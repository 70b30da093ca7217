"""The interpolation path from a smaller SAE to a larger one (paper B's stitching, continued).

``interpolation_path`` orders the moves of ``stitching.stitch.stitch_moves`` (plus the bias move) by exact
greedy benefit and records MSE and L0 after each; the rules are in ``paperlib.stitching.stitch``'s
docstring. Split from it to keep each module readable in one sitting.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from paperlib.sae.bank import SAEBank
from paperlib.sae.view import SAEView, as_view
from paperlib.stitching.stitch import (
    Insertion,
    Move,
    StitchConfig,
    _check_pair,
    _encode_pair,
    _insertion,
    _Pass,
    insertion_from_tensors,
    insertion_tensors,
    stitch_moves,
)


@dataclass(frozen=True)
class StitchPath:
    """Step t = 0..T (0: the small SAE; T: the large one): latent count, MSE and L0 after t moves;
    ``moves[t-1]`` and ``delta[t-1]`` are the move made at step t and its exact ΔMSE."""

    n_latents: np.ndarray
    mse: np.ndarray
    l0: np.ndarray
    delta: np.ndarray
    moves: tuple[Move, ...]
    mse_small: float
    mse_large: float
    endpoint_error: float  # |path's final MSE - the large SAE's MSE computed directly|
    violations: np.ndarray  # steps (1-based) whose MSE rose by more than monotone_tol · MSE_S
    insertion: Insertion
    sizes: tuple[int, int]

    @property
    def monotone(self) -> bool:
        return len(self.violations) == 0

    def members(self, step: int) -> tuple[Tensor, Tensor, str]:
        """(kept small latents [n_S] bool, added large latents [n_L] bool, "small"/"large" bias) after
        ``step`` moves."""
        if not 0 <= step <= len(self.moves):
            raise IndexError(f"step must lie in [0, {len(self.moves)}], got {step}")
        keep, add, bias = (
            torch.ones(self.sizes[0], dtype=torch.bool),
            torch.zeros(self.sizes[1], dtype=torch.bool),
            "small",
        )
        for move in self.moves[:step]:
            keep[list(move.removed)] = False
            add[list(move.added)] = True
            bias = "large" if move.kind == "bias" else bias
        return keep, add, bias

    def summary(self) -> dict:
        kinds = [m.kind for m in self.moves]
        return {
            "steps": len(self.moves),
            **{f"{k}_moves": kinds.count(k) for k in ("swap", "insert", "remove", "bias")},
            "mse_small": self.mse_small,
            "mse_large": self.mse_large,
            "endpoint_error": self.endpoint_error,
            "monotone": self.monotone,
            "violations": len(self.violations),
            "total_increase": float(self.delta[self.delta > 0].sum()),
            "largest_group": max((len(m.removed) + len(m.added) for m in self.moves), default=0),
        }


class _Walk:
    """State of the greedy walk: residual r = x − x̂ (float64, all tokens), every move's entries
    (token, atom, signed code; atoms = S latents then L latents) grouped by move and indexed by
    token, and each move's current ΔMSE parts Q_m and ⟨r, Z_m⟩ (``lin``)."""

    def __init__(self, small: SAEView, large: SAEView, p: _Pass, moves: list[Move], max_gram: int) -> None:
        if p.residual is None:
            raise ValueError("the walk needs the pass's residual (encode the pair with keep=True)")
        residual = p.residual
        n_s, n = small.n_latents, residual.shape[0]
        if (small.n_latents + large.n_latents) ** 2 > max_gram:
            raise ValueError(
                f"the decoder Gram matrix of {small.n_latents + large.n_latents} latents exceeds "
                f"max_gram_entries={max_gram} (4 bytes each); raise it if memory allows"
            )
        self.r, self.r_sum, self.scale = residual, residual.sum(0), 1.0 / residual.numel()
        self.w = torch.cat([small.W_dec.double(), large.W_dec.double()])
        self.gram = self.w.float() @ self.w.float().T
        self.db = large.b_dec.double() - small.b_dec.double()
        move_of = torch.empty(len(self.w), dtype=torch.long)
        for m, move in enumerate(moves):
            move_of[list(move.removed)] = m
            move_of[[n_s + j for j in move.added]] = m
        (ts, ls, vs), (tl, ll, vl) = (map(torch.cat, zip(*side)) for side in p.entries)
        atom, tok = torch.cat([ls, ll + n_s]), torch.cat([ts, tl])
        key, order = (move_of[atom] * n + tok).sort(stable=True)
        self.atom, self.tok, self.coef = atom[order], tok[order], torch.cat([-vs, vl])[order]
        self.move = move_of[self.atom]
        new = torch.ones(len(key), dtype=torch.bool)
        new[1:] = key[1:] != key[:-1]
        self.local = new.long().cumsum(0) - 1  # which (move, token) pair each entry belongs to
        self.tokens = self.tok[new]
        self.e_ptr, self.u_ptr = (
            torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(k // n, minlength=len(moves)).cumsum(0)])
            for k in (key, key[new])
        )
        self.by_token = self.tok.argsort(stable=True)
        self.t_ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(self.tok, minlength=n).cumsum(0)])
        # ⟨r, Z_m⟩ = Σ_{a∈m} ± Σ_t f_ta ⟨r_t, w_a⟩ (sparse product); Q_m = Σ_t ‖Z_mt‖² from entry pairs
        # sharing a (move, token), which are adjacent after the sort.
        f = torch.sparse_coo_tensor(
            torch.stack([self.atom, self.tok]), self.coef, (len(self.w), n), check_invariants=True
        )
        per_atom = (torch.sparse.mm(f, self.r) * self.w).sum(1)
        self.lin = torch.zeros(len(moves), dtype=torch.float64).index_add_(0, move_of, per_atom)
        run_start = torch.cat([torch.zeros(1, dtype=torch.long), new.nonzero().flatten()[1:]])
        mine, other = self._pairs(torch.arange(len(key)), run_start[self.local], torch.bincount(self.local)[self.local])
        self.quad = torch.zeros(len(moves), dtype=torch.float64).index_add_(0, self.move[mine], self._gram(mine, other))

    def _change(self, m: int) -> tuple[Tensor | None, Tensor | None]:
        """Move m's change of x̂ on the tokens where it acts, and those tokens."""
        e0, e1, u0, u1 = (int(v) for v in (self.e_ptr[m], self.e_ptr[m + 1], self.u_ptr[m], self.u_ptr[m + 1]))
        if e0 == e1:
            return None, None
        z = torch.zeros(u1 - u0, self.r.shape[1], dtype=torch.float64)
        return (
            z.index_add_(0, self.local[e0:e1] - u0, self.coef[e0:e1, None] * self.w[self.atom[e0:e1]]),
            self.tokens[u0:u1],
        )

    def deltas(self) -> Tensor:
        return (self.quad - 2 * self.lin) * self.scale

    def make(self, m: int) -> float:
        """Make move m; its exact ΔMSE from the residual, then every affected move's ``lin``."""
        z, toks = self._change(m)
        if z is None:
            return 0.0
        r = self.r[toks]
        delta = float(torch.vdot(z.view(-1), (z - 2 * r).view(-1))) * self.scale
        self.r[toks] = r - z
        self.r_sum -= z.sum(0)
        tok = self.tok[self.e_ptr[m] : self.e_ptr[m + 1]]  # every (entry of m, entry on its token) pair:
        mine, other = self._pairs(
            torch.arange(int(self.e_ptr[m]), int(self.e_ptr[m + 1])),
            self.t_ptr[tok],
            self.t_ptr[tok + 1] - self.t_ptr[tok],
        )
        self.lin.index_add_(0, self.move[self.by_token[other]], -self._gram(mine, self.by_token[other]))
        return delta

    @staticmethod
    def _pairs(entries: Tensor, starts: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
        """Each entry paired with every position in [start, start + len) of its own range."""
        mine = entries.repeat_interleave(lens)
        offsets = torch.arange(len(mine)) - (lens.cumsum(0) - lens).repeat_interleave(lens)
        return mine, starts.repeat_interleave(lens) + offsets

    def _gram(self, a: Tensor, b: Tensor) -> Tensor:
        """coef_a · coef_b · ⟨w_a, w_b⟩ for entry pairs."""
        return self.coef[a] * (self.coef[b] * self.gram[self.atom[a], self.atom[b]])

    def bias_delta(self) -> float:
        return float(self.r.shape[0] * self.db.square().sum() - 2 * self.db @ self.r_sum) * self.scale

    def make_bias(self) -> float:
        delta = self.bias_delta()
        self.r -= self.db
        self.r_sum -= self.r.shape[0] * self.db
        self.lin.index_add_(0, self.move, -self.coef * (self.w @ self.db)[self.atom])
        return delta


def _greedy(walk: _Walk, n_moves: int, bias: str) -> tuple[list[int], list[float]]:
    """Move order (-1: the bias) and the exact ΔMSE of each (see the module docstring)."""
    order, deltas, done = [], [], torch.zeros(n_moves, dtype=torch.bool)
    if bias == "first":
        order.append(-1)
        deltas.append(walk.make_bias())
    for _ in range(n_moves):
        current = walk.deltas().masked_fill_(done, float("inf"))
        m = int(current.argmin())
        if bias == "ordered" and -1 not in order and walk.bias_delta() < float(current[m]):
            order.append(-1)
            deltas.append(walk.make_bias())
            m = int(walk.deltas().masked_fill_(done, float("inf")).argmin())
        order.append(m)
        deltas.append(walk.make(m))
        done[m] = True
    if -1 not in order:
        order.append(-1)
        deltas.append(walk.make_bias())
    return order, deltas


def interpolation_path(
    small: SAEView | SAEBank, large: SAEView | SAEBank, x: Tensor, *, config: StitchConfig = StitchConfig()
) -> StitchPath:
    """The greedy path of moves from ``small`` to ``large`` with exact MSE and L0 at every step."""
    small, large = as_view(small, "small"), as_view(large, "large")
    x = _check_pair(small, large, x)
    n, n_s, n_l = x.shape[0], small.n_latents, large.n_latents
    p = _encode_pair(small, large, x, config.chunk_size, True, config.max_code_entries)
    moves = stitch_moves(small, large, threshold=config.threshold, orphans=config.orphans, chunk_size=config.chunk_size)
    order, deltas = _greedy(_Walk(small, large, p, moves, config.max_gram_entries), len(moves), config.bias)
    ordered = tuple(moves[m] if m >= 0 else Move("bias", (), ()) for m in order)
    delta = np.asarray(deltas)
    mse = p.mse[0] + np.concatenate([[0.0], np.cumsum(delta)])
    freq_s, freq_l = p.fired[0].double() / n, p.fired[1].double() / n
    n_latents = n_s + np.concatenate([[0], np.cumsum([len(mv.added) - len(mv.removed) for mv in ordered])])
    l0_steps = [float(freq_l[list(mv.added)].sum() - freq_s[list(mv.removed)].sum()) for mv in ordered]
    l0 = float(freq_s.sum()) + np.concatenate([[0.0], np.cumsum(l0_steps)])
    violations = np.flatnonzero(delta > config.monotone_tol * p.mse[0]) + 1
    return StitchPath(
        n_latents,
        mse,
        l0,
        delta,
        ordered,
        p.mse[0],
        p.mse[1],
        abs(float(mse[-1]) - p.mse[1]),
        violations,
        _insertion(small, large, p, x),
        (n_s, n_l),
    )


# --------------------------------------------------------- a path as tensors, for the store
_KINDS = ("swap", "insert", "remove", "bias")


def _flat(groups: list[tuple[int, ...]]) -> tuple[Tensor, Tensor]:
    ptr = torch.tensor([0] + [len(g) for g in groups]).cumsum(0)
    return torch.tensor([i for g in groups for i in g], dtype=torch.long), ptr


def path_tensors(path: StitchPath) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A ``StitchPath`` as (tensors, meta) for ``Store.cached``; ``path_from_tensors`` inverts it."""
    removed, removed_ptr = _flat([m.removed for m in path.moves])
    added, added_ptr = _flat([m.added for m in path.moves])
    tensors = {
        "n_latents": torch.as_tensor(path.n_latents),
        "mse": torch.as_tensor(path.mse),
        "l0": torch.as_tensor(path.l0),
        "delta": torch.as_tensor(path.delta),
        "violations": torch.as_tensor(path.violations, dtype=torch.long),
        "kind": torch.tensor([_KINDS.index(m.kind) for m in path.moves], dtype=torch.long),
        "removed": removed,
        "removed_ptr": removed_ptr,
        "added": added,
        "added_ptr": added_ptr,
        **{f"insertion.{k}": v for k, v in insertion_tensors(path.insertion).items()},
    }
    meta = {
        "mse_small": path.mse_small,
        "mse_large": path.mse_large,
        "endpoint_error": path.endpoint_error,
        "sizes": list(path.sizes),
    }
    return tensors, meta


def path_from_tensors(t: dict[str, Tensor], meta: dict[str, Any]) -> StitchPath:
    """The ``StitchPath`` that ``path_tensors`` stored."""

    def group(name: str, m: int) -> tuple[int, ...]:
        ptr = t[f"{name}_ptr"]
        return tuple(t[name][int(ptr[m]) : int(ptr[m + 1])].tolist())

    moves = tuple(Move(_KINDS[int(k)], group("removed", m), group("added", m)) for m, k in enumerate(t["kind"]))
    insertion = insertion_from_tensors(
        {k[len("insertion.") :]: v for k, v in t.items() if k.startswith("insertion.")}, meta
    )
    return StitchPath(
        t["n_latents"].numpy(),
        t["mse"].numpy(),
        t["l0"].numpy(),
        t["delta"].numpy(),
        moves,
        meta["mse_small"],
        meta["mse_large"],
        meta["endpoint_error"],
        t["violations"].numpy(),
        insertion,
        tuple(meta["sizes"]),
    )
