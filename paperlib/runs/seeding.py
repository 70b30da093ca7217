"""Stability against stabilization: which source of randomness differs between the runs compared.

Brzozowski & Chung (2026) show that a published stability gain came from giving every run the same
initialisation, and separate *stability* (independently started runs agree) from *stabilization*
(runs from one start end up alike). Every bank in this companion varies the initialisation and
shares the data order: seed i of a bank starts from the decoder drawn with ``SAEConfig.seed + i``
and all seeds see the same batches (``paperlib.sae.train``). ``seeded_runs`` trains R runs of one
configuration that differ in one chosen way, so a reader sees how much PW-MCC each source leaves:

* ``"init"``  — independent initialisations, one batch order (ours; one bank of R seeds);
* ``"order"`` — one initialisation, independent batch orders (R banks of one seed);
* ``"both"``  — independent initialisations and batch orders.

Run 0 is the same (initialisation ``SAEConfig.seed``, order ``TrainConfig.seed``) in every arm; run i
adds i to the seed that varies. Runs are stored runs (``paperlib.runs.trained.trained_bank``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

import torch
from torch import Tensor

from paperlib.runs.trained import trained_bank
from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.train import TrainConfig
from paperlib.store import Store

Varied = Literal["init", "order", "both"]
VARIED: tuple[Varied, ...] = ("init", "order", "both")


def seeded_runs(
    data,
    data_key: Any,
    sae: SAEConfig,
    schedule: TrainConfig,
    *,
    n_runs: int,
    vary: Varied,
    store: Store | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> list[SAEBank]:
    """``n_runs`` trained single-seed banks of ``sae`` (its ``n_seeds`` is set here) that differ in
    what ``vary`` names; ``data``, ``data_key``, ``store`` and ``device`` as in ``trained_bank``."""
    if vary not in VARIED:
        raise ValueError(f"vary must be one of {', '.join(VARIED)} (what differs between the runs), got {vary!r}")
    if not isinstance(n_runs, int) or isinstance(n_runs, bool) or n_runs < 2:
        raise ValueError(f"n_runs must be an integer >= 2 (runs to compare), got {n_runs!r}")
    if vary == "init":
        bank = trained_bank(
            data, data_key, replace(sae, n_seeds=n_runs), schedule, store=store, device=device, progress=progress
        ).bank
        return [bank.seed(i) for i in range(n_runs)]
    runs = []
    for i in range(n_runs):
        single = replace(sae, n_seeds=1, seed=sae.seed + (i if vary == "both" else 0))
        runs.append(
            trained_bank(
                data,
                data_key,
                single,
                replace(schedule, seed=schedule.seed + i),
                store=store,
                device=device,
                progress=progress,
            ).bank
        )
    return runs


def decoders(runs: list[SAEBank]) -> Tensor:
    """The runs' decoder rows stacked [R, n, d], as ``pw_mcc`` takes them."""
    return torch.cat([run.decoder_directions() for run in runs])
