"""Seeded runs vary exactly what they name: full-batch training has no order, so only the initialisation can differ."""

import pytest
import torch

from paperlib.runs.seeding import decoders, seeded_runs
from paperlib.sae.bank import SAEConfig
from paperlib.sae.train import TrainConfig
from paperlib.sources.organism import UniformOrganism, sample
from paperlib.store import Store

ORGANISM = UniformOrganism(d=8, n_gt=12, s=2, n_samples=512, seed=3)
SAE = SAEConfig("topk", d_model=8, n_latents=12, k=2, seed=5)


def _runs(tmp_path, vary, batch_size, n_runs=3):
    schedule = TrainConfig(steps=30, lr=3e-3, batch_size=batch_size, log_every=30, seed=1, precision="fp32")
    return decoders(
        seeded_runs(
            sample(ORGANISM).x, ORGANISM, SAE, schedule, n_runs=n_runs, vary=vary, store=Store(tmp_path), device="cpu"
        )
    )


def test_full_batch_runs_differ_only_by_their_initialisation(tmp_path):
    init, order, both = (_runs(tmp_path, vary, batch_size=None) for vary in ("init", "order", "both"))
    assert init.shape == (3, 12, 8)
    assert torch.equal(order[0], order[1]) and torch.equal(order[0], order[2])  # one start, no order to vary
    assert torch.allclose(both, init, atol=1e-5)  # a bank of 3 seeds = 3 banks of one, up to rounding
    assert not torch.allclose(init[0], init[1], atol=1e-2)


def test_mini_batch_orders_make_one_start_diverge_and_run_0_is_shared(tmp_path):
    init, order = (_runs(tmp_path, vary, batch_size=64) for vary in ("init", "order"))
    assert not torch.allclose(order[0], order[1], atol=1e-4)
    assert torch.allclose(order[0], init[0], atol=1e-5)


def test_bad_arguments_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="vary must be one of init, order, both"):
        _runs(tmp_path, "data", batch_size=None)
    with pytest.raises(ValueError, match="n_runs must be an integer >= 2"):
        _runs(tmp_path, "init", batch_size=None, n_runs=1)
