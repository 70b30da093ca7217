"""One SAE: what stitching, meta-SAEs and the explorers need of it, whatever its encoder.

``SAEView`` is codes f(x) [B, n] from any encoder (ReLU, TopK, thresholds, gates) and a linear decoder
x̂ = f(x) W_dec + b_dec. ``bank[i]`` gives seed i of an ``SAEBank`` as one (a CPU snapshot of its
weights; codes come back on the CPU); the code of an SAE trained elsewhere fits by passing its encode.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from paperlib.sae.bank import SAEBank


@dataclass(frozen=True, eq=False)
class SAEView:
    """One SAE: ``encode`` x [B, d] -> codes [B, n]; decoder ``W_dec`` [n, d] and ``b_dec`` [d]."""

    encode: Callable[[Tensor], Tensor]
    W_dec: Tensor
    b_dec: Tensor
    name: str = "SAE"

    def __post_init__(self) -> None:
        if self.W_dec.ndim != 2 or self.b_dec.shape != (self.W_dec.shape[1],):
            raise ValueError(
                f"{self.name}: W_dec must be [n_latents, d_model] and b_dec [d_model], got "
                f"{tuple(self.W_dec.shape)} and {tuple(self.b_dec.shape)}"
            )
        if not (torch.isfinite(self.W_dec).all() and torch.isfinite(self.b_dec).all()):
            raise ValueError(f"{self.name}: decoder has NaN/Inf entries")

    @property
    def n_latents(self) -> int:
        return self.W_dec.shape[0]

    @property
    def d_model(self) -> int:
        return self.W_dec.shape[1]

    def decode(self, codes: Tensor) -> Tensor:
        """Reconstructions [B, d] of codes [B, n]."""
        return codes @ self.W_dec + self.b_dec

    @classmethod
    def from_bank(cls, bank: SAEBank, seed: int = 0, name: str | None = None) -> SAEView:
        """Seed ``seed`` of a bank. BatchTopK-style banks need their trained inference threshold
        (without it their codes would depend on how tokens are chunked)."""
        one = bank if bank.n_seeds == 1 and seed == 0 else bank.seed(seed)
        if one.cfg.arch.inference_differs and torch.isnan(one.threshold).any():
            raise ValueError(
                f"{one.cfg.architecture} SAE has no inference threshold yet (untrained?); "
                "train it first or set bank.threshold"
            )

        @torch.no_grad()
        def encode(x: Tensor) -> Tensor:  # on the bank's device; codes come back to the CPU
            return one.encode(x.to(one.W_dec.device, torch.float32))[0].cpu()

        return cls(
            encode,
            one.W_dec.detach()[0].cpu(),
            one.b_dec.detach()[0].cpu(),
            name or f"{one.cfg.architecture} SAE ({one.cfg.n_latents} latents)",
        )

    @classmethod
    def empty(cls, d_model: int, b_dec: Tensor | None = None) -> SAEView:
        """An SAE with no latents (reconstruction = its bias): stitching into it builds L from scratch."""
        b = torch.zeros(d_model) if b_dec is None else b_dec.detach()
        return cls(lambda x: x.new_zeros(x.shape[0], 0), torch.zeros(0, d_model), b, "empty SAE")


def as_view(sae: SAEView | SAEBank, name: str) -> SAEView:
    """``sae`` as an ``SAEView``; a bank must hold exactly one seed."""
    if isinstance(sae, SAEView):
        return sae
    if isinstance(sae, SAEBank):
        if sae.n_seeds != 1:
            raise ValueError(f"the {name} SAE is a bank of {sae.n_seeds} seeds; pass bank[i] (seed i)")
        return SAEView.from_bank(sae, name=f"{name} SAE")
    raise TypeError(f"the {name} SAE must be an SAEBank or SAEView, got {type(sae).__name__}")
