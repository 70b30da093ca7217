"""Synthetic model organisms: data with a known ground-truth dictionary.

Paper A's uniform organism: ``n_gt`` unit-norm Gaussian atoms in R^d; every sample switches on
exactly ``s`` features at uniformly random positions with half-normal magnitudes |N(0, 1)|, and
x = codes @ dictionary (+ optional isotropic Gaussian noise). This matches the authors' released
generator in distribution (not bit for bit: we draw with torch, they used numpy).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class UniformOrganism:
    """Configuration of the uniform organism (defaults: the authors' released setting)."""

    d: int = 16
    n_gt: int = 32
    s: int = 3
    n_samples: int = 50_000
    noise_std: float = 0.0
    seed: int = 42

    def __post_init__(self) -> None:
        for name in ("d", "n_gt", "s", "n_samples"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"UniformOrganism.{name} must be a positive integer, got {value!r}")
        if self.s > self.n_gt:
            raise ValueError(
                f"UniformOrganism.s={self.s} active features per sample exceeds n_gt={self.n_gt} features; "
                "lower s or raise n_gt"
            )
        if not self.noise_std >= 0:
            raise ValueError(f"UniformOrganism.noise_std must be >= 0, got {self.noise_std!r}")


@dataclass(frozen=True)
class OrganismData:
    """Samples of an organism with their ground truth."""

    dictionary: torch.Tensor  # [n_gt, d], unit rows
    codes: torch.Tensor  # [n_samples, n_gt], non-negative, exactly s non-zeros per row
    x: torch.Tensor  # [n_samples, d]


def unit_gaussian_dictionary(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` independent directions drawn uniformly on the unit sphere of R^d."""
    atoms = torch.randn(n, d, generator=generator, dtype=torch.float64)
    return (atoms / atoms.norm(dim=1, keepdim=True)).float()


def sample_uniform(cfg: UniformOrganism) -> OrganismData:
    """Draw the organism's dictionary, codes and observations from ``cfg.seed`` alone."""
    gen = torch.Generator().manual_seed(cfg.seed)
    dictionary = unit_gaussian_dictionary(cfg.n_gt, cfg.d, gen)
    # A uniformly random s-subset per sample: the s largest of n_gt i.i.d. uniforms.
    positions = torch.rand(cfg.n_samples, cfg.n_gt, generator=gen).topk(cfg.s, dim=1).indices
    magnitudes = torch.randn(cfg.n_samples, cfg.s, generator=gen).abs()
    codes = torch.zeros(cfg.n_samples, cfg.n_gt).scatter_(1, positions, magnitudes)
    x = codes @ dictionary
    if cfg.noise_std > 0:
        x = x + cfg.noise_std * torch.randn(x.shape, generator=gen)
    return OrganismData(dictionary=dictionary, codes=codes, x=x)
