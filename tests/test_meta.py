"""Meta-SAEs: the presets are paper B's and SAEBench's, variance explained is a fraction that grows with
width, a planted structure is recovered and decomposed, the cache returns the same meta-SAE."""

import pytest
import torch

from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.stitching.meta import (
    MetaSAEConfig,
    compare_to_saes,
    decompose,
    meta_codes,
    meta_latent_frequency,
    meta_latents_per_latent,
    train_meta_sae,
    unit_directions,
    variance_explained,
)
from paperlib.store import Store

FAST = dict(lr=1e-2, steps=300, batch_size=None, log_every=100)


def random_directions(n=600, d=12, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def planted(n=1000, d=32, atoms=12, seed=1):
    """Directions that are each a positive combination of two of ``atoms`` random meta-directions."""
    gen = torch.Generator().manual_seed(seed)
    basis = torch.nn.functional.normalize(torch.randn(atoms, d, generator=gen), dim=1)
    pairs = torch.stack([torch.randperm(atoms, generator=gen)[:2] for _ in range(n)])
    weights = 0.5 + torch.rand(n, 2, generator=gen)
    return (weights[:, :1] * basis[pairs[:, 0]] + weights[:, 1:] * basis[pairs[:, 1]]), basis, pairs


def test_presets_are_the_papers_settings():
    paper, bench = MetaSAEConfig.paper(), MetaSAEConfig.saebench()
    assert paper.width_for(49152) == 2304 and bench.width_for(49152) == 12288
    assert paper.width_for(9216) == 432 and bench.width_for(9216) == 2304
    for cfg in (paper, bench):
        assert (cfg.k, cfg.lr, cfg.aux_coeff, cfg.steps, cfg.batch_size) == (4, 1e-3, 1 / 16, 2000, 16384)
    sae = paper.sae_config(9216, 576)
    assert (sae.architecture, sae.decoder, sae.reconstruction, sae.k) == ("batchtopk", "unit", "sum", 4)
    assert sae.dead_tokens == 5 * 9216  # five full batches
    assert MetaSAEConfig.saebench(k=8).k == 8 and MetaSAEConfig(width=50).width_for(10**6) == 50


def test_variance_explained_is_a_fraction_that_grows_with_width():
    x = random_directions()
    explained = [
        variance_explained(train_meta_sae(x, config=MetaSAEConfig(width=w, k=2, **FAST)), x) for w in (4, 16, 64)
    ]
    assert all(0 <= v <= 1 for v in explained), explained
    assert explained[0] < explained[1] < explained[2], explained


def test_planted_meta_structure_is_recovered_and_decomposed():
    x, basis, pairs = planted()
    meta = train_meta_sae(x, config=MetaSAEConfig(width=12, k=2, **FAST))
    assert variance_explained(meta, x) > 0.9 and variance_explained(meta, x, batch=True) > 0.9
    resemblance = compare_to_saes(meta, {"planted": basis, "random": random_directions(12, 32)})
    # The decoder bias takes the directions' mean (all weights are positive), so meta-latents are
    # the planted atoms minus a shared part: clearly closer to them than to random directions.
    assert resemblance["planted"].max_cos.mean() > resemblance["random"].max_cos.mean() + 0.25
    found = decompose(meta, x, torch.arange(len(x)), top=2)
    atom_of_meta = resemblance["planted"].closest
    recovered = [set(atom_of_meta[found.meta_latents[i]].tolist()) == set(pairs[i].tolist()) for i in range(len(x))]
    assert sum(recovered) / len(x) > 0.5  # chance: 1 / 66 pairs of atoms
    assert (found.cosine > 0.9).float().mean() > 0.8
    per_latent = meta_latents_per_latent(meta, x, batch=True)
    assert per_latent.float().mean() <= 2 + 1e-6  # BatchTopK keeps n·k codes in all
    torch.testing.assert_close(meta_latent_frequency(meta, x, batch=True).sum(), per_latent.float().mean())


def test_decomposition_adds_up_to_the_reconstruction():
    x = random_directions(200, 10)
    meta = train_meta_sae(x, config=MetaSAEConfig(width=20, k=3, **FAST))
    codes = meta_codes(meta, x)
    top = int((codes > 0).sum(1).max())
    found = decompose(meta, x, [0, 5, 199], top=max(top, 1))
    rebuilt = (found.weights[..., None] * meta.directions[found.meta_latents.clamp_min(0)]).sum(1) + meta.bank.b_dec[0]
    expected = meta.bank.decode(codes[None])[0][[0, 5, 199]]
    torch.testing.assert_close(rebuilt.detach(), expected.detach(), rtol=1e-5, atol=1e-6)
    assert (found.weights[:, :-1] >= found.weights[:, 1:]).all()  # by decreasing weight


def test_the_store_returns_the_trained_meta_sae(tmp_path):
    x = random_directions(100, 8)
    cfg = MetaSAEConfig(width=8, k=2, lr=1e-2, steps=20, batch_size=None, log_every=10)
    store = Store(tmp_path)
    first, second = (
        train_meta_sae(x, config=cfg, store=store),
        train_meta_sae(x * 2.0, config=cfg, store=store),
    )  # same unit directions
    assert first.key == second.key and len(list((tmp_path / "meta-sae").iterdir())) == 1
    for (name, a), (_, b) in zip(first.bank.state_dict().items(), second.bank.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)
    assert train_meta_sae(random_directions(100, 8, seed=9), config=cfg, store=store).key != first.key
    assert first.history["step"].tolist() == [0, 10, 20]


def test_directions_from_banks_are_unit_rows():
    bank = SAEBank(SAEConfig("relu", d_model=6, n_latents=10, n_seeds=2, init_scale=0.3))
    w = unit_directions(bank, seed=1)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(10))
    torch.testing.assert_close(w, bank.W_dec[1].detach() / 0.3)


def test_bad_inputs_are_refused_with_the_fix():
    x = random_directions(100, 8)
    meta = train_meta_sae(x, config=MetaSAEConfig(width=8, k=2, lr=1e-2, steps=5, batch_size=None, log_every=5))
    with pytest.raises(ValueError, match="d_model=12 but the meta-SAE was trained on d_model=8"):
        variance_explained(meta, random_directions(10, 12))
    with pytest.raises(ValueError, match="SAE 'wide' has d_model=12"):
        compare_to_saes(meta, {"wide": random_directions(10, 12)})
    for threshold in (1.2, -2.0):
        with pytest.raises(ValueError, match=r"must lie in \[-1, 1\]"):
            compare_to_saes(meta, {"same": x}, threshold=threshold)
    zero = x.clone()
    zero[3] = 0
    with pytest.raises(ValueError, match=r"1 decoder rows are zero or non-finite \(first: \[3\]\)"):
        train_meta_sae(zero, config=MetaSAEConfig(width=8, k=2, steps=1))
    with pytest.raises(ValueError, match=r"non-empty \[n_latents, d_model\] tensor, got \(8,\)"):
        unit_directions(torch.ones(8))
    with pytest.raises(IndexError, match="seed 2 out of range"):
        unit_directions(SAEBank(SAEConfig("relu", d_model=4, n_latents=4, n_seeds=2)), seed=2)
    with pytest.raises(ValueError, match=r"latents must be indices in \[0, 100\)"):
        decompose(meta, x, [100])
    with pytest.raises(ValueError, match="k=4 exceeds width=2"):
        MetaSAEConfig(width=2)
    with pytest.raises(ValueError, match="width 3 cannot have k=4"):
        MetaSAEConfig(width_fraction=0.03).width_for(100)
    with pytest.raises(ValueError, match="width_fraction must lie in"):
        MetaSAEConfig(width_fraction=0)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        MetaSAEConfig(steps=0)
