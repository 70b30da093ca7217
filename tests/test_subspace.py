"""Subspace agreement: principal cosines against scipy, chance against its exact mean, and unstable latents
that share a span found on runs built to have one."""

import numpy as np
import pytest
from scipy.linalg import subspace_angles

from paperlib.metrics.consistency import pw_mcc
from paperlib.metrics.stability import latent_stability
from paperlib.metrics.subspace import principal_cosines, random_subspace_cosines, span, subspace_agreement

D = 40


def _orthonormal(k, d=D, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((d, k)))
    return q.T


def test_principal_cosines_equal_scipys_angles():
    a, b = _orthonormal(5, seed=1), _orthonormal(3, seed=2)
    want = np.sort(np.cos(subspace_angles(a.T, b.T)))[::-1]
    np.testing.assert_allclose(principal_cosines(a, b), want, atol=1e-10)


def test_a_span_does_not_depend_on_its_basis():
    basis = _orthonormal(4, seed=3)
    rotation = _orthonormal(4, d=4, seed=4)  # another basis of the same span
    scaled = (rotation @ basis) * np.array([[0.5], [2.0], [3.0], [7.0]])  # span() scales rows to unit length
    np.testing.assert_allclose(principal_cosines(span(basis), span(scaled)), np.ones(4), atol=1e-10)
    assert principal_cosines(np.eye(D)[:3], np.eye(D)[3:6]) == pytest.approx(np.zeros(3))


def test_random_subspaces_overlap_k_over_d_on_average():
    for k, d in [(3, 12), (6, 20)]:
        overlap = (random_subspace_cosines(k, d, n_samples=3000, seed=7) ** 2).mean(axis=1)
        assert overlap.mean() == pytest.approx(k / d, abs=4 * overlap.std() / np.sqrt(len(overlap)))


def _runs_with_a_shared_span(n_runs=3, n_stable=12, rank=4, seed=0):
    """Runs that share ``n_stable`` atoms (slightly perturbed) and a rank-``rank`` span, each in its
    own orthonormal basis at 45 degrees to the others' (so every in-span latent matches at cosine ~0.71)."""
    rng = np.random.default_rng(seed)
    stable = rng.standard_normal((n_stable, D))
    plane = _orthonormal(rank, seed=seed + 1)
    half_turn = np.array([[1.0, 1.0], [1.0, -1.0]]) / np.sqrt(2)
    bases = [plane, np.kron(np.eye(rank // 2), half_turn) @ plane]
    runs, in_span = [], []
    for r in range(n_runs):
        order = rng.permutation(n_stable + rank)
        rows = np.vstack([stable + 0.03 * rng.standard_normal(stable.shape), bases[r % 2]])[order]
        runs.append(rows)
        in_span.append(np.sort(np.flatnonzero(order >= n_stable)))
    return runs, in_span, plane


def test_unstable_latents_that_share_a_span_agree_as_a_subspace():
    runs, in_span, plane = _runs_with_a_shared_span()
    result = pw_mcc(runs)
    agreement = subspace_agreement(runs, latent_stability(result, [len(r) for r in runs]), threshold=0.9)
    assert [p.runs for p in agreement.pairs] == [(0, 1), (0, 2), (1, 2)]
    for p in agreement.pairs:
        i, j = p.runs
        if i % 2 == j % 2:  # same basis: nothing is unstable
            assert p.dim == 0 and np.isnan(p.overlap)
            continue
        np.testing.assert_array_equal(p.unstable[0], in_span[i])
        np.testing.assert_array_equal(p.unstable[1], in_span[j])
        assert p.dim == 4 and p.cosines == pytest.approx(np.ones(4), abs=1e-9)
        np.testing.assert_allclose(principal_cosines(span(runs[i][p.unstable[0]]), plane), np.ones(4), atol=1e-9)
    np.testing.assert_allclose(agreement.chance_overlap(), [4 / D, np.nan, 4 / D])


def test_unrelated_unstable_latents_overlap_like_chance():
    rng = np.random.default_rng(11)
    runs = [rng.standard_normal((30, D)) for _ in range(2)]  # nothing shared: every latent is unstable
    agreement = subspace_agreement(runs, latent_stability(pw_mcc(runs), [30, 30]), threshold=0.9, max_dim=10)
    (pair,) = agreement.pairs
    chance = (random_subspace_cosines(10, D, n_samples=500, seed=1) ** 2).mean(axis=1)
    assert pair.dim == 10
    assert np.quantile(chance, 0.005) < pair.overlap < np.quantile(chance, 0.995)


def test_latents_left_out_of_the_matching_are_not_counted():
    runs, in_span, _ = _runs_with_a_shared_span(n_runs=2)
    alive = [np.ones(len(r), dtype=bool) for r in runs]
    alive[0][in_span[0][0]] = False
    result = pw_mcc(runs, alive=alive)
    (pair,) = subspace_agreement(runs, latent_stability(result, [16, 16], alive=alive), threshold=0.9).pairs
    assert in_span[0][0] not in pair.unstable[0] and len(pair.unstable[0]) == 3


def test_errors_name_the_input():
    runs, _, _ = _runs_with_a_shared_span(n_runs=2)
    stability = latent_stability(pw_mcc(runs), [16, 16])
    with pytest.raises(ValueError, match="stability must come from these runs"):
        subspace_agreement(runs + [runs[0]], stability, threshold=0.9)
    with pytest.raises(ValueError, match="span dimension must be in"):
        span(np.eye(D)[:3], dim=4)
    with pytest.raises(ValueError, match="two bases"):
        principal_cosines(np.eye(3), np.eye(4))
    with pytest.raises(ValueError, match="1 <= k <= d"):
        random_subspace_cosines(5, 4)
