"""The uniform organism's defining statistics."""

import pytest
import torch

from paperlib.organism import UniformOrganism, sample_uniform


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
