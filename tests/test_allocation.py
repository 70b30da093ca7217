"""The capacity exponent: maximum likelihood over every group (empty ones too) and its seed bootstrap."""

import math

import numpy as np
import pytest

from paperlib.metrics.allocation import (
    capacity_exponent,
    capacity_exponent_interval,
    capacity_shares,
    group_allocation,
    group_capacity,
    group_coverage,
    nearest_groups,
)

P = np.arange(1, 11) ** -1.0 / np.sum(np.arange(1, 11) ** -1.0)  # ten Zipfian groups, beta = 1


def draw(alpha: float, seeds: int, latents: int, seed: int = 0) -> np.ndarray:
    share = P**alpha / np.sum(P**alpha)
    return np.random.default_rng(seed).choice(len(P), size=(seeds, latents), p=share)


@pytest.mark.parametrize("alpha", [-0.5, 0.0, 1.4, 3.0])
def test_recovers_the_exponent_of_the_share_model(alpha):
    groups = draw(alpha, seeds=50, latents=400)
    estimate = capacity_exponent(np.stack([np.bincount(row, minlength=len(P)) for row in groups]), P)
    assert estimate == pytest.approx(alpha, abs=0.06)


def test_equal_shares_are_alpha_zero_and_the_probability_scale_does_not_matter():
    assert capacity_exponent(np.full(10, 8), P) == pytest.approx(0.0, abs=1e-9)
    counts = np.array([40, 20, 10, 5, 3, 2, 0, 0, 0, 0])
    assert capacity_exponent(counts, P) == pytest.approx(capacity_exponent(counts, 7 * P), abs=1e-9)


def test_empty_groups_are_evidence():
    """The same two populated groups say more about concentration when eight others stayed empty."""
    few = capacity_exponent([74, 6, 0], P[:3])
    many = capacity_exponent([74, 6] + [0] * 8, P)
    assert 0 < few < many < math.inf


def test_all_latents_in_one_extreme_group_is_an_infinite_exponent():
    assert capacity_exponent([80] + [0] * 9, P) == math.inf
    assert capacity_exponent([0] * 9 + [80], P) == -math.inf
    assert capacity_shares(math.inf, P).tolist() == [1.0] + [0.0] * 9


@pytest.mark.parametrize("alpha", [-1.0, 0.0, 1.4])
def test_shares_are_proportional_to_p_to_the_alpha(alpha):
    shares = capacity_shares(alpha, P)
    assert shares.sum() == pytest.approx(1.0)
    assert shares / shares[0] == pytest.approx((P / P[0]) ** alpha)


def test_the_interval_covers_the_true_exponent_in_most_reruns():
    """Reruns (new seeds of the same model) fall inside each other's intervals: 19 of 20 here."""
    covered = 0
    for rerun in range(20):
        low, high = capacity_exponent_interval(draw(1.4, seeds=5, latents=80, seed=rerun), P, n_rep=200, seed=rerun)
        covered += low <= 1.4 <= high
    assert covered >= 17


def test_the_interval_keeps_infinite_estimates():
    groups = np.zeros((5, 80), dtype=int)
    groups[0, 0] = 1  # one latent outside the most frequent group, in one seed
    low, high = capacity_exponent_interval(groups, P, n_rep=200)
    assert math.isfinite(low) and high == math.inf


@pytest.mark.parametrize(
    "counts, p, message",
    [
        ([0] * 10, P, "at least one latent"),
        ([-1] + [1] * 9, P, "non-negative"),
        ([1, 2, 3], np.full(3, 0.1), "different probabilities"),
    ],
)
def test_bad_counts_are_refused(counts, p, message):
    with pytest.raises(ValueError, match=message):
        capacity_exponent(counts, p)


def test_bad_group_arrays_are_refused():
    with pytest.raises(ValueError, match=r"\[seeds, latents\]"):
        capacity_exponent_interval(np.zeros(5, dtype=int), P)


def organism_atoms(n_atoms=12, d=20, n_groups=3, seed=0):
    rng = np.random.default_rng(seed)
    truth = rng.standard_normal((n_atoms, d)).astype(np.float32)
    truth /= np.linalg.norm(truth, axis=1, keepdims=True)
    return truth, np.arange(n_atoms) % n_groups


def test_nearest_groups_is_the_group_of_the_largest_cosine():
    truth, group = organism_atoms()
    W = np.random.default_rng(1).standard_normal((2, 30, 20)).astype(np.float32) * 3  # any row norms
    found = nearest_groups(W, truth, group)
    for s in range(2):
        for j in range(30):  # by hand, in float64
            w = W[s, j].astype(np.float64)
            cosines = [w @ t / np.linalg.norm(w) for t in truth.astype(np.float64)]
            assert found[s, j] == group[int(np.argmax(cosines))]
    assert (group_capacity(found, 3) == [[np.sum(row == g) for g in range(3)] for row in found]).all()


def test_group_allocation_of_a_perfect_recovery():
    truth, group = organism_atoms()
    perm = np.random.default_rng(2).permutation(12)
    W = np.stack([truth[perm] * 2.0, truth[::-1].copy()])  # two seeds: the atoms, rescaled and reordered
    found = group_allocation(W, truth, group, 3)
    assert np.allclose(found.per_group, 1.0) and np.allclose(found.split, 1.0)
    assert (found.capacity == 4).all() and found.nearest.shape == (2, 12)


def test_group_allocation_matches_per_group_matching_by_hand():
    from scipy.optimize import linear_sum_assignment

    truth, group = organism_atoms(seed=3)
    W = np.random.default_rng(4).standard_normal((1, 15, 20)).astype(np.float32)
    found = group_allocation(W, truth, group, 3)
    unit_w = W[0] / np.linalg.norm(W[0], axis=1, keepdims=True)
    cos = truth @ unit_w.T  # signed cosine, atoms x latents
    rows, cols = linear_sum_assignment(-cos)
    for g in range(3):
        sub = cos[group == g]
        r, c = linear_sum_assignment(-sub)
        assert found.per_group[0, g] == pytest.approx(sub[r, c].mean(), abs=1e-6)
        assert found.split[0, g] == pytest.approx(cos[rows, cols][group[rows] == g].mean(), abs=1e-6)


@pytest.mark.parametrize("signed", [True, False])
def test_group_coverage_matches_best_cosines_by_hand(signed):
    truth, group = organism_atoms(seed=5)
    W = np.random.default_rng(6).standard_normal((2, 15, 20)) * 2  # any row norms
    W[1, :4] = -truth[:4]  # seed 1 has four atoms' negatives: clean only under |cosine|
    found = group_coverage(W, truth, group, 3, clean_cosine=0.9, signed=signed)
    for s in range(2):
        cos = (truth / np.linalg.norm(truth, axis=1, keepdims=True)) @ (
            W[s] / np.linalg.norm(W[s], axis=1, keepdims=True)
        ).T
        cos = cos if signed else np.abs(cos)
        for g in range(3):  # by hand, in float64
            assert found.coverage[s, g] == pytest.approx(cos.max(1)[group == g].mean(), abs=1e-6)  # float32 atoms
            owners = group[cos.argmax(0)][cos.max(0) >= 0.9]
            assert found.clean[s, g] == np.sum(owners == g)
    assert found.clean[1].sum() == (0 if signed else 4)
