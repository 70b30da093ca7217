"""Zoo runs on activations: the L1 family calibrated to the target L0 by cached pilots, the others by rule."""

import math

import pytest
import torch

from paperlib.runs.family import FamilyConfig, train_family
from paperlib.sources.activations import MemoryActivations
from paperlib.runs.zoo import llm_schedule, rule_config, zoo_run
from paperlib.sae.zoo_presets import zoo_config
from paperlib.sources.organism import UniformOrganism, sample_uniform
from paperlib.store import Store

D, WIDTH, TARGET = 16, 48, 3


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return Store(tmp_path_factory.mktemp("zoo-runs-cache"))


@pytest.fixture(scope="module")
def acts():
    return MemoryActivations(
        sample_uniform(UniformOrganism(d=D, n_gt=48, s=TARGET, n_samples=2400, seed=11)).x, "organism d16"
    )


@pytest.fixture(scope="module")
def schedule():
    return llm_schedule(steps=80, lr=3e-3, batch_size=200, seed=0, eval_rows=300, warmup_steps=5)


def _runs_in(store: Store) -> int:
    return sum(1 for _ in (store.root / "llm-sae").glob("*")) if (store.root / "llm-sae").exists() else 0


def test_relu_is_calibrated_to_the_target_l0_by_cached_pilots(acts, schedule, store):
    found = zoo_run(acts, "relu", WIDTH, TARGET, schedule=schedule, eval_rows=300, store=store, n_seeds=2, seed=5)
    c = found.calibration
    assert c is not None and len(c.tried) >= 2
    assert min(c.tried.values()) <= TARGET < max(c.tried.values()), c.tried  # the target was bracketed
    assert found.config.l1_coeff == pytest.approx(rule_config("relu", D, WIDTH, TARGET).l1_coeff * c.multiplier)
    assert found.run.bank.n_seeds == 2 and found.run.bank.cfg == found.config
    chosen = c.tried[c.multiplier]
    assert abs(math.log(chosen / TARGET)) == min(abs(math.log(l0 / TARGET)) for l0 in c.tried.values() if l0 > 0)
    assert abs(math.log(found.run.history["l0"][-1].mean() / TARGET)) < math.log(2.5)
    before = _runs_in(store)
    again = zoo_run(acts, "relu", WIDTH, TARGET, schedule=schedule, eval_rows=300, store=store, n_seeds=2, seed=5)
    assert _runs_in(store) == before, "a second calibration must train nothing"
    assert again.calibration == c and torch.equal(again.run.bank.W_dec, found.run.bank.W_dec)


def test_uncalibrated_and_k_family_runs_follow_the_rule(acts, schedule, store):
    plain = zoo_run(acts, "relu", WIDTH, TARGET, schedule=schedule, eval_rows=300, store=store, seed=5, calibrate=False)
    assert plain.calibration is None
    assert (
        plain.config.l1_coeff
        == zoo_config("relu", d_model=D, n_latents=WIDTH, sparsity=TARGET, data_scale=1.0, seed=5).l1_coeff
    )
    topk = zoo_run(acts, "topk", WIDTH, TARGET, schedule=schedule, eval_rows=300, store=store, seed=5, aux_coeff=0.25)
    assert topk.calibration is None and topk.config.k == TARGET and topk.config.aux_coeff == 0.25


def test_family_members_are_calibrated_per_width(acts, schedule, store):
    fam = train_family(
        acts, FamilyConfig("relu", widths=(24, 48), sparsity=TARGET, seed=5), schedule, eval_rows=300, store=store
    )
    assert sorted(fam.calibrations) == [24, 48]
    for width, c in fam.calibrations.items():
        assert fam.run(width).bank.cfg.l1_coeff == pytest.approx(
            rule_config("relu", D, width, TARGET, seed=fam.config.member_seed(width)).l1_coeff * c.multiplier
        )
    off = train_family(
        acts,
        FamilyConfig("relu", widths=(24, 48), sparsity=TARGET, seed=5, calibrate_l1=False),
        schedule,
        eval_rows=300,
        store=store,
    )
    assert off.calibrations == {}


def test_bad_pilot_seeds_are_named(acts, schedule, store):
    with pytest.raises(ValueError, match="pilot_seeds"):
        zoo_run(acts, "gated", WIDTH, TARGET, schedule=schedule, eval_rows=300, store=store, pilot_seeds=0)
