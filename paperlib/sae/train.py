"""The training loop: every seed of a bank sees the same batches; Adam; metrics at a cadence.

Full-batch training (paper A's organism: all N rows every step) and mini-batch training share one
loop. Mini-batches follow a per-epoch permutation derived from ``(seed, epoch)`` alone, so a
resumed run sees exactly the batches an uninterrupted one would. Each step:

* learning rate: linear warm-up over ``warmup_steps``, constant, then linear decay to zero over
  the last ``decay_fraction`` of the steps; sparsity coefficients warm up over
  ``sparsity_warmup_steps``;
* gradients in closed form for ReLU/TopK (``SAEBank.loss_and_grads``), else by autograd;
* ``decoder="unit"``: the decoder gradient's component along each row is removed before the Adam
  step and rows are renormalised after it;
* dead-latent tracking (tokens since each latent fired), which AuxK uses;
* on the CPU, the thread count measured fastest for that kind of step, where a probe shows the count
  changes no bit (``paperlib.sae.threads.MeasuredStep``), so a busy machine does not stall short steps;
* ``precision``: ``"bf16"`` autocasts the step's matmuls to bfloat16 (fp32 weights, Adam state and
  losses; see ``paperlib.runtime``), ``"auto"`` (default) does so on CUDA only. Evaluation and
  logged metrics are always fp32.

Before training, ``normalize=True`` scales the data to unit mean squared norm (factor measured on
the first ``stats_rows`` rows) and ``b_dec_init`` sets the decoder bias to the data's mean or
geometric median; after training the scale is folded back into the weights, so the bank works on
raw activations. Every ``log_every`` steps (and at the first and last) the bank is evaluated and
each callback called; at ``checkpoint_fractions`` of training the decoders are snapshotted
(``History.checkpoints``) and, with ``checkpoint_dir``, the full state is written atomically so an
interrupted run resumes from its last checkpoint. The checkpoint records everything that
determines the run (the SAE config, the whole ``TrainConfig`` but ``checkpoint_dir``, and the data's
shape and sha256: a full hash, ~1 GB/s, about 2 s for 1M rows x 576, small next to training on
them); resuming with anything else is refused, never silently mixed.

A non-finite loss stops training with the step and configuration in the message. A run that
diverges but stays finite ends with a ``RuntimeWarning``: for some seed the last logged loss is more
than ``DIVERGED_LOSS_RATIO`` (2) times the first and the last FVU is above 1 (worse than predicting
the mean); a run that learns never meets both.

Where training runs, one rule for every entry point (``train`` and the cached runs built on it:
``runs.trained.trained_bank``, ``runs.zoo.zoo_run``, ``runs.family.train_family``,
``stitching.meta.train_meta_sae``): on ``device`` when the caller names one, else on ``paperlib.device()``
(``PAPERLIB_DEVICE`` if set, else CUDA when present, else CPU). ``train`` moves the bank there in place
and leaves it there, like ``Module.to``; the cached entry points hand their banks back on the CPU.

``x`` is a float tensor or a numpy array (converted, on the training device) of shape
[n_rows >= 1, d_model]; anything else is refused before training starts, as are configuration
fields of the wrong type (``True`` for an integer, a string for a number).

``x`` may also be a ``paperlib.sources.stream.RowStream`` (stored rows read block by block, or a live
language model): then only one block is held at a time, batches (``batch_size`` is required) are its
consecutive rows, the first ``stats_rows`` rows set the scale and ``b_dec`` and are the evaluation rows,
a checkpoint records the stream's identity and position, and a resumed run continues at that position.
``train_many(banks, stream, cfgs)`` trains several banks in lockstep from one stream (each batch read once),
each ending as ``train`` alone would leave it, in as many passes over the stream as the memory requires.
"""

from __future__ import annotations

import functools
import hashlib
import math
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import cast

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from paperlib._stack import user_stacklevel
from paperlib.atomic import atomic_path, remove_stale_temporaries
from paperlib.checks import is_int, is_real
from paperlib.runtime import PRECISIONS, cpu_has_native_bf16, matmul_precision, resolve_device, resolve_precision
from paperlib.sae.bank import SAEBank
from paperlib.sae.kernels import scratch
from paperlib.sae.threads import MeasuredStep
from paperlib.sources.stream import Feed, RowStream
from paperlib.store import jsonable

Callback = Callable[[SAEBank], "float | np.ndarray | Tensor"]

# Paper A's checkpoints: log-spaced early in training, then every tenth.
PAPER_CHECKPOINTS = (0.0, 0.001, 0.00316, 0.01, 0.0316, 0.1, 0.316) + tuple(round(0.1 * i, 1) for i in range(2, 11))

# A run has diverged when, for some seed, the last logged loss exceeds this multiple of the first
# and the last FVU exceeds 1 (module docstring).
DIVERGED_LOSS_RATIO = 2.0


@dataclass(frozen=True)
class TrainConfig:
    """``batch_size=None`` trains full-batch. ``eval_rows`` caps the rows used for logged metrics
    (``None``: all). ``chunk_size`` only bounds memory: results do not depend on it beyond float
    rounding."""

    steps: int
    lr: float = 1e-4
    batch_size: int | None = None
    log_every: int = 100
    seed: int = 0
    eval_rows: int | None = None
    chunk_size: int = 4096
    warmup_steps: int = 0
    decay_fraction: float = 0.0
    sparsity_warmup_steps: int = 0
    normalize: bool = False
    b_dec_init: str = "zeros"  # "zeros", "mean" or "median" (geometric median)
    stats_rows: int = 100_000
    checkpoint_fractions: tuple[float, ...] = ()
    checkpoint_dir: str | None = None
    precision: str = "auto"  # matmuls: "auto" (bf16 on CUDA, fp32 on CPU), "native" (bf16 where native), fp32, bf16

    def __post_init__(self) -> None:
        for name in ("steps", "log_every", "chunk_size", "stats_rows"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("batch_size", "eval_rows"):
            value = getattr(self, name)
            if value is not None and (not is_int(value) or value < 1):
                raise ValueError(f"TrainConfig.{name} must be a positive integer or None, got {value!r}")
        for name in ("warmup_steps", "sparsity_warmup_steps"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if not is_int(self.seed):
            raise ValueError(f"TrainConfig.seed must be an integer, got {self.seed!r}")
        if not is_real(self.lr) or not self.lr > 0:
            raise ValueError(f"TrainConfig.lr must be a positive finite number (e.g. 1e-3), got {self.lr!r}")
        if not is_real(self.decay_fraction) or not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"TrainConfig.decay_fraction must be a number in [0, 1], got {self.decay_fraction!r}")
        if not isinstance(self.normalize, bool):
            raise ValueError(f"TrainConfig.normalize must be True or False, got {self.normalize!r}")
        if self.b_dec_init not in ("zeros", "mean", "median"):
            raise ValueError(f"TrainConfig.b_dec_init must be 'zeros', 'mean' or 'median', got {self.b_dec_init!r}")
        if not isinstance(self.checkpoint_fractions, (tuple, list)) or any(
            not is_real(f) or not 0 <= f <= 1 for f in self.checkpoint_fractions
        ):
            raise ValueError(
                f"TrainConfig.checkpoint_fractions must be a tuple of numbers in [0, 1], "
                f"got {self.checkpoint_fractions!r}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.checkpoint_dir is not None and not self.checkpoint_fractions:
            raise ValueError("TrainConfig.checkpoint_dir needs checkpoint_fractions (e.g. PAPER_CHECKPOINTS)")

    def checkpoint_steps(self) -> list[int]:
        return sorted({round(f * self.steps) for f in self.checkpoint_fractions})

    def lr_at(self, step: int) -> float:
        """Learning rate of the update that produces ``step`` (1-based)."""
        warm = min(1.0, step / self.warmup_steps) if self.warmup_steps else 1.0
        decay_steps = self.decay_fraction * self.steps
        decay = min(1.0, (self.steps - step + 1) / decay_steps) if decay_steps else 1.0
        return self.lr * warm * decay

    def sparsity_scale_at(self, step: int) -> float:
        return min(1.0, step / self.sparsity_warmup_steps) if self.sparsity_warmup_steps else 1.0


@dataclass
class History:
    """Logged metrics: ``step`` [T]; per-seed metrics [T, S]; callback outputs [T, ...]; decoder
    snapshots {step: W_dec [S, n, d]} at the checkpoint steps; the data scale used in training."""

    columns: dict[str, np.ndarray]
    checkpoints: dict[int, Tensor] = field(default_factory=dict)
    scale: float = 1.0

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]

    def final(self, name: str) -> np.ndarray:
        return self.columns[name][-1]


@torch.no_grad()
def evaluate(bank: SAEBank, x: Tensor, chunk_size: int = 4096) -> dict[str, np.ndarray]:
    """Per-seed metrics on ``x``: the training loss and its parts, and at inference mse (element
    mean), fvu (fraction of variance unexplained), l1, l0, and ``dead_in_training``: the fraction of
    latents the trainer counts as dead (no firing in the last ``dead_tokens`` training tokens; not a
    held-out statistic: ``runs.trained.firing_rates`` on held-out rows gives that)."""
    sums: dict[str, Tensor] = {}
    for start in range(0, x.shape[0], chunk_size):
        chunk = x[start : start + chunk_size]
        _, parts, codes, recon = bank.loss_and_reconstruction(chunk)
        if bank.cfg.arch.inference_differs:  # e.g. BatchTopK: a threshold instead of the batch top-k
            codes = bank.encode(chunk)
            recon = bank.decode(codes)
        parts = {f"loss_{k}": v * len(chunk) for k, v in parts.items()}
        parts.update(sq_err=(recon - chunk).square().sum((1, 2)), l1=codes.sum((1, 2)), l0=(codes > 0).sum((1, 2)))
        for name, value in parts.items():
            sums[name] = sums.get(name, 0) + value
    n = x.shape[0]
    out = {name: value / n for name, value in sums.items()}
    variance = (x - x.mean(0)).square().sum() / n
    out["mse"] = out["sq_err"] / x.shape[1]
    out["fvu"] = out.pop("sq_err") / variance.clamp_min(1e-30)
    out["loss"] = cast(Tensor, sum(v for k, v in out.items() if k.startswith("loss_")))
    out["dead_in_training"] = (bank.tokens_since_fired >= bank.cfg.dead_tokens).float().mean(-1)
    return {name: value.cpu().numpy() for name, value in out.items()}


def _check_stream(stream: RowStream, bank: SAEBank, cfg: TrainConfig) -> None:
    """A stream has no length to take all of: batches must be sized, and rows must fit the bank."""
    if cfg.batch_size is None:
        raise ValueError(
            "training from a stream needs TrainConfig.batch_size (full-batch training takes all rows, and a "
            "stream has no end); set batch_size, e.g. 4096"
        )
    if stream.d_model != bank.cfg.d_model:
        raise ValueError(
            f"the stream's rows have d_model={stream.d_model}, the bank expects {bank.cfg.d_model}; "
            "build the bank for the stream's model and layer"
        )


def _as_data(x, bank: SAEBank) -> Tensor:
    """``x`` as a tensor, checked: numpy arrays are accepted (converted without a copy where possible);
    anything else, integer or boolean data, no rows, the wrong width or NaN/Inf is refused here."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x) if x.dtype.kind == "f" and x.dtype.isnative else torch.as_tensor(x)
    if not isinstance(x, Tensor):
        raise ValueError(
            f"training data must be a torch.Tensor or numpy array [n_rows, d_model={bank.cfg.d_model}], "
            f"got {type(x).__name__}; convert it with torch.as_tensor"
        )
    if not x.dtype.is_floating_point:
        raise ValueError(
            f"training data must hold floating-point activations, got dtype {x.dtype}; "
            "pass activations (e.g. Activations.fp32()), converted with .float() if they are numbers"
        )
    if x.ndim != 2 or x.shape[1] != bank.cfg.d_model:
        raise ValueError(f"training data must be [n_rows, d_model={bank.cfg.d_model}], got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"training data has no rows (shape {tuple(x.shape)}); pass at least one row per batch")
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).any(dim=1).sum())
        raise ValueError(f"training data has {bad} rows with NaN/Inf entries; clean or drop them first")
    return x


def data_fingerprint(x: Tensor | np.ndarray) -> dict:
    """Shape, dtype and sha256 of the rows exactly as training reads them (the same bytes give the
    same run): what a checkpoint must match to be resumed. Hashed in ~64 MB chunks, never a second
    copy of the whole data (a numpy array, e.g. a memory map, gives what the same tensor gives)."""
    digest = hashlib.sha256()
    rows = max(1, (64 << 20) // max(1, x.shape[1] * x.dtype.itemsize))
    for start in range(0, x.shape[0], rows):
        chunk = x[start : start + rows]
        chunk = chunk if isinstance(chunk, np.ndarray) else chunk.detach().cpu().contiguous().numpy()
        digest.update(np.ascontiguousarray(chunk).data)  # a view where already contiguous: no copy
    return {"shape": list(x.shape), "dtype": str(x.dtype).removeprefix("torch."), "sha256": digest.hexdigest()}


def _batch_rows(step: int, n_rows: int, cfg: TrainConfig) -> Tensor | None:
    """Rows of the batch of ``step`` (1-based); None = all rows. Stateless, hence resumable."""
    if cfg.batch_size is None or cfg.batch_size >= n_rows:
        return None
    per_epoch = n_rows // cfg.batch_size
    epoch, position = divmod(step - 1, per_epoch)
    return _epoch_order(n_rows, cfg.seed * 1_000_003 + epoch)[
        position * cfg.batch_size : (position + 1) * cfg.batch_size
    ]


@functools.lru_cache(maxsize=2)
def _epoch_order(n_rows: int, seed: int) -> Tensor:
    """One epoch's permutation of the rows, drawn once per epoch instead of once per step."""
    return torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed))


def geometric_median(x: Tensor, iterations: int = 100, tol: float = 1e-7) -> Tensor:
    """Weiszfeld's algorithm: the point minimising the sum of Euclidean distances to the rows."""
    median = x.mean(0)
    for _ in range(iterations):
        weights = 1 / (x - median).norm(dim=1).clamp_min(1e-12)
        update = (weights[:, None] * x).sum(0) / weights.sum()
        if (update - median).norm() <= tol * median.norm().clamp_min(1e-12):
            return update
        median = update
    return median


@torch.no_grad()
def _prepare(bank: SAEBank, x: Tensor, cfg: TrainConfig) -> float:
    """Data scale (1 unless ``normalize``), decoder bias initialisation, unit-norm decoder rows."""
    sample = x[: cfg.stats_rows]
    scale = float(1 / sample.square().sum(1).mean().sqrt().clamp_min(1e-12)) if cfg.normalize else 1.0
    if cfg.b_dec_init != "zeros":
        centre = sample.mean(0) if cfg.b_dec_init == "mean" else geometric_median(sample)
        bank.b_dec.copy_((centre * scale).expand_as(bank.b_dec))
    if bank.cfg.decoder == "unit":
        bank.W_dec.div_(bank.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return scale


@torch.no_grad()
def fold_scale(bank: SAEBank, scale: float) -> None:
    """Make a bank trained on ``scale · x`` act on raw ``x``: same codes, reconstructions / scale."""
    bank.W_enc.mul_(scale)
    bank.b_dec.div_(scale)
    bank.W_dec.div_(scale)


def train(
    bank: SAEBank,
    x: Tensor | np.ndarray | RowStream,
    cfg: TrainConfig,
    *,
    callbacks: Mapping[str, Callback] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
) -> History:
    """Train every seed of ``bank`` on rows of ``x`` (a tensor, or a stream of rows) with Adam; returns the logged
    ``History``.
    ``device``: where (default ``paperlib.device()``); the bank is moved there and stays there."""
    target = resolve_device(device, "device")  # refused before the data is read
    if isinstance(x, RowStream):
        return train_many([bank], x, [cfg], callbacks=[callbacks or {}], progress=progress, device=target)[0]
    x = _as_data(x, bank).to(target, torch.float32)
    run = _Run(bank, x, data_fingerprint(x), cfg, callbacks or {}, target)
    x = run.eval_x if cfg.eval_rows is None else run.scaled(x)  # all of x, scaled once
    bar = _bar(run.start, cfg.steps, bank.cfg.architecture, progress)
    with scratch.reuse():  # the steps' large temporaries are allocated once (kernels/scratch.py)
        for step in bar:
            run.step(step, x)
    return run.finish()


def train_many(
    banks: Sequence[SAEBank],
    stream: RowStream,
    cfgs: Sequence[TrainConfig],
    *,
    callbacks: Sequence[Mapping[str, Callback]] | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    memory_limit: int | None = None,
) -> list[History]:
    """Train every bank (bank ``i`` with ``cfgs[i]``) in lockstep from one stream: each batch is read once and
    every bank takes its step on it, so one pass of the stream (one LLM forward per row, for a live stream)
    feeds them all, and each bank ends exactly as ``train(bank, stream, cfg)`` alone would leave it (every
    ``cfgs[i].batch_size`` must be equal). ``memory_limit`` (bytes; default 80 % of what is available on the
    device, ``training_memory`` per bank) splits the banks into groups, each its own pass over the stream;
    the plan is printed first when ``progress``. A bank with ``checkpoint_dir`` resumes from its checkpoint,
    and a pass starts at the earliest of its banks' positions."""
    target = resolve_device(device, "device")
    banks, cfgs = list(banks), list(cfgs)
    callbacks = list(callbacks) if callbacks is not None else [{} for _ in banks]
    if not banks or len(cfgs) != len(banks) or len(callbacks) != len(banks):
        raise ValueError(
            f"train_many takes one TrainConfig and one callbacks mapping per bank, got {len(banks)} banks, "
            f"{len(cfgs)} configs and {len(callbacks)} callbacks"
        )
    for bank, cfg in zip(banks, cfgs):
        _check_stream(stream, bank, cfg)
    if len({cfg.batch_size for cfg in cfgs}) > 1:
        raise ValueError(
            f"banks trained in lockstep read the same batches: give every TrainConfig the same batch_size, "
            f"got {sorted({cast(int, cfg.batch_size) for cfg in cfgs})}"
        )
    sample = _as_data(Feed(stream).take(max(cfg.stats_rows for cfg in cfgs)), banks[0]).to(target, torch.float32)
    passes = _passes(banks, cfgs, target, memory_limit, progress)
    histories: dict[int, History] = {}
    identity = {"stream": stream.identity()}
    for members in passes:
        runs = {
            i: _Run(banks[i], sample[: cfgs[i].stats_rows], identity, cfgs[i], callbacks[i], target) for i in members
        }
        first = min(runs.values(), key=lambda run: run.start)
        feed = Feed(stream, first.position)
        label = banks[members[0]].cfg.architecture if len(members) == 1 else f"{len(members)} banks"
        with scratch.reuse():
            for step in _bar(first.start, max(cfgs[i].steps for i in members), label, progress):
                raw = feed.take(cast(int, cfgs[members[0]].batch_size)).to(target)
                for run in runs.values():
                    if run.start < step <= run.cfg.steps:  # a bank resumed further on waits for its own step
                        run.step(step, run.scaled(raw), feed.position)
        histories.update({i: run.finish() for i, run in runs.items()})
    return [histories[i] for i in range(len(banks))]


def _bar(start: int, steps: int, label: str, progress: bool) -> Iterable[int]:
    """Steps ``start + 1 .. steps``, with a progress bar when ``progress``."""
    return tqdm(
        range(start + 1, steps + 1), disable=not progress, desc=label, mininterval=2, initial=start, total=steps
    )


def training_memory(bank: SAEBank, batch_size: int) -> int:
    """Bytes a bank needs while it trains (an estimate): its fp32 parameters, their gradients and Adam's two
    moments, and per seed a few [batch, n_latents] temporaries of the step (pre-activations, codes and their
    gradient)."""
    parameters = sum(p.numel() for p in bank.parameters())
    return 4 * (4 * parameters + 3 * bank.cfg.n_seeds * batch_size * bank.cfg.n_latents)


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**63  # unknown: no limit


def _passes(
    banks: list[SAEBank], cfgs: list[TrainConfig], device: torch.device, memory_limit: int | None, progress: bool
) -> list[list[int]]:
    """The banks in groups whose training memory fits ``memory_limit``, in order; each group is one pass."""
    limit = memory_limit if memory_limit is not None else int(0.8 * _available_memory(device))
    needs = [training_memory(bank, cast(int, cfg.batch_size)) for bank, cfg in zip(banks, cfgs)]
    passes: list[list[int]] = []
    used = 0
    for i, need in enumerate(needs):
        if not passes or used + need > limit:
            passes.append([])
            used = 0
        passes[-1].append(i)
        used += need
    if progress:
        print(
            f"train_many: {_count(sum(bank.cfg.n_seeds for bank in banks), 'SAE')} in {_count(len(banks), 'bank')}, "
            f"about {sum(needs) / 2**30:.2f} GiB to train on {device} (limit {limit / 2**30:.2f} GiB): "
            f"{_count(len(passes), 'pass', 'passes')} over the stream"
        )
    return passes


def _count(n: int, one: str, many: str | None = None) -> str:
    return f"{n} {one if n == 1 else many or one + 's'}"


class _Run:
    """One bank's training: its optimizer, schedule, log, checkpoints and resumption, advanced one step at a
    time by ``train`` (from a tensor) or ``train_many`` (from a stream shared with other banks)."""

    def __init__(
        self,
        bank: SAEBank,
        sample: Tensor,
        data: dict,
        cfg: TrainConfig,
        callbacks: Mapping[str, Callback],
        target: torch.device,
    ) -> None:
        bank.to(target)
        if resolve_precision(cfg.precision, target) == "bf16" and target.type == "cpu" and not cpu_has_native_bf16():
            warnings.warn(
                f"TrainConfig.precision={cfg.precision!r}: this CPU has no native bf16 (AVX512-BF16/AMX), so "
                "bf16 matmuls are emulated and slower than fp32; use precision='fp32' here",
                stacklevel=user_stacklevel(),
            )  # train directly, or through runs.trained.trained_bank and the Store
        self.bank, self.cfg, self.callbacks = bank, cfg, dict(callbacks)
        # foreach: one kernel per op over all parameters; bitwise the same updates as the per-tensor loop
        # (tested), 1.3-2.4x faster on large banks. torch's fused Adam is faster still but rounds differently.
        self.optimizer = torch.optim.Adam(bank.parameters(), lr=cfg.lr, foreach=True)
        self.log: dict[str, list] = {"step": []}
        self.snapshots: dict[int, Tensor] = {}
        self.resume = _Resume(cfg.checkpoint_dir, bank, cfg, data) if cfg.checkpoint_dir else None
        resumed = self.resume.load(bank, self.optimizer, self.log, self.snapshots) if self.resume else None
        if resumed is None:
            self.scale, self.start, self.position = _prepare(bank, sample, cfg), 0, (0, 0)
        else:
            self.start, self.scale, self.position = resumed
        # only the evaluation rows are kept scaled: train_many holds one run per bank
        self.eval_x = self.scaled(sample if cfg.eval_rows is None else sample[: cfg.eval_rows])
        self.checkpoints = set(cfg.checkpoint_steps())
        # On the CPU each kind of step runs at the thread count measured fastest, where a probe shows the
        # count changes no number (paperlib.sae.threads): a busy machine otherwise stalls short steps.
        self.measured = MeasuredStep(enabled=target.type == "cpu")
        if self.start == 0:
            self.record(0)
            if 0 in self.checkpoints:
                self.checkpoint(0)

    def scaled(self, x: Tensor) -> Tensor:
        """Rows as this run trains on them (the data scale of ``normalize``)."""
        return x * self.scale if self.scale != 1.0 else x

    def step(self, step: int, x: Tensor, position: tuple[int, int] | None = None) -> None:
        """Training step ``step`` on ``x`` (the whole data, or a stream's batch that ends at ``position``),
        then its log and checkpoint when due."""
        _iteration(self.measured, self.bank, self.optimizer, x, self.cfg, step)
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            self.record(step)
        if step in self.checkpoints:
            self.checkpoint(step, position)

    def record(self, step: int) -> None:
        self.log["step"].append(step)
        metrics = evaluate(self.bank, self.eval_x, self.cfg.chunk_size)
        metrics.update({name: np.asarray(_to_numpy(fn(self.bank))) for name, fn in self.callbacks.items()})
        for name, value in metrics.items():
            self.log.setdefault(name, []).append(value)
        if not np.isfinite(metrics["loss"]).all():
            _stop_non_finite(step, self.bank, metrics["loss"])

    def checkpoint(self, step: int, position: tuple[int, int] | None = None) -> None:
        self.snapshots[step] = (self.bank.W_dec.detach() / self.scale).cpu().clone()
        if self.resume:
            self.resume.save(step, self.scale, self.bank, self.optimizer, self.log, self.snapshots, position)

    def finish(self) -> History:
        if self.scale != 1.0:
            fold_scale(self.bank, self.scale)
        history = History({name: np.stack(values) for name, values in self.log.items()}, self.snapshots, self.scale)
        _warn_if_diverged(history, self.bank, self.cfg)
        return history


def _warn_if_diverged(history: History, bank: SAEBank, cfg: TrainConfig) -> None:
    """The ``RuntimeWarning`` of the module docstring: finite numbers, yet the run got worse."""
    loss, fvu = history["loss"], history["fvu"]
    if len(loss) < 2:
        return
    bad = np.flatnonzero((loss[-1] > DIVERGED_LOSS_RATIO * loss[0]) & (fvu[-1] > 1))
    if bad.size:
        seeds = "; ".join(
            f"seed {i}: loss {loss[0][i]:.4g} -> {loss[-1][i]:.4g}, FVU {fvu[0][i]:.4g} -> {fvu[-1][i]:.4g}"
            for i in bad
        )
        warnings.warn(
            f"training diverged (last loss > {DIVERGED_LOSS_RATIO:g}x the first and FVU > 1, worse than predicting "
            f"the mean) at steps {int(history['step'][0])}..{int(history['step'][-1])} for {seeds}; of {bank.cfg} "
            f"with {cfg}; lower TrainConfig.lr (now {cfg.lr:g}) or add warmup_steps",
            RuntimeWarning,
            stacklevel=3,
        )


def _iteration(
    measured: MeasuredStep, bank: SAEBank, optimizer: torch.optim.Optimizer, x: Tensor, cfg: TrainConfig, step: int
) -> None:
    """Training step ``step``: its mini-batch of ``x`` and the step, at the thread count ``measured`` picks for
    steps of that batch size and kind."""
    rows = _batch_rows(step, len(x), cfg)
    kind = (len(x) if rows is None else len(rows), bank.closed_form_now())
    measured.run(kind, _step, bank, optimizer, x, rows, cfg, step)


def _step(
    bank: SAEBank, optimizer: torch.optim.Optimizer, x: Tensor, rows: Tensor | None, cfg: TrainConfig, step: int
) -> None:
    """One step on the batch ``x[rows]`` (all of ``x`` when ``rows`` is None), gathered here so that it runs
    at the step's measured thread count too."""
    batch = x if rows is None else x[rows.to(x.device)]
    bank.cfg.arch.at_step(bank, step, cfg.steps)  # progress-dependent state (P-anneal's p); else a no-op
    sparsity = cfg.sparsity_scale_at(step)
    optimizer.zero_grad(set_to_none=True)
    closed_form = bank.closed_form_now()
    with matmul_precision(cfg.precision, batch.device):
        if closed_form:  # gradients accumulate in fp32 buffers whatever the matmul precision
            grads, parts = bank.loss_and_grads(batch, batch.shape[0], cfg.chunk_size, bank.cfg.l1_coeff * sparsity)
        else:
            total, parts, codes = bank.loss(batch, sparsity_scale=sparsity)
    if closed_form:
        for name, param in bank.named_parameters():
            param.grad = grads[name]
        check, fired = parts["sq_err"], parts["fired"]
    else:
        check, fired = cast(Tensor, sum(parts.values())), (codes > 0).any(1)
        total.backward()
    if not torch.isfinite(check).all():
        _stop_non_finite(step, bank, check)
    bank.record_firing(fired, batch.shape[0])
    if bank.cfg.decoder == "unit":
        with torch.no_grad():  # remove the gradient component that would change row norms
            rows, grad = bank.W_dec, bank.W_dec.grad
            assert grad is not None  # set above, by backward() or the closed form
            # grad -= (grad * rows).sum(-1, keepdim=True) * rows, its two [S, n, d] products in one kept buffer
            product = scratch.buffer("unit_projection", tuple(grad.shape), grad.dtype, grad.device)
            along = torch.mul(grad, rows, out=product).sum(-1, keepdim=True)
            grad -= torch.mul(along, rows, out=product)
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr_at(step)
    optimizer.step()
    if bank.cfg.decoder == "unit":
        with torch.no_grad():
            bank.W_dec.div_(bank.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12))


class _Resume:
    """The full training state at the last checkpoint, in one file written atomically, with the
    record of what it is a run of (the SAE config, the schedule, the data) that ``load`` checks."""

    def __init__(self, directory: str, bank: SAEBank, cfg: TrainConfig, data: dict) -> None:
        self.path = Path(directory) / "train_state.pt"
        self.record = {"sae": jsonable(bank.cfg), "train": jsonable(replace(cfg, checkpoint_dir=None)), "data": data}
        remove_stale_temporaries(self.path.parent, recursive=False)  # of interrupted saves, an hour old

    def save(self, step, scale, bank, optimizer, log, snapshots, position: tuple[int, int] | None) -> None:
        state = {
            "step": step,
            "scale": scale,
            "position": position,  # in a stream: where the next batch starts
            "bank": bank.state_dict(),
            "optimizer": optimizer.state_dict(),
            "log": log,
            "snapshots": snapshots,
            "config": repr(bank.cfg),
            **self.record,
        }
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)

    def load(self, bank, optimizer, log, snapshots) -> tuple[int, float, tuple[int, int]] | None:
        if not self.path.exists():
            return None
        fix = f"use another checkpoint_dir, or delete {self.path.parent} to start this run over"
        try:
            state = torch.load(self.path, weights_only=False)
        except Exception as exc:
            raise ValueError(f"cannot resume from {self.path}: unreadable ({exc}); {fix}") from exc
        if not isinstance(state, dict) or not all(k in state for k in self.record):
            raise ValueError(
                f"cannot resume from {self.path}: it does not record the schedule and data it was "
                f"trained with (written by an older paperlib), so it may be another run; {fix}"
            )
        differences = [d for part in self.record for d in _differences(part, state[part], self.record[part])]
        if differences:
            raise ValueError(
                f"{self.path} holds a run of another configuration or data ({'; '.join(differences)}); {fix}"
            )
        bank.load_state_dict(state["bank"])
        optimizer.load_state_dict(state["optimizer"])
        log.update(state["log"])
        snapshots.update(state["snapshots"])
        return state["step"], state["scale"], tuple(state.get("position") or (0, 0))


def _differences(part: str, saved, now) -> list[str]:
    """What differs between a checkpoint's record and this run's, field by field ("default" where a
    field is at its default, which ``jsonable`` leaves out)."""
    if saved == now:
        return []
    if not isinstance(saved, dict) or not isinstance(now, dict):
        return [f"{part}: checkpoint {saved!r}, now {now!r}"]
    return [
        f"{part}.{k}: checkpoint {saved.get(k, 'default')!r}, now {now.get(k, 'default')!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]


def _to_numpy(value) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _stop_non_finite(step: int, bank: SAEBank, values) -> None:
    seeds = [i for i, v in enumerate(np.atleast_1d(_to_numpy(values))) if not math.isfinite(float(v))]
    raise FloatingPointError(
        f"non-finite loss at step {step} for seeds {seeds} of {bank.cfg}; "
        "lower the learning rate or check the data scale"
    )
