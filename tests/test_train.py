"""The training loop: it learns, it is deterministic, it stops loudly on bad numbers."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from paperlib.metrics.consistency import chance_mcc, gt_mcc
from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.train import TrainConfig, evaluate, train
from paperlib.sources.organism import UniformOrganism, sample_uniform

ORGANISM = UniformOrganism(d=8, n_gt=12, s=2, n_samples=2000, seed=0)


def bank(architecture="topk", **overrides):
    fields = dict(d_model=8, n_latents=12, k=2 if architecture == "topk" else None, l1_coeff=1e-3, n_seeds=3, seed=1)
    fields.update(overrides)
    return SAEBank(SAEConfig(architecture, **fields))


@pytest.mark.parametrize("architecture,l1_coeff", [("relu", 0.1), ("topk", 1e-3)])
def test_recovers_the_planted_organism_above_chance(architecture, l1_coeff):
    data = sample_uniform(ORGANISM)
    sae = bank(architecture, l1_coeff=l1_coeff)
    history = train(
        sae,
        data.x,
        TrainConfig(steps=400, lr=3e-3, batch_size=500, log_every=100),
        progress=False,
        callbacks={"gt_mcc": lambda b: gt_mcc(data.dictionary, b.decoder_directions())},
    )
    chance = chance_mcc(12, 12, 8, n_samples=100)
    assert history["step"].tolist() == [0, 100, 200, 300, 400]
    assert history["gt_mcc"].shape == (5, 3)
    assert history["mse"][-1].max() < 0.5 * history["mse"][0].min()
    assert history.final("gt_mcc").min() > chance.mean + 5 * chance.std


def test_same_seed_gives_bitwise_identical_weights():
    data = sample_uniform(ORGANISM)
    cfg = TrainConfig(steps=30, lr=1e-3, batch_size=256, log_every=10, seed=3)
    a, b = bank(), bank()
    train(a, data.x, cfg, progress=False)
    train(b, data.x, cfg, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_full_batch_history_and_evaluate_agree():
    data = sample_uniform(ORGANISM)
    sae = bank("relu")
    history = train(sae, data.x, TrainConfig(steps=5, lr=1e-3, log_every=5), progress=False)
    final = evaluate(sae, data.x)
    np.testing.assert_allclose(history.final("loss"), final["loss"])
    assert set(history.columns) >= {"step", "mse", "l1", "l0", "loss"}


def test_compiled_and_eager_steps_agree(monkeypatch):
    data = sample_uniform(ORGANISM)
    cfg = TrainConfig(steps=3, lr=1e-3, log_every=3)
    eager, compiled = bank(), bank()
    monkeypatch.setenv("PAPERLIB_COMPILE", "0")
    train(eager, data.x, cfg, progress=False)
    monkeypatch.setenv("PAPERLIB_COMPILE", "1")
    train(compiled, data.x, cfg, progress=False)
    for p, q in zip(eager.parameters(), compiled.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_stops_with_step_and_config():
    data = sample_uniform(ORGANISM)
    sae = bank()
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step \d+ for seeds \[0, 1, 2\] of SAEConfig"):
        train(sae, data.x * 1e30, TrainConfig(steps=5, lr=1e-3, log_every=1), progress=False)


def test_bad_data_is_rejected_before_training():
    sae = bank()
    x = torch.randn(100, 8)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="1 rows with NaN/Inf"):
        train(sae, x, TrainConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match=r"\[n_rows, d_model=8\], got \(100, 5\)"):
        train(sae, torch.randn(100, 5), TrainConfig(steps=1), progress=False)
    with pytest.raises(ValueError, match="TrainConfig.steps"):
        TrainConfig(steps=0)


def test_learning_rate_warms_up_and_decays_linearly():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, decay_fraction=0.2)
    assert [cfg.lr_at(s) for s in (1, 5, 10, 50, 80)] == [0.1, 0.5, 1.0, 1.0, 1.0]
    assert (
        cfg.lr_at(81) == pytest.approx(1.0)
        and cfg.lr_at(90) == pytest.approx(0.55)
        and cfg.lr_at(100) == pytest.approx(0.05)
    )
    assert TrainConfig(steps=10, sparsity_warmup_steps=4).sparsity_scale_at(1) == 0.25


def test_unit_decoder_rows_stay_unit_norm():
    data = sample_uniform(ORGANISM)
    sae = bank("relu", l1_coeff=0.1, decoder="unit", init_scale=0.3)
    train(sae, data.x, TrainConfig(steps=20, lr=1e-2, batch_size=500, log_every=20), progress=False)
    torch.testing.assert_close(sae.W_dec.norm(dim=-1), torch.ones(3, 12))


def test_normalisation_is_folded_back_into_the_weights():
    data = sample_uniform(ORGANISM)
    cfg = TrainConfig(steps=30, lr=1e-2, batch_size=500, log_every=30, normalize=True)
    raw, scaled = bank(), bank()
    history = train(raw, data.x * 50, cfg, progress=False)
    # Training on already-normalised data gives the same SAE, before folding.
    train(
        scaled,
        data.x * 50 * history.scale,
        TrainConfig(steps=30, lr=1e-2, batch_size=500, log_every=30),
        progress=False,
    )
    assert history.scale == pytest.approx(1 / (data.x * 50).square().sum(1).mean().sqrt().item(), rel=1e-5)
    x = data.x[:100] * 50
    codes_raw, codes_scaled = raw.encode(x), scaled.encode(x * history.scale)
    torch.testing.assert_close(codes_raw, codes_scaled, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(raw(x)[0], scaled(x * history.scale)[0] / history.scale, rtol=1e-4, atol=1e-4)


def test_decoder_bias_starts_at_the_geometric_median():
    from paperlib.sae.train import geometric_median

    points = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [100.0, 100.0]])
    median = geometric_median(points)

    def distance_sum(m):
        return (points - m).norm(dim=1).sum()

    steps = [torch.tensor([dx, dy]) * 1e-2 for dx in (-1, 0, 1) for dy in (-1, 0, 1) if dx or dy]
    assert all(distance_sum(median) <= distance_sum(median + step) for step in steps)  # a minimum
    assert (median - points.mean(0)).norm() > 10  # unlike the mean, robust to the outlier
    data = sample_uniform(ORGANISM)
    sae = bank()
    train(sae, data.x, TrainConfig(steps=1, lr=1e-12, b_dec_init="median", log_every=1), progress=False)
    torch.testing.assert_close(sae.b_dec[0], geometric_median(data.x), rtol=1e-4, atol=1e-5)


def test_checkpoints_snapshot_decoders_at_log_spaced_fractions():
    from paperlib.sae.train import PAPER_CHECKPOINTS

    data = sample_uniform(ORGANISM)
    cfg = TrainConfig(steps=1000, lr=1e-3, batch_size=100, log_every=500, checkpoint_fractions=PAPER_CHECKPOINTS)
    assert cfg.checkpoint_steps() == [0, 1, 3, 10, 32, 100, 200, 300, 316, 400, 500, 600, 700, 800, 900, 1000]
    history = train(
        bank(), data.x, TrainConfig(steps=20, lr=1e-3, log_every=10, checkpoint_fractions=(0, 0.5, 1)), progress=False
    )
    assert sorted(history.checkpoints) == [0, 10, 20] and history.checkpoints[10].shape == (3, 12, 8)


def interrupted_and_resumed(make_bank, x, cfg: TrainConfig) -> tuple[SAEBank, SAEBank]:
    """(uninterrupted, resumed): ``cfg`` (checkpoints at 0.5 and 1, logs every 5 of 20 steps) run once
    straight through, once stopped by a Ctrl-C at the log of step 15 and resumed from step 10."""
    reference = make_bank()
    train(reference, x, replace(cfg, checkpoint_dir=cfg.checkpoint_dir + "-reference"), progress=False)
    calls = []

    def interrupt(b):
        calls.append(1)
        if len(calls) == 4:  # the log at step 15, after the checkpoint at step 10
            raise KeyboardInterrupt
        return 0.0

    with pytest.raises(KeyboardInterrupt):
        train(make_bank(), x, cfg, callbacks={"c": interrupt}, progress=False)
    resumed = make_bank()
    history = train(resumed, x, cfg, callbacks={"c": lambda b: 0.0}, progress=False)
    assert history["step"].tolist() == [0, 5, 10, 15, 20]
    return reference, resumed


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    data = sample_uniform(ORGANISM)
    cfg = TrainConfig(
        steps=20,
        lr=1e-3,
        batch_size=300,
        log_every=5,
        normalize=True,
        checkpoint_fractions=(0.5, 1.0),
        checkpoint_dir=str(tmp_path / "run"),
    )
    # autograd path, Adam state, dead counters
    reference, resumed = interrupted_and_resumed(lambda: bank("topk", aux_coeff=1 / 32, dead_tokens=300), data.x, cfg)
    for (name, p), q in zip(reference.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, equal_nan=True, msg=name)


def test_resuming_someone_elses_run_is_refused(tmp_path):
    data = sample_uniform(ORGANISM)
    cfg = TrainConfig(steps=4, lr=1e-3, log_every=2, checkpoint_fractions=(1.0,), checkpoint_dir=str(tmp_path))
    train(bank(), data.x, cfg, progress=False)
    with pytest.raises(ValueError, match="holds a run of"):
        train(bank(k=3), data.x, cfg, progress=False)


def test_foreach_adam_updates_bitwise_like_the_per_tensor_loop():
    """train() uses foreach Adam for speed on the claim that it rounds exactly like the default loop."""
    params = {
        impl: [torch.nn.Parameter(p.detach().clone()) for p in bank("topk").parameters()] for impl in (False, True)
    }
    optimizers = {impl: torch.optim.Adam(ps, lr=1e-3, foreach=impl) for impl, ps in params.items()}
    torch.manual_seed(0)
    for step in range(5):
        grads = [torch.randn_like(p) for p in params[False]]
        for impl, ps in params.items():
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            optimizers[impl].param_groups[0]["lr"] = 1e-3 / (step + 1)
            optimizers[impl].step()
    assert all(torch.equal(p, q) for p, q in zip(params[False], params[True]))


def test_mini_batches_cover_each_epoch_once_whatever_order_they_are_asked_in():
    from paperlib.sae.train import _batch_rows

    cfg = TrainConfig(steps=20, batch_size=10, seed=7)
    in_order = [_batch_rows(step, 45, cfg) for step in range(1, 13)]  # 4 batches per epoch, 5 rows left out
    shuffled = {step: _batch_rows(step, 45, cfg) for step in (12, 1, 9, 5, 2, 11, 3, 4, 6, 10, 7, 8)}
    for step, rows in enumerate(in_order, start=1):
        assert torch.equal(rows, shuffled[step])  # stateless: a resumed run sees the same batches
    for epoch in range(3):
        rows = torch.cat(in_order[4 * epoch : 4 * epoch + 4])
        assert len(set(rows.tolist())) == 40 and rows.max() < 45  # each row at most once per epoch
    assert not torch.equal(torch.cat(in_order[:4]), torch.cat(in_order[4:8]))  # a new permutation each epoch
