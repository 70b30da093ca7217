"""The training loop: it learns, it is deterministic, it stops loudly on bad numbers."""

import numpy as np
import pytest
import torch

from paperlib.consistency import chance_mcc, gt_mcc
from paperlib.organism import UniformOrganism, sample_uniform
from paperlib.sae import SAEBank, SAEConfig
from paperlib.train import TrainConfig, evaluate, train

ORGANISM = UniformOrganism(d=8, n_gt=12, s=2, n_samples=2000, seed=0)


def bank(architecture="topk", **overrides):
    fields = dict(d_model=8, n_latents=12, k=2 if architecture == "topk" else None, l1_coeff=1e-3, n_seeds=3, seed=1)
    fields.update(overrides)
    return SAEBank(SAEConfig(architecture, **fields))


@pytest.mark.parametrize("architecture,l1_coeff", [("relu", 0.1), ("topk", 1e-3)])
def test_recovers_the_planted_organism_above_chance(architecture, l1_coeff):
    data = sample_uniform(ORGANISM)
    sae = bank(architecture, l1_coeff=l1_coeff)
    history = train(sae, data.x, TrainConfig(steps=400, lr=3e-3, batch_size=500, log_every=100), progress=False,
                    callbacks={"gt_mcc": lambda b: gt_mcc(data.dictionary, b.decoder_directions())})
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
