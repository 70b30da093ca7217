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
``panneal``     relu(pre)                                             l1_coeff · c · Σ f_i^p, p stepped from
                                                                      p_start towards p_end during training, c
                                                                      rescaled at each step of p (below)
==============  ====================================================  ==========================================

JumpReLU's thresholds learn through straight-through estimators with a rectangle kernel of width
``bandwidth`` (Rajamanoharan et al. 2024): d/dθ of the jump is -(θ/ε)·K((pre-θ)/ε) for the code and
-(1/ε)·K((pre-θ)/ε) for the L0 count. AuxK (Gao et al. 2024) lets the ``aux_k`` most active dead
latents reconstruct the detached residual, normalised by the residual's variance.

P-anneal follows ``PAnnealTrainer`` of saprmarks/dictionary_learning (commit 60ec6bf, 2025-08-20;
``dictionary_learning/trainers/p_anneal.py``: ``__init__``, ``lp_norm``, ``loss``), whose settings
paper A used for its LLM sweep (xiangchensong/sae-feature-consistency, commit 32da471,
``examples/demo_config.py``: ``PAnnealTrainerConfig``, ``get_trainer_configs``). What it does:

* model: ``dictionary.AutoEncoder``, f = ReLU(W_enc (x - b) + b_enc), x_hat = W_dec f + b; the
  decoder's columns are kept at unit norm (``ConstrainedAdam`` projects the gradient, then
  renormalises), and the penalty has no decoder-norm factor. Here: ``relu`` codes; use
  ``decoder="unit"`` (the zoo does).
* penalty: ``lp_norm`` is Σ_i f_i^p averaged over the batch for ``sparsity_function="Lp^p"`` (paper
  A's sweep), or (Σ_i f_i^p)^(1/p) for ``"Lp"`` (the trainer's default). Only Lp^p is built here.
  It is multiplied by the sparsity warm-up factor like the L1 (``TrainConfig.sparsity_warmup_steps``).
* schedule: p = ``p_start`` until step ``anneal_start``; then ``n_sparsity_updates`` updates at the
  steps ``linspace(anneal_start, steps, n)``, update j setting p to ``linspace(p_start, p_end, n)[j]``,
  each after that step's loss. Update 0 sets p_start again; the last falls on step ``steps``, which
  the training loop never reaches, so p_end itself is never used ("exact endpoint excluded"): with
  n = 10, training ends at p_start + 8/9 (p_end - p_start) (0.289 for paper A's 1 -> 0.2).
* coefficient: after update 0, every step records the batch's Lp at the current p and at the next
  p (a queue of the last ``sparsity_queue_length`` steps); each later update multiplies the
  coefficient by mean(Lp at old p) / mean(Lp at new p) over that queue, so coefficient · Lp does
  not jump when p changes (with codes below 1, f^p grows as p falls, so the coefficient shrinks).
* no epsilon: ``f.pow(p)`` on the ReLU codes. Exact zeros get no gradient (ReLU's backward masks
  them), but d f^p / df = p f^(p-1) is unbounded for small positive f: 3e20 at f = 1e-30, p = 0.3,
  and inf in float32 for subnormal f once p < ~0.15 (the trainer's own p_end = 0 reaches 0.111).
* defaults: the trainer has p_start 1, p_end 0, anneal_start 15,000 steps, 10 updates, queue 10,
  ``Lp``, initial coefficient 0.1, lr 1e-3; paper A's sweep sets ``Lp^p``, p_end 0.2, anneal_start
  10,000 of its int(500M tokens / 2048) = 244,140 steps (4%), 10 updates, queue 10, coefficients
  0.006-0.025, lr 3e-4, 5,000 sparsity warm-up steps.

Here (``SAEConfig``: ``p_start`` 1, ``p_end`` 0.2, ``anneal_start`` 0.04 as a fraction of training,
``p_updates`` 10, ``p_window`` 10) the schedule is the same in fractions of ``TrainConfig.steps``
(``PAnneal.update_steps``; a point at step u takes effect from step u + 1). The trainer calls
``Architecture.at_step`` before each step's loss, and the exponent in force, the coefficient's
multiplier, the queue and the points passed are buffers of the bank (``p``, ``lp_scale``,
``lp_window``, ``p_updates``), rather than arguments of the loss: they are saved with it, so a
resumed run continues the schedule and a reloaded or evaluated bank reports the penalty it was
trained with. The queue is emptied at each update (the reference keeps it, which differs only when
updates are fewer than ``p_window`` steps apart). Codes below ``PAnneal.eps`` (1e-8) enter f^p
clamped to it, without gradient, which bounds the gradient by p eps^(p-1) (finite at any p >= 0).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

if TYPE_CHECKING:
    from paperlib.sae.bank import SAEBank, SAEConfig

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
    def extra_parameters(bank: SAEBank) -> dict[str, Tensor]:
        return {}

    @staticmethod
    def extra_buffers(bank: SAEBank) -> dict[str, Tensor]:
        """State [S, ...] the architecture keeps besides its parameters (saved with the bank)."""
        return {}

    @staticmethod
    def at_step(bank: SAEBank, step: int, steps: int) -> None:
        """Called by the trainer before the loss of ``step`` (1-based) of ``steps``: schedules that
        depend on training progress (P-anneal's exponent) update the bank's buffers here."""

    @staticmethod
    def encode(bank: SAEBank, x: Tensor, pre: Tensor, training: bool) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def penalties(bank: SAEBank, x: Tensor, pre: Tensor, codes: Tensor) -> dict[str, Tensor]:
        """Loss terms [S] beyond reconstruction, already weighted by their coefficients."""
        return {"l1": bank.cfg.l1_coeff * codes.sum(-1).mean(-1)} if bank.cfg.l1_coeff else {}

    @staticmethod
    def mask(pre: Tensor, k: int) -> Tensor:
        """Which latents fire (closed-form architectures only)."""
        raise NotImplementedError

    @staticmethod
    def observe(bank: SAEBank, codes: Tensor) -> None:
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
        return {
            "log_threshold": torch.full((cfg.n_seeds, cfg.n_latents), float(torch.tensor(cfg.init_threshold).log()))
        }

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


class PAnneal(ReLU):
    """ReLU codes under l1_coeff · c · Σ f^p with p stepped down during training (module docstring):
    as p falls, small codes cost relatively more than large ones, moving the penalty from L1
    towards L0 without ever leaving gradient-based training."""

    name = "panneal"
    closed_form = False
    eps = 1e-8  # codes below this enter f^p clamped (value eps^p, no gradient): bounds p·f^(p-1)

    @staticmethod
    def extra_buffers(bank):
        cfg = bank.cfg
        return {
            "p": torch.full((cfg.n_seeds,), float(cfg.p_start)),  # the exponent in force
            "p_updates": torch.zeros(cfg.n_seeds, dtype=torch.long),  # schedule points passed
            "lp_scale": torch.ones(cfg.n_seeds),  # c: the coefficient's multiplier
            # recent steps' batch-mean Σf^p at (current p, next p), newest first; NaN = empty
            "lp_window": torch.full((cfg.n_seeds, cfg.p_window, 2), math.nan),
        }

    @staticmethod
    def update_steps(cfg: SAEConfig, steps: int) -> list[int]:
        """The step after which each of the ``p_updates`` schedule points takes effect: evenly
        spaced from ``anneal_start`` to the end of training. The last one is ``steps`` itself, so
        it never does (the reference excludes p_end the same way)."""
        n, start = cfg.p_updates, cfg.anneal_start
        return [round((start + j * (1 - start) / (n - 1)) * steps) for j in range(n)]

    @classmethod
    def updates_before(cls, cfg: SAEConfig, step: int, steps: int) -> int:
        """How many schedule points have taken effect at ``step`` (1-based) of ``steps``."""
        return sum(u < step for u in cls.update_steps(cfg, steps))

    @staticmethod
    def exponent(cfg: SAEConfig, updates: int) -> float:
        """p once ``updates`` schedule points have taken effect (0 and 1 both give p_start)."""
        j = min(max(updates - 1, 0), cfg.p_updates - 1)
        return cfg.p_start + j * (cfg.p_end - cfg.p_start) / (cfg.p_updates - 1)

    @classmethod
    def exponent_at(cls, cfg: SAEConfig, step: int, steps: int) -> float:
        """p in force at ``step`` (1-based) of ``steps``."""
        return cls.exponent(cfg, cls.updates_before(cfg, step, steps))

    @classmethod
    def lp(cls, codes: Tensor, p: Tensor | float) -> Tensor:
        """f^p elementwise, in fp32 at least: 0 where f = 0, f clamped to ``eps`` below it."""
        f = codes.to(torch.promote_types(codes.dtype, torch.float32))
        return torch.where(f > 0, f.clamp_min(cls.eps).pow(p), 0.0)

    @classmethod
    def penalties(cls, bank, x, pre, codes):
        lp = cls.lp(codes, bank.p[:, None, None]).sum(-1).mean(-1)
        return {"lp": bank.cfg.l1_coeff * bank.lp_scale * lp}

    @classmethod
    @torch.no_grad()
    def observe(cls, bank, codes):
        updates = int(bank.p_updates[0])
        if updates == 0:  # before the anneal start nothing is recorded (as in the reference)
            return
        now = cls.lp(codes, bank.p[:, None, None]).sum(-1).mean(-1)
        following = cls.lp(codes, cls.exponent(bank.cfg, updates + 1)).sum(-1).mean(-1)
        entry = torch.stack([now, following], -1)[:, None]
        bank.lp_window.copy_(torch.cat([entry, bank.lp_window[:, :-1]], 1))

    @classmethod
    @torch.no_grad()
    def at_step(cls, bank, step, steps):
        target, done = cls.updates_before(bank.cfg, step, steps), int(bank.p_updates[0])
        for updates in range(done + 1, target + 1):
            if updates >= 2:  # p changes: c *= mean Lp(old p) / mean Lp(new p) over the window
                old, new = bank.lp_window.nanmean(1).unbind(-1)
                ratio = old / new
                bank.lp_scale.mul_(torch.where(torch.isfinite(ratio) & (ratio > 0), ratio, 1.0))
            bank.lp_window.fill_(math.nan)
        if target != done:  # (a lower target: a new schedule on a trained bank; p follows it)
            bank.p_updates.fill_(target)
            bank.p.fill_(cls.exponent(bank.cfg, target))


ARCHITECTURES: dict[str, type[Architecture]] = {
    cls.name: cls for cls in (ReLU, ReLUDecoderNorm, TopK, BatchTopK, Matryoshka, JumpReLU, Gated, PAnneal)
}
