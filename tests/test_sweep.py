"""paperlib.runs.sweep: a sweep split into jobs (in this process, and as real subprocess jobs through submitit's
local executor) gives each member the weights it would get alone, never trains a stored member again, and a
killed job resumes from its checkpoints when the sweep is run again."""

import json
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from paperlib.runs import sweep
from paperlib.runs.sweep import StreamSpec, sweep_runs
from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.train import TrainConfig, train
from paperlib.sources.stream import TensorStream
from paperlib.store import Store

BASE = TrainConfig(steps=10, lr=1e-3, batch_size=32, log_every=5, stats_rows=64)
MEMBERS = [
    (SAEConfig("topk", 8, 16, k=3, n_seeds=2, seed=1), BASE),
    (SAEConfig("relu", 8, 24, seed=2, l1_coeff=1e-3), replace(BASE, lr=3e-3)),
    (SAEConfig("topk", 8, 32, k=2, seed=3), replace(BASE, normalize=True)),
]


@pytest.fixture
def spec(tmp_path) -> StreamSpec:
    rows = tmp_path / "rows.npy"
    np.save(rows, np.random.default_rng(0).standard_normal((400, 8), dtype=np.float32))
    return StreamSpec(rows=str(rows), block=64)


def alone(spec: StreamSpec, sae: SAEConfig, schedule: TrainConfig) -> SAEBank:
    bank = SAEBank(sae)
    train(bank, TensorStream(np.load(str(spec.rows), mmap_mode="r"), block_rows=64), schedule, progress=False)
    return bank


def assert_same_state(a: SAEBank, b: SAEBank) -> None:
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p.cpu(), q.cpu(), rtol=0, atol=0, equal_nan=True, msg=name)


def test_members_of_a_sweep_get_the_weights_they_would_get_alone_and_are_never_trained_again(
    spec, tmp_path, monkeypatch
):
    store = Store(tmp_path / "store")
    runs = sweep_runs(spec, MEMBERS, jobs=2, store=store, device="cpu")
    for run, (sae, schedule) in zip(runs, MEMBERS):
        assert_same_state(run.bank, alone(spec, sae, schedule))
    monkeypatch.setattr(sweep, "train_many", lambda *a, **k: pytest.fail("a stored member was trained again"))
    again = sweep_runs(spec, MEMBERS, jobs=3, store=store, device="cpu")  # other jobs: the same entries
    assert [r.key for r in again] == [r.key for r in runs]
    assert not list((tmp_path / "store" / "train_state").iterdir())  # checkpoints removed once stored


def test_jobs_run_as_subprocesses_through_submitit(spec, tmp_path):
    store = Store(tmp_path / "store")
    runs = sweep_runs(spec, MEMBERS, jobs=2, executor="local", folder=tmp_path / "jobs", store=store, device="cpu")
    for run, (sae, schedule) in zip(runs, MEMBERS):
        assert_same_state(run.bank, alone(spec, sae, schedule))
    assert len(list((tmp_path / "jobs").glob("*_log.out"))) == 2  # two jobs, each with its own log


def test_a_killed_job_resumes_from_its_checkpoint_when_the_sweep_runs_again(spec, tmp_path):
    import submitit

    store = Store(tmp_path / "store")
    member = (SAEConfig("topk", 8, 16, k=3, n_seeds=2, seed=1), replace(BASE, steps=4000, log_every=1000))
    pool = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="local")
    pool.update_parameters(timeout_min=10)
    job = pool.submit(sweep.train_group, spec, [member], str(store.root), "cpu")
    deadline = time.time() + 120
    while not list(store.root.glob("train_state/*/train_state.pt")) and time.time() < deadline and not job.done():
        time.sleep(0.2)
    assert not job.done(), "the job finished before it could be killed: give it more steps"
    job.cancel()  # the job is killed after its first checkpoint (at a quarter of its steps)
    while not job.done():
        time.sleep(0.2)
    (run,) = sweep_runs(spec, [member], store=store, device="cpu")
    entry = store.load(sweep.NAMESPACE, sweep._key(spec, *member, "cpu"))
    assert entry is not None and entry.meta["resumed"] is True
    assert_same_state(run.bank, alone(spec, *member))


def test_bad_sweep_inputs_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="exactly one source"):
        StreamSpec()
    with pytest.raises(ValueError, match="no file"):
        StreamSpec(rows=str(tmp_path / "missing.npy")).build(Store(tmp_path))
    spec = StreamSpec(rows=str(Path(tmp_path) / "x.npy"))
    with pytest.raises(ValueError, match="executor must be one of inline, local, slurm"):
        sweep_runs(spec, MEMBERS, executor="kubernetes", store=Store(tmp_path))
    with pytest.raises(ValueError, match="jobs must be a positive integer"):
        sweep_runs(spec, MEMBERS, jobs=0, store=Store(tmp_path))
    with pytest.raises(ValueError, match=r"the same batch_size \(not None\), got \[32, 64\]"):
        sweep_runs(spec, [MEMBERS[0], (MEMBERS[1][0], replace(BASE, batch_size=64))], store=Store(tmp_path))
    with pytest.raises(ValueError, match="name the device SLURM jobs train on"):
        sweep_runs(spec, MEMBERS, executor="slurm", store=Store(tmp_path))


def write_sweep(path: Path, spec: StreamSpec, **extra) -> Path:
    members = [
        {"sae": {"architecture": "topk", "d_model": 8, "n_latents": 16, "k": 3, "n_seeds": 2, "seed": 1},
         "train": {"steps": 10, "lr": 1e-3, "batch_size": 32, "log_every": 5, "stats_rows": 64}},
        {"sae": {"architecture": "relu", "d_model": 8, "n_latents": 24, "seed": 2, "l1_coeff": 1e-3},
         "train": {"steps": 10, "lr": 3e-3, "batch_size": 32, "log_every": 5, "stats_rows": 64}},
    ]  # fmt: skip
    path.write_text(json.dumps({"stream": {"rows": spec.rows, "block": 64}, "members": members, **extra}))
    return path


def test_the_cli_trains_a_sweep_file_and_reports_what_is_stored(spec, tmp_path, monkeypatch, capsys):
    from paperlib.__main__ import main

    monkeypatch.setenv("PAPERLIB_CACHE", str(tmp_path / "store"))
    file = write_sweep(tmp_path / "sweep.json", spec, jobs=2, device="cpu")
    assert main(["sweep", str(file), "--dry-run"]) == 0
    assert "2 configurations, 0 stored already" in capsys.readouterr().out
    assert main(["sweep", str(file)]) == 0
    out = capsys.readouterr().out
    assert "[0] topk 8x16: FVU" in out and "[1] relu 8x24: FVU" in out
    assert main(["sweep", str(file), "--dry-run"]) == 0
    assert "2 stored already" in capsys.readouterr().out
    for run, (sae, schedule) in zip(sweep_runs(spec, MEMBERS[:2], store=Store(tmp_path / "store"), device="cpu"),
                                    MEMBERS[:2]):  # fmt: skip
        assert_same_state(run.bank, alone(spec, sae, schedule))


@pytest.mark.parametrize(
    "content,message",
    [
        ("[1, 2]", "expected a mapping with stream and members"),
        ('{"stream": {"rows": "x.npy"}, "members": [], "jobz": 2}', "expected a mapping with stream and members"),
        ('{"stream": {"rows": "x.npy"}, "members": []}', "members must be a non-empty list"),
        ('{"stream": {"rows": "x.npy"}, "members": [{"sae": {}}]}', r"members\[0\] must be \{sae"),
        (
            '{"stream": {"rows": "x.npy"}, "members": [{"sae": {"architecture": "topk", "d_model": 4, '
            '"n_latents": 8, "kk": 2}, "train": {"steps": 1}}]}',
            r"members\[0\]\.sae: .*kk",
        ),
        (
            '{"stream": {"activations": {"layr": 3}}, "members": [{"sae": {}, "train": {}}]}',
            "stream.activations: .*layr",
        ),
        ("{not json", "cannot read it"),
    ],
)
def test_a_bad_sweep_file_is_refused_naming_the_file_and_field(tmp_path, capsys, content, message):
    from paperlib.__main__ import main

    file = tmp_path / "bad.yaml"
    file.write_text(content)
    assert main(["sweep", str(file)]) == 2
    err = capsys.readouterr().err
    assert str(file) in err and re.search(message, err), err


def test_the_shipped_example_sweep_reads_and_plans(tmp_path, monkeypatch, capsys):
    from paperlib.__main__ import main

    monkeypatch.setenv("PAPERLIB_CACHE", str(tmp_path))
    example = Path(__file__).resolve().parents[1] / "examples" / "sweep.yaml"
    assert main(["sweep", str(example), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "2 configurations, 0 stored already" in out and "[1] relu 576x1152, 3 seed(s), 4688 steps: to train" in out


def test_a_rows_file_whose_content_changed_is_not_taken_for_the_old(spec, tmp_path):
    store = Store(tmp_path / "store")
    (first,) = sweep_runs(spec, MEMBERS[:1], store=store, device="cpu")
    np.save(str(spec.rows), np.random.default_rng(1).standard_normal((400, 8), dtype=np.float32))  # same path
    (second,) = sweep_runs(spec, MEMBERS[:1], store=store, device="cpu")
    assert second.key != first.key
    assert_same_state(second.bank, alone(spec, *MEMBERS[0]))  # trained on the new rows
