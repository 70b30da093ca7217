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
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor

from paperlib.explain.contexts import TopContexts, top_contexts
from paperlib.runs.trained import TrainedRun, held_out_split
from paperlib.runs.zoo import rule_config, zoo_run
from paperlib.sae.bank import SAEConfig
from paperlib.sae.train import TrainConfig
from paperlib.sae.view import SAEView
from paperlib.sae.zoo_presets import ZOO, L1Calibration
from paperlib.stitching.path import StitchPath, interpolation_path
from paperlib.stitching.stitch import Insertion, Move, StitchConfig, insertion_effects
from paperlib.store import Store

_KINDS = ("swap", "insert", "remove", "bias")


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
    acts,
    config: FamilyConfig,
    schedule: TrainConfig,
    *,
    eval_rows: int,
    store: Store | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Family:
    """Every width of ``config`` trained on the training rows of ``acts`` (an ``Activations``, or any
    object with ``config``, ``d_model``, ``len`` and ``fp32(rows)``), through the store."""
    train_rows, _ = held_out_split(len(acts), eval_rows)
    trained = {
        w: zoo_run(
            acts,
            config.architecture,
            w,
            config.sparsity,
            schedule=config.schedule_for(w, schedule),
            eval_rows=eval_rows,
            store=store,
            n_seeds=config.n_seeds(w),
            seed=config.member_seed(w),
            aux_coeff=config.aux_coeff,
            calibrate=config.calibrate_l1,
            device=device,
            progress=progress,
        )
        for w in config.widths
    }
    window = min(train_rows.stop, schedule.steps * min(schedule.batch_size or train_rows.stop, train_rows.stop))
    return Family(
        config,
        {w: t.run for w, t in trained.items()},
        window,
        {w: t.calibration for w, t in trained.items() if t.calibration is not None},
    )


@dataclass(frozen=True)
class MemoryActivations:
    """Activations already in memory ([n_rows, d_model] float), for ``train_family`` on your own data
    and in tests. ``config`` (the cache key) is the name and the sha256 of the rows."""

    x: Tensor
    name: str = "in-memory"

    def __post_init__(self) -> None:
        if not isinstance(self.x, Tensor) or self.x.ndim != 2 or self.x.shape[0] < 2 or not self.x.is_floating_point():
            got = tuple(self.x.shape) if isinstance(self.x, Tensor) else type(self.x).__name__
            raise ValueError(f"MemoryActivations needs a float tensor [n_rows >= 2, d_model], got {got}")
        if not torch.isfinite(self.x).all():
            raise ValueError("MemoryActivations: x has NaN/Inf entries; clean or drop those rows first")

    @property
    def config(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.x.detach().float().cpu().numpy().tobytes()).hexdigest()
        return {"name": self.name, "shape": list(self.x.shape), "sha256": digest}

    @property
    def d_model(self) -> int:
        return self.x.shape[1]

    def __len__(self) -> int:
        return self.x.shape[0]

    def fp32(self, rows: slice | Tensor | None = None) -> Tensor:
        return (self.x if rows is None else self.x[rows]).float()


# ------------------------------------------------------------------------------ cached results
def _insertion_tensors(ins: Insertion) -> dict[str, Tensor]:
    return {"delta_mse": ins.delta_mse, "max_cos": ins.max_cos, "closest": ins.closest, "frequency": ins.frequency}


def _insertion(t: dict[str, Tensor], meta: dict) -> Insertion:
    return Insertion(t["delta_mse"], t["max_cos"], t["closest"], t["frequency"], meta["mse_small"], meta["mse_large"])


def _flat(groups: list[tuple[int, ...]]) -> tuple[Tensor, Tensor]:
    ptr = torch.tensor([0] + [len(g) for g in groups]).cumsum(0)
    return torch.tensor([i for g in groups for i in g], dtype=torch.long), ptr


def path_tensors(path: StitchPath) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """A ``StitchPath`` as (tensors, meta) for ``Store.cached``; ``path_from_tensors`` inverts it."""
    removed, removed_ptr = _flat([m.removed for m in path.moves])
    added, added_ptr = _flat([m.added for m in path.moves])
    tensors = {
        "n_latents": torch.as_tensor(path.n_latents),
        "mse": torch.as_tensor(path.mse),
        "l0": torch.as_tensor(path.l0),
        "delta": torch.as_tensor(path.delta),
        "violations": torch.as_tensor(path.violations, dtype=torch.long),
        "kind": torch.tensor([_KINDS.index(m.kind) for m in path.moves], dtype=torch.long),
        "removed": removed,
        "removed_ptr": removed_ptr,
        "added": added,
        "added_ptr": added_ptr,
        **{f"insertion.{k}": v for k, v in _insertion_tensors(path.insertion).items()},
    }
    meta = {
        "mse_small": path.mse_small,
        "mse_large": path.mse_large,
        "endpoint_error": path.endpoint_error,
        "sizes": list(path.sizes),
    }
    return tensors, meta


def path_from_tensors(t: dict[str, Tensor], meta: dict[str, Any]) -> StitchPath:
    def group(name: str, m: int) -> tuple[int, ...]:
        ptr = t[f"{name}_ptr"]
        return tuple(t[name][int(ptr[m]) : int(ptr[m + 1])].tolist())

    moves = tuple(Move(_KINDS[int(k)], group("removed", m), group("added", m)) for m, k in enumerate(t["kind"]))
    insertion = _insertion({k[len("insertion.") :]: v for k, v in t.items() if k.startswith("insertion.")}, meta)
    return StitchPath(
        t["n_latents"].numpy(),
        t["mse"].numpy(),
        t["l0"].numpy(),
        t["delta"].numpy(),
        moves,
        meta["mse_small"],
        meta["mse_large"],
        meta["endpoint_error"],
        t["violations"].numpy(),
        insertion,
        tuple(meta["sizes"]),
    )


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
        return _insertion_tensors(ins), {"mse_small": ins.mse_small, "mse_large": ins.mse_large}

    entry = store.cached("stitch-insertion", key, compute)
    return _insertion(entry.tensors, entry.meta)


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


def top_tokens(found: TopContexts, decode_row, *, n: int = 3) -> list[list[str]]:
    """Per latent of ``found`` (seed 0): its ``n`` most common activating tokens among its top rows,
    most common first (ties: stronger activation first). ``decode_row(row)`` gives a row's token."""
    out = []
    for rows in found.rows[0].tolist():
        counts: dict[str, int] = {}
        for row in rows:
            if row >= 0:
                token = decode_row(row).strip() or repr(decode_row(row))
                counts[token] = counts.get(token, 0) + 1
        out.append(sorted(counts, key=lambda t: -counts[t])[:n])  # sorted is stable: first seen wins ties
    return out


def novel_fraction(ins: Insertion, *, alive: Tensor | None = None) -> float:
    """Fraction of the large SAE's latents with ΔMSE < 0, over ``alive`` latents if given."""
    mask = torch.ones_like(ins.novel) if alive is None else alive
    if not mask.any():
        return float("nan")
    return float(ins.novel[mask].double().mean())


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Probability that a random positive has a higher ``score`` than a random negative (ties ½):
    how well a cheap score separates two classes (0.5 = chance)."""
    score, label = np.asarray(score, dtype=float), np.asarray(label, dtype=bool)
    if score.shape != label.shape or score.ndim != 1:
        raise ValueError(f"auc needs score and label of the same 1-D shape, got {score.shape} and {label.shape}")
    if label.all() or not label.any():
        return float("nan")
    ranks, n_pos = rankdata(score), int(label.sum())  # average ranks: ties count one half
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (len(label) - n_pos)))


def cross_seed_similarity(
    matches: list, pairs: list[tuple[int, int, float]], n_runs: int, n_latents: int
) -> np.ndarray:
    """Per run and latent [R, n]: the mean cosine of the latent's matched partners in the other runs
    (from ``consistency.pw_mcc``'s ``matches`` and ``pairs``; needs equal widths, so every latent is
    matched). Paper A's per-pair similarity, seen from each latent."""
    total, count = np.zeros((n_runs, n_latents)), np.zeros((n_runs, n_latents))
    for (i, j, _), m in zip(pairs, matches):
        for run, index in ((i, m.rows), (j, m.cols)):
            total[run, index] += m.similarity
            count[run, index] += 1
    if (count != n_runs - 1).any():
        raise ValueError("every latent must be matched in every pair (pass runs of equal width and no dead masks)")
    return total / count


def rank_correlation(
    x: np.ndarray, y: np.ndarray, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """Spearman's ρ of ``x`` and ``y`` and a percentile bootstrap interval (pairs resampled)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 3:
        raise ValueError(f"rank_correlation needs two 1-D arrays of the same length >= 3, got {x.shape} and {y.shape}")
    rng = np.random.default_rng(seed)
    rx, ry = rankdata(x), rankdata(y)
    rho = float(np.corrcoef(rx, ry)[0, 1])
    boots = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(x), len(x))
        boots.append(np.corrcoef(rankdata(x[pick]), rankdata(y[pick]))[0, 1])
    tail = (1 - level) / 2
    return rho, float(np.nanquantile(boots, tail)), float(np.nanquantile(boots, 1 - tail))


def partial_rank_correlation(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> float:
    """Spearman's ρ of ``x`` and ``y`` with ``z`` partialled out (the rank version of the first-order
    partial correlation): what is left of the association once both follow a common cause ``z``."""
    x, y, z = (np.asarray(v, dtype=float) for v in (x, y, z))
    if not x.shape == y.shape == z.shape or x.ndim != 1 or len(x) < 4:
        raise ValueError(
            f"partial_rank_correlation needs three 1-D arrays of the same length >= 4, got "
            f"{x.shape}, {y.shape}, {z.shape}"
        )
    r = np.corrcoef(np.stack([rankdata(x), rankdata(y), rankdata(z)]))
    rxy, rxz, ryz = r[0, 1], r[0, 2], r[1, 2]
    return float((rxy - rxz * ryz) / np.sqrt((1 - rxz**2) * (1 - ryz**2)))
