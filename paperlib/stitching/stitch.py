"""SAE stitching (paper B): which latents of a larger SAE are new, and a path from a smaller SAE to it.

An SAE is codes f(x) [B, n] from any encoder (ReLU, TopK, thresholds, gates) and a linear decoder
x̂ = f(x) W_dec + b_dec (``paperlib.sae.view.SAEView``; ``bank[i]`` is seed i of an ``SAEBank``). MSE is
the mean over tokens *and* dimensions (``sae.train.evaluate``'s ``mse``); sums are kept in float64.

**Insertion** (``insertion_effects``): adding latent j of the larger SAE L to the smaller SAE S
changes S's MSE by ΔMSE_j = E[f_j² ‖d_j‖² − 2 f_j ⟨d_j, r⟩] / d_model, r = x − x̂_S, for all j in
one pass over the tokens. ΔMSE_j < 0: *novel*; ≥ 0: *reconstruction*. The max decoder cosine
m_j = max_i cos(d^L_j, d^S_i) is the paper's cheap predictor of the class.

**Stitched SAE** (``stitch``): x̂ = Σ_{i∈kept} f^S_i d^S_i + Σ_{j∈added} f^L_j d^L_j + b with b one of
the two decoder biases (the paper does not say which; for exact endpoints b is b_S until the *bias
move* swaps it for b_L).

**Interpolation path** (``paperlib.stitching.path.interpolation_path``); our rules where the paper is silent:

* groups (``stitch_moves``): the bipartite graph with an edge between S latent i and L latent j iff
  cos(d^S_i, d^L_j) > ``threshold`` (0.7). A component with latents on both sides is one *swap*
  (remove its S latents, add its L latents); an L latent without edges is *inserted* alone (novel
  by geometry; its ΔMSE class is reported beside). An S latent without edges must still leave:
  ``orphans="nearest"`` attaches it to the component of its most similar L latent (a leaf: two
  components never merge), ``"remove"`` removes it alone. Groups are geometric, not by ΔMSE, so
  that stitching an SAE with itself changes nothing (each latent swaps with its own copy, ΔMSE 0)
  even where L1 shrinkage gives a duplicate latent a negative ΔMSE.
* bias: swapping b_S for b_L changes no latent count; ``bias="ordered"`` makes it when it is the
  best move, ``"first"`` / ``"last"`` pin it.
* order: exact greedy. Each step makes the move with the lowest ΔMSE against the *current* stitched
  SAE, so the MSE rises only where no remaining move would lower it. ΔMSE_m = Q_m − 2⟨r, Z_m⟩ with
  Z_m the move's change of x̂: Q_m is fixed and every move's ⟨r, Z_m⟩ is kept current through the
  decoder Gram matrix (float32: the one rounding in the *order*; 4·(n_S + n_L)² bytes), touching
  only tokens where the moved latents fire.
* bookkeeping: one pass stores both SAEs' codes sparsely and S's residual in float64; each move
  updates the residual on its tokens, so every step's ΔMSE is exact. L0 is additive (Σ firing
  frequencies of the active latents). ``endpoint_error`` compares the last MSE with L's MSE
  computed directly; steps that raise the MSE by more than ``monotone_tol``·MSE_S are listed in
  ``violations``, never hidden.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import overload

import numpy as np
import torch
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from torch import Tensor

from paperlib.sae.bank import SAEBank
from paperlib.sae.view import SAEView, as_view


@overload
def _check_pair(small: SAEView, large: SAEView, x: Tensor) -> Tensor: ...
@overload
def _check_pair(small: SAEView, large: SAEView, x: None) -> None: ...
def _check_pair(small: SAEView, large: SAEView, x: Tensor | None) -> Tensor | None:
    """Same d_model for both SAEs; ``x`` as finite float32 [N, d] on the CPU."""
    if small.d_model != large.d_model:
        raise ValueError(
            f"the small SAE has d_model={small.d_model} but the large one d_model={large.d_model}; "
            "stitch SAEs trained on the same activations"
        )
    if x is None:
        return None
    if x.ndim != 2 or x.shape[1] != small.d_model or x.shape[0] == 0:
        raise ValueError(f"activations x must be [n_tokens >= 1, d_model={small.d_model}], got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError("activations x have NaN/Inf entries; clean or drop those rows first")
    return x.detach().float().cpu()


def _codes(sae: SAEView, x: Tensor) -> Tensor:
    codes = sae.encode(x)
    if codes.shape != (x.shape[0], sae.n_latents):
        raise ValueError(
            f"{sae.name}.encode returned shape {tuple(codes.shape)}, expected [{x.shape[0]}, n_latents={sae.n_latents}]"
        )
    if not torch.isfinite(codes).all():
        raise ValueError(f"{sae.name} produced NaN/Inf codes; check its weights and the activations")
    return codes.detach()


def _decode64(codes: Tensor, sae: SAEView) -> tuple[Tensor, Tensor]:
    """(codes as coalesced sparse float64, reconstruction in float64): cost non-zeros × d."""
    sparse = codes.to_sparse().coalesce().double()
    return sparse, torch.sparse.mm(sparse, sae.W_dec.double()) + sae.b_dec.double()


def reconstruction_mse(sae: SAEView | SAEBank, x: Tensor, *, chunk_size: int = 4096) -> float:
    """MSE of ``sae`` on ``x`` (mean over tokens and dimensions), accumulated in float64."""
    sae = as_view(sae, "given")
    x = _check_pair(sae, sae, x)
    total = 0.0
    for start in range(0, x.shape[0], chunk_size):
        chunk = x[start : start + chunk_size]
        total += float((chunk.double() - _decode64(_codes(sae, chunk), sae)[1]).square().sum())
    return total / x.numel()


def max_cosine(a: Tensor, b: Tensor, *, chunk_size: int = 4096) -> tuple[Tensor, Tensor]:
    """For each row of ``a`` [n_a, d]: the largest cosine to a row of ``b`` [n_b, d] and its index
    (zero rows have cosine 0; NaN and -1 when ``b`` is empty)."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"max_cosine needs [n_a, d] and [n_b, d] with the same d, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if b.shape[0] == 0:
        return torch.full((a.shape[0],), float("nan")), torch.full((a.shape[0],), -1, dtype=torch.long)
    an, bn = _unit(a), _unit(b)
    values, indices = [], []
    for start in range(0, max(an.shape[0], 1), chunk_size):
        best = (an[start : start + chunk_size] @ bn.T).max(dim=1)
        values.append(best.values)
        indices.append(best.indices)
    return torch.cat(values), torch.cat(indices)


def _unit(w: Tensor) -> Tensor:
    w = w.detach().float()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)


@dataclass(frozen=True)
class Insertion:
    """Per latent j of the large SAE: ΔMSE of inserting it alone into the small SAE, its max decoder
    cosine to the small SAE and which latent that is, and its firing frequency."""

    delta_mse: Tensor  # [n_L] float64
    max_cos: Tensor  # [n_L]
    closest: Tensor  # [n_L] index into the small SAE
    frequency: Tensor  # [n_L]
    mse_small: float
    mse_large: float

    @property
    def novel(self) -> Tensor:
        """Latents that lower the small SAE's MSE on their own."""
        return self.delta_mse < 0

    @property
    def fraction_novel(self) -> float:
        return float(self.novel.double().mean())

    def summary(self) -> dict:
        return {
            "n_latents": len(self.delta_mse),
            "fraction_novel": self.fraction_novel,
            "mse_small": self.mse_small,
            "mse_large": self.mse_large,
            "median_max_cos_novel": float(self.max_cos[self.novel].median()) if self.novel.any() else None,
            "median_max_cos_reconstruction": (
                float(self.max_cos[~self.novel].median()) if (~self.novel).any() else None
            ),
        }


@dataclass
class _Pass:
    """One pass over the tokens: sums for ΔMSE, firing counts and MSEs of both SAEs, and (for paths)
    S's residual [N, d] and both SAEs' codes as (token, latent, value) entries."""

    sum_f2: Tensor
    sum_fr: Tensor
    fired: list[Tensor]
    mse: list[float]
    residual: Tensor | None
    entries: tuple[list, list]


def _encode_pair(small: SAEView, large: SAEView, x: Tensor, chunk_size: int, keep: bool, max_entries: int) -> _Pass:
    n, d = x.shape
    sum_f2, sum_fr = torch.zeros(2, large.n_latents, dtype=torch.float64)
    p = _Pass(
        sum_f2,
        sum_fr,
        [torch.zeros(small.n_latents), torch.zeros(large.n_latents)],
        [0.0, 0.0],
        torch.empty(n, d, dtype=torch.float64) if keep else None,
        ([], []),
    )
    for start in range(0, n, chunk_size):
        chunk = x[start : start + chunk_size]
        for side, sae in enumerate((small, large)):
            codes, recon = _decode64(_codes(sae, chunk), sae)
            r = chunk.double() - recon
            p.mse[side] += float(r.square().sum()) / x.numel()
            (tok, lat), values = codes.indices(), codes.values()
            p.fired[side] += torch.bincount(lat, minlength=sae.n_latents)
            if side == 0:
                r_small = r
                if p.residual is not None:  # kept for paths
                    p.residual[start : start + len(chunk)] = r
            else:
                p.sum_f2 += torch.bincount(lat, values.square(), minlength=sae.n_latents)
                p.sum_fr += (torch.sparse.mm(codes.t(), r_small) * sae.W_dec.double()).sum(1)
            if keep:
                p.entries[side].append((tok + start, lat, values))
                if sum(len(e[0]) for part in p.entries for e in part) > max_entries:
                    raise ValueError(
                        f"the codes have more than max_code_entries={max_entries} non-zeros "
                        f"(L0 too high for {n} tokens); pass fewer tokens or raise the limit"
                    )
    return p


def _insertion(small: SAEView, large: SAEView, p: _Pass, x: Tensor) -> Insertion:
    n, d = x.shape
    delta = (p.sum_f2 * large.W_dec.double().square().sum(1) - 2 * p.sum_fr) / (n * d)
    max_cos, closest = max_cosine(large.W_dec, small.W_dec)
    return Insertion(delta, max_cos, closest, p.fired[1] / n, *p.mse)


def insertion_effects(
    small: SAEView | SAEBank, large: SAEView | SAEBank, x: Tensor, *, chunk_size: int = 4096
) -> Insertion:
    """ΔMSE of inserting each latent of ``large`` alone into ``small``, in closed form over ``x``."""
    small, large = as_view(small, "small"), as_view(large, "large")
    x = _check_pair(small, large, x)
    return _insertion(small, large, _encode_pair(small, large, x, chunk_size, False, 0), x)


@dataclass(frozen=True)
class Move:
    """One step of a path: ``kind`` is "swap", "insert", "remove" or "bias"; indices of the small
    SAE's latents it removes and of the large SAE's latents it adds."""

    kind: str
    removed: tuple[int, ...]
    added: tuple[int, ...]


@dataclass(frozen=True)
class StitchConfig:
    """The path's knobs (see the module docstring for the rules they select)."""

    threshold: float = 0.7  # decoder cosine above which an S and an L latent share a group
    orphans: str = "nearest"  # S latents without a partner: "nearest" (join its closest L latent) or "remove"
    bias: str = "ordered"  # when b_S becomes b_L: "ordered" (by benefit), "first" or "last"
    chunk_size: int = 4096
    monotone_tol: float = 1e-9  # relative to MSE_S: larger increases are violations
    max_code_entries: int = 100_000_000  # memory guard for the stored sparse codes (24 bytes each)
    max_gram_entries: int = 1_000_000_000  # memory guard for the decoder Gram matrix (4 bytes each)

    def __post_init__(self) -> None:
        if not -1 <= self.threshold <= 1:
            raise ValueError(f"StitchConfig.threshold is a cosine and must lie in [-1, 1], got {self.threshold!r}")
        if self.orphans not in ("nearest", "remove"):
            raise ValueError(f"StitchConfig.orphans must be 'nearest' or 'remove', got {self.orphans!r}")
        if self.bias not in ("ordered", "first", "last"):
            raise ValueError(f"StitchConfig.bias must be 'ordered', 'first' or 'last', got {self.bias!r}")
        for name in ("chunk_size", "max_code_entries", "max_gram_entries"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"StitchConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        if not self.monotone_tol >= 0:
            raise ValueError(f"StitchConfig.monotone_tol must be >= 0, got {self.monotone_tol!r}")


def stitch_moves(
    small: SAEView | SAEBank,
    large: SAEView | SAEBank,
    *,
    threshold: float = 0.7,
    orphans: str = "nearest",
    chunk_size: int = 4096,
) -> list[Move]:
    """The latent moves (no bias move) from ``small`` to ``large``: components of the graph of
    decoder cosines above ``threshold``, orphans handled as ``orphans`` says."""
    StitchConfig(threshold=threshold, orphans=orphans)  # validates both
    small, large = as_view(small, "small"), as_view(large, "large")
    _check_pair(small, large, None)
    n_s, n_l = small.n_latents, large.n_latents
    s_unit, l_unit = _unit(small.W_dec), _unit(large.W_dec)
    row_chunks, col_chunks = [], []
    for start in range(0, n_l, chunk_size):
        j, i = (l_unit[start : start + chunk_size] @ s_unit.T > threshold).nonzero(as_tuple=True)
        row_chunks.append(i.numpy())
        col_chunks.append(j.numpy() + start + n_s)
    rows = np.concatenate(row_chunks or [np.zeros(0, int)])
    cols = np.concatenate(col_chunks or [np.zeros(0, int)])
    if orphans == "nearest" and n_l and n_s:
        lonely = np.setdiff1d(np.arange(n_s), rows)
        nearest = max_cosine(small.W_dec[lonely], large.W_dec, chunk_size=chunk_size)[1].numpy()
        rows, cols = np.concatenate([rows, lonely]), np.concatenate([cols, nearest + n_s])
    graph = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(n_s + n_l,) * 2)
    _, labels = connected_components(graph, directed=False)
    order = np.argsort(labels, kind="stable")
    moves = []
    for group in np.split(order, np.flatnonzero(np.diff(labels[order])) + 1):
        removed = tuple(int(i) for i in group[group < n_s])
        added = tuple(int(j) - n_s for j in group[group >= n_s])
        moves.append(Move("swap" if removed and added else "remove" if removed else "insert", removed, added))
    return moves


def stitch(
    small: SAEView | SAEBank, large: SAEView | SAEBank, keep: Tensor, add: Tensor, *, bias: str = "small"
) -> SAEView:
    """The stitched SAE keeping ``keep`` [n_S] bool of ``small``, adding ``add`` [n_L] bool of ``large``,
    with the decoder bias of ``bias`` ("small" or "large")."""
    small, large = as_view(small, "small"), as_view(large, "large")
    _check_pair(small, large, None)
    if (
        keep.shape != (small.n_latents,)
        or add.shape != (large.n_latents,)
        or keep.dtype != torch.bool
        or add.dtype != torch.bool
    ):
        raise ValueError(
            f"keep and add must be bool masks of shapes [{small.n_latents}] and [{large.n_latents}], "
            f"got {tuple(keep.shape)} {keep.dtype} and {tuple(add.shape)} {add.dtype}"
        )
    if bias not in ("small", "large"):
        raise ValueError(f"bias must be 'small' or 'large', got {bias!r}")
    return SAEView(
        lambda x: torch.cat([small.encode(x)[:, keep], large.encode(x)[:, add]], 1),
        torch.cat([small.W_dec[keep], large.W_dec[add]]),
        (small if bias == "small" else large).b_dec,
        f"stitched SAE ({int(keep.sum())} small + {int(add.sum())} large latents)",
    )


def insertion_tensors(ins: Insertion) -> dict[str, Tensor]:
    """An ``Insertion``'s tensors for ``Store.cached`` (its two MSEs go in the meta)."""
    return {"delta_mse": ins.delta_mse, "max_cos": ins.max_cos, "closest": ins.closest, "frequency": ins.frequency}


def insertion_from_tensors(t: dict[str, Tensor], meta: dict) -> Insertion:
    """The ``Insertion`` that ``insertion_tensors`` (and its meta) stored."""
    return Insertion(t["delta_mse"], t["max_cos"], t["closest"], t["frequency"], meta["mse_small"], meta["mse_large"])


def novel_fraction(ins: Insertion, *, alive: Tensor | None = None) -> float:
    """Fraction of the large SAE's latents with ΔMSE < 0, over ``alive`` latents if given."""
    mask = torch.ones_like(ins.novel) if alive is None else alive
    if not mask.any():
        return float("nan")
    return float(ins.novel[mask].double().mean())
