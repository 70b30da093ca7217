"""Per-latent stability: which latents of a run reappear in the other runs, and how reliably.

PW-MCC is one mean per pair of runs; a reader's next question is *which* latents are the consistent
ones. For R runs, latent i of run r gets its matched cosine in each of the R-1 other runs (the same
exact one-to-one matchings as PW-MCC; a latent left without a partner because the other run is
narrower scores 0, like a zero row), and its stability at a threshold t is the fraction of the
other runs where that cosine is >= t: an estimate of the probability that a similar latent
reappears in an independently trained SAE (Gerasimov et al. 2026). No single cut is privileged, so
summaries are curves over thresholds, each beside the same curve for random Gaussian dictionaries
of the same shapes (``chance_curve``, from the matchings ``chance_pw_mcc`` already samples).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from paperlib.metrics.consistency import PairwiseChance, PairwiseMCC


@dataclass(frozen=True)
class LatentStability:
    """``cosines[r][i, k]``: latent i of run r, its matched cosine in the k-th other run (the other
    runs in their order, r itself skipped); NaN for a latent left out of the matching (``alive``)."""

    cosines: list[np.ndarray]
    signed: bool

    def at(self, threshold: float) -> list[np.ndarray]:
        """Per run, each latent's fraction of other runs where its matched cosine is >= ``threshold``
        (NaN for latents left out)."""
        return [np.where(np.isnan(c).all(axis=1), np.nan, (c >= threshold).mean(axis=1)) for c in self.cosines]

    def curve(self, thresholds: Sequence[float]) -> np.ndarray:
        """Mean stability over every latent of every run, per threshold: the probability that a
        latent reappears in another run with cosine >= t."""
        pooled = np.concatenate([c.ravel() for c in self.cosines])
        pooled = pooled[~np.isnan(pooled)]
        return np.array([(pooled >= t).mean() for t in _thresholds(thresholds)])

    def everywhere(self, thresholds: Sequence[float]) -> np.ndarray:
        """Per threshold, the fraction of latents whose matched cosine is >= t in *every* other run."""
        worst = np.concatenate([c.min(axis=1) for c in self.cosines])
        worst = worst[~np.isnan(worst)]
        return np.array([(worst >= t).mean() for t in _thresholds(thresholds)])


def latent_stability(result: PairwiseMCC, n_latents: Sequence[int], *, alive=None) -> LatentStability:
    """Per-latent matched cosines from a PW-MCC result over runs of widths ``n_latents``; ``alive``:
    the masks the result was computed with (``pw_mcc(alive=...)``), whose dead latents are NaN. A
    live latent without a partner in some run (that run is narrower) scores 0 there."""
    widths = [int(n) for n in n_latents]
    R = len(widths)
    if len(result.pairs) != R * (R - 1) // 2:
        raise ValueError(
            f"the PW-MCC result has {len(result.pairs)} pairs, but {R} runs make {R * (R - 1) // 2}; "
            "pass the widths of the runs it was computed on, in their order"
        )
    cosines = [np.zeros((n, R - 1)) for n in widths]
    for (i, j, _), m in zip(result.pairs, result.matches):
        if m.rows.size and (m.rows.max() >= widths[i] or m.cols.max() >= widths[j]):
            raise ValueError(f"pair ({i}, {j}) matches latents beyond the widths {widths[i]}, {widths[j]} given")
        cosines[i][m.rows, j - 1] = m.similarity  # j > i: run j is the (j-1)-th other run of i
        cosines[j][m.cols, i] = m.similarity
    for r, mask in enumerate(alive if alive is not None else []):
        if mask is not None:
            cosines[r][~np.asarray(mask, dtype=bool)] = np.nan
    return LatentStability(cosines, result.signed)


def chance_curve(chance: PairwiseChance, thresholds: Sequence[float]) -> np.ndarray:
    """``LatentStability.curve`` for random dictionaries of the runs' widths. Each pair of runs of
    widths n_a <= n_b offers n_a + n_b latent slots: 2 n_a matched cosines (one per side, drawn from
    the sampled chance matchings) and n_b - n_a unmatched ones, which score 0."""
    t = _thresholds(thresholds)
    above, slots = np.zeros(len(t)), 0
    for (n_a, n_b), count in chance.pairs.items():
        sim = chance.by_widths[(n_a, n_b)].similarity
        if not sim.size:
            raise ValueError("this chance level keeps no matched cosines; compute it with chance_pw_mcc")
        above += count * (2 * n_a * (sim[None, :] >= t[:, None]).mean(axis=1) + (n_b - n_a) * (0 >= t))
        slots += count * (n_a + n_b)
    return above / slots


def _thresholds(thresholds: Sequence[float]) -> np.ndarray:
    t = np.asarray(thresholds, dtype=np.float64)
    if t.ndim != 1 or not t.size or not np.isfinite(t).all():
        raise ValueError(f"thresholds must be a non-empty list of finite cosines, got {thresholds!r}")
    return t


def cross_seed_similarity(
    matches: list, pairs: list[tuple[int, int, float]], n_runs: int, n_latents: int
) -> np.ndarray:
    """Per run and latent [R, n]: the mean cosine of the latent's matched partners in the other runs
    (from ``consistency.pw_mcc``'s ``matches`` and ``pairs``; needs equal widths, so every latent is
    matched). Paper A's per-pair similarity, seen from each latent."""
    total, count = np.zeros((n_runs, n_latents)), np.zeros((n_runs, n_latents))
    for (i, j, _), m in zip(pairs, matches):
        for run, index in ((i, m.rows), (j, m.cols)):
            total[run, index] += m.similarity
            count[run, index] += 1
    if (count != n_runs - 1).any():
        raise ValueError("every latent must be matched in every pair (pass runs of equal width and no dead masks)")
    return total / count
