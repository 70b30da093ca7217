"""Zoo SAEs on cached activations at a target L0, with the L1 family calibrated to that target.

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

from dataclasses import dataclass, replace
from typing import Any

import torch

from paperlib.runs.trained import TrainedRun, activation_run
from paperlib.sae.bank import SAEConfig
from paperlib.sae.train import PAPER_CHECKPOINTS, TrainConfig
from paperlib.sae.zoo_presets import K_FAMILY, L1_FAMILY, L1Calibration, calibrate_l1, zoo_config
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


def zoo_run(
    acts,
    architecture: str,
    n_latents: int,
    sparsity: int,
    *,
    schedule: TrainConfig,
    eval_rows: int,
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
    """``architecture`` at target L0 ``sparsity`` trained on ``acts`` (see ``activation_run``); for
    the L1 family with ``calibrate``, its L1 coefficient first calibrated on pilot runs (same
    schedule without decoder snapshots, ``pilot_seeds`` seeds from ``seed``)."""
    cfg = rule_config(architecture, acts.d_model, n_latents, sparsity, n_seeds=n_seeds, seed=seed, aux_coeff=aux_coeff)
    kwargs: dict[str, Any] = dict(device=device, progress=progress)
    calibration = None
    if calibrate and architecture in L1_FAMILY:
        if not isinstance(pilot_seeds, int) or pilot_seeds < 1:
            raise ValueError(f"pilot_seeds must be a positive integer, got {pilot_seeds!r}")
        pilot_schedule = replace(schedule, checkpoint_fractions=(), checkpoint_dir=None)

        def pilot_l0(multiplier: float) -> float:
            pilot = replace(cfg, l1_coeff=cfg.l1_coeff * multiplier, n_seeds=pilot_seeds)
            run = activation_run(acts, pilot, pilot_schedule, eval_rows=eval_rows, store=store, **kwargs)
            return float(run.history["l0"][-1].mean())

        calibration = calibrate_l1(pilot_l0, sparsity, refinements=refinements)
        cfg = replace(cfg, l1_coeff=cfg.l1_coeff * calibration.multiplier)
    return ZooRun(activation_run(acts, cfg, schedule, eval_rows=eval_rows, store=store, **kwargs), cfg, calibration)
