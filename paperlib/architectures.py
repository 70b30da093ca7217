"""SAE architectures: how pre-activations become codes, and what each adds to the loss.

Every architecture reads the bank's encoder pre-activations ``pre = (x - b_dec) @ W_enc + b_enc``
[S, B, n] and decodes linearly (``x_hat = codes @ W_dec + b_dec``); they differ in the code and in
the sparsity terms of the loss (``f``: codes, ``d_i``: decoder row i, ``H``: step function):

==============  ====================================================  ==========================================
name            codes                                                 sparsity / auxiliary terms
==============  ====================================================  ==========================================
``relu``        relu(pre)                                             l1_coeff · Σ f
``relu_dnorm``  relu(pre)                                             l1_coeff · Σ f_i ‖d_i‖ (decoder left free)
``topk``        the k largest of relu(pre) in each sample             AuxK; optional l1 (paper A's organism)
``batchtopk``   the B·k largest of relu(pre) in the batch; at         AuxK; optional l1
                inference relu(pre) above one learned threshold
``jumprelu``    pre · H(pre - θ), θ = exp(log_threshold) per latent   l0_coeff · (L0 / target_l0 - 1)², or
                                                                      l0_coeff · L0 without a target
``gated``       H(π_gate) · relu(π_mag), π_gate = pre,                l1_coeff · Σ relu(π_gate)_i ‖d_i‖ + the
                π_mag = (x - b_dec) @ (W_enc · e^r_mag) + b_mag       reconstruction from relu(π_gate) through a
                                                                      frozen decoder
``matryoshka``  BatchTopK codes                                       reconstruction summed over nested prefixes
==============  ====================================================  ==========================================

JumpReLU's thresholds learn through straight-through estimators with a rectangle kernel of width
``bandwidth`` (Rajamanoharan et al. 2024): d/dθ of the jump is -(θ/ε)·K((pre-θ)/ε) for the code and
-(1/ε)·K((pre-θ)/ε) for the L0 count. AuxK (Gao et al. 2024) lets the ``aux_k`` most active dead
latents reconstruct the detached residual, normalised by the residual's variance. P-anneal is not
implemented (noted in the README): its schedule needs a per-run annealing exponent we cannot check
against the paper's runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from paperlib.sae import SAEBank

_FEW = 8  # largest k for which TopK selects by repeated max instead of topk


def topk_mask(pre: Tensor, k: int) -> Tensor:
    """The k largest entries of each row (last dim) that are also positive."""
    if k <= _FEW:
        # k passes of a max-reduction: fuses into one kernel under torch.compile, ~5x faster than
        # topk on CPU for small k. A tie at the k-th value would let both tied latents fire
        # (exact ties between distinct latents do not occur with continuous weights).
        rest = pre
        for _ in range(k - 1):
            rest = torch.where(rest >= rest.amax(-1, keepdim=True), float("-inf"), rest)
        return (pre >= rest.amax(-1, keepdim=True)) & (pre > 0)
    top = pre.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(pre, dtype=torch.bool).scatter_(-1, top.indices, True) & (pre > 0)


def batch_topk_mask(pre: Tensor, k: int) -> Tensor:
    """Per seed, the B·k largest positive entries across the whole batch [S, B, n]."""
    S, B, n = pre.shape
    flat = pre.reshape(S, B * n)
    top = flat.topk(min(B * k, B * n), dim=-1, sorted=False)
    chosen = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, top.indices, True)
    return (chosen & (flat > 0)).reshape(S, B, n)


class Architecture:
    """How pre-activations become codes (``encode``) and the loss terms beyond reconstruction."""

    name: ClassVar[str]
    needs_k: ClassVar[bool] = False
    uses_aux_k: ClassVar[bool] = False
    # Codes are relu(pre) * mask with a per-sample mask and the loss is reconstruction + l1 · Σf:
    # SAEBank.loss_and_grads computes exact gradients in closed form, chunk by chunk.
    closed_form: ClassVar[bool] = False
    # Inference codes differ from training codes (so evaluation must encode twice).
    inference_differs: ClassVar[bool] = False

    @staticmethod
    def extra_parameters(bank: "SAEBank") -> dict[str, Tensor]:
        return {}

    @staticmethod
    def encode(bank: "SAEBank", x: Tensor, pre: Tensor, training: bool) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def penalties(bank: "SAEBank", x: Tensor, pre: Tensor, codes: Tensor) -> dict[str, Tensor]:
        """Loss terms [S] beyond reconstruction, already weighted by their coefficients."""
        return {"l1": bank.cfg.l1_coeff * codes.sum(-1).mean(-1)} if bank.cfg.l1_coeff else {}

    @staticmethod
    def mask(pre: Tensor, k: int) -> Tensor:
        """Which latents fire (closed-form architectures only)."""
        raise NotImplementedError

    @staticmethod
    def observe(bank: "SAEBank", codes: Tensor) -> None:
        """Update running statistics from a training batch's codes (called once per step)."""


class ReLU(Architecture):
    """Standard SAE: every positive pre-activation fires."""

    name = "relu"
    closed_form = True

    @staticmethod
    def mask(pre: Tensor, k: int) -> Tensor:
        return pre > 0

    @staticmethod
    def encode(bank, x, pre, training):
        return pre.relu()


class ReLUDecoderNorm(ReLU):
    """Standard SAE with the L1 of f_i·‖d_i‖ and an unconstrained decoder (the "April update")."""

    name = "relu_dnorm"
    closed_form = False

    @staticmethod
    def penalties(bank, x, pre, codes):
        norms = bank.W_dec.norm(dim=-1)[:, None]
        return {"l1": bank.cfg.l1_coeff * (codes * norms).sum(-1).mean(-1)}


class TopK(Architecture):
    """The k largest positive pre-activations of each sample fire (exactly k when at least k are
    positive)."""

    name = "topk"
    needs_k = uses_aux_k = closed_form = True

    @staticmethod
    def mask(pre: Tensor, k: int) -> Tensor:
        return topk_mask(pre, k)

    @staticmethod
    def encode(bank, x, pre, training):
        return pre.relu() * topk_mask(pre, bank.cfg.k)


class BatchTopK(Architecture):
    """Training keeps the B·k largest pre-activations of the whole batch (average L0 = k); a
    running mean of the smallest kept activation becomes a single inference threshold, so the
    trained SAE is a JumpReLU with one threshold and each sample's L0 varies around k."""

    name = "batchtopk"
    needs_k = uses_aux_k = inference_differs = True
    momentum = 0.99

    @staticmethod
    def encode(bank, x, pre, training):
        if training or torch.isnan(bank.threshold).any():
            mask = batch_topk_mask(pre, bank.cfg.k)
        else:
            mask = pre > bank.threshold[:, None, None]
        return pre.relu() * mask

    @classmethod
    @torch.no_grad()
    def observe(cls, bank, codes):
        kept = torch.where(codes > 0, codes, float("inf")).flatten(1).amin(-1)
        kept = torch.where(torch.isfinite(kept), kept, bank.threshold)
        first = torch.isnan(bank.threshold)
        bank.threshold.copy_(torch.where(first, kept, cls.momentum * bank.threshold + (1 - cls.momentum) * kept))


class Matryoshka(BatchTopK):
    """BatchTopK codes; the reconstruction loss is summed over nested prefixes of the dictionary
    (prefix ends from ``cfg.groups``), so early latents must reconstruct on their own."""

    name = "matryoshka"

    @staticmethod
    def prefix_ends(n: int, groups: tuple[float, ...]) -> list[int]:
        ends, total = [], 0
        for fraction in groups:
            total += max(1, round(fraction * n))
            if total < n:
                ends.append(total)
        return ends + [n]

    @classmethod
    def penalties(cls, bank, x, pre, codes):
        terms = Architecture.penalties(bank, x, pre, codes)
        ends = cls.prefix_ends(bank.cfg.n_latents, bank.cfg.groups)[:-1]  # the full prefix is the main loss
        if ends:
            prefix = sum(
                bank.reconstruction_loss(x, torch.baddbmm(bank.b_dec[:, None], codes[..., :m], bank.W_dec[:, :m]))
                for m in ends
            )
            terms["prefix_recon"] = prefix
        return terms


class _JumpReLU(torch.autograd.Function):
    """pre · H(pre - θ) with the straight-through threshold gradient (rectangle kernel)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        d_threshold = (-(threshold / eps) * window * grad).sum(1, keepdim=True)
        return grad * (pre > threshold), d_threshold, None


class _Step(torch.autograd.Function):
    """H(pre - θ) with the straight-through threshold gradient; no gradient to ``pre``."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((pre - threshold).abs() < eps / 2).to(grad.dtype)
        return None, (-(1 / eps) * window * grad).sum(1, keepdim=True), None


class JumpReLU(Architecture):
    """Per-latent learned thresholds; an L0 penalty aimed at ``target_l0`` (or plain L0)."""

    name = "jumprelu"

    @staticmethod
    def extra_parameters(bank):
        cfg = bank.cfg
        return {"log_threshold": torch.full((cfg.n_seeds, cfg.n_latents), float(torch.tensor(cfg.init_threshold).log()))}

    @staticmethod
    def encode(bank, x, pre, training):
        return _JumpReLU.apply(pre, bank.log_threshold.exp()[:, None], bank.cfg.bandwidth)

    @staticmethod
    def penalties(bank, x, pre, codes):
        cfg = bank.cfg
        l0 = _Step.apply(pre, bank.log_threshold.exp()[:, None], cfg.bandwidth).sum(-1).mean(-1)
        penalty = (l0 / cfg.target_l0 - 1).square() if cfg.target_l0 else l0
        return {"l0": cfg.l0_coeff * penalty}


class Gated(Architecture):
    """Gated SAE (Rajamanoharan et al. 2024): the gate decides which latents fire, a rescaled copy
    of the same encoder decides how much; the gate is trained by an L1 on its own activations and
    an auxiliary reconstruction through a frozen decoder."""

    name = "gated"

    @staticmethod
    def extra_parameters(bank):
        cfg = bank.cfg
        return {"r_mag": torch.zeros(cfg.n_seeds, cfg.n_latents), "b_mag": torch.zeros(cfg.n_seeds, cfg.n_latents)}

    @staticmethod
    def encode(bank, x, pre, training):
        magnitude = torch.baddbmm(bank.b_mag[:, None], x - bank.b_dec[:, None], bank.W_enc * bank.r_mag.exp()[:, None])
        return (pre > 0) * magnitude.relu()

    @staticmethod
    def penalties(bank, x, pre, codes):
        gate = pre.relu()
        l1 = (gate * bank.W_dec.norm(dim=-1)[:, None]).sum(-1).mean(-1)
        frozen = torch.baddbmm(bank.b_dec.detach()[:, None], gate, bank.W_dec.detach())
        return {"l1": bank.cfg.l1_coeff * l1, "gate_recon": bank.reconstruction_loss(x, frozen)}


ARCHITECTURES: dict[str, type[Architecture]] = {
    cls.name: cls for cls in (ReLU, ReLUDecoderNorm, TopK, BatchTopK, Matryoshka, JumpReLU, Gated)
}
