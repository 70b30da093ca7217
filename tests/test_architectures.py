"""Every architecture of the zoo: its defining property, and recovery of a planted organism."""

import pytest
import torch

from paperlib.interop import load_sae, save_single
from paperlib.metrics.consistency import chance_mcc, gt_mcc
from paperlib.sae.architectures import ARCHITECTURES, Matryoshka
from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.train import TrainConfig, train
from paperlib.sources.organism import UniformOrganism, sample_uniform

D, N_LATENTS = 8, 12
ORGANISM = UniformOrganism(d=D, n_gt=N_LATENTS, s=2, n_samples=2000, seed=0)
# Smoke-scale settings under which each architecture learns the organism (sparsity chosen per
# architecture, as one would for any real run).
SETTINGS = {
    "relu": dict(l1_coeff=0.1),
    "relu_dnorm": dict(l1_coeff=0.1),
    "topk": dict(k=2),
    "batchtopk": dict(k=2),
    "matryoshka": dict(k=2, groups=(0.25, 0.25)),
    "jumprelu": dict(l0_coeff=1.0, target_l0=2.0, init_threshold=0.2, bandwidth=0.1),
    "gated": dict(l1_coeff=0.1),
    "panneal": dict(l1_coeff=0.1),
}


def make(architecture: str, **overrides) -> SAEBank:
    fields = dict(d_model=D, n_latents=N_LATENTS, n_seeds=3, seed=1, **SETTINGS[architecture])
    fields.update(overrides)
    return SAEBank(SAEConfig(architecture, **fields))


def test_every_architecture_has_settings_here():
    assert set(SETTINGS) == set(ARCHITECTURES)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_recovers_the_planted_organism_above_chance(architecture):
    data = sample_uniform(ORGANISM)
    bank = make(architecture, decoder="unit" if architecture != "relu_dnorm" else "free")
    history = train(
        bank,
        data.x,
        TrainConfig(steps=400, lr=3e-3, batch_size=500, log_every=400),
        progress=False,
        callbacks={"gt_mcc": lambda b: gt_mcc(data.dictionary, b.decoder_directions())},
    )
    chance = chance_mcc(N_LATENTS, N_LATENTS, D, n_samples=100)
    assert history.final("fvu").max() < 0.5
    assert history.final("gt_mcc").min() > chance.mean + 4 * chance.std, history.final("gt_mcc")


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_save_load_round_trip_keeps_every_parameter_and_buffer(architecture, tmp_path):
    bank = make(architecture, n_seeds=1)
    with torch.no_grad():
        for p in bank.parameters():
            p.add_(torch.randn_like(p))
        bank.tokens_since_fired.fill_(7)
    loaded = load_sae(save_single(bank, tmp_path))
    assert loaded.cfg == bank.cfg
    for (name, a), (_, b) in zip(bank.state_dict().items(), loaded.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


def test_relu_dnorm_penalises_codes_times_decoder_norms():
    bank = make("relu_dnorm")
    with torch.no_grad():
        bank.W_dec.mul_(torch.rand(3, N_LATENTS, 1) * 3)
    x = torch.randn(40, D)
    _, parts, codes = bank.loss(x)
    expected = 0.1 * (codes * bank.W_dec.norm(dim=-1)[:, None]).sum(-1).mean(-1)
    torch.testing.assert_close(parts["l1"], expected.detach())


def test_batchtopk_keeps_batch_times_k_and_learns_an_inference_threshold():
    data = sample_uniform(ORGANISM)
    bank = make("batchtopk")
    with torch.no_grad():
        bank.b_enc.fill_(5.0)  # every pre-activation positive
    codes = bank.encode(data.x[:64], training=True)
    assert ((codes > 0).sum((1, 2)) == 64 * 2).all()  # average L0 = k exactly
    assert (codes > 0).sum(-1).float().std() > 0  # ... but not k for every sample
    assert torch.isnan(bank.threshold).all()  # encoding has no side effects; training sets it
    bank = make("batchtopk")
    train(bank, data.x, TrainConfig(steps=300, lr=3e-3, batch_size=500, log_every=300), progress=False)
    assert torch.isfinite(bank.threshold).all() and (bank.threshold > 0).all()
    inference_l0 = (bank.encode(data.x) > 0).sum(-1).float().mean((1,))
    assert ((inference_l0 > 1.4) & (inference_l0 < 2.6)).all(), inference_l0  # close to k = 2


def test_matryoshka_adds_the_nested_prefix_reconstructions():
    assert Matryoshka.prefix_ends(64, (1 / 32, 1 / 16, 1 / 8, 1 / 4)) == [2, 6, 14, 30, 64]
    bank = make("matryoshka")
    x = torch.randn(32, D)
    _, parts, codes = bank.loss(x)
    ends = Matryoshka.prefix_ends(N_LATENTS, (0.25, 0.25))
    assert ends == [3, 6, 12]
    manual = sum(
        ((codes[..., :m] @ bank.W_dec[:, :m] + bank.b_dec[:, None]) - x).square().mean((1, 2)) for m in ends[:-1]
    )
    torch.testing.assert_close(parts["prefix_recon"], manual.detach())


def test_jumprelu_codes_and_threshold_gradients():
    bank = make("jumprelu", n_seeds=1)
    x = torch.randn(256, D)
    pre = bank.pre_activations(x).detach()
    codes = bank.encode(x).detach()
    threshold = bank.log_threshold.exp()[:, None].detach()
    torch.testing.assert_close(codes, pre * (pre > threshold))
    total, parts, _ = bank.loss(x)
    total.backward()
    assert bank.log_threshold.grad is not None and bank.log_threshold.grad.abs().sum() > 0
    assert "l0" in parts


def test_jumprelu_l0_moves_towards_its_target():
    data = sample_uniform(ORGANISM)
    bank = make("jumprelu")
    history = train(bank, data.x, TrainConfig(steps=400, lr=3e-3, batch_size=500, log_every=400), progress=False)
    assert abs(history.final("l0").mean() - 2.0) < abs(history["l0"][0].mean() - 2.0)


def test_gated_gate_decides_who_fires_and_every_part_learns():
    bank = make("gated", n_seeds=1)
    x = torch.randn(128, D)
    codes = bank.encode(x)
    pre = bank.pre_activations(x)
    assert ((codes > 0) <= (pre > 0)).all()
    total, parts, _ = bank.loss(x)
    assert set(parts) == {"recon", "l1", "gate_recon"}
    total.backward()
    for name in ("r_mag", "b_mag", "W_enc", "b_enc", "W_dec"):
        assert getattr(bank, name).grad.abs().sum() > 0, name


def test_aux_k_trains_dead_latents_only_when_there_are_some():
    bank = make("topk", aux_coeff=1 / 32, dead_tokens=100)
    x = torch.randn(64, D)
    assert not bank.cfg.closed_form
    _, parts, _ = bank.loss(x)
    assert (parts["aux"] == 0).all()
    with torch.no_grad():
        bank.tokens_since_fired[:, :4] = 1000  # latents 0-3 dead
    bank.zero_grad()
    total, parts, _ = bank.loss(x)
    assert (parts["aux"] > 0).all()
    parts_only_aux = bank.cfg.aux_coeff * bank._aux_k_loss(x, bank.pre_activations(x), bank(x)[0])
    bank.zero_grad()
    parts_only_aux.sum().backward()
    grad = bank.W_enc.grad.abs().sum(1)  # [S, n]
    assert (grad[:, :4] > 0).all() and (grad[:, 4:] == 0).all()


def test_options_an_architecture_does_not_use_are_refused():
    with pytest.raises(ValueError, match="relu SAE has no AuxK loss"):
        SAEConfig("relu", d_model=4, n_latents=8, aux_coeff=0.1)
    with pytest.raises(ValueError, match="groups must be fractions"):
        SAEConfig("matryoshka", d_model=4, n_latents=8, k=2, groups=(0.5, 0.6))
    with pytest.raises(ValueError, match="decoder must be 'free' or 'unit'"):
        SAEConfig("relu", d_model=4, n_latents=8, decoder="tied")


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_evaluation_reuses_the_loss_reconstruction_bitwise(architecture):
    """evaluate() takes the reconstruction from the loss instead of decoding again: same numbers."""
    from paperlib.sae.train import evaluate

    bank = make(architecture)
    x = sample_uniform(ORGANISM).x[:500]
    train(bank, x, TrainConfig(steps=3, lr=1e-3, batch_size=100, log_every=3), progress=False)
    with torch.no_grad():
        codes = bank.encode(x) if bank.cfg.arch.inference_differs else bank.loss(x)[2]
        sq_err = (bank.decode(codes) - x).square().sum((1, 2))
    assert torch.equal(torch.from_numpy(evaluate(bank, x)["mse"]), sq_err / x.shape[0] / x.shape[1])
