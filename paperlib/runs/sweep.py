"""A sweep of SAE configurations trained from one activation stream, split into jobs that run where submitit
reaches: SLURM, subprocesses on this machine, or this process.

Paper A's authors trained their 144 SAEs as 8 SLURM jobs of 18 SAEs sharing one activation buffer. Here
``sweep_runs(stream, members, jobs=8, executor="slurm", folder=...)`` does the same with any configurations:

* the members are split into ``jobs`` groups, in order; each job rebuilds the stream from its ``StreamSpec`` (a
  stream object does not travel to another machine) and trains its group with ``train_many``: one pass over
  the stream feeds the whole group;
* every member is an entry of the store, keyed by the stream (for stored rows also the file's SHA-256), its SAE
  and schedule and the device type (like ``runs.trained.trained_bank``), so a finished configuration is never
  trained again, by this sweep or another, and jobs on other machines share results through a store on a shared
  filesystem (``store``'s root);
* each member checkpoints into the store (``train_state/<key>/``) at its ``checkpoint_fractions`` (at quarters
  when it has none), so a killed or timed-out job, submitted again, resumes where its checkpoints left it;
* ``executor``: ``"slurm"`` (``slurm`` = submitit's parameters, e.g. ``{"slurm_partition": "gpu",
  "gpus_per_node": 1, "cpus_per_task": 8, "timeout_min": 720}``), ``"local"`` (the same jobs as subprocesses of
  this machine: submitit's local executor, whose default time limit would kill a job after 2 minutes, so
  ``timeout_min`` is set from ``slurm`` or to a day), or ``"inline"`` (in this process, one job after another:
  no submitit needed). ``folder`` keeps submitit's job files: scripts, pickled calls, stdout and stderr logs.

``sweep_runs`` waits for every job and returns the members' ``TrainedRun``s in order; a failed job raises with
its log's path.
"""

from __future__ import annotations

import functools
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from paperlib.runs.trained import TrainedRun, pack_run, unpack_run
from paperlib.runtime import resolve_device
from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.train import TrainConfig, train_many
from paperlib.sources.activations import ActivationConfig
from paperlib.sources.stream import ModelStream, RowStream, TensorStream
from paperlib.store import Store, file_sha256

NAMESPACE = "sweep"
RESUME_FRACTIONS = (0.25, 0.5, 0.75, 1.0)  # checkpoints of a member whose schedule has none
EXECUTORS = ("inline", "local", "slurm")


@dataclass(frozen=True)
class StreamSpec:
    """What a job builds its stream from: a live model (``activations``, ``block`` contexts per block, the first
    ``skip_contexts`` contexts held out) or the rows of a ``.npy`` file (``rows``, a path every job can read;
    ``block`` rows per block); the shuffle seed, and the massive-row filter (``sources.massive``; None: off)."""

    activations: ActivationConfig | None = None
    rows: str | None = None
    block: int = 256
    seed: int = 0
    skip_contexts: int = 0
    max_norm_factor: float | None = None

    def __post_init__(self) -> None:
        if (self.activations is None) == (self.rows is None):
            raise ValueError("StreamSpec takes exactly one source: activations=ActivationConfig(...) or rows=PATH.npy")
        if self.skip_contexts and self.activations is None:
            raise ValueError("StreamSpec.skip_contexts holds out contexts of a live model's corpus; rows take none")

    def build(self, store: Store, device: str = "cpu") -> RowStream:
        """The stream, its model (if live) on ``device``: the job's training device, so the forward runs there."""
        if self.activations is not None:
            return ModelStream(
                self.activations,
                block_contexts=self.block,
                seed=self.seed,
                skip_contexts=self.skip_contexts,
                max_norm_factor=self.max_norm_factor,
                device=device,
                store=store,
            )
        _stamp(str(self.rows))  # refused with the fix when absent
        rows = np.load(str(self.rows), mmap_mode="r")
        return TensorStream(rows, block_rows=self.block, seed=self.seed, max_norm_factor=self.max_norm_factor)


def _key(spec: StreamSpec, sae: SAEConfig, schedule: TrainConfig, device: str) -> dict[str, Any]:
    """A member's store key: for stored rows also their content, so a changed file is never taken for the old."""
    rows = None if spec.rows is None else _content(spec.rows, *_stamp(spec.rows))
    return {"stream": spec, "rows_sha256": rows, "sae": sae, "train": schedule, "device": device}


def _stamp(path: str) -> tuple[int, int]:
    """The rows file's size and modification time; refused with the fix where there is no such file."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"StreamSpec.rows: no file {path}; give a .npy file of rows that every job can read")
    found = file.stat()
    return found.st_size, found.st_mtime_ns


@functools.lru_cache(maxsize=8)
def _content(path: str, size: int, mtime_ns: int) -> str:
    """The file's sha256, hashed once per process while its size and modification time stay (~1 GB/s)."""
    return file_sha256(Path(path))


@dataclass(frozen=True)
class SweepFile:
    """A sweep as written in a YAML or JSON file for ``python -m paperlib sweep FILE`` (README: the format)."""

    stream: StreamSpec
    members: list[tuple[SAEConfig, TrainConfig]]
    jobs: int = 1
    executor: str = "inline"
    folder: str = "sweep_jobs"
    slurm: dict[str, Any] = field(default_factory=dict)
    device: str | None = None


def read_sweep(path: str | Path) -> SweepFile:
    """The sweep in ``path``: ``stream`` ({activations: {ActivationConfig fields}} or {rows: PATH}, plus ``block``
    and ``seed``), ``members`` (a list of {sae: {SAEConfig fields}, train: {TrainConfig fields}}), and optionally
    ``jobs``, ``executor``, ``folder``, ``slurm`` and ``device``. Every problem names the file and the field."""
    import yaml

    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"sweep file {path}: cannot read it ({exc})") from exc
    allowed = {f for f in SweepFile.__dataclass_fields__}
    if not isinstance(raw, dict) or not {"stream", "members"} <= set(raw) or set(raw) - allowed:
        raise ValueError(
            f"sweep file {path}: expected a mapping with stream and members, and optionally jobs, executor, folder, "
            f"slurm, device; got {sorted(raw) if isinstance(raw, dict) else type(raw).__name__}"
        )

    def build(kind: Callable[..., Any], fields: Any, where: str) -> Any:
        if not isinstance(fields, dict):
            raise ValueError(f"sweep file {path}: {where} must be a mapping of {kind.__name__} fields, got {fields!r}")
        try:
            return kind(**fields)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"sweep file {path}: {where}: {exc}") from exc

    stream = dict(raw["stream"]) if isinstance(raw["stream"], dict) else raw["stream"]
    if isinstance(stream, dict) and isinstance(stream.get("activations"), dict):
        stream["activations"] = build(ActivationConfig, stream["activations"], "stream.activations")
    members = raw["members"]
    if not isinstance(members, list) or not members:
        raise ValueError(f"sweep file {path}: members must be a non-empty list of {{sae: ..., train: ...}}")
    for i, member in enumerate(members):
        if not isinstance(member, dict) or set(member) != {"sae", "train"}:
            raise ValueError(
                f"sweep file {path}: members[{i}] must be {{sae: {{...}}, train: {{...}}}}, got {member!r}"
            )
    return SweepFile(
        stream=build(StreamSpec, stream, "stream"),
        members=[
            (build(SAEConfig, m["sae"], f"members[{i}].sae"), build(TrainConfig, m["train"], f"members[{i}].train"))
            for i, m in enumerate(members)
        ],
        **{k: raw[k] for k in ("jobs", "executor", "folder", "slurm", "device") if k in raw},
    )


def sweep_runs(
    stream: StreamSpec,
    members: Sequence[tuple[SAEConfig, TrainConfig]],
    *,
    jobs: int = 1,
    executor: str = "inline",
    folder: str | Path = "sweep_jobs",
    slurm: dict[str, Any] | None = None,
    store: Store | None = None,
    device: str | None = None,
) -> list[TrainedRun]:
    """Every member ``(sae, schedule)`` trained from ``stream``, from the store where it was trained before; the
    rest trained in ``jobs`` jobs by ``executor`` (module docstring). ``device``: where each job trains
    (default: that machine's ``paperlib.device()``); it is part of the key, so give it when jobs run elsewhere."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"jobs must be a positive integer, got {jobs!r}")
    sizes = sorted({schedule.batch_size for _, schedule in members}, key=lambda size: (size is None, size or 0))
    if len(sizes) != 1 or sizes[0] is None:
        raise ValueError(
            f"a sweep's members share batches: give every schedule the same batch_size (not None), got {sizes}"
        )
    if executor == "slurm" and device is None:
        raise ValueError(
            "name the device SLURM jobs train on (device='cuda' or 'cpu'; `device:` in a sweep file): this "
            "machine's, which would be the default, need not be the nodes'"
        )
    store = store or Store()
    device = device or resolve_device(None, "device").type
    keys = [_key(stream, sae, schedule, device) for sae, schedule in members]
    entries = [store.load(NAMESPACE, key) for key in keys]  # each read (and hash-checked) once
    names = [store.path(NAMESPACE, key).name for key in keys]
    todo = [i for i, entry in enumerate(entries) if entry is None and names.index(names[i]) == i]  # each once
    groups = [g for g in (todo[j * len(todo) // jobs : (j + 1) * len(todo) // jobs] for j in range(jobs)) if g]
    calls = [(stream, [members[i] for i in group], str(store.root), device) for group in groups]
    if executor == "inline":
        for call in calls:
            train_group(*call)
    elif calls:
        _submit(calls, executor, Path(folder), dict(slurm or {}))
    runs = []
    for (sae, _), key, entry in zip(members, keys, entries):
        entry = entry or store.load(NAMESPACE, key)
        if entry is None:
            raise RuntimeError(f"the sweep's jobs ended without storing {sae}; see their logs in {folder}")
        runs.append(unpack_run(sae, entry.tensors, entry.path.name))
    return runs


def stored(
    stream: StreamSpec,
    members: Sequence[tuple[SAEConfig, TrainConfig]],
    *,
    store: Store | None = None,
    device: str | None = None,
) -> list[bool]:
    """Whether each member is in the store already (then ``sweep_runs`` only loads it)."""
    store = store or Store()
    device = device or resolve_device(None, "device").type
    return [store.load(NAMESPACE, _key(stream, sae, schedule, device)) is not None for sae, schedule in members]


def _submit(calls: list[tuple], executor: str, folder: Path, parameters: dict[str, Any]) -> None:
    import submitit

    pool = submitit.AutoExecutor(folder=folder, cluster=executor)
    parameters.setdefault("timeout_min", 24 * 60)  # submitit's own default would stop a local job after 2 minutes
    pool.update_parameters(**parameters)
    submitted = [pool.submit(train_group, *call) for call in calls]
    for job in submitted:
        try:
            job.result()
        except Exception as exc:
            raise RuntimeError(
                f"sweep job {job.job_id} failed: {exc}; its logs: {job.paths.stdout} and {job.paths.stderr}"
            ) from exc


def train_group(spec: StreamSpec, members: list[tuple[SAEConfig, TrainConfig]], root: str, device: str) -> list[str]:
    """One job: the members not stored yet, trained in lockstep from the stream, each stored when done; returns
    their entries' paths. Checkpoints go to ``<root>/train_state/<key>/`` and are removed once the entry exists."""
    store = Store(root)
    pending = [(sae, s) for sae, s in members if store.load(NAMESPACE, _key(spec, sae, s, device)) is None]
    if not pending:
        return []
    banks = [SAEBank(sae) for sae, _ in pending]
    directories = [store.root / "train_state" / store.path(NAMESPACE, _key(spec, *m, device)).name for m in pending]
    cfgs = [
        replace(s, checkpoint_fractions=s.checkpoint_fractions or RESUME_FRACTIONS, checkpoint_dir=str(directory))
        for (_, s), directory in zip(pending, directories)
    ]
    resumed = [(directory / "train_state.pt").exists() for directory in directories]
    histories = train_many(banks, spec.build(store, device), cfgs, progress=False, device=torch.device(device))
    paths = []
    for (sae, schedule), bank, history, directory, was_resumed in zip(pending, banks, histories, directories, resumed):
        tensors = pack_run(bank.cpu(), history.columns, history.checkpoints)
        meta = {"architecture": sae.architecture, "resumed": was_resumed}
        paths.append(str(store.save(NAMESPACE, _key(spec, sae, schedule, device), tensors, meta).path))
        shutil.rmtree(directory, ignore_errors=True)  # the entry exists: its checkpoints are spent
    return paths
