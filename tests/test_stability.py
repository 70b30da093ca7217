"""Per-latent stability against a brute-force reference (scipy's assignment on the full cosine matrix)."""

from itertools import combinations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from paperlib.metrics.consistency import chance_pw_mcc, pw_mcc
from paperlib.metrics.stability import chance_curve, latent_stability

D = 48  # wide enough that the own atoms of different runs are near orthogonal


def _runs(widths, shared=6, seed=0):
    """Runs that share ``shared`` atoms (slightly perturbed) and fill the rest with their own."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal((shared, D))
    return [
        np.vstack([common + 0.05 * rng.standard_normal((shared, D)), rng.standard_normal((n - shared, D))])[
            rng.permutation(n)
        ]
        for n in widths
    ]


def _reference(runs):
    """cosines[r][i, k] by an independent route: unit rows, dense matrix, scipy, unmatched = 0."""
    units = [r / np.linalg.norm(r, axis=1, keepdims=True) for r in runs]
    R = len(runs)
    out = [np.zeros((len(r), R - 1)) for r in runs]
    for i, j in combinations(range(R), 2):
        sim = units[i] @ units[j].T
        rows, cols = linear_sum_assignment(sim, maximize=True)
        out[i][rows, j - 1] = sim[rows, cols]
        out[j][cols, i] = sim[rows, cols]
    return out


@pytest.mark.parametrize("widths", [(10, 10, 10), (8, 10, 14), (14, 8)])
def test_matched_cosines_equal_the_reference(widths):
    runs = _runs(widths)
    stability = latent_stability(pw_mcc(runs), widths)
    for got, want in zip(stability.cosines, _reference(runs)):
        np.testing.assert_allclose(got, want, atol=1e-12)


def test_summaries_count_what_they_say():
    runs = _runs((10, 10, 10, 10))
    stability = latent_stability(pw_mcc(runs), [10] * 4)
    ref = _reference(runs)
    for t in (0.5, 0.9, 0.99):
        per_latent = stability.at(t)
        for got, c in zip(per_latent, ref):
            np.testing.assert_allclose(got, (c >= t).sum(axis=1) / 3)
        pooled = np.concatenate([c.ravel() for c in ref])
        assert stability.curve([t])[0] == pytest.approx((pooled >= t).mean())
        assert stability.everywhere([t])[0] == pytest.approx(np.mean([row.min() >= t for c in ref for row in c]))
    # the 6 shared atoms reappear everywhere at 0.9; the runs' own atoms do not
    assert stability.everywhere([0.9])[0] == pytest.approx(6 / 10)


def test_dead_latents_are_left_out_not_scored():
    runs = _runs((10, 10))
    runs[1][:2] = 0
    alive = [np.ones(10, bool), runs[1].any(axis=1)]
    stability = latent_stability(pw_mcc(runs, alive=alive), [10, 10], alive=alive)
    assert np.isnan(stability.cosines[1][:2]).all() and not np.isnan(stability.cosines[1][2:]).any()
    assert np.isnan(stability.at(0.5)[1][:2]).all()
    kept = np.concatenate([stability.cosines[0].ravel(), stability.cosines[1][2:].ravel()])
    assert stability.curve([0.5])[0] == pytest.approx((kept >= 0.5).mean())
    scored = latent_stability(pw_mcc(runs), [10, 10])  # without masks a zero row is matched at cosine 0
    assert not np.isnan(scored.cosines[1]).any() and (scored.cosines[1][:2] == 0).all()


def test_chance_curve_matches_random_runs_of_the_same_widths():
    widths, thresholds = [16, 16, 24], [0.0, 0.3, 0.5, 0.7]
    chance = chance_pw_mcc(widths, D, n_samples=40, seed=1)
    rng = np.random.default_rng(2)
    curves = []
    for _ in range(40):
        runs = [rng.standard_normal((n, D)) for n in widths]
        curves.append(latent_stability(pw_mcc(runs), widths).curve(thresholds))
    np.testing.assert_allclose(chance_curve(chance, thresholds), np.mean(curves, axis=0), atol=0.03)
    assert chance_curve(chance, [0.0])[0] == pytest.approx(1.0, abs=0.02)  # matched cosines are (almost) all > 0


@pytest.mark.parametrize("bad", [[], [float("nan")], [[0.5]]])
def test_bad_thresholds_are_refused(bad):
    stability = latent_stability(pw_mcc(_runs((10, 10))), [10, 10])
    with pytest.raises(ValueError, match="thresholds must be"):
        stability.curve(bad)


def test_widths_that_do_not_fit_the_result_are_refused():
    result = pw_mcc(_runs((10, 10, 10)))
    with pytest.raises(ValueError, match="has 3 pairs, but 4 runs make 6"):
        latent_stability(result, [10, 10, 10, 10])
    with pytest.raises(ValueError, match="beyond the widths"):
        latent_stability(result, [5, 10, 10])
