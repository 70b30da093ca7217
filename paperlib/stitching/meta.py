"""Meta-SAEs (paper B): an SAE trained on the decoder directions of another SAE.

Every latent of an SAE contributes one training example, its unit-norm decoder direction; a small
BatchTopK SAE (the *meta-SAE*) learns to write each direction as a sparse sum of *meta-latents*. If
SAE latents were atomic, no such sparse structure would exist; paper B finds that meta-SAEs explain
≈55% of the variance of the directions with k = 4, and that meta-latents often resemble latents of
a smaller SAE (decoder cosine > 0.7) more than latents of an equally sized one.

Our choices where the paper is silent (``MetaSAEConfig``):

* architecture: ``paperlib.sae.bank``'s BatchTopK with unit-norm decoder rows and ``reconstruction="sum"``
  (the per-example squared error summed over dimensions: for unit-norm inputs this is Gao et al.'s
  normalised MSE, the scale AuxK's weight 1/16 is meant against); AuxK uses ``aux_k = d_model // 2``
  dead latents, and a meta-latent counts as dead after ``dead_batches`` = 5 batches without firing
  (as in Bussmann et al.'s BatchTopK code); decoder bias starts at zero.
* presets: ``paper()`` — width 2304 / 49152 · n (≈ n/21), k = 4, Adam lr 1e-3, 2000 steps of batch
  16384 (full batch when there are fewer directions), AuxK 1/16; ``saebench()`` — width n/4 and k = 4
  as in SAEBench's meta-SAE evaluation, the rest as ``paper()`` (SAEBench's other settings
  UNVERIFIED). No learning-rate warm-up or decay (not reported).
* inference: meta-latents fire above BatchTopK's learned threshold (a JumpReLU with one threshold), so
  the number per latent varies around k; ``batch=True`` uses training's top-(n·k) selection over
  all directions instead.
* variance explained: 1 − Σ‖x − x̂‖² / Σ‖x − x̄‖² over the unit directions x.
* resemblance: meta-latent decoder directions live in the model's activation space, so each is
  compared by cosine with the decoder directions of other SAEs (``compare_to_saes``).

Trained meta-SAEs are cached through ``paperlib.runs.trained.trained_bank``, keyed by the configuration and
the sha256 of the directions, so a notebook re-run never retrains.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from paperlib.runs.trained import trained_bank
from paperlib.sae.bank import SAEBank, SAEConfig
from paperlib.sae.train import TrainConfig
from paperlib.sae.view import SAEView
from paperlib.stitching.stitch import max_cosine
from paperlib.store import Store

PAPER_WIDTH_FRACTION = 2304 / 49152  # paper B: 2304 meta-latents for the 49152-latent SAE


@dataclass(frozen=True)
class MetaSAEConfig:
    """A meta-SAE's training (see the module docstring); width = ``width`` if given, else
    round(``width_fraction`` · n_latents)."""

    width_fraction: float = PAPER_WIDTH_FRACTION
    width: int | None = None
    k: int = 4
    lr: float = 1e-3
    aux_coeff: float = 1 / 16
    steps: int = 2000
    batch_size: int | None = 16384  # None: full batch
    dead_batches: int = 5
    seed: int = 0
    log_every: int = 200

    def __post_init__(self) -> None:
        if not 0 < self.width_fraction <= 1:
            raise ValueError(f"MetaSAEConfig.width_fraction must lie in (0, 1], got {self.width_fraction!r}")
        for name in ("k", "steps", "dead_batches", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"MetaSAEConfig.{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("width", "batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"MetaSAEConfig.{name} must be a positive integer or None, got {value!r}")
        if self.width is not None and self.k > self.width:
            raise ValueError(f"MetaSAEConfig.k={self.k} exceeds width={self.width}; lower k or widen the meta-SAE")
        if not self.lr > 0 or not self.aux_coeff >= 0:
            raise ValueError(f"MetaSAEConfig needs lr > 0 and aux_coeff >= 0, got {self.lr!r} and {self.aux_coeff!r}")

    @classmethod
    def paper(cls, **overrides) -> MetaSAEConfig:
        """Paper B's setting: width ≈ n/21, k = 4, lr 1e-3, AuxK 1/16, 2000 steps of batch 16384."""
        return cls(**overrides)

    @classmethod
    def saebench(cls, **overrides) -> MetaSAEConfig:
        """SAEBench's meta-SAE width (n/4, k = 4); training as in ``paper()``."""
        return cls(**{"width_fraction": 0.25, **overrides})

    def width_for(self, n_latents: int) -> int:
        width = self.width or round(self.width_fraction * n_latents)
        if self.k > width:
            raise ValueError(f"a meta-SAE of width {width} cannot have k={self.k}; lower k or widen it")
        return width

    def sae_config(self, n_latents: int, d_model: int) -> SAEConfig:
        rows = min(self.batch_size or n_latents, n_latents)
        return SAEConfig(
            "batchtopk",
            d_model=d_model,
            n_latents=self.width_for(n_latents),
            k=self.k,
            aux_coeff=self.aux_coeff,
            decoder="unit",
            reconstruction="sum",
            seed=self.seed,
            dead_tokens=self.dead_batches * rows,
        )

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            steps=self.steps,
            lr=self.lr,
            batch_size=self.batch_size,
            seed=self.seed,
            log_every=min(self.log_every, self.steps),
        )


def unit_directions(source: Tensor | SAEBank | SAEView, seed: int = 0) -> Tensor:
    """Unit-norm decoder directions [n, d] (float32) of an SAE (seed ``seed`` of a bank) or of a matrix."""
    if isinstance(source, SAEBank):
        if not 0 <= seed < source.n_seeds:
            raise IndexError(f"seed {seed} out of range for a bank of {source.n_seeds} seeds")
        source = source.W_dec.detach()[seed]
    elif isinstance(source, SAEView):
        source = source.W_dec
    if not isinstance(source, Tensor) or source.ndim != 2 or min(source.shape) == 0:
        shape = tuple(source.shape) if isinstance(source, Tensor) else type(source).__name__
        raise ValueError(f"decoder directions must be a non-empty [n_latents, d_model] tensor, got {shape}")
    w = source.detach().float().cpu()
    norms = w.norm(dim=1)
    bad = (~torch.isfinite(norms) | (norms == 0)).nonzero().flatten()
    if len(bad):
        raise ValueError(
            f"{len(bad)} decoder rows are zero or non-finite (first: {bad[:5].tolist()}); "
            "drop those latents (e.g. dead ones) before training a meta-SAE"
        )
    return w / norms[:, None]


@dataclass
class MetaSAE:
    """A trained meta-SAE: its bank (one seed), configuration, logged history and store key."""

    bank: SAEBank
    config: MetaSAEConfig
    history: dict[str, np.ndarray]
    key: str

    @property
    def directions(self) -> Tensor:
        """Meta-latent decoder directions [width, d_model] (unit norm)."""
        return self.bank.W_dec.detach()[0]

    @property
    def width(self) -> int:
        return self.bank.cfg.n_latents


def train_meta_sae(
    directions: Tensor | SAEBank | SAEView,
    *,
    config: MetaSAEConfig = MetaSAEConfig(),
    store: Store | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> MetaSAE:
    """Train (or load from the store) a meta-SAE on the unit decoder directions of ``directions``."""
    x = unit_directions(directions)
    digest = hashlib.sha256(x.numpy().tobytes()).hexdigest()
    run = trained_bank(
        x,
        {"directions_sha256": digest, "shape": list(x.shape)},
        config.sae_config(*x.shape),
        config.train_config(),
        store=store,
        namespace="meta-sae",
        device=device,
        progress=progress,
    )
    return MetaSAE(run.bank, config, run.history, run.key)


def _check(meta: MetaSAE, directions: Tensor | SAEBank | SAEView) -> Tensor:
    x = unit_directions(directions)
    if x.shape[1] != meta.bank.cfg.d_model:
        raise ValueError(
            f"directions have d_model={x.shape[1]} but the meta-SAE was trained on "
            f"d_model={meta.bank.cfg.d_model}; pass decoder directions of the same model"
        )
    return x


@torch.no_grad()
def meta_codes(
    meta: MetaSAE, directions: Tensor | SAEBank | SAEView, *, batch: bool = False, chunk_size: int = 8192
) -> Tensor:
    """Meta-latent codes [n, width] of each direction (``batch``: training's top-(n·k) selection)."""
    x = _check(meta, directions)
    if batch:
        return meta.bank.encode(x, training=True)[0]
    return torch.cat([meta.bank.encode(x[i : i + chunk_size])[0] for i in range(0, len(x), chunk_size)])


@torch.no_grad()
def variance_explained(meta: MetaSAE, directions: Tensor | SAEBank | SAEView, batch: bool = False) -> float:
    """Fraction of the variance of the unit directions the meta-SAE reconstructs (1 − FVU)."""
    x = _check(meta, directions).double()
    recon = meta.bank.decode(meta_codes(meta, directions, batch=batch)[None])[0].double()
    return float(1 - (x - recon).square().sum() / (x - x.mean(0)).square().sum())


def meta_latents_per_latent(meta: MetaSAE, directions: Tensor | SAEBank | SAEView, batch: bool = False) -> Tensor:
    """How many meta-latents fire for each latent [n] (paper B's k = 4 on average in training)."""
    return (meta_codes(meta, directions, batch=batch) > 0).sum(1)


def meta_latent_frequency(meta: MetaSAE, directions: Tensor | SAEBank | SAEView, batch: bool = False) -> Tensor:
    """Fraction of latents each meta-latent fires on [width] (paper B: the most frequent ≈ 2%)."""
    return (meta_codes(meta, directions, batch=batch) > 0).float().mean(0)


@dataclass(frozen=True)
class Decomposition:
    """For each requested latent: its meta-latents by decreasing weight ([L, top], -1 / 0 padded) and
    the cosine between the latent's direction and its meta-SAE reconstruction."""

    latents: Tensor
    meta_latents: Tensor
    weights: Tensor
    cosine: Tensor


def decompose(
    meta: MetaSAE,
    directions: Tensor | SAEBank | SAEView,
    latents: Sequence[int] | Tensor,
    *,
    top: int = 8,
    batch: bool = False,
) -> Decomposition:
    """The meta-latents each of ``latents`` is built from, with their weights (codes)."""
    x = _check(meta, directions)
    latents = torch.as_tensor(latents, dtype=torch.long).flatten()
    if len(latents) == 0 or latents.min() < 0 or latents.max() >= len(x):
        raise ValueError(f"latents must be indices in [0, {len(x)}), got {latents.tolist()[:10]}")
    if not isinstance(top, int) or top < 1:
        raise ValueError(f"top must be a positive integer, got {top!r}")
    codes = meta_codes(meta, x, batch=batch)[latents]
    weights, index = codes.topk(min(top, codes.shape[1]), dim=1)
    index = torch.where(weights > 0, index, -1)
    with torch.no_grad():
        recon = meta.bank.decode(codes[None])[0]
    cosine = torch.nn.functional.cosine_similarity(recon, x[latents], dim=1)
    return Decomposition(latents, index, weights.clamp_min(0), cosine)


@dataclass(frozen=True)
class Resemblance:
    """Each meta-latent's largest decoder cosine to one other SAE, which latent that is, and the
    fraction of meta-latents above ``threshold``."""

    max_cos: Tensor
    closest: Tensor
    threshold: float

    @property
    def fraction_above(self) -> float:
        return float((self.max_cos > self.threshold).float().mean())


def compare_to_saes(
    meta: MetaSAE, others: Mapping[str, Tensor | SAEBank | SAEView], threshold: float = 0.7
) -> dict[str, Resemblance]:
    """For each named SAE: how closely its latents resemble the meta-latents (paper B: often a
    smaller SAE's latents, cosine > 0.7, more than an equally sized SAE's)."""
    if not -1 <= threshold <= 1:
        raise ValueError(f"threshold is a cosine and must lie in [-1, 1], got {threshold!r}")
    out = {}
    for name, sae in others.items():
        w = unit_directions(sae)
        if w.shape[1] != meta.bank.cfg.d_model:
            raise ValueError(
                f"SAE {name!r} has d_model={w.shape[1]}, the meta-SAE d_model={meta.bank.cfg.d_model}; "
                "compare SAEs of the same model"
            )
        values, index = max_cosine(meta.directions, w)
        out[name] = Resemblance(values, index, threshold)
    return out
