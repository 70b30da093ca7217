"""Paper A's consistency metrics: MCC, PW-MCC, GT-MCC, and the baselines they must beat.

A dictionary is a set of directions, one row per latent (an SAE's decoder rows), compared after
normalising each row to unit length. MCC(A, B) is the mean cosine over the best one-to-one
matching of size m = min(n_A, n_B), solved exactly as a linear assignment problem.

* Signed cosine is the default (the authors' code; for SAEs with non-negative codes an
  anti-parallel atom is a different feature); ``signed=False`` uses |cos| (the paper's formula).
  Every result says which one it used.
* A zero-norm row (a latent that never learned a direction) has cosine 0 with everything: it
  still takes part in the matching, so dead latents lower MCC rather than being silently dropped.
  This holds at every size (the sparse solver gets the live rows plus one zero-weight stand-in per
  zero row the other side could use, see ``_match_with_zero_rows``). To leave dead latents out
  instead, pass ``alive_a`` / ``alive_b`` masks (e.g. activation frequency > 0); m is then the
  smaller number of live latents.
* Matchings are exact at every size: dense (scipy) for small dictionaries, and above that the
  certified sparse solver of ``paperlib.metrics.matching`` (candidate graph + LP-dual optimality proof
  over all n_A·n_B pairs, never a dense n×n matrix): 16k latents in seconds, 65k in under a
  minute on 2 CPU cores. Every result carries ``certified``.
* Baselines: ``chance_mcc`` (independent random Gaussian dictionaries of the same shapes, ≈0.46
  signed at d=16, n=32), ``chance_pw_mcc`` (the chance level of PW-MCC over runs of several widths:
  the mean over pairs of each pair's chance, whatever order the runs come in) and
  ``untrained_pw_mcc`` (freshly initialised SAEs of a configuration).
* ``bootstrap_interval`` resamples latents (which latents a pair has); ``run_interval`` leaves out
  runs (which seeds were drawn); ``frequency_decomposition`` splits an MCC into
  activation-frequency bins whose contributions sum to it; ``shared_latents`` is Paulo & Belrose's
  alternative definition (encoder and decoder matchings agree and both cosines >= 0.7).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import combinations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from paperlib.metrics.matching import match as sparse_match
from paperlib.runtime import resolve_device


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
    """The optimal matching: ``rows[i]`` of A is paired with ``cols[i]`` of B at ``similarity[i]``;
    ``certified`` says its optimality was proven over all pairs (always, unless the sparse
    solver hit its round limit, which it reports with a warning)."""

    mcc: float
    similarity: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    signed: bool
    certified: bool = True
    solver: str = "dense"  # "dense" (scipy) or "sparse" (paperlib.metrics.matching's certified solver)


# Up to this many latents (either side) the dense float64 solver is used; above it the sparse
# certified one. Both score zero-norm rows as cosine 0 (module docstring).
DENSE_LIMIT = 2048


def _live(mask, n: int, name: str) -> np.ndarray:
    if mask is None:
        return np.arange(n)
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != (n,):
        raise ValueError(f"{name} must be a boolean vector of length {n} (one per latent), got shape {mask.shape}")
    if not mask.any():
        raise ValueError(f"{name} marks every latent dead; nothing to match")
    return np.flatnonzero(mask)


def match(A, B, *, signed: bool = True, alive_a=None, alive_b=None, device: str | None = None) -> MatchResult:
    """Exact maximum-similarity one-to-one matching of the (live) rows of A and B. ``device``
    runs the sparse solver's similarity scans (e.g. "cuda"); the result does not depend on it."""
    device = _device(device)
    a, b = as_dictionary(A, "first dictionary"), as_dictionary(B, "second dictionary")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"dictionaries live in different spaces: d_model {a.shape[1]} vs {b.shape[1]}; "
            "compare SAEs trained on the same activations"
        )
    keep_a, keep_b = _live(alive_a, len(a), "alive_a"), _live(alive_b, len(b), "alive_b")
    a, b = a[keep_a], b[keep_b]
    if max(len(a), len(b)) > DENSE_LIMIT:
        rows, cols, similarity, certified = _match_with_zero_rows(a, b, signed, device)
        solver = "sparse"
    else:
        sim = a @ b.T
        if not signed:
            sim = np.abs(sim)
        rows, cols = linear_sum_assignment(sim, maximize=True)
        similarity, certified, solver = sim[rows, cols], True, "dense"
    return MatchResult(float(similarity.mean()), similarity, keep_a[rows], keep_b[cols], signed, certified, solver)


def _device(device) -> str | None:
    """A device this machine has (refused up front otherwise, even where a small problem would not use it)."""
    return None if device is None else str(resolve_device(device))


def _match_with_zero_rows(a: np.ndarray, b: np.ndarray, signed: bool, device: str | None):
    """The sparse solver on unit rows with zero rows scored as cosine 0, as the dense path does.

    Call ``s`` the smaller side (all its rows are matched) and ``t`` the other. Zero rows only ever
    score 0, so the solver sees the live rows alone: a live row of ``s`` goes to a live row of ``t``
    (its cosine) or to a zero row of ``t`` (0); zero rows of ``s`` take leftover rows of ``t``. With
    |cos| (never negative) some optimum matches as many live rows as possible: the rectangular live
    problem. With signed cosines a zero row of ``t`` is worth taking instead of a negative pair, so
    it enters as a stand-in column orthogonal to everything (an extra coordinate), on the side with
    fewer live rows, where no stand-in is forced (the solver certifies forced all-tie columns poorly).
    Returns (rows of a, cols of b, similarity, certified)."""
    swap = len(a) > len(b)
    s, t = (b, a) if swap else (a, b)
    live_s, zero_s = np.flatnonzero(s.any(1)), np.flatnonzero(~s.any(1))
    live_t, zero_t = np.flatnonzero(t.any(1)), np.flatnonzero(~t.any(1))
    if not zero_s.size and not zero_t.size:
        result = sparse_match(a, b, signed=signed, device=device, dense_limit=DENSE_LIMIT)
        return result.rows, result.cols, result.weights, result.certified
    p, q = live_s.size, live_t.size
    pairs_s, pairs_t, pair_w, certified = np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0), True
    if p and q:
        if not signed or not zero_t.size:
            stand_ins, rows_are_s = 0, True
        elif p <= q:  # each live s row may instead take one of the zero rows of t
            stand_ins, rows_are_s = min(zero_t.size, p), True
        else:  # each live t row may stay unmatched, as long as the live s rows left over fit on zero rows of t
            stand_ins, rows_are_s = min(q, q + zero_t.size - p), False
        own, other = (s[live_s], t[live_t]) if rows_are_s else (t[live_t], s[live_s])
        result = sparse_match(
            *_with_stand_ins(own, other, stand_ins), signed=signed, device=device, dense_limit=DENSE_LIMIT
        )
        real = result.cols < len(other)
        r, c, certified = result.rows[real], result.cols[real], result.certified
        pairs_s, pairs_t = (live_s[r], live_t[c]) if rows_are_s else (live_s[c], live_t[r])
        pair_w = result.weights[real]
    matched_s = np.zeros(len(s), bool)
    matched_s[pairs_s] = True
    used_t = np.zeros(len(t), bool)
    used_t[pairs_t] = True
    rest_s = np.concatenate([np.setdiff1d(live_s, pairs_s), zero_s])  # live ones first: onto zero rows of t
    free_t = np.concatenate([np.setdiff1d(zero_t, pairs_t), np.flatnonzero(~used_t & t.any(1))])
    rows_s = np.concatenate([pairs_s, rest_s])
    rows_t = np.concatenate([pairs_t, free_t[: rest_s.size]])
    weight = np.concatenate([pair_w, np.zeros(rest_s.size)])
    rows, cols = (rows_t, rows_s) if swap else (rows_s, rows_t)
    order = np.argsort(rows)
    return rows[order], cols[order], weight[order], certified


def _with_stand_ins(own: np.ndarray, other: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``own`` and ``other`` plus ``k`` rows appended to ``other`` with cosine 0 to every row of ``own``."""
    if not k:
        return own, other
    d = own.shape[1]
    return (
        np.hstack([own, np.zeros((len(own), 1))]),
        np.vstack([np.hstack([other, np.zeros((len(other), 1))]), np.tile(np.eye(1, d + 1, d), (k, 1))]),
    )


def mcc(A, B, *, signed: bool = True) -> float:
    """Mean matched cosine of dictionaries A and B (see the module docstring)."""
    return match(A, B, signed=signed).mcc


def _as_runs(dictionaries) -> list:
    """A [R, n, d] stack or a sequence of [n_r, d] dictionaries as a list of runs."""
    return list(dictionaries.unbind(0) if isinstance(dictionaries, torch.Tensor) else dictionaries)


@dataclass(frozen=True)
class PairwiseMCC:
    """PW-MCC over R runs: mean and std over all R(R-1)/2 pairs, each pair's (i, j, MCC), and the
    matchings themselves (per-latent similarity and partner index)."""

    mean: float
    std: float
    pairs: list[tuple[int, int, float]]
    matches: list[MatchResult]
    signed: bool


def pw_mcc(dictionaries, *, signed: bool = True, device: str | None = None, alive=None) -> PairwiseMCC:
    """Pairwise MCC between independent runs (same data, architecture and width; other seeds).
    ``alive``: one mask per run (see ``match``); the matchings' indices stay the runs' own."""
    runs = _as_runs(dictionaries)
    if len(runs) < 2:
        raise ValueError(f"PW-MCC needs at least two runs, got {len(runs)}; train more seeds")
    alive = [None] * len(runs) if alive is None else list(alive)
    if len(alive) != len(runs):
        raise ValueError(f"alive needs one mask per run: {len(runs)} runs, {len(alive)} masks")
    index = list(combinations(range(len(runs)), 2))
    matches = [
        match(runs[i], runs[j], signed=signed, alive_a=alive[i], alive_b=alive[j], device=device) for i, j in index
    ]
    values = np.array([m.mcc for m in matches])
    pairs = [(i, j, m.mcc) for (i, j), m in zip(index, matches)]
    return PairwiseMCC(float(values.mean()), float(values.std()), pairs, matches, signed)


def gt_mcc(ground_truth, dictionaries, *, signed: bool = True) -> np.ndarray:
    """MCC of each run's dictionary against the ground-truth dictionary (one value per run)."""
    return np.array([mcc(ground_truth, run, signed=signed) for run in _as_runs(dictionaries)])


def bootstrap_interval(
    matches: list[MatchResult], *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile interval of the mean MCC over ``matches`` when each pair's latents are resampled
    with replacement: the uncertainty that comes from which latents the dictionaries happen to have."""
    if not matches or n_boot < 1 or not 0 < level < 1:
        raise ValueError(f"bootstrap_interval needs matches, n_boot >= 1 and 0 < level < 1 (got {n_boot}, {level})")
    rng = np.random.default_rng(seed)
    replicates = np.zeros(n_boot)
    for m in matches:
        n = len(m.similarity)
        replicates += m.similarity[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    replicates /= len(matches)
    tail = (1 - level) / 2
    return float(np.quantile(replicates, tail)), float(np.quantile(replicates, 1 - tail))


def run_interval(result: PairwiseMCC, *, level: float = 0.95) -> tuple[float, float]:
    """Confidence interval of the expected PW-MCC over draws of seeds (not of one rerun's value, which
    varies more): the mean over pairs is a U-statistic of the runs, so its standard error is the
    jackknife's over left-out runs, with Student's t on R - 1 degrees of freedom (wide at few runs,
    as it should be), clipped to the MCC's range."""
    from scipy.stats import t

    R = max(max(i, j) for i, j, _ in result.pairs) + 1 if result.pairs else 0
    if R < 3 or len(result.pairs) != R * (R - 1) // 2 or not 0 < level < 1:
        raise ValueError(
            f"run_interval needs every pair of at least 3 runs and 0 < level < 1 "
            f"(got {len(result.pairs)} pairs, level {level})"
        )
    values = np.array([v for _, _, v in result.pairs])
    left_out = np.array([values[[r not in (i, j) for i, j, _ in result.pairs]].mean() for r in range(R)])
    se = np.sqrt((R - 1) / R * ((left_out - left_out.mean()) ** 2).sum())
    half = float(t.ppf(0.5 + level / 2, R - 1) * se)
    floor = -1.0 if result.signed else 0.0  # an MCC's range: the interval is clipped to it
    return max(result.mean - half, floor), min(result.mean + half, 1.0)


@dataclass(frozen=True)
class FrequencyBins:
    """Matched pairs binned by the pair's smaller activation frequency. ``contribution`` sums to
    the MCC: bin b contributes (sum of its pairs' similarities) / m."""

    edges: np.ndarray
    count: np.ndarray
    mean_similarity: np.ndarray
    contribution: np.ndarray


def frequency_decomposition(result: MatchResult, freq_a, freq_b, edges) -> FrequencyBins:
    """Paper A's frequency decomposition of one matching (average the bins over pairs for PW-MCC).

    ``freq_a``/``freq_b``: per-latent activation frequencies (any unit, e.g. per 1M tokens);
    ``edges``: increasing bin edges covering every pair's minimum frequency."""
    freq_a, freq_b, edges = (np.asarray(v, dtype=np.float64) for v in (freq_a, freq_b, edges))
    pair_freq = np.minimum(freq_a[result.rows], freq_b[result.cols])
    if edges.ndim != 1 or len(edges) < 2 or np.any(np.diff(edges) <= 0):
        raise ValueError(f"edges must be at least two strictly increasing values, got {edges}")
    if pair_freq.min() < edges[0] or pair_freq.max() > edges[-1]:
        raise ValueError(
            f"bin edges [{edges[0]}, {edges[-1]}] do not cover the pairs' frequencies "
            f"[{pair_freq.min()}, {pair_freq.max()}]; widen the edges"
        )
    which = np.clip(np.searchsorted(edges, pair_freq, side="right") - 1, 0, len(edges) - 2)
    count = np.bincount(which, minlength=len(edges) - 1)
    total = np.bincount(which, weights=result.similarity, minlength=len(edges) - 1)
    mean = np.divide(total, count, out=np.full(len(count), np.nan), where=count > 0)
    return FrequencyBins(edges, count, mean, total / len(result.similarity))


def mean_where_defined(rows) -> np.ndarray:
    """Column means of ``rows`` [R, C] over the rows where a value is defined; NaN, without numpy's
    empty-slice warning, where none is (a frequency bin that no pair fills)."""
    rows = np.asarray(rows, dtype=float)
    defined = ~np.isnan(rows)
    total = np.where(defined, rows, 0).sum(0)
    return np.divide(total, defined.sum(0), out=np.full(rows.shape[1], np.nan), where=defined.any(0))


@dataclass(frozen=True)
class SharedLatents:
    """Paulo & Belrose's shared latents of A in B: ``shared[i]`` for A's latent ``rows[i]``."""

    fraction: float
    shared: np.ndarray
    rows: np.ndarray
    decoder_cos: np.ndarray
    encoder_cos: np.ndarray


def shared_latents(dec_a, dec_b, enc_a, enc_b, *, threshold: float = 0.7) -> SharedLatents:
    """A latent is shared when the decoder and the encoder matchings pick the same partner and
    both cosines are >= ``threshold``. Encoders are given as directions, one row per latent."""
    decoder, encoder = match(dec_a, dec_b), match(enc_a, enc_b)
    if not np.array_equal(decoder.rows, encoder.rows):
        raise ValueError("encoder and decoder dictionaries must have the same latents as rows [n_latents, d_model]")
    shared = (decoder.cols == encoder.cols) & (decoder.similarity >= threshold) & (encoder.similarity >= threshold)
    return SharedLatents(float(shared.mean()), shared, decoder.rows, decoder.similarity, encoder.similarity)


@dataclass(frozen=True)
class Chance:
    """MCC of random dictionaries of given shapes: mean and std over sampled pairs, and every
    sampled pair's matched cosines pooled (the chance distribution of a matched latent's cosine)."""

    mean: float
    std: float
    n_samples: int
    signed: bool
    similarity: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def rescale(self, value) -> np.ndarray:
        """``value`` as a fraction of the way from chance to a perfect match: 0 at ``mean``, 1 at 1, so
        that MCCs measured against different chance levels (organisms, widths) can be pooled."""
        return (np.asarray(value) - self.mean) / (1 - self.mean)


def chance_mcc(
    n_a: int, n_b: int, d: int, *, n_samples: int = 100, seed: int = 0, signed: bool = True, device: str | None = None
) -> Chance:
    """The MCC two unrelated dictionaries of shapes [n_a, d] and [n_b, d] reach by chance."""
    if min(n_a, n_b, d, n_samples) < 1:
        raise ValueError(f"chance_mcc needs positive sizes, got n_a={n_a}, n_b={n_b}, d={d}, n_samples={n_samples}")
    rng = np.random.default_rng(seed)
    results = [
        match(rng.standard_normal((n_a, d)), rng.standard_normal((n_b, d)), signed=signed, device=device)
        for _ in range(n_samples)
    ]
    values = np.array([r.mcc for r in results])
    return Chance(
        float(values.mean()), float(values.std()), n_samples, signed, np.concatenate([r.similarity for r in results])
    )


@dataclass(frozen=True)
class PairwiseChance:
    """The chance level of a PW-MCC: ``mean`` over the pairs of runs of each pair's chance level,
    ``std`` that of the mixture (a random pair's chance MCC), and per width pair ``(n_a <= n_b)``
    its ``Chance`` and how many of the run pairs have those widths."""

    mean: float
    std: float
    n_samples: int
    signed: bool
    by_widths: dict[tuple[int, int], Chance]
    pairs: dict[tuple[int, int], int]


def chance_pw_mcc(
    n_latents, d: int, *, n_samples: int = 100, seed: int = 0, signed: bool = True, device: str | None = None
) -> PairwiseChance:
    """Chance level of PW-MCC over runs of widths ``n_latents`` (one per run): each pair's chance
    depends on both of its widths, so it is computed per distinct width pair (smaller first, same
    seed) and averaged over all pairs: the same whatever order the runs come in."""
    widths = [int(n) for n in n_latents]
    if len(widths) < 2:
        raise ValueError(f"chance_pw_mcc needs the widths of at least two runs, got {widths}")
    pairs: dict[tuple[int, int], int] = {}
    for i, j in combinations(range(len(widths)), 2):
        key = (min(widths[i], widths[j]), max(widths[i], widths[j]))
        pairs[key] = pairs.get(key, 0) + 1
    pairs = dict(sorted(pairs.items()))
    by = {key: chance_mcc(*key, d, n_samples=n_samples, seed=seed, signed=signed, device=device) for key in pairs}
    weight = np.array(list(pairs.values()), dtype=np.float64) / sum(pairs.values())
    means = np.array([c.mean for c in by.values()])
    stds = np.array([c.std for c in by.values()])
    mean = float(weight @ means)
    std = float(np.sqrt(weight @ (stds**2 + (means - mean) ** 2))) if len(by) > 1 else float(stds[0])
    return PairwiseChance(mean, std, n_samples, signed, by, pairs)


def untrained_pw_mcc(cfg, *, n_seeds: int = 3, signed: bool = True) -> PairwiseMCC:
    """PW-MCC of freshly initialised SAEs of configuration ``cfg`` (a ``paperlib.sae.bank.SAEConfig``):
    the consistency a training run starts from."""
    from paperlib.sae.bank import SAEBank

    return pw_mcc(SAEBank(replace(cfg, n_seeds=n_seeds)).decoder_directions(), signed=signed)
