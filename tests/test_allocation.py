"""The capacity exponent: maximum likelihood over every group (empty ones too) and its seed bootstrap."""

import math

import numpy as np
import pytest

from paperlib.metrics.allocation import capacity_exponent, capacity_exponent_interval, capacity_shares

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
