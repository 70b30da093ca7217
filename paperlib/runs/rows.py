"""Where the LLM notebooks' SAEs get their training rows: the activation cache, or a live stream.

Notebooks 06-11 evaluate on held-out rows of the activation cache (``held_out_split``: its last contexts) and
ask ``runs.zoo.zoo_runs`` for their SAEs, which trains them from one of two sources (``training_rows``):

* ``"cache"`` (the default profile): the cache's training rows, one configuration after another
  (``runs.trained.activation_run``);
* ``"stream"`` (the paper profile): the model's residual stream on the corpus *after* every context the cache
  holds, so each cached row, the held-out ones included, stays unseen, and the token budget is the schedule's,
  not the cache's. Every configuration asked for at once trains in lockstep from one stream
  (``runs.sweep.sweep_runs``: one forward of the LLM per batch for all of them), split into ``jobs`` jobs run
  by ``executor`` (``"inline"``, ``"local"`` subprocesses, or ``"slurm"``). Its massive rows are left out per
  block (``sources.massive``), as the cache's are over all its rows.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from paperlib.runs.sweep import EXECUTORS, StreamSpec, sweep_runs
from paperlib.runs.trained import TrainedRun, activation_run, held_out_split
from paperlib.runtime import resolve_device
from paperlib.sae.bank import SAEConfig
from paperlib.sae.train import TrainConfig
from paperlib.sources.activations import ActivationConfig
from paperlib.sources.massive import MASSIVE_NORM_FACTOR, checked_norm_factor
from paperlib.store import Store

SOURCES = ("cache", "stream")
Member = tuple[SAEConfig, TrainConfig]


class TrainingRows(ABC):
    """A source of training rows of width ``d_model`` that trains SAE configurations through the store."""

    d_model: int

    @property
    @abstractmethod
    def pass_rows(self) -> int | None:
        """Rows in one pass over the training data (None: the stream has no pass the run will reach)."""

    @abstractmethod
    def runs(
        self,
        members: Sequence[Member],
        *,
        store: Store | None = None,
        device: str | torch.device | None = None,
        progress: bool = False,
    ) -> list[TrainedRun]:
        """Each ``(sae, schedule)`` trained (or loaded from the store), in order."""


@dataclass(frozen=True)
class CachedRows(TrainingRows):
    """The training rows of cached activations ``acts`` (all but the last ``eval_rows``)."""

    acts: Any  # sources.activations.Activations, or any object with config, d_model, len and fp32(rows)
    eval_rows: int
    max_norm_factor: float | None = MASSIVE_NORM_FACTOR

    def __post_init__(self) -> None:
        held_out_split(len(self.acts), self.eval_rows)  # refused here, naming eval_rows, when it does not fit
        checked_norm_factor(self.max_norm_factor)

    @property
    def d_model(self) -> int:  # type: ignore[override]
        return int(self.acts.d_model)

    @property
    def pass_rows(self) -> int:
        return held_out_split(len(self.acts), self.eval_rows)[0].stop

    def __str__(self) -> str:
        return f"the cache's {self.pass_rows:,} training rows"

    def runs(self, members, *, store=None, device=None, progress=False) -> list[TrainedRun]:
        return [
            activation_run(
                self.acts,
                sae,
                schedule,
                eval_rows=self.eval_rows,
                store=store,
                max_norm_factor=self.max_norm_factor,
                device=device,
                progress=progress,
            )
            for sae, schedule in members
        ]


@dataclass(frozen=True)
class StreamedRows(TrainingRows):
    """A live stream (``spec``) trained from in lockstep by ``jobs`` jobs on ``executor`` (module docstring);
    ``folder`` keeps the jobs' files (default: ``sweep_jobs`` in the store), ``slurm`` submitit's parameters."""

    spec: StreamSpec
    d_model: int
    jobs: int = 1
    executor: str = "inline"
    folder: str | None = None
    slurm: dict[str, Any] = field(default_factory=dict)

    @property
    def pass_rows(self) -> None:
        return None

    def __str__(self) -> str:
        source = self.spec.activations
        return (
            f"a live stream of {source.model if source else self.spec.rows} after the {self.spec.skip_contexts:,} "
            f"cached contexts ({self.jobs} {self.executor} job{'s' if self.jobs > 1 else ''})"
        )

    def runs(self, members, *, store=None, device=None, progress=False) -> list[TrainedRun]:
        store = store or Store()
        return sweep_runs(
            self.spec,
            members,
            jobs=self.jobs,
            executor=self.executor,
            folder=Path(self.folder) if self.folder else store.root / "sweep_jobs",
            slurm=self.slurm,
            store=store,
            device=None if device is None else resolve_device(device).type,
        )


def training_rows(
    acts,
    eval_rows: int,
    *,
    source: str = "cache",
    block_contexts: int = 256,
    seed: int = 0,
    executor: str = "inline",
    jobs: int = 1,
    slurm: dict[str, Any] | None = None,
    folder: str | None = None,
    max_norm_factor: float | None = MASSIVE_NORM_FACTOR,
) -> TrainingRows:
    """The training rows a notebook's SAEs read (module docstring): ``acts``'s own (``source="cache"``), or a
    stream of ``acts.config``'s model on its corpus after the cached contexts (``"stream"``; ``block_contexts``
    contexts per shuffled block, shuffle ``seed``, the sweep's ``executor``, ``jobs``, ``slurm``, ``folder``)."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}")
    if source == "cache":
        return CachedRows(acts, eval_rows, max_norm_factor)
    held_out_split(len(acts), eval_rows)
    if not isinstance(getattr(acts, "config", None), ActivationConfig):
        raise ValueError(
            f"source='stream' streams the model and corpus the activations came from: give activations of "
            f"load_activations (an ActivationConfig), not {type(acts).__name__}; or use source='cache'"
        )
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    spec = StreamSpec(
        activations=acts.config,
        block=block_contexts,
        seed=seed,
        skip_contexts=len(acts.tokens),
        max_norm_factor=checked_norm_factor(max_norm_factor),
    )
    return StreamedRows(spec, int(acts.d_model), jobs, executor, folder, dict(slurm or {}))


def as_training_rows(data, eval_rows: int | None) -> TrainingRows:
    """``data`` itself if it is ``TrainingRows``, else cached activations with ``eval_rows`` held out."""
    if isinstance(data, TrainingRows):
        return data
    if eval_rows is None:
        raise ValueError("eval_rows: give the number of held-out rows of the cached activations (or TrainingRows)")
    return CachedRows(data, eval_rows)
