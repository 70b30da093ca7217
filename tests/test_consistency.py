"""MCC / PW-MCC / GT-MCC against definitions computed independently (brute force, known answers)."""

import itertools

import numpy as np
import pytest
import torch

from paperlib.metrics.consistency import (
    PairwiseMCC,
    as_dictionary,
    bootstrap_interval,
    chance_mcc,
    frequency_decomposition,
    gt_mcc,
    match,
    mcc,
    pw_mcc,
    run_interval,
    shared_latents,
    untrained_pw_mcc,
)
from paperlib.sae.bank import SAEConfig


def brute_force_mcc(a: np.ndarray, b: np.ndarray, signed: bool = True) -> float:
    """Best mean cosine over every injective map from the smaller side into the larger one."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    sim = a @ b.T if signed else np.abs(a @ b.T)
    if sim.shape[0] > sim.shape[1]:
        sim = sim.T
    m = sim.shape[0]
    return max(np.mean(sim[np.arange(m), list(p)]) for p in itertools.permutations(range(sim.shape[1]), m))


def test_permuted_rescaled_copy_scores_exactly_one():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20, 8))
    perm = rng.permutation(20)
    b = a[perm] * rng.uniform(0.1, 5.0, size=(20, 1))
    result = match(a, b)
    assert result.mcc == pytest.approx(1.0, abs=1e-12)
    assert np.array_equal(perm[result.cols], result.rows)


@pytest.mark.parametrize("shape_a,shape_b", [((5, 4), (5, 4)), ((4, 3), (6, 3)), ((6, 3), (4, 3)), ((3, 5), (3, 5))])
@pytest.mark.parametrize("signed", [True, False])
def test_agrees_with_brute_force(shape_a, shape_b, signed):
    rng = np.random.default_rng(sum(shape_a) * 7 + sum(shape_b) + signed)
    for _ in range(5):
        a, b = rng.standard_normal(shape_a), rng.standard_normal(shape_b)
        assert mcc(a, b, signed=signed) == pytest.approx(brute_force_mcc(a, b, signed), abs=1e-12)


def test_unequal_widths_match_min_size():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((3, 6)), rng.standard_normal((7, 6))
    result = match(a, b)
    assert len(result.similarity) == 3 and len(set(result.cols.tolist())) == 3
    # The symmetric call reaches the same optimum.
    assert mcc(b, a) == pytest.approx(result.mcc, abs=1e-12)


def test_signed_vs_abs_on_a_flipped_atom():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((6, 10))
    b = a.copy()
    b[0] *= -1
    assert mcc(a, b, signed=False) == pytest.approx(1.0, abs=1e-12)
    assert mcc(a, b, signed=True) < 1.0 - 1.0 / 6  # the flipped atom can no longer score +1


def test_pw_mcc_mean_std_over_all_pairs():
    rng = np.random.default_rng(3)
    runs = [rng.standard_normal((8, 5)) for _ in range(4)]
    result = pw_mcc(runs)
    expected = [mcc(runs[i], runs[j]) for i, j in itertools.combinations(range(4), 2)]
    assert [p[:2] for p in result.pairs] == list(itertools.combinations(range(4), 2))
    assert result.mean == pytest.approx(np.mean(expected)) and result.std == pytest.approx(np.std(expected))
    # A stacked [R, n, d] tensor (an SAE bank's decoders) is accepted too.
    assert pw_mcc(torch.tensor(np.stack(runs))).mean == pytest.approx(result.mean)


def test_gt_mcc_one_value_per_run():
    rng = np.random.default_rng(4)
    gt = rng.standard_normal((6, 4))
    runs = torch.tensor(np.stack([gt[rng.permutation(6)], rng.standard_normal((6, 4))]))
    values = gt_mcc(gt, runs)
    assert values.shape == (2,) and values[0] == pytest.approx(1.0) and values[1] < 0.99


@pytest.mark.parametrize("d,n,reference", [(16, 32, 0.46), (8, 16, 0.53)])
def test_chance_level_matches_an_independent_estimate(d, n, reference):
    # Neither paper reports chance: an estimate made independently of this code when the project was specified
    # says random Gaussian dictionaries score about 0.46 (d=16, n=32) and 0.53 (d=8, n=16), signed.
    chance = chance_mcc(n, n, d, n_samples=200, seed=5)
    assert chance.mean == pytest.approx(reference, abs=0.02)
    assert 0 < chance.std < 0.05


def test_chance_level_agrees_with_independent_samples():
    chance = chance_mcc(10, 12, 6, n_samples=300, seed=0)
    rng = np.random.default_rng(123)  # other seeds: a separate estimate of the same expectation
    sampled = [mcc(rng.standard_normal((10, 6)), rng.standard_normal((12, 6))) for _ in range(300)]
    assert chance.mean == pytest.approx(np.mean(sampled), abs=4 * chance.std / np.sqrt(300) * np.sqrt(2))


def test_zero_norm_atoms_score_zero_and_still_take_a_slot():
    a = np.eye(3)
    b = np.eye(3)
    b[2] = 0.0  # a dead latent
    assert as_dictionary(b)[2].tolist() == [0, 0, 0]
    assert mcc(a, b) == pytest.approx(2 / 3)


def test_mismatched_d_model_is_a_clear_error():
    with pytest.raises(ValueError, match="d_model 4 vs 5"):
        mcc(np.ones((3, 4)), np.ones((3, 5)))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_entries_are_rejected(bad):
    a = np.ones((3, 4))
    a[1, 2] = bad
    with pytest.raises(ValueError, match="second dictionary has 1 rows with NaN/Inf"):
        mcc(np.ones((3, 4)), a)


def test_wrong_rank_and_too_few_runs():
    with pytest.raises(ValueError, match="2-D"):
        mcc(np.ones(4), np.ones((3, 4)))
    with pytest.raises(ValueError, match="at least two runs"):
        pw_mcc([np.ones((3, 4))])


def test_dead_latents_can_be_left_out_by_mask():
    rng = np.random.default_rng(6)
    a = rng.standard_normal((6, 5))
    b = a[::-1].copy()
    b[0] = rng.standard_normal(5)  # b's latent 0 is junk; leave it and a's partner out
    result = match(a, b, alive_a=np.arange(6) != 5, alive_b=np.arange(6) != 0)
    assert result.mcc == pytest.approx(1.0) and len(result.rows) == 5 and 5 not in result.rows and 0 not in result.cols
    with pytest.raises(ValueError, match="alive_b must be a boolean vector of length 6"):
        match(a, b, alive_b=[True, False])
    with pytest.raises(ValueError, match="every latent dead"):
        match(a, b, alive_a=np.zeros(6, bool))


def test_bootstrap_interval_brackets_the_estimate_and_shrinks_with_more_latents():
    rng = np.random.default_rng(7)
    small = pw_mcc([rng.standard_normal((20, 6)) for _ in range(3)])
    large = pw_mcc([rng.standard_normal((400, 6)) for _ in range(3)])
    lo, hi = bootstrap_interval(small.matches, n_boot=500)
    assert lo < small.mean < hi
    lo_l, hi_l = bootstrap_interval(large.matches, n_boot=500)
    assert lo_l < large.mean < hi_l and hi_l - lo_l < (hi - lo) / 2
    with pytest.raises(ValueError, match="n_boot >= 1"):
        bootstrap_interval(small.matches, n_boot=0)


def test_frequency_bins_contributions_sum_to_mcc():
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((50, 8)), rng.standard_normal((60, 8))
    result = match(a, b)
    freq_a, freq_b = rng.uniform(0, 100, 50), rng.uniform(0, 100, 60)
    bins = frequency_decomposition(result, freq_a, freq_b, edges=[0, 10, 30, 100])
    assert bins.count.sum() == 50
    assert bins.contribution.sum() == pytest.approx(result.mcc)
    pair_freq = np.minimum(freq_a[result.rows], freq_b[result.cols])
    in_first = pair_freq < 10
    assert bins.count[0] == in_first.sum()
    assert bins.mean_similarity[0] == pytest.approx(result.similarity[in_first].mean())
    with pytest.raises(ValueError, match="do not cover"):
        frequency_decomposition(result, freq_a, freq_b, edges=[20, 100])


def test_shared_latents_need_both_matchings_to_agree():
    rng = np.random.default_rng(9)
    dec, enc = rng.standard_normal((10, 6)), rng.standard_normal((10, 6))
    perm = rng.permutation(10)
    same = shared_latents(dec, dec[perm], enc, enc[perm])
    assert same.fraction == 1.0
    other_encoder = shared_latents(dec, dec[perm], enc, rng.standard_normal((10, 6)))
    assert other_encoder.fraction < 0.5 and (other_encoder.decoder_cos > 0.999).all()


def test_untrained_saes_sit_at_the_chance_level():
    cfg = SAEConfig("topk", d_model=16, n_latents=32, k=3)
    untrained = untrained_pw_mcc(cfg, n_seeds=6)
    chance = chance_mcc(32, 32, 16, n_samples=100)
    assert untrained.mean == pytest.approx(chance.mean, abs=3 * chance.std)


def test_large_dictionaries_use_the_certified_sparse_solver_and_agree_with_dense():
    from scipy.optimize import linear_sum_assignment

    from paperlib.metrics.consistency import DENSE_LIMIT

    rng = np.random.default_rng(10)
    n = DENSE_LIMIT + 200
    a = rng.standard_normal((n, 24))
    b = a[rng.permutation(n)] + 0.3 * rng.standard_normal((n, 24))
    result = match(a, b)
    assert result.certified and len(result.rows) == n
    ua, ub = as_dictionary(a), as_dictionary(b)
    sim = ua @ ub.T
    rows, cols = linear_sum_assignment(sim, maximize=True)
    assert result.mcc == pytest.approx(sim[rows, cols].mean(), abs=1e-12)
    dead = b.copy()
    dead[5] = 0  # scored as cosine 0 and kept in the matching, as below DENSE_LIMIT
    with_dead = match(a, dead)
    sim = ua @ as_dictionary(dead).T
    rows, cols = linear_sum_assignment(sim, maximize=True)
    assert with_dead.certified and with_dead.mcc == pytest.approx(sim[rows, cols].mean(), abs=1e-12)
    alive = np.ones(n, bool)
    alive[5] = False
    assert match(a, dead, alive_b=alive).certified


def _pairwise(values):
    """A PairwiseMCC of given pair values {(i, j): v} (no matchings needed by run_interval)."""
    pairs = [(i, j, v) for (i, j), v in values.items()]
    v = np.array(list(values.values()))
    return PairwiseMCC(float(v.mean()), float(v.std()), pairs, [], True)


def test_run_interval_covers_the_mean_of_other_seeds_at_its_level():
    rng = np.random.default_rng(9)  # a seed's quality shifts all of its pairs: pairs are not independent
    covered = []
    for _ in range(2000):
        run_effect = rng.standard_normal(5)
        values = {
            (i, j): run_effect[i] + run_effect[j] + 0.5 * rng.standard_normal()
            for i, j in itertools.combinations(range(5), 2)
        }
        lo, hi = run_interval(_pairwise(values))
        covered.append(lo < 0 < hi)
    assert np.mean(covered) == pytest.approx(0.95, abs=0.03)


def test_run_interval_stays_inside_the_range_of_an_mcc():
    lo, hi = run_interval(_pairwise({(0, 1): 1.0, (0, 2): 0.9, (1, 2): 0.9}))
    assert lo < 0.95 and hi == 1.0


def test_run_interval_needs_three_runs():
    with pytest.raises(ValueError, match="at least 3 runs"):
        run_interval(_pairwise({(0, 1): 0.5}))


def test_mean_where_defined_skips_undefined_entries_without_a_warning():
    import warnings

    from paperlib.metrics.consistency import mean_where_defined

    rows = np.array([[1.0, np.nan, np.nan, 2.0], [3.0, 5.0, np.nan, np.nan], [np.nan, 7.0, np.nan, 4.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's nanmean would warn on the all-NaN column
        got = mean_where_defined(rows)
    expected = [np.mean([v for v in col if not np.isnan(v)]) if (~np.isnan(col)).any() else np.nan for col in rows.T]
    np.testing.assert_array_equal(got, expected)


def test_rescaling_by_the_chance_level_puts_chance_at_zero_and_a_perfect_match_at_one():
    from paperlib.metrics.consistency import chance_mcc

    level = chance_mcc(8, 8, 4, n_samples=5)
    assert 0 < level.mean < 1
    np.testing.assert_allclose(level.rescale([level.mean, 1.0, (1 + level.mean) / 2]), [0.0, 1.0, 0.5], atol=1e-12)
