"""Sparse autoencoders as a bank of S seeds trained at once.

One ``SAEBank`` holds S independently initialised SAEs of one configuration as stacked weights
(``W_enc`` [S, d, n], ``b_enc`` [S, n], ``W_dec`` [S, n, d], ``b_dec`` [S, d]; per seed the SAELens
layout), so every batch is read once and each layer is a single batched matmul for all seeds.

    pre = (x - b_dec) @ W_enc + b_enc          codes = architecture(pre)      (architectures.py)
    x_hat = codes @ W_dec + b_dec
    loss = reconstruction(x_hat, x) + the architecture's sparsity terms [+ AuxK]

``reconstruction="mean"`` averages the squared error over samples and dimensions (paper A's
organism code); ``"sum"`` sums it over dimensions and averages over samples (SAELens,
dictionary_learning). ``decoder="free"`` leaves decoder rows unconstrained (paper A's organism
code, and the decoder-norm-weighted ReLU); ``"unit"`` keeps them at unit norm (the trainer
projects the gradient and renormalises after each step). Defaults reproduce paper A's organism;
the LLM notebooks set what the papers' LLM runs used.

ReLU and TopK (without AuxK) also have exact closed-form gradients (``loss_and_grads``) that
process a batch in cache-sized chunks and never build an autograd graph: ~3x faster than autograd
on CPU, and equal to it (tested); for TopK with k much smaller than n they touch only the k active
latents of each sample; for small SAEs on CPU the whole step is one fused C++ kernel. Which kernel
runs is decided in one place, ``kernels/dispatch.py``. Everything else trains through autograd on ``loss``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple, cast

import torch
from torch import Tensor, nn

from paperlib.checks import is_int, is_real
from paperlib.sae.architectures import ARCHITECTURES, Architecture
from paperlib.sae.kernels.dispatch import closed_form_grads
from paperlib.sae.kernels.params import Params

if TYPE_CHECKING:
    from paperlib.sae.view import SAEView


@dataclass(frozen=True)
class SAEConfig:
    """One SAE configuration; seed i of the bank is initialised from ``seed + i``.

    ``init_scale`` is the norm of each initial decoder row (the encoder starts as the decoder's
    transpose, both biases at zero): the authors' organism code uses 0.1 for ReLU and 1 for TopK.
    Fields an architecture does not use are ignored, except k and aux_coeff, which are refused.
    """

    architecture: str
    d_model: int
    n_latents: int
    k: int | None = None  # topk, batchtopk, matryoshka: active latents per sample (on average)
    l1_coeff: float = 0.0  # relu, relu_dnorm, gated, panneal; optional for the topk family
    n_seeds: int = 1
    seed: int = 0
    init_scale: float = 1.0
    reconstruction: str = "mean"  # "mean" over samples and dims, or "sum" over dims, mean over samples
    decoder: str = "free"  # "free" or "unit" (unit-norm rows)
    l0_coeff: float = 0.0  # jumprelu
    target_l0: float | None = None  # jumprelu: penalty (L0 / target_l0 - 1)^2 instead of L0
    bandwidth: float = 1e-3  # jumprelu: straight-through kernel width
    init_threshold: float = 1e-3  # jumprelu: initial threshold
    aux_coeff: float = 0.0  # topk family: AuxK weight (1/32 in Gao et al.); 0 disables it
    aux_k: int | None = None  # topk family: dead latents used by AuxK (default d_model // 2)
    dead_tokens: int = 10_000_000  # a latent that has not fired for this many tokens is dead
    groups: tuple[float, ...] = (1 / 32, 1 / 16, 1 / 8, 1 / 4)  # matryoshka: group fractions before "rest"
    # panneal (defaults: paper A's dictionary_learning sweep, see architectures.py)
    p_start: float = 1.0  # exponent until the anneal starts
    p_end: float = 0.2  # exponent annealed towards (the last step of p, onto p_end itself, never comes)
    anneal_start: float = 0.04  # fraction of training at which annealing starts
    p_updates: int = 10  # schedule points from anneal_start to the end of training
    p_window: int = 10  # steps averaged to rescale the coefficient when p changes

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown SAE architecture {self.architecture!r}; choose one of {sorted(ARCHITECTURES)}")
        for name in ("d_model", "n_latents", "n_seeds", "dead_tokens"):
            value = getattr(self, name)
            if not is_int(value, 1):
                raise ValueError(f"SAEConfig.{name} must be a positive integer, got {value!r}")
        if not is_int(self.seed):
            raise ValueError(f"SAEConfig.seed must be an integer, got {self.seed!r}")
        if self.aux_k is not None and not is_int(self.aux_k, 1):
            raise ValueError(f"SAEConfig.aux_k must be a positive integer or None (d_model // 2), got {self.aux_k!r}")
        for name in ("l1_coeff", "l0_coeff", "aux_coeff", "init_scale", "bandwidth", "init_threshold", "target_l0"):
            value = getattr(self, name)
            if value is not None and not is_real(value):
                raise ValueError(f"SAEConfig.{name} must be a finite number, got {value!r}")
        arch = self.arch
        if arch.needs_k:
            if self.k is None or not is_int(self.k) or not 1 <= self.k <= self.n_latents:
                raise ValueError(
                    f"{self.architecture} SAE needs 1 <= k <= n_latents={self.n_latents}, got k={self.k!r}"
                )
        elif self.k is not None:
            raise ValueError(f"{self.architecture} SAE takes no k (got k={self.k}); leave k=None")
        for name in ("l1_coeff", "l0_coeff", "aux_coeff"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"SAEConfig.{name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("init_scale", "bandwidth", "init_threshold"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SAEConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if self.reconstruction not in ("mean", "sum"):
            raise ValueError(f"SAEConfig.reconstruction must be 'mean' or 'sum', got {self.reconstruction!r}")
        if self.decoder not in ("free", "unit"):
            raise ValueError(f"SAEConfig.decoder must be 'free' or 'unit', got {self.decoder!r}")
        if self.aux_coeff and not arch.uses_aux_k:
            raise ValueError(f"{self.architecture} SAE has no AuxK loss; leave aux_coeff=0")
        if self.target_l0 is not None and not self.target_l0 > 0:
            raise ValueError(f"SAEConfig.target_l0 must be > 0 or None, got {self.target_l0!r}")
        if not self.groups or any(not is_real(g) or not 0 < g < 1 for g in self.groups) or sum(self.groups) >= 1:
            raise ValueError(f"SAEConfig.groups must be fractions in (0, 1) summing below 1, got {self.groups!r}")
        for name in ("p_start", "p_end", "anneal_start"):
            value = getattr(self, name)
            if not is_real(value, finite=False):  # nan and inf fail the range checks below, by name
                raise ValueError(f"SAEConfig.{name} must be a number, got {value!r}")
        if not (0 < self.p_start <= 1 and 0 <= self.p_end <= self.p_start):
            raise ValueError(
                f"SAEConfig needs 0 <= p_end <= p_start <= 1 and p_start > 0 (P-anneal's exponents), "
                f"got p_start={self.p_start!r}, p_end={self.p_end!r}"
            )
        if not 0 <= self.anneal_start < 1:
            raise ValueError(
                f"SAEConfig.anneal_start must be a fraction of training in [0, 1), got {self.anneal_start!r}"
            )
        for name, least in (("p_updates", 2), ("p_window", 1)):
            value = getattr(self, name)
            if not is_int(value, least):
                raise ValueError(f"SAEConfig.{name} must be an integer >= {least}, got {value!r}")

    @property
    def arch(self) -> type[Architecture]:
        return ARCHITECTURES[self.architecture]

    @property
    def closed_form(self) -> bool:
        """Whether ``SAEBank.loss_and_grads`` applies (exact, faster than autograd)."""
        return self.arch.closed_form and not self.aux_coeff


class Loss(NamedTuple):
    """A training loss: ``total`` summed over seeds (differentiable), its ``parts`` per seed [S]
    (detached) and the ``codes`` [S, B, n] it came from (detached)."""

    total: Tensor
    parts: dict[str, Tensor]
    codes: Tensor


class LossAndReconstruction(NamedTuple):
    """``Loss`` and the reconstructions [S, B, d] (detached) it was computed from."""

    total: Tensor
    parts: dict[str, Tensor]
    codes: Tensor
    recon: Tensor


class SAEBank(nn.Module):
    """S SAEs of one configuration with stacked parameters (see the module docstring)."""

    tokens_since_fired: Tensor  # buffers, registered in __init__ (declared for type checkers)
    threshold: Tensor

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        decoders = torch.stack([self._initial_decoder(cfg, cfg.seed + i) for i in range(cfg.n_seeds)])
        self.W_dec = nn.Parameter(decoders)
        self.W_enc = nn.Parameter(decoders.transpose(1, 2).clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_seeds, cfg.n_latents))
        self.b_dec = nn.Parameter(torch.zeros(cfg.n_seeds, cfg.d_model))
        for name, value in cfg.arch.extra_parameters(self).items():
            self.register_parameter(name, nn.Parameter(value))
        # Tokens since each latent last fired (dead-latent tracking, AuxK) and BatchTopK's
        # inference threshold (NaN until training sets it).
        self.register_buffer("tokens_since_fired", torch.zeros(cfg.n_seeds, cfg.n_latents))
        self.register_buffer("threshold", torch.full((cfg.n_seeds,), math.nan))
        for name, value in cfg.arch.extra_buffers(self).items():
            self.register_buffer(name, value)

    @staticmethod
    def _initial_decoder(cfg: SAEConfig, seed: int) -> Tensor:
        gen = torch.Generator().manual_seed(seed)
        rows = torch.randn(cfg.n_latents, cfg.d_model, generator=gen)
        return rows / rows.norm(dim=1, keepdim=True) * cfg.init_scale

    @property
    def n_seeds(self) -> int:
        return self.W_dec.shape[0]

    def seed(self, i: int) -> SAEBank:
        """Seed ``i`` of the bank as a bank of one (a copy, buffers included)."""
        if not 0 <= i < self.n_seeds:
            raise IndexError(f"seed index {i} out of range for a bank of {self.n_seeds} seeds")
        single = SAEBank(replace(self.cfg, n_seeds=1, seed=self.cfg.seed + i)).to(self.W_dec.dtype)
        single.load_state_dict({name: value[i : i + 1] for name, value in self.state_dict().items()})
        return single.to(self.W_dec.device)

    def __getitem__(self, i: int) -> SAEView:
        """Seed ``i`` as one SAE (``SAEView``: codes [B, n] and a decoder, no seed axis)."""
        from paperlib.sae.view import SAEView  # it builds on SAEBank

        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"index a bank with a seed number, got {i!r}")
        return SAEView.from_bank(self, seed=i)

    def closed_form_now(self) -> bool:
        """Whether ``loss_and_grads`` gives this step's exact gradients: for closed-form architectures
        without AuxK always; with AuxK while no latent is dead, since AuxK's loss and gradient are then
        exactly zero (the LLM notebooks' runs never reach ``dead_tokens``)."""
        if not self.cfg.arch.closed_form:
            return False
        return not self.cfg.aux_coeff or not bool((self.tokens_since_fired >= self.cfg.dead_tokens).any())

    def decoder_directions(self) -> Tensor:
        """Decoder rows [S, n, d] (not normalised): the dictionaries compared by MCC."""
        return self.W_dec.detach()

    def _check_input(self, x: Tensor) -> None:
        if x.ndim != 2 or x.shape[1] != self.cfg.d_model:
            raise ValueError(f"SAE input must have shape [batch, d_model={self.cfg.d_model}], got {tuple(x.shape)}")

    def pre_activations(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return torch.baddbmm(self.b_enc[:, None], x - self.b_dec[:, None], self.W_enc)

    def encode(self, x: Tensor, training: bool = False) -> Tensor:
        """Codes [S, B, n] of a batch x [B, d] shared by all seeds (``training`` selects BatchTopK's
        batch-level selection instead of its inference threshold)."""
        return self.cfg.arch.encode(self, x, self.pre_activations(x), training)

    def decode(self, codes: Tensor) -> Tensor:
        return torch.baddbmm(self.b_dec[:, None], codes, self.W_dec)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(reconstructions [S, B, d], codes [S, B, n]) at inference."""
        codes = self.encode(x)
        return self.decode(codes), codes

    def reconstruction_loss(self, x: Tensor, recon: Tensor) -> Tensor:
        """Per seed [S]: squared error averaged over samples (and over dims for ``"mean"``)."""
        per_sample = (recon - x).square().sum(-1)
        scale = x.shape[-1] if self.cfg.reconstruction == "mean" else 1
        return per_sample.mean(-1) / scale

    def loss(self, x: Tensor, sparsity_scale: float = 1.0) -> Loss:
        """Training loss summed over seeds (differentiable), its parts per seed [S], and the codes.
        ``sparsity_scale`` multiplies the sparsity terms (``l1``, ``l0``, ``lp``) during their warm-up."""
        total, parts, codes, _ = self.loss_and_reconstruction(x, sparsity_scale)
        return Loss(total, parts, codes)

    def loss_and_reconstruction(self, x: Tensor, sparsity_scale: float = 1.0) -> LossAndReconstruction:
        """``loss`` and the reconstructions [S, B, d] it was computed from (detached), so that an
        evaluation does not decode the same codes a second time."""
        pre = self.pre_activations(x)
        codes = self.cfg.arch.encode(self, x, pre, training=True)
        recon = self.decode(codes)
        parts = {"recon": self.reconstruction_loss(x, recon)}
        for name, term in self.cfg.arch.penalties(self, x, pre, codes).items():
            parts[name] = term * sparsity_scale if name in ("l1", "l0", "lp") else term
        if self.cfg.aux_coeff:
            parts["aux"] = self.cfg.aux_coeff * self._aux_k_loss(x, pre, recon)
        if torch.is_grad_enabled():  # a training step, not an evaluation
            self.cfg.arch.observe(self, codes.detach())
        total = cast(Tensor, sum(parts.values()))  # parts are [S] tensors
        detached = {k: v.detach() for k, v in parts.items()}
        return LossAndReconstruction(total.sum(), detached, codes.detach(), recon.detach())

    def _aux_k_loss(self, x: Tensor, pre: Tensor, recon: Tensor) -> Tensor:
        """AuxK: the most active dead latents reconstruct the detached residual, normalised by the
        residual's variance; zero while no latent is dead."""
        dead = self.tokens_since_fired >= self.cfg.dead_tokens
        if not dead.any():
            return torch.zeros(self.n_seeds, device=x.device)
        k_aux = min(self.cfg.aux_k or self.cfg.d_model // 2, self.cfg.n_latents)
        dead_pre = torch.where(dead[:, None], pre, float("-inf"))
        top = dead_pre.topk(k_aux, dim=-1)
        codes = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu().nan_to_num(neginf=0.0))
        residual = (x - recon).detach()
        err = (torch.bmm(codes, self.W_dec) - residual).square().sum((1, 2))
        return err / (residual - residual.mean(1, keepdim=True)).square().sum((1, 2)).clamp_min(1e-12)

    @torch.no_grad()
    def record_firing(self, fired: Tensor, n_tokens: int) -> None:
        """Update dead-latent tracking with a [S, n] mask of latents that fired in ``n_tokens``."""
        self.tokens_since_fired.add_(n_tokens).masked_fill_(fired, 0)

    @torch.no_grad()
    def loss_and_grads(
        self,
        x: Tensor,
        n_rows: int,
        chunk_size: int = 4096,
        l1_coeff: float | None = None,
        sparse: bool | None = None,
    ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Closed-form gradients (ReLU, TopK without AuxK) of the loss over ``x`` (a batch of
        ``n_rows`` rows, processed in chunks to stay in cache) for every seed, and the loss parts
        summed over the batch. ``l1_coeff`` overrides the configured one (sparsity warm-up).
        ``sparse`` forces TopK's sparse path on or off (default: on when k is small next to n).

        Returns ({parameter name: gradient}, {"sq_err", "l1", "l0"} each [S], and "fired" [S, n]).
        """
        if not self.closed_form_now():
            why = "while latents are dead (AuxK)" if self.cfg.arch.closed_form else "at all"
            raise ValueError(f"{self.cfg.architecture} SAEs have no closed-form gradient {why}; use loss()")
        self._check_input(x)
        l1 = self.cfg.l1_coeff if l1_coeff is None else l1_coeff
        params = Params(self.W_dec, self.W_enc, self.b_enc, self.b_dec)
        step = closed_form_grads(self.cfg, params, x, n_rows=n_rows, l1_coeff=l1, chunk_size=chunk_size, sparse=sparse)
        sums = step.sums
        return step.grads._asdict(), {"sq_err": sums[0], "l1": sums[1], "l0": sums[2], "fired": step.fired}
