"""Trained SAE banks through the store: train a configuration once, reload it anywhere.

Notebooks that share SAEs (LLM consistency, explanations, stitching, meta-SAEs) ask for the same
``(data, sae, train)`` configuration and get the same bank back without retraining. An entry holds
the bank's whole state (parameters and buffers, so BatchTopK's threshold and dead-latent counters
survive), the logged history and the decoder snapshots at the checkpoint steps.

The data is passed lazily (a tensor or a function returning one) so a cache hit never touches it;
``data_key`` names the data in the cache key (an ``ActivationConfig``, an organism config, ...).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from paperlib.runtime import resolve_device
from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.train import Callback, TrainConfig, train
from paperlib.sources.massive import MASSIVE_NORM_FACTOR, checked_norm_factor, without_massive_rows
from paperlib.store import Store

_STATE, _HISTORY, _CHECKPOINT = "state.", "history.", "checkpoint."


@dataclass
class TrainedRun:
    """A trained bank (on CPU), its logged metrics [T, ...] and decoder snapshots {step: [S, n, d]}."""

    bank: SAEBank
    history: dict[str, np.ndarray]
    checkpoints: dict[int, Tensor]
    key: str  # the store key: a stable id of this run (e.g. for explanation caches)


def pack_run(bank: SAEBank, history, checkpoints: Mapping[int, Tensor]) -> dict[str, Tensor]:
    """A bank's state, its logged columns and decoder snapshots as the tensors of one store entry."""
    tensors = {_STATE + name: value for name, value in bank.state_dict().items()}
    tensors.update({_HISTORY + name: torch.as_tensor(np.asarray(value)) for name, value in history.items()})
    tensors.update({f"{_CHECKPOINT}{step}": value for step, value in checkpoints.items()})
    return tensors


def unpack_run(sae: SAEConfig, tensors: Mapping[str, Tensor], key: str) -> TrainedRun:
    """The run an entry written from ``pack_run`` holds, its bank rebuilt from ``sae``."""
    bank = SAEBank(sae)
    bank.load_state_dict({n[len(_STATE) :]: t for n, t in tensors.items() if n.startswith(_STATE)})
    history = {n[len(_HISTORY) :]: t.numpy() for n, t in tensors.items() if n.startswith(_HISTORY)}
    checkpoints = {int(n[len(_CHECKPOINT) :]): t for n, t in tensors.items() if n.startswith(_CHECKPOINT)}
    return TrainedRun(bank.requires_grad_(False), history, dict(sorted(checkpoints.items())), key)


def trained_bank(
    data: Tensor | Callable[[], Tensor],
    data_key: Any,
    sae: SAEConfig,
    schedule: TrainConfig,
    *,
    store: Store | None = None,
    namespace: str = "sae",
    callbacks: Mapping[str, Callback] | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
) -> TrainedRun:
    """The bank trained on ``data`` with ``schedule``, from the cache when it was trained before.

    ``callbacks`` are logged like ``train``'s; they are not part of the key, so a cached run keeps
    the columns it was first trained with. Training runs on ``device`` (default ``paperlib.device()``,
    see ``paperlib.sae.train``); the device type is part of the key (a GPU run rounds differently from a
    CPU one), and the bank comes back on the CPU."""
    target = resolve_device(device, "device")  # refused before any data is read, not mid-run
    store = store or Store()
    config = {"data": data_key, "sae": sae, "train": schedule, "device": target.type}
    key = store.path(namespace, config).name

    def compute():
        x = data() if callable(data) else data
        bank = SAEBank(sae)
        history = train(bank, x, schedule, callbacks=callbacks, progress=progress, device=target)
        return pack_run(bank.cpu(), history.columns, history.checkpoints), {"architecture": sae.architecture}

    entry = store.cached(namespace, config, compute)
    return unpack_run(sae, entry.tensors, key)


@torch.no_grad()
def firing_rates(bank: SAEBank, x: Tensor, *, chunk_size: int = 4096, dtype: torch.dtype = torch.float32) -> Tensor:
    """Fraction of the rows of ``x`` on which each latent fires, per seed [S, n_latents] (inference
    encoding, so BatchTopK uses its threshold), in ``dtype`` (float64: count / rows exactly rounded).
    Multiply by 1e6 for "per 1M tokens"."""
    counts = torch.zeros(bank.n_seeds, bank.cfg.n_latents, dtype=torch.float64)
    for start in range(0, x.shape[0], chunk_size):
        chunk = x[start : start + chunk_size].to(bank.W_dec.device, torch.float32)
        counts += (bank.encode(chunk) > 0).sum(1).cpu().double()
    return (counts / max(x.shape[0], 1)).to(dtype)


def held_out_split(n_rows: int, eval_rows: int) -> tuple[slice, slice]:
    """Training rows first, the last ``eval_rows`` held out. Activation rows are in context order,
    so the held-out rows come from contexts the SAE never saw."""
    if not isinstance(eval_rows, int) or not 0 < eval_rows < n_rows:
        raise ValueError(
            f"eval_rows must be an integer in 1..{n_rows - 1} (rows available: {n_rows}), got {eval_rows!r}"
        )
    return slice(0, n_rows - eval_rows), slice(n_rows - eval_rows, n_rows)


def activation_run(
    acts,
    sae: SAEConfig,
    schedule: TrainConfig,
    *,
    eval_rows: int,
    store: Store | None = None,
    max_norm_factor: float | None = MASSIVE_NORM_FACTOR,
    **kwargs,
) -> TrainedRun:
    """``trained_bank`` on the training rows of ``acts`` (a ``paperlib.sources.activations.Activations``),
    without the massive ones (``without_massive_rows``), keyed by the activation config, the split and
    that filter, so every notebook asking for the same SAE on the same activations shares one run."""
    train_rows, _ = held_out_split(len(acts), eval_rows)
    checked_norm_factor(max_norm_factor)  # refused before the cache is read
    key = {"activations": acts.config, "train_rows": train_rows.stop, "max_norm_factor": max_norm_factor}
    return trained_bank(
        lambda: without_massive_rows(acts.fp32(train_rows), factor=max_norm_factor),
        key,
        sae,
        schedule,
        store=store,
        namespace="llm-sae",
        **kwargs,
    )
