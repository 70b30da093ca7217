"""The organisms' defining statistics: exact sparsity, feature frequencies against their law, determinism, errors."""

import pytest
import torch

from paperlib.sources.fixed_size import systematic_sample
from paperlib.sources.organism import (
    OrganismData,
    PlantedSubspaceOrganism,
    TwoPhaseZipfOrganism,
    UniformOrganism,
    ZipfianOrganism,
    sample,
    sample_two_phase,
    sample_uniform,
    sample_zipfian,
)


def test_exact_sparsity_unit_atoms_nonnegative_codes():
    cfg = UniformOrganism(d=8, n_gt=20, s=4, n_samples=3000, seed=1)
    data = sample_uniform(cfg)
    assert data.dictionary.shape == (20, 8) and data.x.shape == (3000, 8)
    assert torch.allclose(data.dictionary.norm(dim=1), torch.ones(20), atol=1e-6)
    assert ((data.codes != 0).sum(dim=1) == 4).all()
    assert (data.codes >= 0).all()
    assert torch.allclose(data.x, data.codes @ data.dictionary, atol=1e-5)


def test_positions_are_uniform_and_magnitudes_half_normal():
    data = sample_uniform(UniformOrganism(d=8, n_gt=10, s=3, n_samples=20_000, seed=2))
    rate = (data.codes != 0).float().mean(dim=0)  # each feature fires with probability s / n_gt
    assert torch.allclose(rate, torch.full((10,), 0.3), atol=0.015)
    magnitudes = data.codes[data.codes != 0]
    assert magnitudes.mean().item() == pytest.approx((2 / torch.pi) ** 0.5, abs=0.02)  # E|N(0,1)|


def test_same_seed_same_data_other_seed_other_data():
    a = sample_uniform(UniformOrganism(n_samples=500, seed=3))
    b = sample_uniform(UniformOrganism(n_samples=500, seed=3))
    c = sample_uniform(UniformOrganism(n_samples=500, seed=4))
    assert torch.equal(a.x, b.x) and torch.equal(a.dictionary, b.dictionary)
    assert not torch.equal(a.dictionary, c.dictionary)


def test_noise_is_added_on_request():
    clean = sample_uniform(UniformOrganism(n_samples=2000, seed=5))
    noisy = sample_uniform(UniformOrganism(n_samples=2000, seed=5, noise_std=0.1))
    residual = noisy.x - noisy.codes @ noisy.dictionary
    assert residual.std().item() == pytest.approx(0.1, rel=0.05)
    assert torch.equal(clean.dictionary, noisy.dictionary)


def test_bad_configurations_name_the_field():
    with pytest.raises(ValueError, match="s=40 active features per sample exceeds n_gt=32"):
        UniformOrganism(s=40)
    with pytest.raises(ValueError, match="UniformOrganism.d must be a positive integer"):
        UniformOrganism(d=0)
    with pytest.raises(ValueError, match="noise_std"):
        UniformOrganism(noise_std=-1.0)


# --- the uniform organism's compact codes and correlated features ------------------------------------------------


def sigma(p, n):
    """Standard error of an empirical frequency with probability p over n draws."""
    return (p * (1 - p) / n) ** 0.5


def test_uniform_active_and_magnitudes_hold_the_same_codes():
    data = sample_uniform(UniformOrganism(d=8, n_gt=20, s=4, n_samples=500, seed=1))
    rebuilt = torch.zeros(500, 20).scatter_(1, data.active, data.magnitudes)
    assert torch.equal(rebuilt, data.codes)
    assert (data.active[:, 1:] > data.active[:, :-1]).all()  # sorted and distinct
    assert data.group is None and data.probability is None and data.cluster is None


def test_correlated_uniform_keeps_marginals_and_sparsity_and_couples_clusters():
    n = 40_000
    data = sample(UniformOrganism(d=8, n_gt=20, s=4, n_samples=n, correlation=0.9, cluster_size=4, seed=6))
    on = data.codes != 0
    assert (on.sum(dim=1) == 4).all()
    p = 4 / 20
    assert (data.firing_rate() - p).abs().max() < 5 * sigma(p, n)  # exact marginals by exchangeability
    both = (on[:, :, None] & on[:, None, :]).double().mean(dim=0)
    same = data.cluster[:, None] == data.cluster[None, :]
    off_diagonal = ~torch.eye(20, dtype=torch.bool)
    within, across = both[same & off_diagonal].mean().item(), both[~same].mean().item()
    # independent s-subsets co-activate two given features with probability s(s-1)/(n(n-1)) = 0.0316
    assert within > 2 * 4 * 3 / (20 * 19) > across


# --- randomised systematic sampling ---------------------------------------------------------------------------------


def test_systematic_sample_hits_each_unit_mass_times_on_average_and_floor_or_ceil_times_per_row():
    mass = torch.tensor([2.4, 1.0, 0.35, 0.25, 0.0, 1.0])  # sums to s = 5
    n = 20_000
    hits = systematic_sample(mass, n, torch.Generator().manual_seed(0))
    assert hits.shape == (n, 5)
    counts = torch.zeros(n, 6, dtype=torch.long).scatter_add_(1, hits, torch.ones_like(hits))
    assert (counts[:, 0] >= 2).all() and (counts[:, 0] <= 3).all()
    assert (counts[:, 1] == 1).all() and (counts[:, 5] == 1).all() and (counts[:, 4] == 0).all()
    for j, m in enumerate(mass.tolist()):
        frac = m - int(m)
        assert abs(counts[:, j].double().mean().item() - m) < 5 * sigma(frac, n) + 1e-12


def test_systematic_sample_with_many_units_shares_orders_but_keeps_exact_marginals():
    gen = torch.Generator().manual_seed(1)
    p = torch.rand(300, generator=gen, dtype=torch.float64)
    p = 3 * p / p.sum()
    n = 30_000
    hits = systematic_sample(p, n, gen)  # 300 units > per_row_limit: block-shared orders
    assert (hits[:, 1:] != hits[:, :-1]).all()  # every p <= 1: distinct units
    rate = torch.bincount(hits.flatten(), minlength=300).double() / n
    assert ((rate - p).abs() / sigma(p, n)).max() < 5


def test_systematic_sample_rejects_masses_without_integer_sum():
    with pytest.raises(ValueError, match="sum to a positive integer"):
        systematic_sample(torch.tensor([0.5, 0.7]), 10, torch.Generator())


# --- the Zipfian-groups organism --------------------------------------------------------------------------------------


def test_zipfian_law_sums_to_s_and_follows_the_power_of_the_group_rank():
    cfg = ZipfianOrganism(d=16, n_gt=200, s=5, n_groups=10, beta=1.3, n_samples=10)
    p = cfg.group_probability()
    ranks = torch.arange(1, 11, dtype=torch.float64)
    assert torch.allclose(p / p[0], ranks**-1.3)
    assert cfg.probability().sum().item() == pytest.approx(5)
    assert torch.equal(cfg.group(), torch.arange(200) // 20)


def test_zipfian_samples_have_exact_sparsity_and_group_frequencies_within_sampling_error():
    n = 30_000
    cfg = ZipfianOrganism(d=16, n_gt=200, s=5, n_groups=10, beta=1.0, n_samples=n, seed=3)
    data = sample_zipfian(cfg)
    assert data.dictionary.shape == (200, 16) and data.x.shape == (n, 16)
    assert torch.allclose(data.dictionary.norm(dim=1), torch.ones(200), atol=1e-6)
    assert ((data.codes != 0).sum(dim=1) == 5).all() and (data.codes >= 0).all()
    assert torch.allclose(data.x, data.codes @ data.dictionary, atol=1e-5)
    assert torch.equal(data.group, cfg.group()) and torch.equal(data.probability, cfg.probability())
    rate = data.firing_rate()
    assert ((rate - data.probability).abs() / sigma(data.probability, n)).max() < 5  # every feature
    group_rate = rate.view(10, 20).mean(dim=1)
    group_p = cfg.group_probability()
    assert ((group_rate - group_p).abs() / sigma(group_p, n * 20)).max() < 4
    slope = (
        torch.linalg.lstsq(
            torch.stack([torch.ones(10), torch.arange(1, 11).log()], dim=1).double(), group_rate.log()[:, None]
        )
        .solution[1]
        .item()
    )
    assert slope == pytest.approx(-1.0, abs=0.05)


def test_zipfian_beta_zero_is_uniform_and_magnitudes_are_half_normal():
    data = sample_zipfian(ZipfianOrganism(d=8, n_gt=40, s=4, n_groups=4, beta=0.0, n_samples=20_000, seed=4))
    assert torch.allclose(data.probability, torch.full((40,), 0.1, dtype=torch.float64))
    assert data.magnitudes.mean().item() == pytest.approx((2 / torch.pi) ** 0.5, abs=0.02)


def test_zipfian_correlated_features_keep_group_frequencies():
    n = 30_000
    cfg = ZipfianOrganism(d=8, n_gt=80, s=6, n_groups=4, beta=1.0, n_samples=n, correlation=0.9, cluster_size=5, seed=5)
    data = sample_zipfian(cfg)
    assert ((data.codes != 0).sum(dim=1) == 6).all()
    assert ((data.firing_rate() - data.probability).abs() / sigma(data.probability, n)).max() < 5
    on = (data.codes != 0).double()
    # features 0 and 1 share a cluster in group 0; 0 and 5 do not
    assert (on[:, 0] * on[:, 1]).mean() > 1.5 * (on[:, 0] * on[:, 5]).mean()


def test_zipfian_same_seed_same_data_and_noise_on_request():
    cfg = ZipfianOrganism(d=8, n_gt=40, s=4, n_groups=4, n_samples=3000, seed=7)
    a, b = sample_zipfian(cfg), sample(cfg)
    assert torch.equal(a.x, b.x) and torch.equal(a.codes, b.codes)
    c = sample_zipfian(ZipfianOrganism(d=8, n_gt=40, s=4, n_groups=4, n_samples=3000, seed=8))
    assert not torch.equal(a.dictionary, c.dictionary)
    noisy = sample_zipfian(ZipfianOrganism(d=8, n_gt=40, s=4, n_groups=4, n_samples=3000, seed=7, noise_std=0.2))
    assert torch.equal(noisy.codes, a.codes)
    assert (noisy.x - a.x).std().item() == pytest.approx(0.2, rel=0.05)


def test_zipfian_bad_configurations_name_the_field_and_the_fix():
    with pytest.raises(ValueError, match="probability .* > 1 .* lower s"):
        ZipfianOrganism(n_gt=20, s=10, n_groups=10, beta=3.0)
    with pytest.raises(ValueError, match="n_groups=7 must divide n_gt=800"):
        ZipfianOrganism(n_groups=7)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        ZipfianOrganism(beta=-1.0)
    with pytest.raises(ValueError, match="cluster_size=3 must divide the group size 80"):
        ZipfianOrganism(correlation=0.5, cluster_size=3)
    with pytest.raises(ValueError, match="correlation must be in"):
        ZipfianOrganism(correlation=1.0)
    with pytest.raises(ValueError, match="ZipfianOrganism.d must be a positive integer"):
        ZipfianOrganism(d=0)


# --- the two-phase Zipf organism --------------------------------------------------------------------------------------


def test_two_phase_law_has_both_exponents_and_is_continuous_at_the_break():
    cfg = TwoPhaseZipfOrganism(d=8, n_gt=2000, s=3, beta_head=0.8, beta_tail=2.2, break_rank=300, n_samples=10)
    p = cfg.probability()
    assert p.sum().item() == pytest.approx(3) and (p[1:] < p[:-1]).all()
    log_p, log_r = p.log(), torch.arange(1, 2001, dtype=torch.float64).log()
    head = (log_p[99] - log_p[9]) / (log_r[99] - log_r[9])
    tail = (log_p[1999] - log_p[499]) / (log_r[1999] - log_r[499])
    assert head.item() == pytest.approx(-0.8) and tail.item() == pytest.approx(-2.2)
    assert (p[300] / p[299]).item() == pytest.approx((301 / 300) ** -2.2)  # no jump at the break
    assert torch.equal(cfg.group(), (torch.arange(2000) >= 300).long())


def test_two_phase_samples_exact_sparsity_sparse_codes_and_frequencies():
    n = 20_000
    cfg = TwoPhaseZipfOrganism(d=16, n_gt=1000, s=4, break_rank=200, n_samples=n, seed=9)
    data = sample_two_phase(cfg)
    assert data.codes.is_sparse and data.codes.shape == (n, 1000)
    assert (data.active[:, 1:] > data.active[:, :-1]).all()  # s distinct features per row
    dense = data.codes.to_dense()
    assert ((dense != 0).sum(dim=1) == 4).all()
    assert torch.allclose(data.x, dense @ data.dictionary, atol=1e-5)
    p = data.probability
    assert ((data.firing_rate() - p).abs() / sigma(p, n)).max() < 5
    assert torch.equal(sample(cfg).x, data.x)


def test_two_phase_bad_configurations():
    with pytest.raises(ValueError, match="probability .* > 1"):
        TwoPhaseZipfOrganism(s=20)
    with pytest.raises(ValueError, match="break_rank must be an integer in \\[1, n_gt=5000\\]"):
        TwoPhaseZipfOrganism(break_rank=6000)
    with pytest.raises(ValueError, match="beta_tail must be a finite number >= 0"):
        TwoPhaseZipfOrganism(beta_tail=float("nan"))


def test_sample_rejects_unknown_configurations():
    with pytest.raises(TypeError, match="sample\\(\\) needs a UniformOrganism"):
        sample({"d": 16})


def test_firing_rate_without_compact_codes_uses_dense_codes():
    codes = torch.tensor([[1.0, 0.0], [0.5, 2.0]])
    data = OrganismData(dictionary=torch.eye(2), codes=codes, x=codes)
    assert torch.equal(data.firing_rate(), torch.tensor([1.0, 0.5], dtype=torch.float64))


def test_planted_subspace_adds_an_orthonormal_span_on_the_uniform_organism():
    cfg = PlantedSubspaceOrganism(d=24, n_gt=30, s=3, rank=3, probability=0.25, n_samples=20_000, seed=6)
    data = sample(cfg)
    base = sample_uniform(cfg.base())
    assert torch.equal(data.codes, base.codes) and torch.equal(data.dictionary, base.dictionary)
    assert torch.allclose(data.subspace @ data.subspace.T, torch.eye(3), atol=1e-6)
    assert torch.allclose(data.x, base.x + data.subspace_codes @ data.subspace, atol=1e-5)
    on = data.subspace_codes.abs().sum(dim=1) > 0
    assert on.float().mean().item() == pytest.approx(0.25, abs=4 * (0.25 * 0.75 / 20_000) ** 0.5)
    assert data.subspace_codes[on].var(dim=0) == pytest.approx(torch.ones(3), abs=0.06)  # N(0, I) when on


def test_planted_subspace_noise_and_validation():
    clean = sample(PlantedSubspaceOrganism(d=16, n_gt=20, n_samples=4000, seed=8))
    noisy = sample(PlantedSubspaceOrganism(d=16, n_gt=20, n_samples=4000, seed=8, noise_std=0.1))
    assert (noisy.x - clean.x).std().item() == pytest.approx(0.1, rel=0.05)
    with pytest.raises(ValueError, match="rank must be an integer in \\[1, d=16\\)"):
        PlantedSubspaceOrganism(d=16, n_gt=20, rank=16)
    with pytest.raises(ValueError, match="probability must be in \\(0, 1\\]"):
        PlantedSubspaceOrganism(probability=0.0)
    with pytest.raises(ValueError, match="s=60 active features per sample exceeds n_gt=48"):
        PlantedSubspaceOrganism(s=60)
