"""Zoo SAEs on LLM activations (cached or streamed, ``runs.rows``) at a target L0, with the L1 family
calibrated to that target.

Notebooks 06-10 train the zoo on the same activations and must get the same SAEs back (a cache hit
across notebooks), so the rule that turns (architecture, width, target L0) into a trained run lives
here once. The TopK family and JumpReLU take the target directly (``zoo_config``). The ReLU family
has no L0 knob, and on LLM activations the rule's organism-derived L1 left L0 4-11x above the
target (notebook 06, measured before calibration); ``calibrate_l1`` scales it with pilot runs of
the same schedule on ``pilot_seeds`` seeds, judged only by the pilots' final L0 on training rows
(never by a consistency score), as a practitioner's sweep would be. Two bisections after the
factor-2 bracket (multipliers on a 2^(1/4) grid): with one, Gated's steep L0 curve (62 -> 18 over a
factor of sqrt(2), measured) sent the targets 16 and 32 to the same coefficient, hence the same SAE.
Pilots are stored runs: a second calibration, in any notebook, trains nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from paperlib.runs.rows import TrainingRows, as_training_rows
from paperlib.runs.trained import TrainedRun
from paperlib.sae.bank import SAEConfig
from paperlib.sae.train import PAPER_CHECKPOINTS, TrainConfig
from paperlib.sae.zoo_presets import K_FAMILY, L1_FAMILY, L1Calibration, l1_probes, zoo_config
from paperlib.store import Store


@dataclass(frozen=True)
class ZooRun:
    """A trained run and, for the L1 family, the calibration that chose its L1 coefficient."""

    run: TrainedRun
    config: SAEConfig
    calibration: L1Calibration | None = None


def llm_schedule(
    steps: int,
    *,
    lr: float,
    batch_size: int,
    seed: int,
    eval_rows: int,
    warmup_steps: int,
    decay_fraction: float = 0.2,
    precision: str = "auto",
) -> TrainConfig:
    """Notebooks 06-10's training schedule for SAEs on LLM activations (paper A's: warm-up, constant,
    linear decay over the last ``decay_fraction``; unit mean squared norm; b_dec at the geometric
    median; decoder snapshots at paper A's checkpoints; ``precision`` of the matmuls, see
    ``TrainConfig``). Metrics are logged before, half-way through and after training only: the half-way
    FVU is what ``convergence.last_doubling`` compares the end with (PW-MCC over training uses the
    snapshots), and each fp32 evaluation of a 06-sized bank costs ~0.5 s (measured). Same arguments,
    same cache key, in every notebook."""
    return TrainConfig(
        steps=steps,
        lr=lr,
        batch_size=batch_size,
        log_every=max(1, round(steps / 2)),
        seed=seed,
        eval_rows=min(4096, eval_rows),
        warmup_steps=warmup_steps,
        decay_fraction=decay_fraction,
        normalize=True,
        b_dec_init="median",
        checkpoint_fractions=PAPER_CHECKPOINTS,
        precision=precision,
    )


def rule_config(
    architecture: str,
    d_model: int,
    n_latents: int,
    sparsity: int,
    *,
    n_seeds: int = 1,
    seed: int = 0,
    aux_coeff: float = 1 / 32,
) -> SAEConfig:
    """The zoo rule's SAEConfig on activations that training normalises (data_scale 1), with AuxK
    weight ``aux_coeff`` for the TopK family; the L1 family's coefficient is the uncalibrated one."""
    cfg = zoo_config(
        architecture,
        d_model=d_model,
        n_latents=n_latents,
        sparsity=sparsity,
        data_scale=1.0,
        n_seeds=n_seeds,
        seed=seed,
    )
    return replace(cfg, aux_coeff=aux_coeff) if architecture in K_FAMILY else cfg


@dataclass(frozen=True)
class ZooSpec:
    """One configuration of the zoo rule (``rule_config``) and its schedule: what ``zoo_runs`` trains; with
    ``calibrate``, an L1-family coefficient calibrated to L0 ≈ ``sparsity`` first."""

    architecture: str
    n_latents: int
    sparsity: int
    schedule: TrainConfig
    n_seeds: int = 1
    seed: int = 0
    aux_coeff: float = 1 / 32
    calibrate: bool = True

    def config(self, d_model: int) -> SAEConfig:
        return rule_config(
            self.architecture,
            d_model,
            self.n_latents,
            self.sparsity,
            n_seeds=self.n_seeds,
            seed=self.seed,
            aux_coeff=self.aux_coeff,
        )


def zoo_runs(
    rows: TrainingRows,
    specs: Sequence[ZooSpec],
    *,
    store: Store | None = None,
    pilot_seeds: int = 1,
    refinements: int = 2,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> list[ZooRun]:
    """Every spec trained from ``rows`` (``runs.rows``), in order; each of the L1 family with ``calibrate``
    first gets its L1 coefficient from pilot runs (same schedule without decoder snapshots, ``pilot_seeds``
    seeds from its seed). All calibrations advance together, one pilot each per round, and each round's
    pilots, then the final runs, go to ``rows`` at once: a stream trains them in lockstep."""
    if any(spec.calibrate for spec in specs) and (not isinstance(pilot_seeds, int) or pilot_seeds < 1):
        raise ValueError(f"pilot_seeds must be a positive integer, got {pilot_seeds!r}")
    kwargs: dict[str, Any] = dict(store=store, device=device, progress=progress)
    configs = [spec.config(rows.d_model) for spec in specs]
    calibrations: dict[int, L1Calibration] = {}
    probes = {
        i: l1_probes(spec.sparsity, refinements=refinements)
        for i, spec in enumerate(specs)
        if spec.calibrate and spec.architecture in L1_FAMILY
    }
    asks = {i: next(probe) for i, probe in probes.items()}
    while asks:
        pilots = [
            (
                replace(configs[i], l1_coeff=configs[i].l1_coeff * m, n_seeds=pilot_seeds),
                replace(specs[i].schedule, checkpoint_fractions=(), checkpoint_dir=None),
            )
            for i, m in asks.items()
        ]
        following = {}
        for i, pilot in zip(asks, rows.runs(pilots, **kwargs)):
            try:
                following[i] = probes[i].send(float(pilot.history["l0"][-1].mean()))
            except StopIteration as done:
                calibrations[i] = done.value
        asks = following
    configs = [
        replace(cfg, l1_coeff=cfg.l1_coeff * calibrations[i].multiplier) if i in calibrations else cfg
        for i, cfg in enumerate(configs)
    ]
    trained = rows.runs([(cfg, spec.schedule) for cfg, spec in zip(configs, specs)], **kwargs)
    return [ZooRun(run, cfg, calibrations.get(i)) for i, (run, cfg) in enumerate(zip(trained, configs))]


def zoo_run(
    rows,
    architecture: str,
    n_latents: int,
    sparsity: int,
    *,
    schedule: TrainConfig,
    eval_rows: int | None = None,
    store: Store | None = None,
    n_seeds: int = 1,
    seed: int = 0,
    aux_coeff: float = 1 / 32,
    calibrate: bool = True,
    pilot_seeds: int = 1,
    refinements: int = 2,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> ZooRun:
    """``architecture`` at target L0 ``sparsity`` (one ``zoo_runs`` spec) trained from ``rows``: ``TrainingRows``,
    or cached activations with ``eval_rows`` held out (see ``activation_run``)."""
    spec = ZooSpec(architecture, n_latents, sparsity, schedule, n_seeds, seed, aux_coeff, calibrate)
    [run] = zoo_runs(
        as_training_rows(rows, eval_rows),
        [spec],
        store=store,
        pilot_seeds=pilot_seeds,
        refinements=refinements,
        device=device,
        progress=progress,
    )
    return run
