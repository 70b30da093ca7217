"""paperlib.runs.rows and zoo_runs: a notebook's SAEs from the cache one by one, or from a live stream in lockstep
(calibration pilots included), with the same results as the sweep that trains them, and refusals with the fix."""

from dataclasses import replace

import pytest
import torch

from paperlib.runs.rows import CachedRows, StreamedRows, training_rows
from paperlib.runs.sweep import StreamSpec, sweep_runs
from paperlib.runs.zoo import ZooSpec, llm_schedule, zoo_run, zoo_runs
from paperlib.sources.activations import ActivationConfig, MemoryActivations, load_activations
from paperlib.sources.organism import UniformOrganism, sample_uniform
from paperlib.store import Store

D, TARGET = 16, 3


@pytest.fixture(scope="module")
def organism_acts():
    return MemoryActivations(sample_uniform(UniformOrganism(d=D, n_gt=48, s=TARGET, n_samples=2400, seed=11)).x)


def schedule(steps=60, batch_size=200, eval_rows=300):
    return llm_schedule(steps=steps, lr=3e-3, batch_size=batch_size, seed=0, eval_rows=eval_rows, warmup_steps=5)


def counting(rows, calls):
    """``rows`` whose ``runs`` records how many members each call asked for."""
    original = rows.runs

    def runs(members, **kwargs):
        calls.append(len(members))
        return original(members, **kwargs)

    object.__setattr__(rows, "runs", runs)
    return rows


def test_zoo_runs_calibrate_side_by_side_and_equal_runs_one_at_a_time(organism_acts, tmp_path):
    specs = [
        ZooSpec("relu", 48, TARGET, schedule(), n_seeds=2, seed=5),
        ZooSpec("gated", 32, TARGET, schedule(), seed=6),
        ZooSpec("topk", 48, TARGET, schedule(), seed=7),
    ]
    calls: list[int] = []
    together = zoo_runs(counting(CachedRows(organism_acts, 300), calls), specs, store=Store(tmp_path / "a"))
    assert calls[0] == 2 and calls[-1] == 3, calls  # a round asks both calibrations' pilots; then all three runs
    assert len(calls) - 1 == max(len(z.calibration.tried) for z in together[:2])  # one call per round of pilots
    assert together[2].calibration is None and together[2].config.k == TARGET
    for spec, found in zip(specs, together):
        alone = zoo_run(
            organism_acts, spec.architecture, spec.n_latents, spec.sparsity, schedule=spec.schedule, eval_rows=300,
            store=Store(tmp_path / "b"), n_seeds=spec.n_seeds, seed=spec.seed,
        )  # fmt: skip
        assert alone.calibration == found.calibration and alone.config == found.config
        assert alone.run.key == found.run.key and torch.equal(alone.run.bank.W_dec, found.run.bank.W_dec)


def test_training_rows_name_a_bad_source_and_need_a_models_activations(organism_acts):
    assert isinstance(training_rows(organism_acts, 300), CachedRows)
    assert str(training_rows(organism_acts, 300)) == "the cache's 2,100 training rows"
    with pytest.raises(ValueError, match="source must be one of cache, stream, got 'disk'"):
        training_rows(organism_acts, 300, source="disk")
    with pytest.raises(ValueError, match="give activations of load_activations"):
        training_rows(organism_acts, 300, source="stream")
    with pytest.raises(ValueError, match="eval_rows must be an integer in 1..2399"):
        training_rows(organism_acts, 2400)
    with pytest.raises(ValueError, match="eval_rows: give the number of held-out rows"):
        zoo_run(organism_acts, "topk", 32, TARGET, schedule=schedule())


@pytest.fixture(scope="module")
def tiny_acts(tiny, tmp_path_factory):
    store = Store(tmp_path_factory.mktemp("rows-store"))
    config = ActivationConfig(model=tiny["models"]["gpt_neox"], layer=1, corpus=tiny["corpus"], context_length=16,
                              n_tokens=16 * 12, batch_contexts=4)  # fmt: skip
    return load_activations(config, store=store, progress=False), store


def test_a_stream_trains_every_spec_in_lockstep_after_the_cached_contexts(tiny_acts, tmp_path):
    acts, store = tiny_acts
    rows = training_rows(acts, 64, source="stream", block_contexts=8, seed=3)
    assert isinstance(rows, StreamedRows) and rows.d_model == acts.d_model == 32 and rows.pass_rows is None
    assert rows.spec.skip_contexts == len(acts.tokens) == 12 and rows.spec.max_norm_factor == 10.0
    assert "after the 12 cached contexts (1 inline job)" in str(rows)
    plan = schedule(steps=30, batch_size=64, eval_rows=128)
    specs = [ZooSpec("topk", 48, 4, plan, n_seeds=2, seed=1), ZooSpec("relu", 48, 12, plan, seed=2)]
    calls: list[int] = []
    found = zoo_runs(counting(rows, calls), specs, store=store, device="cpu")
    assert calls[-1] == 2 and all(n == 1 for n in calls[:-1]) and len(calls) - 1 == len(found[1].calibration.tried)
    # each run is the sweep's entry for that member: trained from the stream, in lockstep with the others
    again = sweep_runs(rows.spec, [(z.config, plan) for z in found], store=store, device="cpu")
    for z, run in zip(found, again):
        assert run.key == z.run.key and torch.equal(run.bank.W_dec, z.run.bank.W_dec)
        assert z.run.history["fvu"][-1].max() < 1.5
    cached = zoo_runs(training_rows(acts, 64), specs[:1], store=store, device="cpu")[0]
    assert cached.run.key != found[0].run.key  # the cache's rows are another source: another run


def test_a_stream_spec_refuses_held_out_contexts_of_stored_rows(tmp_path):
    with pytest.raises(ValueError, match="rows take none"):
        StreamSpec(rows=str(tmp_path / "x.npy"), skip_contexts=3)
    spec = replace(StreamSpec(activations=ActivationConfig()), skip_contexts=5)
    assert spec.skip_contexts == 5
