"""SAEs trained on a synthetic organism through the store, with both consistency curves logged.

The organism notebooks train a bank on an organism's samples and follow GT-MCC (against the known
dictionary) and PW-MCC (between the bank's seeds) during training. ``organism_run`` trains one such
configuration once and reloads it anywhere; its cache key is the organism, the SAE, the schedule,
the sign convention of the matchings and the device type (a GPU run rounds differently).
"""

from __future__ import annotations

import numpy as np
import torch

from paperlib.metrics.consistency import gt_mcc, pw_mcc
from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.train import TrainConfig, train
from paperlib.sources.organism import Organism, sample
from paperlib.store import Store


def organism_run(
    namespace: str,
    organism: Organism,
    sae: SAEConfig,
    schedule: TrainConfig,
    *,
    signed: bool = True,
    device: str,
    store: Store | None = None,
    progress: bool = False,
) -> dict[str, np.ndarray]:
    """Every logged column ([T, ...], with ``gt_mcc`` [T, seeds] and ``pw_mcc`` [T, pairs]), the final
    decoders ``W_dec`` [seeds, n, d] and the ``ground_truth`` [n_gt, d] of ``sae`` trained on
    ``organism``, under ``namespace`` in the store. ``device`` is resolved by the caller ("cpu", "cuda")."""
    store = store or Store()

    def compute():
        data = sample(organism)
        bank = SAEBank(sae)
        logged = {
            "gt_mcc": lambda b: gt_mcc(data.dictionary, b.decoder_directions(), signed=signed),
            "pw_mcc": lambda b: [p[2] for p in pw_mcc(b.decoder_directions(), signed=signed).pairs],
        }
        history = train(bank, data.x, schedule, device=device, progress=progress, callbacks=logged)
        tensors = {name: torch.as_tensor(values) for name, values in history.columns.items()}
        tensors["W_dec"] = bank.W_dec.detach().cpu()
        tensors["ground_truth"] = data.dictionary
        return tensors, {"organism": type(organism).__name__}

    config = {"organism": organism, "sae": sae, "train": schedule, "signed": signed, "device": device}
    entry = store.cached(namespace, config, compute)
    return {name: t.numpy() for name, t in entry.tensors.items()}
