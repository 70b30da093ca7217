"""A family of SAEs of growing width on one activation set, and the cached results built on it.

Paper B's stitching and meta-SAEs need SAEs of several widths trained alike (GPT-2 small, widths
768·2^i). Notebooks 08-10 share one family through the store: ``train_family`` trains each width
with ``paperlib.runs.trained.activation_run`` (so a run notebook 06 already trained is a cache hit), and
``cached_path`` / ``cached_insertion`` / ``cached_top_contexts`` keep the expensive results, keyed
by the runs' store keys, so a re-run only replots.

Our rules where the papers are silent (``FamilyConfig``):

* every width follows notebook 06's zoo rule (``paperlib.runs.zoo``: k = target L0 for the TopK
  family; the ReLU family's L1 calibrated on pilot runs until L0 ≈ the target) with one target L0
  for the whole family. Paper B used one L1 coefficient for all its widths, whose L0 then grows with
  width; ``calibrate_l1=False`` does the same (the rule's coefficient at every width: L0 ≈ 7x the
  target at 2304 latents, measured). Matching L0 keeps the widths comparable; it does not make the
  wide ReLU SAEs trained — on the default schedule their decoder rows stay near their random start
  either way (cosine 0.88 uncalibrated, 0.95 calibrated at 2304: notebook 08). AuxK (``aux_coeff``)
  for the TopK family as in 06;
* **distinct seeds per width.** ``SAEBank`` draws its initial decoder as ``randn(n, d)`` from the
  seed, so two widths with the same seed start with identical first rows: the smaller SAE's whole
  initial dictionary is a prefix of the larger one's. That would inflate the max cosine between
  family members (and call latents "reconstruction" because they started equal), so width i trains
  from seed ``seed + 100·(i + 1)``, except ``bridge_width``, which trains ``bridge_seeds`` seeds
  from ``seed`` (seeds 42, 43, 44 = notebook 06's run);
* the training schedule is one ``TrainConfig`` for all widths (``runs.zoo.llm_schedule``, 06's); the
  log-spaced decoder snapshots are kept only for the multi-seed bridge bank (06's PW-MCC over
  training uses them, and they must be in the key for a cache hit); single-seed members drop them
  (16 snapshots of a 4608-latent decoder would be 170 MB of cache no figure reads).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from paperlib.explain.contexts import TopContexts, top_contexts
from paperlib.runs.trained import TrainedRun
from paperlib.runs.rows import as_training_rows
from paperlib.runs.zoo import ZooSpec, rule_config, zoo_runs
from paperlib.sae.bank import SAEConfig
from paperlib.sae.train import TrainConfig
from paperlib.sae.view import SAEView
from paperlib.sae.zoo_presets import ZOO, L1Calibration
from paperlib.stitching.path import StitchPath, interpolation_path, path_from_tensors, path_tensors
from paperlib.stitching.stitch import (
    Insertion,
    StitchConfig,
    insertion_effects,
    insertion_from_tensors,
    insertion_tensors,
)
from paperlib.store import Store


@dataclass(frozen=True)
class FamilyConfig:
    """SAEs of one ``architecture`` at increasing ``widths`` with target L0 ``sparsity`` (see the
    module docstring for the seed rule)."""

    architecture: str
    widths: tuple[int, ...]
    sparsity: int = 32
    seed: int = 42
    bridge_width: int | None = None
    bridge_seeds: int = 3
    aux_coeff: float = 1 / 32  # TopK family only (06's AuxK weight); ignored for the others
    calibrate_l1: bool = True  # ReLU family only: L1 calibrated to L0 ≈ sparsity per width (module docstring)

    def __post_init__(self) -> None:
        if self.architecture not in ZOO:
            raise ValueError(f"FamilyConfig.architecture {self.architecture!r} is not in the zoo; choose one of {ZOO}")
        widths = tuple(self.widths)
        if (
            len(widths) < 2
            or any(not isinstance(w, int) or isinstance(w, bool) for w in widths)
            or any(b <= a for a, b in zip(widths, widths[1:]))
        ):
            raise ValueError(f"FamilyConfig.widths must be at least two increasing integers, got {self.widths!r}")
        object.__setattr__(self, "widths", widths)
        if not isinstance(self.sparsity, int) or not 1 <= self.sparsity <= widths[0]:
            raise ValueError(
                f"FamilyConfig.sparsity must be an integer target L0 in 1..{widths[0]} (the smallest "
                f"width), got {self.sparsity!r}"
            )
        if self.bridge_width is not None and self.bridge_width not in widths:
            raise ValueError(f"FamilyConfig.bridge_width={self.bridge_width} is not one of the widths {widths}")
        if not isinstance(self.bridge_seeds, int) or self.bridge_seeds < 1:
            raise ValueError(f"FamilyConfig.bridge_seeds must be a positive integer, got {self.bridge_seeds!r}")
        if not self.aux_coeff >= 0:
            raise ValueError(f"FamilyConfig.aux_coeff must be >= 0, got {self.aux_coeff!r}")

    def n_seeds(self, width: int) -> int:
        return self.bridge_seeds if width == self.bridge_width else 1

    def member_seed(self, width: int) -> int:
        """The first seed of ``width``'s bank: ``seed`` at the bridge width, else seed + 100·(i + 1)."""
        self._index(width)
        return self.seed if width == self.bridge_width else self.seed + 100 * (self.widths.index(width) + 1)

    def sae_config(self, width: int, d_model: int) -> SAEConfig:
        """06's rule at this width before any L1 calibration (its initial weights are the run's)."""
        return rule_config(
            self.architecture,
            d_model,
            width,
            self.sparsity,
            n_seeds=self.n_seeds(width),
            seed=self.member_seed(width),
            aux_coeff=self.aux_coeff,
        )

    def schedule_for(self, width: int, schedule: TrainConfig) -> TrainConfig:
        """``schedule``, without decoder snapshots unless ``width`` is a multi-seed bank."""
        return schedule if self.n_seeds(width) > 1 else replace(schedule, checkpoint_fractions=())

    def _index(self, width: int) -> int:
        if width not in self.widths:
            raise KeyError(f"width {width} is not in the family {self.widths}")
        return self.widths.index(width)


@dataclass
class Family:
    """Trained banks per width (``runs``), the config, ``window``: the training tokens of the last
    epoch (or of the whole run, if shorter), over which a latent must fire to count as alive, and the
    L1 calibration of each width (ReLU family; empty otherwise)."""

    config: FamilyConfig
    runs: dict[int, TrainedRun]
    window: int
    calibrations: dict[int, L1Calibration] = field(default_factory=dict)

    @property
    def widths(self) -> tuple[int, ...]:
        return self.config.widths

    def run(self, width: int) -> TrainedRun:
        self.config._index(width)
        return self.runs[width]

    def view(self, width: int, seed: int = 0) -> SAEView:
        """Seed index ``seed`` of ``width``'s bank as an ``SAEView`` (codes of raw activations)."""
        bank = self.run(width).bank
        if not 0 <= seed < bank.n_seeds:
            raise IndexError(f"width {width} has {bank.n_seeds} seeds; seed index {seed} is out of range")
        return SAEView.from_bank(bank, seed, name=f"{self.config.architecture} {width}")

    def ref(self, width: int, seed: int = 0) -> dict[str, Any]:
        """What identifies one SAE of the family in a cache key: its run's store key and seed index."""
        self.view(width, seed)  # validates
        return {"run": self.runs[width].key, "seed": seed}

    def alive(self, width: int, seed: int = 0) -> Tensor:
        """Latents that fired during the last ``window`` training tokens [n] bool (a latent that never
        fires keeps a decoder row that says little about the data)."""
        if not 0 <= seed < self.run(width).bank.n_seeds:
            raise IndexError(
                f"width {width} has {self.runs[width].bank.n_seeds} seeds; seed index {seed} is out of range"
            )
        return self.runs[width].bank.tokens_since_fired[seed] < self.window


def train_family(
    rows,
    config: FamilyConfig,
    schedule: TrainConfig,
    *,
    eval_rows: int | None = None,
    store: Store | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Family:
    """Every width of ``config`` trained from ``rows`` (``runs.rows.TrainingRows``, or cached activations with
    ``eval_rows`` held out) through the store (``train_families`` of one family)."""
    [family] = train_families(
        rows, [config], schedule, eval_rows=eval_rows, store=store, device=device, progress=progress
    )
    return family


def train_families(
    rows,
    configs: Sequence[FamilyConfig],
    schedule: TrainConfig,
    *,
    eval_rows: int | None = None,
    store: Store | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> list[Family]:
    """Every width of every family in ``configs``, all in one ``zoo_runs`` call: from a stream, every SAE of
    every family in lockstep (paper B's widths from one pass of the LLM)."""
    rows = as_training_rows(rows, eval_rows)
    specs = [
        ZooSpec(
            config.architecture,
            w,
            config.sparsity,
            config.schedule_for(w, schedule),
            config.n_seeds(w),
            config.member_seed(w),
            config.aux_coeff,
            config.calibrate_l1,
        )
        for config in configs
        for w in config.widths
    ]
    zoo = iter(zoo_runs(rows, specs, store=store, device=device, progress=progress))
    seen = schedule.steps * (schedule.batch_size or rows.pass_rows or 0)
    window = seen if rows.pass_rows is None else min(rows.pass_rows, seen)
    families = []
    for config in configs:
        trained = {w: next(zoo) for w in config.widths}
        calibrations = {w: t.calibration for w, t in trained.items() if t.calibration is not None}
        families.append(Family(config, {w: t.run for w, t in trained.items()}, window, calibrations))
    return families


def cached_path(
    small: SAEView,
    large: SAEView,
    x: Tensor,
    key: dict[str, Any],
    *,
    config: StitchConfig = StitchConfig(),
    store: Store | None = None,
) -> StitchPath:
    """``interpolation_path(small, large, x, config)`` through the store. ``key`` must identify both
    SAEs and the rows ``x`` (e.g. ``{"small": family.ref(w), "large": family.ref(2 * w), "data": ...}``)."""
    store = store or Store()
    entry = store.cached(
        "stitch-path",
        {**key, "config": config},
        lambda: path_tensors(interpolation_path(small, large, x, config=config)),
    )
    return path_from_tensors(entry.tensors, entry.meta)


def cached_insertion(
    small: SAEView, large: SAEView, x: Tensor, key: dict[str, Any], *, store: Store | None = None
) -> Insertion:
    """``insertion_effects(small, large, x)`` through the store (``key`` as for ``cached_path``)."""
    store = store or Store()

    def compute():
        ins = insertion_effects(small, large, x)
        return insertion_tensors(ins), {"mse_small": ins.mse_small, "mse_large": ins.mse_large}

    entry = store.cached("stitch-insertion", key, compute)
    return insertion_from_tensors(entry.tensors, entry.meta)


def cached_top_contexts(
    sae: SAEView,
    x: Tensor,
    key: dict[str, Any],
    *,
    latents: Tensor | None = None,
    n_top: int = 10,
    store: Store | None = None,
) -> TopContexts:
    """Top-activating rows of ``latents`` (default: all) of ``sae`` on ``x``, through the store."""
    store = store or Store()
    latents = torch.arange(sae.n_latents) if latents is None else torch.as_tensor(latents, dtype=torch.long)
    config = {**key, "latents_sha256": hashlib.sha256(latents.numpy().tobytes()).hexdigest(), "n_top": n_top}

    def compute():
        found = top_contexts(sae.encode, x, latents, n_top=n_top, n_quantile=0, reservoir=1)
        return found.tensors(), {"n_rows": found.n_rows}

    entry = store.cached("top-contexts", config, compute)
    return TopContexts.from_tensors(entry.tensors, entry.meta["n_rows"])
