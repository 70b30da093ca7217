"""Has an SAE converged? The criterion the LLM notebooks hold their runs to, and how it is measured.

A run is called converged when **doubling its training tokens changes PW-MCC by less than 0.01
(absolute) and FVU by less than 1 % (relative)**. Three ways to see a doubling:

* ``last_doubling``: inside one run, from what every LLM run already records — PW-MCC of the
  decoder snapshots at half and at all of its steps, FVU logged at the same two steps (training
  rows). Cheap, but the half-way point is still at the full learning rate while the end is after
  the decay, so it mixes "more tokens" with "annealed": a conservative check that a user who
  shortens a schedule sees fail.
* ``logged_doubling``: the same from a history whose callbacks log PW-MCC (the organism
  notebooks 01-05; at their constant rate a plain doubling, 05's final decay as above).
* ``doubling_study``: separate runs, each with the whole schedule (warm-up, decay) at its own
  budget, over a doubling grid of tokens, measured on held-out rows; ``study_doublings`` applies
  the criterion to each of its doublings, ``study_convergence`` to the last. Notebook 11 runs it
  for four architectures of notebook 06 and plots it.

All three report the same ``Convergence`` record, which the notebooks put in their JSON.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from itertools import pairwise
from typing import Any

import numpy as np
import torch

from paperlib.metrics.consistency import pw_mcc
from paperlib.runs.trained import TrainedRun, firing_rates
from paperlib.sae.train import TrainConfig, evaluate

PW_MCC_TOLERANCE = 0.01  # absolute change of PW-MCC over a doubling of the training tokens
FVU_TOLERANCE = 0.01  # relative change of FVU over the same doubling


@dataclass(frozen=True)
class Convergence:
    """PW-MCC and FVU at a budget and at twice it; ``converged`` applies the criterion. A run of one
    seed has no PW-MCC (``None``): it is judged by FVU alone, and says so."""

    tokens: tuple[int, int]
    pw_mcc: tuple[float, float] | None
    fvu: tuple[float, float]
    pw_mcc_tolerance: float = PW_MCC_TOLERANCE
    fvu_tolerance: float = FVU_TOLERANCE

    @property
    def pw_mcc_change(self) -> float | None:
        return None if self.pw_mcc is None else self.pw_mcc[1] - self.pw_mcc[0]

    @property
    def fvu_change(self) -> float:
        """Relative change of FVU (negative: FVU fell)."""
        return (self.fvu[1] - self.fvu[0]) / max(abs(self.fvu[0]), 1e-12)

    @property
    def converged(self) -> bool:
        change = self.pw_mcc_change
        return (change is None or abs(change) < self.pw_mcc_tolerance) and abs(self.fvu_change) < self.fvu_tolerance

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "pw_mcc_change": self.pw_mcc_change,
            "fvu_change": self.fvu_change,
            "converged": self.converged,
        }

    def __str__(self) -> str:
        verdict = "converged" if self.converged else "NOT converged"
        pw = (
            "PW-MCC n/a (one seed)"
            if self.pw_mcc is None
            else f"PW-MCC {self.pw_mcc[0]:.3f} -> {self.pw_mcc[1]:.3f} ({self.pw_mcc_change:+.3f})"
        )
        return (
            f"{verdict}: {self.tokens[0]:,} -> {self.tokens[1]:,} tokens, {pw}, FVU {self.fvu[0]:.4f} -> "
            f"{self.fvu[1]:.4f} ({100 * self.fvu_change:+.2f} %)"
        )


def _logged_index(steps: np.ndarray, step: int) -> int | None:
    """Row of the history logged at ``step`` (None where it was not logged)."""
    hits = np.flatnonzero(np.asarray(steps) == step)
    return int(hits[0]) if len(hits) else None


def last_doubling(run: TrainedRun, schedule: TrainConfig) -> Convergence:
    """The criterion applied inside one run: half its steps against all of them (see the module
    docstring). Needs logged FVU at both steps and, for a bank of several seeds, decoder snapshots
    there too (``llm_schedule`` has them)."""
    half, full = round(schedule.steps / 2), schedule.steps  # the step of checkpoint fraction 0.5
    rows = [_logged_index(run.history["step"], step) for step in (half, full)]
    missing = [f"FVU at step {step}" for step, row in zip((half, full), rows) if row is None]
    seeds = run.bank.n_seeds
    if seeds > 1:
        missing += [f"decoder snapshot at step {step}" for step in (half, full) if step not in run.checkpoints]
    if half < 1 or missing:
        raise ValueError(
            f"run {run.key} has no {', '.join(missing) or 'half-way step'}; train it with a schedule "
            "that logs metrics (and snapshots decoders) at half and all of its steps "
            "(runs.zoo.llm_schedule)"
        )
    fvu = [float(np.mean(run.history["fvu"][row])) for row in rows]
    pw = None if seeds == 1 else (pw_mcc(run.checkpoints[half]).mean, pw_mcc(run.checkpoints[full]).mean)
    tokens = [step * (schedule.batch_size or 0) for step in (half, full)]
    return Convergence((tokens[0], tokens[1]), pw, (fvu[0], fvu[1]))


def logged_doubling(columns: Mapping[str, Any], rows_per_step: int) -> Convergence:
    """The same in-run criterion from logged metrics alone, for runs whose callbacks log PW-MCC per
    seed pair as ``"pw_mcc"`` (the organism notebooks): the last logged step against half of it.
    ``rows_per_step`` is the batch size (the number of samples for full-batch training)."""
    steps = np.asarray(columns["step"])
    full = int(steps[-1])
    half = full // 2
    rows = [_logged_index(steps, half), len(steps) - 1]
    if full < 2 or full % 2 or rows[0] is None or "fvu" not in columns:
        raise ValueError(
            f"no logged FVU at step {half} (half of the last logged step {full}); log metrics "
            "with a log_every that divides steps / 2"
        )
    fvu = [float(np.mean(columns["fvu"][row])) for row in rows]
    pw = None
    if "pw_mcc" in columns and np.size(columns["pw_mcc"][rows[1]]):
        pw = (float(np.mean(columns["pw_mcc"][rows[0]])), float(np.mean(columns["pw_mcc"][rows[1]])))
    return Convergence((half * rows_per_step, full * rows_per_step), pw, (fvu[0], fvu[1]))


def family_convergence(families, schedule: TrainConfig) -> dict[str, Convergence]:
    """``last_doubling`` of every member of each ``paperlib.runs.family.Family`` in ``families``, trained
    with ``schedule``, named "architecture/width"."""
    return {
        f"{family.config.architecture}/{width}": last_doubling(
            family.run(width), family.config.schedule_for(width, schedule)
        )
        for family in families
        for width in family.widths
    }


def report(reports: dict[str, Convergence]) -> dict[str, dict[str, Any]]:
    """Print one line per run and a warning naming every run that misses the criterion; the
    records for a notebook's JSON (its ``convergence`` block)."""
    for name, record in reports.items():
        print(f"{name}: {record}")
    missed = not_converged(reports)
    if missed:
        warnings.warn(
            f"{len(missed)} of {len(reports)} SAE configurations have not converged (doubling their "
            f"training tokens would change PW-MCC by >= {PW_MCC_TOLERANCE} or FVU by >= "
            f"{100 * FVU_TOLERANCE:g} %): {', '.join(missed)}. Their numbers measure under-training; "
            "train longer (steps) or read them as such.",
            RuntimeWarning,
            stacklevel=2,
        )
    return {name: record.as_dict() for name, record in reports.items()}


def not_converged(reports: dict[str, Convergence]) -> list[str]:
    """Names of the reports that miss the criterion (for a notebook's warning)."""
    return [name for name, record in reports.items() if not record.converged]


def decoder_cosine_to_init(run: TrainedRun) -> float:
    """Median over latents and seeds of the cosine between a decoder row and its initial direction:
    near 1 means training barely moved the dictionary."""
    if 0 not in run.checkpoints:
        raise ValueError(
            f"run {run.key} has no step-0 decoder snapshot; train it with checkpoint_fractions that include 0"
        )
    start, end = run.checkpoints[0].double(), run.bank.decoder_directions().double().cpu()
    cos = torch.nn.functional.cosine_similarity(start, end, dim=-1)
    return float(cos.median())


@dataclass(frozen=True)
class StudyPoint:
    """One budget of a doubling study: held-out metrics of the run trained on that many tokens."""

    tokens: int
    steps: int
    pw_mcc: float
    pw_mcc_std: float
    fvu: float
    l0: float
    dead_held_out: float
    cosine_to_init: float
    seconds: float = float("nan")  # wall time of training (or loading from the cache) and measuring this budget


def budget_schedules(schedule: TrainConfig, token_grid: Sequence[int]) -> list[TrainConfig]:
    """``schedule`` at each budget of ``token_grid``: steps = tokens / batch size, logged half-way as
    ``llm_schedule``, every other part kept. What ``doubling_study`` trains, so a caller may train them all
    beforehand (e.g. in lockstep from a stream, ``runs.zoo.zoo_runs``) and the study finds them stored."""
    if not schedule.batch_size:
        raise ValueError("doubling_study needs a mini-batch schedule (batch_size set)")
    steps = [max(1, round(tokens / schedule.batch_size)) for tokens in token_grid]
    return [replace(schedule, steps=n, log_every=max(1, round(n / 2))) for n in steps]


def doubling_study(
    train_run, schedule: TrainConfig, token_grid: Sequence[int], x_eval: torch.Tensor
) -> list[StudyPoint]:
    """Train ``train_run(schedule)`` (a function returning a ``TrainedRun`` for a schedule, e.g. a
    ``zoo_run`` call) once per budget of ``token_grid`` (``budget_schedules``) and measure each on the
    held-out rows ``x_eval``."""
    points = []
    for budget in budget_schedules(schedule, token_grid):
        start = time.perf_counter()
        steps, tokens = budget.steps, budget.steps * (budget.batch_size or 0)  # batch_size is set (budget_schedules)
        run = train_run(budget)
        bank = run.bank
        metrics = evaluate(bank, x_eval)
        pw = pw_mcc(bank.decoder_directions())
        dead = (firing_rates(bank, x_eval) == 0).float().mean(-1)
        points.append(
            StudyPoint(
                tokens,
                steps,
                pw.mean,
                pw.std,
                float(metrics["fvu"].mean()),
                float(metrics["l0"].mean()),
                float(dead.mean()),
                decoder_cosine_to_init(run),
                time.perf_counter() - start,
            )
        )
    return points


def study_doublings(points: Sequence[StudyPoint]) -> list[Convergence]:
    """The criterion over every step of a study, smallest budget first: where the changes shrink
    towards the tolerances shows how far the plateau is, which the last doubling alone does not."""
    if len(points) < 2:
        raise ValueError(f"a doubling study needs at least two budgets, got {len(points)}")
    ordered = sorted(points, key=lambda p: p.tokens)
    return [Convergence((a.tokens, b.tokens), (a.pw_mcc, b.pw_mcc), (a.fvu, b.fvu)) for a, b in pairwise(ordered)]


def study_convergence(points: Sequence[StudyPoint]) -> Convergence:
    """The criterion over the last doubling of a study (its two largest budgets)."""
    return study_doublings(points)[-1]
