"""The training loop: every seed of a bank sees the same batches; Adam; metrics at a cadence.

Full-batch training (paper A's organism: all N samples every step) and mini-batch training (a
fresh random permutation of the rows each epoch, seeded) share one loop. At every ``log_every``
steps (and at the first and last step) the bank is evaluated on the evaluation rows and each
callback is called; their outputs become columns of the returned ``History``. A non-finite loss
stops training with the step and configuration in the message.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from paperlib.sae import SAEBank

Callback = Callable[[SAEBank], "float | np.ndarray | Tensor"]


@dataclass(frozen=True)
class TrainConfig:
    """``batch_size=None`` trains full-batch. ``eval_rows`` caps the rows used for logged metrics
    (``None``: all of them). ``chunk_size`` only bounds memory: results do not depend on it beyond
    float rounding."""

    steps: int
    lr: float = 1e-4
    batch_size: int | None = None
    log_every: int = 100
    seed: int = 0
    eval_rows: int | None = None
    chunk_size: int = 4096

    def __post_init__(self) -> None:
        for name in ("steps", "log_every", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("batch_size", "eval_rows"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"TrainConfig.{name} must be a positive integer or None, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr!r}")


@dataclass
class History:
    """Logged metrics: ``step`` [T]; per-seed metrics [T, S]; callback outputs [T, ...]."""

    columns: dict[str, np.ndarray]

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def final(self, name: str) -> np.ndarray:
        return self.columns[name][-1]


@torch.no_grad()
def evaluate(bank: SAEBank, x: Tensor, chunk_size: int = 4096) -> dict[str, np.ndarray]:
    """Per-seed loss parts on ``x``: mse (element mean), l1 and l0 (per-sample means), loss."""
    _, parts = bank.loss_and_grads(x, n_rows=x.shape[0], chunk_size=chunk_size)
    mse = parts["sq_err"] / (x.shape[0] * x.shape[1])
    l1 = parts["l1"] / x.shape[0]
    out = {"mse": mse, "l1": l1, "l0": parts["l0"] / x.shape[0], "loss": mse + bank.cfg.l1_coeff * l1}
    return {name: value.cpu().numpy() for name, value in out.items()}


def _check_data(x: Tensor, bank: SAEBank) -> None:
    if x.ndim != 2 or x.shape[1] != bank.cfg.d_model:
        raise ValueError(f"training data must be [n_rows, d_model={bank.cfg.d_model}], got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(f"training data has {bad} rows with NaN/Inf entries; clean or drop them first")


def _batches(n_rows: int, cfg: TrainConfig):
    """Row indices of each step's batch (None = all rows)."""
    if cfg.batch_size is None or cfg.batch_size >= n_rows:
        while True:
            yield None
    gen = torch.Generator().manual_seed(cfg.seed)
    while True:
        order = torch.randperm(n_rows, generator=gen)
        for start in range(0, n_rows - cfg.batch_size + 1, cfg.batch_size):
            yield order[start : start + cfg.batch_size]


def train(
    bank: SAEBank,
    x: Tensor,
    cfg: TrainConfig,
    callbacks: Mapping[str, Callback] | None = None,
    progress: bool = True,
) -> History:
    """Train every seed of ``bank`` on rows of ``x`` with Adam; returns the logged ``History``."""
    _check_data(x, bank)
    x = x.to(bank.W_dec.device, torch.float32)
    eval_x = x if cfg.eval_rows is None else x[: cfg.eval_rows]
    callbacks = dict(callbacks or {})
    optimizer = torch.optim.Adam(bank.parameters(), lr=cfg.lr)
    log: dict[str, list] = {"step": []}

    def record(step: int) -> None:
        log["step"].append(step)
        metrics = evaluate(bank, eval_x, cfg.chunk_size)
        metrics.update({name: np.asarray(_to_numpy(fn(bank))) for name, fn in callbacks.items()})
        for name, value in metrics.items():
            log.setdefault(name, []).append(value)
        if not np.isfinite(metrics["loss"]).all():
            _stop_non_finite(step, bank, metrics["loss"])

    batches = _batches(x.shape[0], cfg)
    record(0)
    for step in tqdm(range(1, cfg.steps + 1), disable=not progress, desc=bank.cfg.architecture, mininterval=2):
        rows = next(batches)
        batch = x if rows is None else x[rows.to(x.device)]
        grads, parts = bank.loss_and_grads(batch, n_rows=batch.shape[0], chunk_size=cfg.chunk_size)
        if not torch.isfinite(parts["sq_err"]).all():
            _stop_non_finite(step, bank, parts["sq_err"])
        for name, param in bank.named_parameters():
            param.grad = grads[name]
        optimizer.step()
        if step % cfg.log_every == 0 or step == cfg.steps:
            record(step)
    return History({name: np.stack(values) for name, values in log.items()})


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _stop_non_finite(step: int, bank: SAEBank, values) -> None:
    seeds = [i for i, v in enumerate(np.atleast_1d(_to_numpy(values))) if not math.isfinite(float(v))]
    raise FloatingPointError(
        f"non-finite loss at step {step} for seeds {seeds} of {bank.cfg}; "
        "lower the learning rate or check the data scale"
    )
