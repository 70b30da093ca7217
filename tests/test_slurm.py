"""The sweep on a real SLURM cluster through submitit's SLURM executor (sbatch, scancel): the checks of test_sweep's
local subprocess jobs, on a one-node cluster that ``tests/slurm_cluster.sh`` starts (``make slurm`` does, as root;
CI requires it with PAPERLIB_REQUIRE_SLURM=1). Without that cluster these tests skip and say why; a cluster this
machine otherwise belongs to is never used."""

import os
import signal
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from paperlib.runs import sweep
from paperlib.runs.sweep import sweep_runs
from paperlib.sae.bank import SAEConfig
from paperlib.store import Store
from test_sweep import BASE, MEMBERS, alone, assert_same_state, spec, write_sweep  # noqa: F401 (spec: fixture)

CONF = Path(os.environ.get("PAPERLIB_SLURM", "/tmp/paperlib-slurm")) / "slurm.conf"


def _cluster_answers() -> str | None:
    """None when the test cluster answers, else why not."""
    if not CONF.exists():
        return f"no test cluster ({CONF} missing): run tests/slurm_cluster.sh as root, or `make slurm`"
    try:
        out = subprocess.run(["sinfo", "-h", "-t", "idle,mix,alloc"], env={**os.environ, "SLURM_CONF": str(CONF)},
                             capture_output=True, text=True, timeout=20)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"sinfo failed: {exc}"
    return None if out.returncode == 0 and out.stdout.strip() else f"the test cluster does not answer: {out.stderr}"


_why_not = _cluster_answers()
if _why_not and os.environ.get("PAPERLIB_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"PAPERLIB_REQUIRE_SLURM=1 but {_why_not}")
pytestmark = pytest.mark.skipif(_why_not is not None, reason=str(_why_not))


@pytest.fixture(autouse=True)
def slurm_conf(monkeypatch):
    """The test cluster for submitit's sbatch/scancel calls, and a limit: a job the cluster never runs would
    otherwise leave the sweep waiting for ever."""
    monkeypatch.setenv("SLURM_CONF", str(CONF))

    def too_long(*_):
        raise TimeoutError("the SLURM jobs did not finish in 300 s: see the cluster's logs beside " + str(CONF))

    previous = signal.signal(signal.SIGALRM, too_long)
    signal.alarm(300)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _listed(job_id: str) -> bool:
    return bool(subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip())


def _kill_tasks(job_id: str) -> None:
    """SIGKILL to the job's tasks, as an out-of-memory kill or a failing node ends them. (scancel first sends SIGTERM,
    which submitit's job ignores until SLURM's KillWait, 30 s, sends SIGKILL: time enough for this job to finish.)"""
    listed = subprocess.run(["scontrol", "listpids", job_id], capture_output=True, text=True, check=True).stdout
    rows = [line.split() for line in listed.splitlines()[1:]]
    tasks = [int(r[0]) for r in rows if len(r) >= 4 and r[2] != "batch" and r[3] != "-"]
    assert tasks, f"no task of job {job_id} in `scontrol listpids`:\n{listed}"
    for pid in tasks:
        os.kill(pid, signal.SIGKILL)


def test_a_sweep_runs_as_slurm_jobs(spec, tmp_path):  # noqa: F811
    store = Store(tmp_path / "store")
    runs = sweep_runs(spec, MEMBERS, jobs=2, executor="slurm", folder=tmp_path / "jobs", store=store, device="cpu",
                      slurm={"timeout_min": 10, "cpus_per_task": 1, "mem_gb": 2})  # fmt: skip
    for run, (sae, schedule) in zip(runs, MEMBERS):
        assert_same_state(run.bank, alone(spec, sae, schedule))
    assert len(list((tmp_path / "jobs").glob("*_log.out"))) == 2  # two jobs, each with its own log
    scripts = list((tmp_path / "jobs").glob("*_submission.sh"))  # the sbatch scripts submitit wrote
    assert scripts and "#SBATCH --time=10" in scripts[0].read_text()


def test_a_killed_slurm_job_resumes_from_its_checkpoint(spec, tmp_path):  # noqa: F811
    import submitit

    store = Store(tmp_path / "store")
    member = (SAEConfig("topk", 8, 16, k=3, n_seeds=2, seed=1), replace(BASE, steps=4000, log_every=1000))
    pool = submitit.AutoExecutor(folder=tmp_path / "jobs", cluster="slurm")
    pool.update_parameters(timeout_min=10, cpus_per_task=1, mem_gb=2)
    job = pool.submit(sweep.train_group, spec, [member], str(store.root), "cpu")
    deadline = time.time() + 180
    while not list(store.root.glob("train_state/*/train_state.pt")) and time.time() < deadline:
        assert _listed(job.job_id), f"job {job.job_id} ended before its first checkpoint: {job.paths.stderr}"
        time.sleep(0.2)
    _kill_tasks(job.job_id)  # after its first checkpoint (a quarter of the steps)
    while _listed(job.job_id):
        time.sleep(0.2)
    (run,) = sweep_runs(spec, [member], executor="slurm", folder=tmp_path / "jobs", store=store, device="cpu",
                        slurm={"timeout_min": 10, "cpus_per_task": 1, "mem_gb": 2})  # fmt: skip
    entry = store.load(sweep.NAMESPACE, sweep._key(spec, *member, "cpu"))
    assert entry is not None and entry.meta["resumed"] is True
    assert_same_state(run.bank, alone(spec, *member))


def test_the_cli_submits_a_sweep_file_to_slurm(spec, tmp_path, monkeypatch):  # noqa: F811
    from paperlib.__main__ import main

    monkeypatch.setenv("PAPERLIB_CACHE", str(tmp_path / "store"))
    file = write_sweep(tmp_path / "sweep.json", spec, jobs=2, device="cpu", folder=str(tmp_path / "jobs"),
                       slurm={"timeout_min": 10, "cpus_per_task": 1, "mem_gb": 2})  # fmt: skip
    assert main(["sweep", str(file), "--executor", "slurm"]) == 0
    assert len(list((tmp_path / "jobs").glob("*_log.out"))) == 2
    for run, (sae, schedule) in zip(sweep_runs(spec, MEMBERS[:2], store=Store(tmp_path / "store"), device="cpu"),
                                    MEMBERS[:2]):  # fmt: skip
        assert_same_state(run.bank, alone(spec, sae, schedule))
