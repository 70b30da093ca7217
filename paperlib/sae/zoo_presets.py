"""One rule for every architecture of the zoo, so that comparing them on the same data is fair.

Paper A compared only ReLU/L1 and TopK on its organism. Putting the whole zoo side by side needs a
hyperparameter for each architecture's sparsity, and choosing those by the ground-truth score would
tune the comparison to its own answer. So the rules here look only at what a practitioner sees —
the width, the target sparsity, the data's scale and the L0 a run reaches — never at the ground truth:

* **sparsity.** TopK, BatchTopK and Matryoshka get k = the target L0 (``sparsity``); JumpReLU
  gets ``target_l0`` = the same number. ReLU, decoder-norm ReLU, Gated and P-anneal have no L0
  knob: their L1 coefficient (P-anneal's at p = 1; it rescales itself as p falls) starts from paper
  A's organism value (1e-2 on a squared error averaged over d = 16 dims = 0.16 on the per-sample
  squared error, at codes of scale 1), and ``calibrate_l1`` scales it by powers of two (then
  geometric bisection) until short pilot runs land near the target L0 — the sweep a practitioner
  runs, judged by L0 alone.
* **scale.** Coefficients are expressed in the data's units, so a rule means the same at any d and
  data scale: the L1 in code units, code_scale = sqrt(E‖x‖² / sparsity) (the size of one active
  code if the active directions were orthogonal), JumpReLU's L0 weight in units of E‖x‖², and its
  initial threshold and straight-through bandwidth in code units. Reconstruction is the per-sample
  squared error summed over dims.
* **decoder.** Unit-norm rows for every architecture except ``relu_dnorm``, whose definition is a
  free decoder with the L1 weighted by row norms. A free decoder under a plain L1 lets ReLU shrink
  its codes and grow its rows (notebook 01 shows the drift); unit rows make the L1 mean the same for
  ReLU and Gated.
* **no auxiliary losses, no L1 on the TopK family.** AuxK would give the TopK family a dead-latent
  remedy the others lack, and an L1 term on top of k only shrinks the active codes (paper A's
  authors kept one; notebook 01 keeps it, this rule does not).
* **same initialisation.** Tied encoder/decoder with unit rows for all (``init_scale=1``); decoder
  rows depend on the seed alone, so seed i of every architecture starts from the same dictionary.
* **Matryoshka's nested prefixes.** Paper B's fractions (1/32, 1/16, 1/8, 1/4) give one-latent
  groups at 32 latents; here prefixes end at 1/8, 1/4 and 1/2 of the width (32 latents: 4, 8, 16,
  32), and every group must hold at least ``min_group`` latents.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator
from dataclasses import dataclass

import torch

from paperlib.sae.architectures import Matryoshka
from paperlib.sae.bank import SAEConfig

ZOO = ("relu", "relu_dnorm", "gated", "topk", "batchtopk", "matryoshka", "jumprelu", "panneal")
L1_FAMILY = ("relu", "relu_dnorm", "gated", "panneal")
K_FAMILY = ("topk", "batchtopk", "matryoshka")


@dataclass(frozen=True)
class ZooRules:
    """The per-architecture rules (module docstring); one instance configures the whole zoo."""

    l1_coeff: float = 0.16  # relu, relu_dnorm, gated, panneal: x code_scale (paper A: 1e-2 x d=16)
    l0_coeff: float = 5.0  # jumprelu: weight of (L0 / target - 1)^2, x mean squared norm of x
    threshold_fraction: float = 0.1  # jumprelu: initial threshold / code_scale
    bandwidth_fraction: float = 0.05  # jumprelu: straight-through kernel width / code_scale
    prefix_ends: tuple[float, ...] = (1 / 8, 1 / 4, 1 / 2)  # matryoshka: nested prefixes / width
    min_group: int = 2  # matryoshka: fewest latents in any group
    init_scale: float = 1.0

    def __post_init__(self) -> None:
        for name in ("l1_coeff", "l0_coeff", "threshold_fraction", "bandwidth_fraction", "init_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ZooRules.{name} must be > 0, got {getattr(self, name)!r}")
        ends = self.prefix_ends
        if not ends or any(not 0 < e < 1 for e in ends) or any(b <= a for a, b in zip(ends, ends[1:])):
            raise ValueError(f"ZooRules.prefix_ends must be increasing fractions in (0, 1), got {ends!r}")
        if not isinstance(self.min_group, int) or self.min_group < 1:
            raise ValueError(f"ZooRules.min_group must be a positive integer, got {self.min_group!r}")


def mean_sq_norm(x: torch.Tensor) -> float:
    """mean ‖x‖² over the rows of ``x``: the data scale every rule is expressed in."""
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"mean_sq_norm needs data of shape [n_rows, d_model], got {tuple(x.shape)}")
    value = float(x.double().square().sum(1).mean())
    if not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"mean_sq_norm: the data must be finite and not all zero (mean squared norm {value}); clean it first"
        )
    return value


def matryoshka_groups(n_latents: int, prefix_ends: tuple[float, ...], min_group: int = 2) -> tuple[float, ...]:
    """SAEConfig.groups (fractions before "rest") whose nested prefixes end at ``prefix_ends`` of
    the width, checked so that every group holds at least ``min_group`` latents."""
    ends = [round(e * n_latents) for e in prefix_ends]
    sizes = [b - a for a, b in zip([0, *ends], [*ends, n_latents])]
    if min(sizes) < min_group:
        raise ValueError(
            f"Matryoshka prefixes {prefix_ends} of {n_latents} latents give groups of {sizes} latents, "
            f"below min_group={min_group}; use fewer or wider prefixes, or more latents"
        )
    groups = tuple(size / n_latents for size in sizes[:-1])
    assert Matryoshka.prefix_ends(n_latents, groups) == [*ends, n_latents]
    return groups


def zoo_config(
    architecture: str,
    *,
    d_model: int,
    n_latents: int,
    sparsity: int,
    data_scale: float,
    rules: ZooRules = ZooRules(),
    n_seeds: int = 1,
    seed: int = 0,
) -> SAEConfig:
    """The SAEConfig of ``architecture`` under ``rules`` for a target L0 of ``sparsity`` on data
    whose mean squared norm is ``data_scale`` (``mean_sq_norm(x)``)."""
    if architecture not in ZOO:
        raise ValueError(f"unknown zoo architecture {architecture!r}; choose one of {', '.join(ZOO)}")
    if not isinstance(sparsity, int) or isinstance(sparsity, bool) or not 1 <= sparsity <= n_latents:
        raise ValueError(f"sparsity must be an integer target L0 in [1, n_latents={n_latents}], got {sparsity!r}")
    if not (isinstance(data_scale, (int, float)) and math.isfinite(data_scale) and data_scale > 0):
        raise ValueError(
            f"data_scale must be the data's mean squared norm (> 0; use mean_sq_norm(x)), got {data_scale!r}"
        )
    code = math.sqrt(data_scale / sparsity)
    fields: dict = dict(
        d_model=d_model,
        n_latents=n_latents,
        n_seeds=n_seeds,
        seed=seed,
        init_scale=rules.init_scale,
        reconstruction="sum",
        decoder="free" if architecture == "relu_dnorm" else "unit",
    )
    if architecture in L1_FAMILY:
        fields["l1_coeff"] = rules.l1_coeff * code
    elif architecture in K_FAMILY:
        fields["k"] = sparsity
        if architecture == "matryoshka":
            fields["groups"] = matryoshka_groups(n_latents, rules.prefix_ends, rules.min_group)
    else:  # jumprelu
        fields.update(
            l0_coeff=rules.l0_coeff * data_scale,
            target_l0=float(sparsity),
            init_threshold=rules.threshold_fraction * code,
            bandwidth=rules.bandwidth_fraction * code,
        )
    return SAEConfig(architecture, **fields)


@dataclass(frozen=True)
class L1Calibration:
    """The chosen multiplier of the rule's L1 coefficient and every pilot's L0 {multiplier: L0}."""

    multiplier: float
    tried: dict[float, float]


def calibrate_l1(
    pilot_l0: Callable[[float], float],
    target: float,
    *,
    factor: float = 2.0,
    refinements: int = 1,
    max_pilots: int = 12,
) -> L1Calibration:
    """The multiplier m of the rule's L1 coefficient whose pilot run (``pilot_l0(m)`` -> its final
    L0) lands closest to ``target`` in log ratio (``l1_probes``, one pilot after another)."""
    probes = l1_probes(target, factor=factor, refinements=refinements, max_pilots=max_pilots)
    multiplier = next(probes)
    while True:
        try:
            multiplier = probes.send(pilot_l0(multiplier))
        except StopIteration as done:
            return done.value


def l1_probes(
    target: float, *, factor: float = 2.0, refinements: int = 1, max_pilots: int = 12
) -> Generator[float, float, L1Calibration]:
    """``calibrate_l1`` as a conversation: yields the next pilot's multiplier, is sent that pilot's final L0,
    and returns the ``L1Calibration``; so several calibrations can train their pilots side by side
    (``runs.zoo.zoo_runs``). From m = 1 it multiplies or divides by ``factor`` until one pilot is at or
    below the target and one above it, then bisects that bracket geometrically ``refinements`` times
    (L0 falls as the L1 grows)."""
    if not target > 0:
        raise ValueError(f"calibrate_l1 needs a target L0 > 0, got {target!r}")
    if not factor > 1:
        raise ValueError(f"calibrate_l1 needs factor > 1, got {factor!r}")
    if not isinstance(refinements, int) or refinements < 0 or not isinstance(max_pilots, int) or max_pilots < 2:
        raise ValueError(
            f"calibrate_l1 needs refinements >= 0 and max_pilots >= 2, got {refinements!r}, {max_pilots!r}"
        )
    tried: dict[float, float] = {}

    def record(m: float, l0: float) -> float:
        if not math.isfinite(l0) or l0 < 0:
            raise ValueError(f"pilot run at L1 multiplier {m:g} reached L0 {l0}; it must be a finite count >= 0")
        tried[m] = l0
        return l0

    dense, sparse, m = None, None, 1.0  # dense: L0 above target; sparse: at or below it
    while dense is None or sparse is None:
        if len(tried) == max_pilots:
            raise ValueError(
                f"could not bracket the target L0 {target:g} in {max_pilots} pilots (multiplier: L0 {tried}); "
                "check the pilot runs or raise max_pilots"
            )
        if record(m, float((yield m))) > target:
            dense, m = m, m * factor
        else:
            sparse, m = m, m / factor
    for _ in range(refinements):
        m = math.sqrt(dense * sparse)
        if record(m, float((yield m))) > target:
            dense = m
        else:
            sparse = m

    def miss(m: float) -> float:
        return abs(math.log(tried[m] / target)) if tried[m] > 0 else math.inf

    return L1Calibration(min(tried, key=miss), dict(tried))
