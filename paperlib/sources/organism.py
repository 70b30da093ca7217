"""Synthetic model organisms: data with a known ground-truth dictionary.

Every organism draws ``n_gt`` unit-norm Gaussian atoms in R^d (the dictionary), switches on exactly
``s`` features per sample with half-normal magnitudes |N(0, 1)|, and observes x = codes @ dictionary
(+ optional isotropic Gaussian noise ``noise_std``). They differ in how often each feature fires:

* ``UniformOrganism`` — paper A's base organism: a uniformly random s-subset per sample, so every
  feature fires with probability s / n_gt. Matches the authors' released generator in distribution
  (not bit for bit: we draw with torch, they used numpy).
* ``ZipfianOrganism`` — paper A's Zipfian organism: the features form ``n_groups`` equal groups
  (contiguous indices, group 0 the most frequent) and a feature of group g fires with probability
  p_g ∝ (g + 1)^(-beta), scaled so that the probabilities sum to s.
* ``TwoPhaseZipfOrganism`` — paper A's "two-phase" Zipfian organism (n_gt = 5000 → n_sae = 1000):
  feature r (rank r + 1) fires with probability ∝ rank^(-beta_head) up to ``break_rank`` and
  ∝ rank^(-beta_tail) beyond, continuous at the break — the two regimes of word frequencies
  (Ferrer i Cancho & Solé 2001), which the paper's token rank-frequency plot motivates.
* ``PlantedSubspaceOrganism`` — not paper A's: the uniform organism plus one planted subspace of rank
  ``rank`` that is switched on in a fraction ``probability`` of the samples and then adds an isotropic
  Gaussian vector inside its span. Every orthonormal basis of the span explains the data equally well,
  so the span is identifiable and no direction within it is: the basis ambiguity under which
  Gerasimov et al. (2026) find individually unstable latents spanning reproducible subspaces.

The authors' released code (synthetic/generate_data.py) implements only the uniform organism; its
Zipfian branch raises NotImplementedError. The Zipfian definitions above are therefore our reading
of the paper's text (10 groups, beta = 1; two phases of a Zipf law), stated as such in notebooks 04 and 05.

Exact sparsity *and* exact feature probabilities come from a fixed-size sampling design
(``paperlib.sources.fixed_size``): group counts by randomised systematic sampling, members uniformly
within the group. ``correlation`` > 0 (uniform and Zipfian organisms) makes features of one
cluster (``cluster_size`` consecutive features inside a group) fire together through a shared
Gaussian score factor, without changing any feature's probability or the exact sparsity.

``sample(cfg)`` dispatches on the config type. ``OrganismData.codes`` is dense [n_samples, n_gt]
except for the two-phase organism, where it is a sparse COO tensor (dense would be N × 5000
floats); ``active`` / ``magnitudes`` hold the same codes compactly for every organism.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from paperlib.sources.fixed_size import check_probabilities, select_members, systematic_sample


def _validate(cfg, owner: str) -> None:
    for name in ("d", "n_gt", "s", "n_samples"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")
    if cfg.s > cfg.n_gt:
        raise ValueError(
            f"{owner}.s={cfg.s} active features per sample exceeds n_gt={cfg.n_gt} features; lower s or raise n_gt"
        )
    if not cfg.noise_std >= 0 or not math.isfinite(cfg.noise_std):
        raise ValueError(f"{owner}.noise_std must be a finite number >= 0, got {cfg.noise_std!r}")
    if not isinstance(cfg.seed, int):
        raise ValueError(f"{owner}.seed must be an integer, got {cfg.seed!r}")


def _validate_clusters(cfg, owner: str, group_size: int) -> None:
    if not 0 <= cfg.correlation < 1:
        raise ValueError(f"{owner}.correlation must be in [0, 1), got {cfg.correlation!r}")
    if not isinstance(cfg.cluster_size, int) or cfg.cluster_size < 1:
        raise ValueError(f"{owner}.cluster_size must be a positive integer, got {cfg.cluster_size!r}")
    if cfg.correlation > 0 and group_size % cfg.cluster_size:
        raise ValueError(
            f"{owner}.cluster_size={cfg.cluster_size} must divide the group size {group_size} when correlation > 0 "
            "(equal clusters keep every feature's probability exact); pick a divisor"
        )


@dataclass(frozen=True)
class UniformOrganism:
    """Configuration of the uniform organism (defaults: the authors' released setting)."""

    d: int = 16
    n_gt: int = 32
    s: int = 3
    n_samples: int = 50_000
    noise_std: float = 0.0
    seed: int = 42
    correlation: float = 0.0  # shared score factor within clusters; 0: independent features
    cluster_size: int = 2

    def __post_init__(self) -> None:
        _validate(self, "UniformOrganism")
        _validate_clusters(self, "UniformOrganism", self.n_gt)


@dataclass(frozen=True)
class ZipfianOrganism:
    """Zipfian groups: feature of group g fires with probability ∝ (g + 1)^(-beta), sum = s.

    Defaults: paper A's Zipfian setting (n_gt = 800, 10 groups, beta = 1, s = 8); d = 400 is our
    choice (the paper does not state it; n_gt / 2 as in the authors' released d = 16, n_gt = 32)."""

    d: int = 400
    n_gt: int = 800
    s: int = 8
    n_groups: int = 10
    beta: float = 1.0
    n_samples: int = 50_000
    noise_std: float = 0.0
    seed: int = 42
    correlation: float = 0.0
    cluster_size: int = 2

    def __post_init__(self) -> None:
        _validate(self, "ZipfianOrganism")
        if not isinstance(self.n_groups, int) or not 1 <= self.n_groups <= self.n_gt:
            raise ValueError(
                f"ZipfianOrganism.n_groups must be an integer in [1, n_gt={self.n_gt}], got {self.n_groups!r}"
            )
        if self.n_gt % self.n_groups:
            raise ValueError(
                f"ZipfianOrganism.n_groups={self.n_groups} must divide n_gt={self.n_gt} (equal groups); pick a divisor"
            )
        if not math.isfinite(self.beta) or self.beta < 0:
            raise ValueError(f"ZipfianOrganism.beta must be a finite number >= 0, got {self.beta!r}")
        _validate_clusters(self, "ZipfianOrganism", self.n_gt // self.n_groups)
        check_probabilities(self.probability(), self.s, "ZipfianOrganism")

    def group(self) -> torch.Tensor:
        """[n_gt] group of each feature (0 = most frequent)."""
        return torch.arange(self.n_gt) // (self.n_gt // self.n_groups)

    def group_probability(self) -> torch.Tensor:
        """[n_groups] firing probability of one feature of each group (float64)."""
        weight = torch.arange(1, self.n_groups + 1, dtype=torch.float64) ** -self.beta
        return self.s * weight / (weight.sum() * (self.n_gt // self.n_groups))

    def probability(self) -> torch.Tensor:
        """[n_gt] firing probability of each feature (float64); sums to s."""
        return self.group_probability()[self.group()]


@dataclass(frozen=True)
class TwoPhaseZipfOrganism:
    """Two-phase Zipf law over individual features: rank^(-beta_head) up to ``break_rank``, then
    rank^(-beta_tail), continuous at the break; probabilities sum to s.

    Defaults: n_gt = 5000 (paper A); the exponents (1 then 2, the two regimes of word frequencies),
    the break at rank 1000 (= the paper's n_sae, so the SAE can afford one latent per head
    feature), s = 4 (keeps the most frequent feature below p = 0.5) and d = 256 are our choices."""

    d: int = 256
    n_gt: int = 5000
    s: int = 4
    beta_head: float = 1.0
    beta_tail: float = 2.0
    break_rank: int = 1000
    n_samples: int = 50_000
    noise_std: float = 0.0
    seed: int = 42

    def __post_init__(self) -> None:
        _validate(self, "TwoPhaseZipfOrganism")
        for name in ("beta_head", "beta_tail"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"TwoPhaseZipfOrganism.{name} must be a finite number >= 0, got {value!r}")
        if not isinstance(self.break_rank, int) or not 1 <= self.break_rank <= self.n_gt:
            raise ValueError(
                f"TwoPhaseZipfOrganism.break_rank must be an integer in [1, n_gt={self.n_gt}], got {self.break_rank!r}"
            )
        check_probabilities(self.probability(), self.s, "TwoPhaseZipfOrganism")

    def group(self) -> torch.Tensor:
        """[n_gt] phase of each feature: 0 = head (rank <= break_rank), 1 = tail."""
        return (torch.arange(1, self.n_gt + 1) > self.break_rank).long()

    def probability(self) -> torch.Tensor:
        """[n_gt] firing probability of each feature (float64, decreasing with the index); sums to s."""
        rank = torch.arange(1, self.n_gt + 1, dtype=torch.float64)
        head = rank**-self.beta_head
        tail = self.break_rank**-self.beta_head * (rank / self.break_rank) ** -self.beta_tail
        weight = torch.where(rank <= self.break_rank, head, tail)
        return self.s * weight / weight.sum()


@dataclass(frozen=True)
class PlantedSubspaceOrganism:
    """The uniform organism (d, n_gt, s, n_samples, seed) plus a planted subspace of rank ``rank``,
    active in a fraction ``probability`` of the samples with coefficients N(0, I_rank) in an orthonormal
    basis, so each active sample gets E‖v‖² = rank. Defaults are ours (notebook 12)."""

    d: int = 64
    n_gt: int = 48
    s: int = 3
    rank: int = 4
    probability: float = 0.3
    n_samples: int = 50_000
    noise_std: float = 0.0
    seed: int = 42

    def __post_init__(self) -> None:
        _validate(self, "PlantedSubspaceOrganism")
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or not 1 <= self.rank < self.d:
            raise ValueError(f"PlantedSubspaceOrganism.rank must be an integer in [1, d={self.d}), got {self.rank!r}")
        if not (isinstance(self.probability, (int, float)) and 0 < self.probability <= 1):
            raise ValueError(f"PlantedSubspaceOrganism.probability must be in (0, 1], got {self.probability!r}")

    def base(self) -> UniformOrganism:
        """The uniform organism underneath (noise is added once, after the subspace)."""
        return UniformOrganism(d=self.d, n_gt=self.n_gt, s=self.s, n_samples=self.n_samples, seed=self.seed)


Organism = UniformOrganism | ZipfianOrganism | TwoPhaseZipfOrganism | PlantedSubspaceOrganism


@dataclass(frozen=True)
class OrganismData:
    """Samples of an organism with their ground truth.

    ``group`` and ``probability`` are None for the uniform organism (every feature alike);
    ``cluster`` is set only when features are correlated."""

    dictionary: torch.Tensor  # [n_gt, d], unit rows
    codes: torch.Tensor  # [n_samples, n_gt], non-negative, exactly s non-zeros per row (sparse COO: two-phase)
    x: torch.Tensor  # [n_samples, d]
    group: torch.Tensor | None = None  # [n_gt] int64
    probability: torch.Tensor | None = None  # [n_gt] float64, each feature's firing probability
    active: torch.Tensor | None = None  # [n_samples, s] int64, sorted active features per sample
    magnitudes: torch.Tensor | None = None  # [n_samples, s], the codes of ``active``
    cluster: torch.Tensor | None = None  # [n_gt] int64 cluster ids of correlated features
    subspace: torch.Tensor | None = None  # [rank, d] orthonormal basis of a planted subspace (not in ``codes``)
    subspace_codes: torch.Tensor | None = None  # [n_samples, rank] its coefficients (zero rows: switched off)

    def firing_rate(self) -> torch.Tensor:
        """[n_gt] empirical fraction of samples in which each feature is active."""
        n, n_gt = self.codes.shape
        if self.active is not None:
            return torch.bincount(self.active.flatten(), minlength=n_gt).double() / n
        return (self.codes != 0).double().mean(dim=0)


def unit_gaussian_dictionary(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` independent directions drawn uniformly on the unit sphere of R^d."""
    atoms = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return (atoms / atoms.norm(dim=1, keepdim=True)).float()


def _clusters(n_gt: int, cfg) -> torch.Tensor | None:
    return torch.arange(n_gt) // cfg.cluster_size if cfg.correlation > 0 else None


def _observe(cfg, gen: torch.Generator, dictionary: torch.Tensor, active: torch.Tensor, dense: bool, **extra):
    """Magnitudes, codes and observations for the chosen ``active`` features (then noise)."""
    magnitudes = torch.randn(active.shape, generator=gen).abs()
    if dense:
        codes = torch.zeros(cfg.n_samples, cfg.n_gt).scatter_(1, active, magnitudes)
        x = codes @ dictionary
    else:
        rows = torch.arange(cfg.n_samples).repeat_interleave(cfg.s)
        codes = torch.sparse_coo_tensor(
            torch.stack([rows, active.flatten()]),
            magnitudes.flatten(),
            (cfg.n_samples, cfg.n_gt),
            check_invariants=False,  # indices are in range and unique per row by construction
        ).coalesce()
        x = torch.cat(
            [
                torch.einsum("ns,nsd->nd", magnitudes[i : i + 8192], dictionary[active[i : i + 8192]])
                for i in range(0, cfg.n_samples, 8192)
            ]
        )
    if cfg.noise_std > 0:
        x = x + cfg.noise_std * torch.randn(x.shape, generator=gen)
    return OrganismData(dictionary=dictionary, codes=codes, x=x, active=active, magnitudes=magnitudes, **extra)


def sample_uniform(cfg: UniformOrganism) -> OrganismData:
    """Draw the organism's dictionary, codes and observations from ``cfg.seed`` alone."""
    gen = torch.Generator().manual_seed(cfg.seed)
    dictionary = unit_gaussian_dictionary(cfg.n_gt, cfg.d, gen)
    if cfg.correlation > 0:
        counts = torch.full((cfg.n_samples, 1), cfg.s)
        cluster = _clusters(cfg.n_gt, cfg)
        active = select_members(counts, [torch.arange(cfg.n_gt)], cfg.n_gt, cfg.s, gen, cluster, cfg.correlation)
        return _observe(cfg, gen, dictionary, active, dense=True, cluster=cluster)
    # A uniformly random s-subset per sample: the s largest of n_gt i.i.d. uniforms.
    positions = torch.rand(cfg.n_samples, cfg.n_gt, generator=gen).topk(cfg.s, dim=1).indices
    magnitudes = torch.randn(cfg.n_samples, cfg.s, generator=gen).abs()
    codes = torch.zeros(cfg.n_samples, cfg.n_gt).scatter_(1, positions, magnitudes)
    x = codes @ dictionary
    if cfg.noise_std > 0:
        x = x + cfg.noise_std * torch.randn(x.shape, generator=gen)
    order = positions.argsort(dim=1)
    return OrganismData(
        dictionary=dictionary,
        codes=codes,
        x=x,
        active=positions.gather(1, order),
        magnitudes=magnitudes.gather(1, order),
    )


def sample_zipfian(cfg: ZipfianOrganism) -> OrganismData:
    """Draw a Zipfian-groups organism from ``cfg.seed`` alone (dense codes)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    dictionary = unit_gaussian_dictionary(cfg.n_gt, cfg.d, gen)
    group, size = cfg.group(), cfg.n_gt // cfg.n_groups
    hits = systematic_sample(cfg.group_probability() * size, cfg.n_samples, gen)
    counts = torch.zeros(cfg.n_samples, cfg.n_groups, dtype=torch.long).scatter_add_(1, hits, torch.ones_like(hits))
    members = [torch.arange(g * size, (g + 1) * size) for g in range(cfg.n_groups)]
    cluster = _clusters(cfg.n_gt, cfg)
    active = select_members(counts, members, cfg.n_gt, cfg.s, gen, cluster, cfg.correlation)
    return _observe(
        cfg, gen, dictionary, active, dense=True, group=group, probability=cfg.probability(), cluster=cluster
    )


def sample_two_phase(cfg: TwoPhaseZipfOrganism) -> OrganismData:
    """Draw a two-phase Zipf organism from ``cfg.seed`` alone (sparse COO codes)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    dictionary = unit_gaussian_dictionary(cfg.n_gt, cfg.d, gen)
    active = systematic_sample(cfg.probability(), cfg.n_samples, gen)  # every p <= 1: distinct features
    return _observe(cfg, gen, dictionary, active, dense=False, group=cfg.group(), probability=cfg.probability())


def sample_planted_subspace(cfg: PlantedSubspaceOrganism) -> OrganismData:
    """The uniform organism of ``cfg.base()`` plus the planted subspace, drawn from a second stream
    of ``cfg.seed`` (so its base features are exactly those of the uniform organism alone)."""
    data = sample_uniform(cfg.base())
    gen = torch.Generator().manual_seed(cfg.seed + 1_000_003)
    basis = torch.linalg.qr(torch.randn(cfg.d, cfg.rank, generator=gen, dtype=torch.float64)).Q.T.float()
    on = torch.rand(cfg.n_samples, generator=gen) < cfg.probability
    coefficients = torch.randn(cfg.n_samples, cfg.rank, generator=gen) * on[:, None]
    x = data.x + coefficients @ basis
    if cfg.noise_std > 0:
        x = x + cfg.noise_std * torch.randn(x.shape, generator=gen)
    return replace(data, x=x, subspace=basis, subspace_codes=coefficients)


def sample(cfg: Organism) -> OrganismData:
    """Draw any organism from its configuration."""
    if isinstance(cfg, UniformOrganism):
        return sample_uniform(cfg)
    if isinstance(cfg, ZipfianOrganism):
        return sample_zipfian(cfg)
    if isinstance(cfg, TwoPhaseZipfOrganism):
        return sample_two_phase(cfg)
    if isinstance(cfg, PlantedSubspaceOrganism):
        return sample_planted_subspace(cfg)
    raise TypeError(
        "sample() needs a UniformOrganism, ZipfianOrganism, TwoPhaseZipfOrganism or "
        f"PlantedSubspaceOrganism, got {type(cfg).__name__}"
    )
