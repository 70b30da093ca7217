"""P-anneal: the exponent's schedule, the coefficient's rescaling, the penalty and its gradient near
zero, training, and the buffers that carry the schedule through saving, slicing and resuming."""

import math

import pytest
import torch

from paperlib.interop import load_sae, save_single
from paperlib.runs.trained import trained_bank
from paperlib.sae.architectures import ARCHITECTURES, PAnneal
from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.train import TrainConfig, evaluate, train
from paperlib.sae.zoo_presets import L1_FAMILY, ZOO, zoo_config
from paperlib.sources.organism import UniformOrganism, sample_uniform
from paperlib.store import Store
from test_train import interrupted_and_resumed

DATA = sample_uniform(UniformOrganism(d=16, n_gt=32, s=3, n_samples=2048, seed=0))


def config(**overrides) -> SAEConfig:
    fields = dict(d_model=16, n_latents=64, n_seeds=2, l1_coeff=0.3, decoder="unit", reconstruction="sum")
    return SAEConfig("panneal", **(fields | overrides))


# ------------------------------------------------------------------------------------ schedule


def test_p_holds_until_the_anneal_start_then_steps_down_without_reaching_p_end():
    cfg = config()  # paper A's sweep: 1 -> 0.2, annealing from 4% of training, 10 schedule points
    steps = 1000
    assert PAnneal.update_steps(cfg, steps) == [40, 147, 253, 360, 467, 573, 680, 787, 893, 1000]
    p = [PAnneal.exponent_at(cfg, step, steps) for step in range(1, steps + 1)]
    assert p[0] == 1.0 and p[39] == 1.0  # steps 1 and 40 (the anneal start)
    assert p[40] == 1.0  # the first schedule point sets p_start again (as the reference's does)
    assert p[147] == pytest.approx(1 - 0.8 / 9)  # step 148, after the second point
    assert p[-1] == pytest.approx(1 - 0.8 * 8 / 9)  # the end: one step short of p_end = 0.2
    assert all(b <= a for a, b in zip(p, p[1:]))
    assert len(set(p)) == 9 and min(p) > cfg.p_end


def test_the_trainer_applies_the_schedule_step_by_step():
    cfg = config(n_seeds=1, p_updates=4, anneal_start=0.25, p_end=0.1)
    steps = 40
    bank = SAEBank(cfg)
    history = train(
        bank,
        DATA.x[:256],
        TrainConfig(steps=steps, lr=1e-3, log_every=1),
        progress=False,
        callbacks={"p": lambda b: b.p.clone()},
    )
    expected = [cfg.p_start] + [PAnneal.exponent_at(cfg, step, steps) for step in range(1, steps + 1)]
    torch.testing.assert_close(torch.from_numpy(history["p"][:, 0]), torch.tensor(expected))
    assert int(bank.p_updates) == 3 and float(bank.p) == pytest.approx(1 - 0.9 * 2 / 3)


def test_the_coefficient_is_rescaled_so_the_penalty_does_not_jump_when_p_changes():
    cfg = config(n_seeds=2, p_updates=3, p_end=0.2, anneal_start=0.5, p_window=3)  # p: 1, 1, 0.6
    steps = 10
    assert PAnneal.update_steps(cfg, steps) == [5, 8, 10]
    bank = SAEBank(cfg)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand(2, 32, 64, generator=gen) * (torch.rand(2, 32, 64, generator=gen) < 0.2) for _ in range(8)]
    for step, codes in enumerate(batches, start=1):  # steps 1-8
        PAnneal.at_step(bank, step, steps)
        if step == 6:
            assert torch.isnan(bank.lp_window).all()  # nothing recorded before the anneal start
        PAnneal.observe(bank, codes)
    assert float(bank.p[0]) == 1.0 and torch.isfinite(bank.lp_window).all()
    PAnneal.at_step(bank, 9, steps)  # the third schedule point: p 1 -> 0.6
    assert float(bank.p[0]) == pytest.approx(0.6) and torch.isnan(bank.lp_window).all()
    window = batches[5:8]  # steps 6-8: the last p_window steps at p = 1
    old = torch.stack([c.sum(-1).mean(-1) for c in window]).mean(0)
    new = torch.stack([c.pow(0.6).sum(-1).mean(-1) for c in window]).mean(0)
    torch.testing.assert_close(bank.lp_scale, old / new)
    assert (bank.lp_scale < 1).all()  # codes below 1: f^0.6 > f, so the coefficient shrinks
    # on the window's own codes the rescaled penalty at the new p equals the old one at the old p
    same = torch.cat(window, 1)
    at_new = PAnneal.penalties(bank, None, None, same)["lp"]
    bank.p.fill_(1.0)
    bank.lp_scale.fill_(1.0)
    torch.testing.assert_close(at_new, PAnneal.penalties(bank, None, None, same)["lp"])
    bank.p.fill_(0.6)
    bank.lp_scale.copy_(old / new)
    PAnneal.at_step(bank, 9, steps)  # the same step again changes nothing (a resumed run repeats none)
    torch.testing.assert_close(bank.lp_scale, old / new)


# ------------------------------------------------------------------------------- penalty, gradient


def test_the_penalty_is_l1_coeff_times_scale_times_the_sum_of_f_to_the_p():
    bank = SAEBank(config())
    bank.p.copy_(torch.tensor([0.5, 0.3]))
    bank.lp_scale.copy_(torch.tensor([1.3, 0.7]))
    x = DATA.x[:100]
    _, parts, codes = bank.loss(x, sparsity_scale=0.25)
    assert set(parts) == {"recon", "lp"}
    direct = torch.stack([codes[s].double().pow(p).sum(-1).mean() for s, p in enumerate((0.5, 0.3))])
    expected = 0.3 * torch.tensor([1.3, 0.7], dtype=torch.float64) * direct * 0.25
    torch.testing.assert_close(parts["lp"].double(), expected, rtol=1e-5, atol=0)
    metrics = evaluate(bank, x)  # an evaluation reports the same penalty (without the warm-up factor)
    torch.testing.assert_close(torch.from_numpy(metrics["loss_lp"]).double(), expected / 0.25, rtol=1e-5, atol=0)


@pytest.mark.parametrize("p", [0.3, 0.05, 0.0])
def test_gradient_matches_p_f_to_the_p_minus_1_and_stays_finite_at_and_near_zero(p):
    bank = SAEBank(config())
    bank.p.fill_(p)
    bank.lp_scale.copy_(torch.tensor([1.0, 2.0]))
    values = [0.0, 1e-45, 1e-30, 1e-9, 1e-8, 1e-4, 0.3, 2.0]
    codes = torch.tensor(values).repeat(2, 3, 1).requires_grad_(True)  # [S=2, B=3, n=8]
    PAnneal.penalties(bank, None, None, codes)["lp"].sum().backward()
    f = torch.tensor(values, dtype=torch.float64)
    slope = torch.where(f >= PAnneal.eps, p * f.clamp_min(PAnneal.eps) ** (p - 1), 0.0)
    expected = 0.3 * torch.tensor([1.0, 2.0], dtype=torch.float64)[:, None, None] * slope / 3
    assert torch.isfinite(codes.grad).all()
    torch.testing.assert_close(codes.grad.double(), expected.expand(2, 3, 8), rtol=1e-5, atol=0)


def test_gradient_agrees_with_finite_differences():
    bank = SAEBank(config(n_seeds=1))
    bank.p.fill_(0.3)
    codes = (torch.rand(1, 4, 6, dtype=torch.float64) + 0.05).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: PAnneal.penalties(bank, None, None, c)["lp"], (codes,))


def test_a_training_step_with_codes_at_and_just_above_zero_has_finite_gradients():
    bank = SAEBank(config(n_seeds=1))
    bank.p.fill_(0.05)
    with torch.no_grad():
        bank.W_enc[:, :, :2] = 0  # latent 0: pre-activation exactly 0; latent 1: exactly 1e-30
        bank.b_enc[:, 0], bank.b_enc[:, 1] = 0.0, 1e-30
    x = DATA.x[:64]
    total, _, codes = bank.loss(x)
    assert (codes[..., 0] == 0).all() and (codes[..., 1] == 1e-30).all()
    total.backward()
    for name, param in bank.named_parameters():
        assert torch.isfinite(param.grad).all(), name


# ------------------------------------------------------------------------------------- training


def test_trains_and_reaches_a_lower_l0_than_relu_at_the_same_coefficient():
    schedule = TrainConfig(steps=200, lr=3e-3, batch_size=256, log_every=50)
    runs = {}
    for architecture in ("relu", "panneal"):
        cfg = SAEConfig(
            architecture, d_model=16, n_latents=64, n_seeds=2, l1_coeff=0.3, decoder="unit", reconstruction="sum"
        )
        bank = SAEBank(cfg)
        runs[architecture] = (bank, train(bank, DATA.x, schedule, progress=False))
    bank, history = runs["panneal"]
    assert (history.final("loss") < 0.2 * history["loss"][0]).all()
    assert history.final("fvu").max() < 0.25
    relu_l0, l0 = runs["relu"][1]["l0"], history["l0"]
    assert (l0[-1] < 0.95 * relu_l0[-1]).all(), (l0[-1], relu_l0[-1])  # measured: 12.0 vs 13.4
    assert (l0[-1] < l0[2]).all()  # L0 keeps falling as p falls (from step 100 to 200)
    assert torch.allclose(bank.p, torch.tensor(1 - 0.8 * 8 / 9))
    assert ((bank.lp_scale > 0) & (bank.lp_scale < 1)).all()


def test_an_interrupted_run_resumes_to_the_same_state(tmp_path):
    cfg = config(n_seeds=1, p_updates=4, anneal_start=0.2)
    schedule = TrainConfig(
        steps=20,
        lr=1e-3,
        batch_size=256,
        log_every=5,
        checkpoint_fractions=(0.5, 1.0),
        checkpoint_dir=str(tmp_path / "run"),
    )
    reference, resumed = interrupted_and_resumed(lambda: SAEBank(cfg), DATA.x, schedule)
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)
    assert int(resumed.p_updates) == 3 and float(resumed.lp_scale) != 1.0


# ---------------------------------------------------------------------------- state, store, zoo


def test_buffers_survive_the_store_seed_slicing_and_save_load(tmp_path):
    cfg = config()
    schedule = TrainConfig(steps=60, lr=3e-3, batch_size=256, log_every=60)
    first = trained_bank(DATA.x, "organism", cfg, schedule, store=Store(tmp_path), progress=False)

    def untouched():
        raise AssertionError("a cache hit must not train again")

    again = trained_bank(untouched, "organism", cfg, schedule, store=Store(tmp_path), progress=False)
    bank = again.bank
    assert list(bank.state_dict())[-4:] == ["p", "p_updates", "lp_scale", "lp_window"]
    for (name, a), b in zip(first.bank.state_dict().items(), bank.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)
    assert torch.allclose(bank.p, torch.tensor(PAnneal.exponent_at(cfg, 60, 60)))
    assert int(bank.p_updates[0]) == 9 and (bank.lp_scale != 1).all() and torch.isfinite(bank.lp_window).any()
    # a reloaded bank reports the penalty it was trained with
    torch.testing.assert_close(
        torch.from_numpy(evaluate(bank, DATA.x)["loss_lp"]), torch.from_numpy(again.history["loss_lp"][-1])
    )
    single = bank.seed(1)
    for name, value in bank.state_dict().items():
        torch.testing.assert_close(single.state_dict()[name], value[1:2], rtol=0, atol=0, equal_nan=True, msg=name)
    fresh = SAEBank(cfg)
    fresh.load_state_dict(bank.state_dict())
    assert torch.equal(fresh.lp_scale, bank.lp_scale) and torch.equal(fresh.p, bank.p)
    loaded = load_sae(save_single(single, tmp_path / "single"))
    assert loaded.cfg == single.cfg
    for (name, a), b in zip(single.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=name)


def test_other_architectures_keep_their_state_and_ignore_the_step_hook():
    expected = ["W_dec", "W_enc", "b_enc", "b_dec", "tokens_since_fired", "threshold"]
    relu = SAEBank(SAEConfig("relu", d_model=4, n_latents=8, l1_coeff=0.1))
    assert list(relu.state_dict()) == expected
    before = {k: v.clone() for k, v in relu.state_dict().items()}
    for architecture in ARCHITECTURES:
        if architecture != "panneal":
            ARCHITECTURES[architecture].at_step(relu, 5, 10)
    for name, value in relu.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0, equal_nan=True, msg=name)


def test_zoo_puts_panneal_in_the_l1_family():
    assert "panneal" in ZOO and "panneal" in L1_FAMILY
    args = dict(d_model=16, n_latents=32, sparsity=3, data_scale=12.0)
    cfg, relu = zoo_config("panneal", **args), zoo_config("relu", **args)
    assert cfg.l1_coeff == relu.l1_coeff == pytest.approx(0.16 * 2.0)
    assert cfg.decoder == "unit" and cfg.reconstruction == "sum" and (cfg.p_start, cfg.p_end) == (1.0, 0.2)


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(p_end=1.5), "0 <= p_end <= p_start <= 1"),
        (dict(p_start=0.5, p_end=0.8), "got p_start=0.5, p_end=0.8"),
        (dict(p_start=0.0, p_end=0.0), "p_start > 0"),
        (dict(p_end=-0.1), "0 <= p_end"),
        (dict(p_end=math.nan), "P-anneal's exponents"),
        (dict(p_start="1"), "p_start must be a number, got '1'"),
        (dict(anneal_start=None), "anneal_start must be a number"),
        (dict(anneal_start=1.0), "anneal_start must be a fraction of training in \\[0, 1\\)"),
        (dict(p_updates=1), "p_updates must be an integer >= 2, got 1"),
        (dict(p_updates=True), "p_updates must be an integer >= 2"),
        (dict(p_window=0), "p_window must be an integer >= 1, got 0"),
        (dict(p_window=2.0), "p_window must be an integer >= 1"),
    ],
)
def test_bad_schedules_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        config(**bad)
