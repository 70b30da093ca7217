"""The zoo's hyperparameter rules: what each architecture gets, scale invariance, bad input."""

import math
from dataclasses import replace

import pytest
import torch

from paperlib.sae.architectures import ARCHITECTURES, Matryoshka
from paperlib.sae.bank import SAEBank
from paperlib.sae.train import TrainConfig, train
from paperlib.sae.zoo_presets import (
    K_FAMILY,
    L1_FAMILY,
    ZOO,
    ZooRules,
    calibrate_l1,
    matryoshka_groups,
    mean_sq_norm,
    zoo_config,
)
from paperlib.sources.organism import UniformOrganism, sample_uniform


def config(architecture, data_scale=3.0, sparsity=3, n_latents=32, **kw):
    return zoo_config(architecture, d_model=16, n_latents=n_latents, sparsity=sparsity, data_scale=data_scale, **kw)


def test_the_zoo_is_every_architecture():
    assert set(ZOO) == set(ARCHITECTURES) and len(ZOO) == len(ARCHITECTURES)
    assert set(L1_FAMILY) | set(K_FAMILY) | {"jumprelu"} == set(ZOO)


def test_sparsity_is_matched_where_the_architecture_has_a_knob():
    for architecture in K_FAMILY:
        cfg = config(architecture)
        assert cfg.k == 3 and cfg.l1_coeff == 0 and cfg.aux_coeff == 0
    jump = config("jumprelu")
    assert jump.target_l0 == 3.0 and jump.l1_coeff == 0
    # The L1 family has no L0 knob: one shared coefficient, in units of the code scale sqrt(E|x|^2 / s).
    for architecture in L1_FAMILY:
        cfg = config(architecture, data_scale=12.0, sparsity=3)
        assert cfg.k is None and cfg.l1_coeff == pytest.approx(0.16 * 2.0)


def test_decoder_reconstruction_and_initialisation_are_shared_except_the_decoder_norm_relu():
    configs = {a: config(a) for a in ZOO}
    assert {a for a, c in configs.items() if c.decoder == "free"} == {"relu_dnorm"}
    assert {c.reconstruction for c in configs.values()} == {"sum"}
    assert {c.init_scale for c in configs.values()} == {1.0}
    # same seed, same width: every architecture starts from the same decoder
    decoders = [SAEBank(c).W_dec for c in configs.values()]
    for dec in decoders[1:]:
        torch.testing.assert_close(dec, decoders[0])


def test_rules_follow_the_data_scale():
    """Scaling the data by a scales codes by a: L1 by a, the squared-error-sized L0 weight by a^2,
    JumpReLU's threshold and bandwidth by a."""
    a = 3.0
    small, large = config("jumprelu", data_scale=2.0), config("jumprelu", data_scale=2.0 * a**2)
    assert large.l0_coeff == pytest.approx(small.l0_coeff * a**2)
    assert large.init_threshold == pytest.approx(small.init_threshold * a)
    assert large.bandwidth == pytest.approx(small.bandwidth * a)
    assert config("relu", data_scale=2.0 * a**2).l1_coeff == pytest.approx(config("relu", data_scale=2.0).l1_coeff * a)
    rules = ZooRules(l1_coeff=0.5, l0_coeff=2.0, threshold_fraction=0.2, bandwidth_fraction=0.1)
    jump = config("jumprelu", data_scale=12.0, rules=rules)
    assert (jump.l0_coeff, jump.init_threshold, jump.bandwidth) == pytest.approx((24.0, 0.4, 0.2))


def test_matryoshka_prefixes_end_at_the_given_fractions():
    assert Matryoshka.prefix_ends(32, config("matryoshka").groups) == [4, 8, 16, 32]
    assert Matryoshka.prefix_ends(80, matryoshka_groups(80, (1 / 8, 1 / 4, 1 / 2))) == [10, 20, 40, 80]
    with pytest.raises(ValueError, match="groups of \\[1, 1, 2, 4\\] latents, below min_group=2"):
        matryoshka_groups(8, (1 / 8, 1 / 4, 1 / 2))
    with pytest.raises(ValueError, match="below min_group"):
        config("matryoshka", n_latents=8, sparsity=2)


def test_mean_sq_norm():
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert mean_sq_norm(x) == pytest.approx(13.0)
    with pytest.raises(ValueError, match="shape \\[n_rows, d_model\\]"):
        mean_sq_norm(torch.ones(3))
    with pytest.raises(ValueError, match="finite and not all zero"):
        mean_sq_norm(torch.tensor([[math.nan, 1.0]]))
    with pytest.raises(ValueError, match="finite and not all zero"):
        mean_sq_norm(torch.zeros(4, 2))


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(architecture="p_anneal"), "unknown zoo architecture 'p_anneal'"),
        (dict(sparsity=0), "sparsity must be an integer target L0 in \\[1, n_latents=32\\]"),
        (dict(sparsity=33), "sparsity must be an integer"),
        (dict(sparsity=2.5), "sparsity must be an integer"),
        (dict(data_scale=0.0), "data_scale must be the data's mean squared norm"),
        (dict(data_scale=math.inf), "data_scale must be"),
    ],
)
def test_bad_arguments_are_refused(bad, message):
    args = dict(architecture="topk", sparsity=3, data_scale=3.0) | bad
    with pytest.raises(ValueError, match=message):
        zoo_config(args.pop("architecture"), d_model=16, n_latents=32, **args)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(l1_coeff=0.0), "ZooRules.l1_coeff must be > 0"),
        (dict(bandwidth_fraction=-1.0), "ZooRules.bandwidth_fraction must be > 0"),
        (dict(prefix_ends=(0.5, 0.25)), "prefix_ends must be increasing fractions"),
        (dict(prefix_ends=(0.5, 1.0)), "prefix_ends must be increasing fractions"),
        (dict(prefix_ends=()), "prefix_ends must be increasing fractions"),
        (dict(min_group=0), "min_group must be a positive integer"),
    ],
)
def test_bad_rules_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        ZooRules(**bad)


def test_every_zoo_config_trains_and_the_knobs_act():
    """Each configuration trains on a small organism; the k family lands on its k, JumpReLU's L0
    moves towards its target, and the L1 family's L0 falls as its L1 grows."""
    data = sample_uniform(UniformOrganism(d=8, n_gt=16, s=2, n_samples=1024, seed=0))
    scale = mean_sq_norm(data.x)
    schedule = TrainConfig(steps=150, lr=3e-3, batch_size=256, log_every=150)
    l0 = {}
    for architecture in ZOO:
        cfg = zoo_config(architecture, d_model=8, n_latents=16, sparsity=2, data_scale=scale, n_seeds=2)
        history = train(SAEBank(cfg), data.x, schedule, progress=False)
        assert history.final("fvu").max() < 1.0, architecture
        l0[architecture] = (history["l0"][0].mean(), history.final("l0").mean())
    assert l0["topk"][1] == pytest.approx(2.0)
    assert abs(l0["jumprelu"][1] - 2) < abs(l0["jumprelu"][0] - 2)
    strong = zoo_config(
        "relu", d_model=8, n_latents=16, sparsity=2, data_scale=scale, n_seeds=2, rules=ZooRules(l1_coeff=1.6)
    )
    assert train(SAEBank(strong), data.x, schedule, progress=False).final("l0").mean() < l0["relu"][1]


def test_calibration_brackets_the_target_then_bisects():
    found = calibrate_l1(lambda m: 12 / m, target=3)  # dense at the rule's value: doubles up
    assert sorted(found.tried) == pytest.approx([1, 2, 2 * math.sqrt(2), 4]) and found.multiplier == 4
    found = calibrate_l1(lambda m: 1 / m, target=3)  # sparse at the rule's value: halves down
    assert sorted(found.tried) == pytest.approx([0.25, math.sqrt(0.125), 0.5, 1])
    assert found.multiplier == pytest.approx(math.sqrt(0.125))  # L0 2.83 beats 4 in log ratio
    assert len(calibrate_l1(lambda m: 12 / m, target=3, refinements=0).tried) == 3


def test_calibration_never_picks_a_dead_sae():
    found = calibrate_l1(lambda m: 0.0 if m >= 2 else 10.0, target=3)
    assert found.tried[found.multiplier] == 10.0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(pilot_l0=lambda m: 8.0, target=3), "could not bracket the target L0 3 in 12 pilots"),
        (dict(pilot_l0=lambda m: math.nan, target=3), "reached L0 nan; it must be a finite count"),
        (dict(pilot_l0=lambda m: -1.0, target=3), "must be a finite count >= 0"),
        (dict(pilot_l0=lambda m: 1.0, target=0), "target L0 > 0"),
        (dict(pilot_l0=lambda m: 1.0, target=3, factor=1.0), "factor > 1"),
        (dict(pilot_l0=lambda m: 1.0, target=3, max_pilots=1), "max_pilots >= 2"),
    ],
)
def test_calibration_refuses_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        calibrate_l1(**kwargs)


def test_calibration_on_real_pilots_lands_near_the_target():
    """The L1 of a ReLU SAE on a small organism, calibrated on real pilot runs, gives an L0 near s,
    where the rule's own value leaves it far denser."""
    data = sample_uniform(UniformOrganism(d=8, n_gt=16, s=2, n_samples=1024, seed=0))
    base = zoo_config("relu", d_model=8, n_latents=16, sparsity=2, data_scale=mean_sq_norm(data.x), n_seeds=2)
    schedule = TrainConfig(steps=150, lr=3e-3, batch_size=256, log_every=150)

    def pilot(m):
        return float(
            train(SAEBank(replace(base, l1_coeff=base.l1_coeff * m)), data.x, schedule, progress=False)
            .final("l0")
            .mean()
        )

    found = calibrate_l1(pilot, target=2)
    assert found.tried[1.0] > 3  # the uncalibrated rule is too dense here
    assert abs(math.log(found.tried[found.multiplier] / 2)) < math.log(1.5)
