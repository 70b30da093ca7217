"""Benchmark TopK SAE training throughput: paperlib vs SAELens, sparsify and dictionary_learning.

    python benchmarks/train_throughput.py [--sizes 576x4096 768x16384] [--steps N] [--out PATH]
                                          [--warmup N] [--peers sae-lens eai-sparsify dictionary-learning]
                                          [--device {cpu,cuda}]

Every library trains the same TopK SAE (k=32, batches of 4096 tokens, Adam, lr 1e-4, float32, CPU)
on the same synthetic activations: a Gaussian with a random low-rank structure plus isotropic noise
and an offset, generated once per size from a fixed seed and handed to every measurement as a file.
Each measurement runs in a fresh subprocess (``--_child NAME``): paperlib in this interpreter,
every peer in its own virtual environment ``benchmarks/.venv-peers-train/<peer>/``, which this
script creates and fills from ``requirements/bench-train-peers.txt`` (used as a pip constraints
file, so torch stays at the CPU wheel 2.13.0). A peer that cannot be installed or driven is
skipped with the reason recorded; nothing here raises because of a peer.

What is timed
    paperlib: ``paperlib.sae.train.train`` as a user calls it. A first call of ``--warmup`` steps
    (torch.compile of the closed-form step, first allocations) is timed separately as warm-up;
    the second call of ``--steps`` steps is the measurement. ``train`` always evaluates the bank
    before the first and after the last step (``eval_rows`` = one batch); those two evaluations are
    timed where they run (the child wraps ``paperlib.sae.train.evaluate``) and subtracted
    (``seconds``), as is the thread-count probe each call runs once before its first step
    (``probe_seconds``: ``paperlib.sae.threads.MeasuredStep``, the first step again on copies at 2 and 1
    threads, a one-time cost like the warm-up); the whole call is kept as ``seconds_with_evals``.
    ``step_path`` records which closed-form step paperlib took (its sparse TopK path or the dense one).
    peers: each library's own SAE class, loss and training-step bookkeeping, driven by a loop of
    their step (their trainers need a language model and a data pipeline, which the loop replaces),
    with ``torch.optim.Adam``. ``--warmup`` steps first, then ``--steps`` timed steps.

paperlib-bf16: the same single-seed run with ``TrainConfig(precision="bf16")`` (every matmul of the
step takes bfloat16 inputs; weights, Adam and losses stay fp32), measured only where the CPU has
native bf16 (AVX512-BF16 or AMX). Its roofline is the machine's bf16 matmul rate, and its ratio to
the peers (all fp32) is reported separately, as ``paperlib_bf16_over_fastest_peer_fp32``.

paperlib-auxk (and paperlib-auxk-bf16): the single-seed run with the AuxK dead-latent loss at weight
1/32, the configuration notebooks 06-10 train (their TopK family: ``runs.zoo.rule_config``). AuxK
adds a top-k over the dead latents' pre-activations and a second decode while any latent is dead;
``auxk_cost`` = paperlib's tokens/s without it / with it. Of the peers only dictionary_learning
trains with AuxK here (its default weight, recorded as ``auxk_alpha``).

Reported per measurement: tokens/s per SAE = steps * batch / seconds (each seed of a bank sees every
token, so a bank of S seeds trains S * that many SAE-tokens per second: ``tokens_per_s_aggregate``)
and that aggregate as a fraction of the machine's dense fp32 matmul roofline for the one
unavoidable forward encoder matmul: roofline tokens/s = (FLOP/s of a [4096, d] x [d, n] float32
matmul, measured here) / (2 d n). torch has two fp32 GEMMs on CPU: ``torch.matmul`` (MKL, what the
peers call) and oneDNN's linear (what paperlib's sparse TopK step calls, ``paperlib.sae.kernels.gemm``); on AMD
CPUs oneDNN is ~2x faster, so the roofline takes the faster of the two and both rates are recorded.
Ratios per size: paperlib (one seed) / fastest peer, and S=3 seeds in one bank vs three separate
single-seed runs (sum of their times / the bank's time). The load average (``os.getloadavg()``) is
recorded with every measurement; a measurement whose child's ``torch.matmul`` check (run right after
its timed part) falls below 75% of the parent's rate shared the CPU with another process: it is
measured once more after the load drops, and flagged ``contended`` if it still was. The JSON result
is written atomically after every measurement and holds no absolute path of this machine.

--device cuda (everything above is ``--device cpu``, the default, unchanged)
    The same comparison on one CUDA GPU, every process in this interpreter (a GPU machine reaches no
    network, so there are no per-peer venvs: a peer that does not import here is skipped with the
    reason; ``benchmarks/gpu_check.sh --fetch-wheels`` fetches wheels to carry). paperlib: ``train(...,
    device="cuda")`` in bf16 (``precision="bf16"``, what ``"auto"`` means on CUDA; three single-seed runs
    and a bank of 3 seeds), bf16 + AuxK, fp32 and fp32 + AuxK. sparsify: driven like its trainer, i.e.
    its forward's own bf16 autocast and its Triton decoder (``decoder`` is recorded). SAELens: fp32 (its
    trainer's default) and ``sae-lens-bf16`` (its ``autocast=True``). Before timing, each child checks
    that the SAE's parameters and the data live on the GPU and refuses to report otherwise
    (``placement``); the device is synchronised before and after the timed part and around each
    subtracted evaluation; ``peak_gpu_memory_mib`` is the child's peak allocation over the timed part.
    Default ``--steps`` 200 and ``--warmup`` 20 (the warm-up includes torch.compile on the GPU).
    Rooflines, all measured here with CUDA events: a [4096, d] x [d, n] matmul in bf16, fp32 (TF32 off,
    torch's default and paperlib's fp32) and TF32; ``fraction_of_roofline`` is against the rate of the
    measurement's ``precision``, ``fraction_of_bf16_roofline`` against the bf16 rate. The physical limit
    of one TopK SAE, in tokens/s (``fraction_of_physical_limit`` = aggregate tokens/s / limit):

        limit = B / (2 B d n / R_bf16 + 28 P / W),    P = 2 d n + d + n

    per step of B = 4096 tokens its encoder forward at the measured bf16 rate R_bf16 (FLOP/s), plus the
    fp32 Adam traffic over its P parameters (W_enc, W_dec, b_enc, b_dec: read parameter, gradient, m, v
    and write parameter, m, v = 28 bytes each) at the measured memory bandwidth W (a device-to-device
    copy, bytes read + written per second). At 768 x 16,384 on an H200 (690 TFLOP/s, ~4.3 TB/s) that is
    0.15 ms + 0.16 ms a step: ~13M tokens/s. The GPU's name, torch, CUDA, cuDNN, Triton and driver
    versions are recorded; results go to ``benchmarks/results/train_throughput.<gpu>.json`` (the GPU's
    name, e.g. ``nvidia-h200``). ``--device cuda`` on a machine without CUDA is refused up front.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PEERS_DIR = ROOT / "benchmarks" / ".venv-peers-train"
REQUIREMENTS = ROOT / "requirements" / "bench-train-peers.txt"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "train_throughput.json"

K = 32
BATCH = 4096
LR = 1e-4
AUX_COEFF = 1 / 32  # the LLM notebooks' AuxK weight (paperlib.runs.zoo.rule_config)
DATA_BATCHES = 4  # rows of synthetic data = DATA_BATCHES * BATCH
DATA_RANK = 64
DATA_SEED = 1234
BANK_SEEDS = 3
CONTENDED = 0.75  # a child's matmul check below this fraction of the parent's rate: CPU was shared
# What each paperlib run reports beside its throughput (the child's bookkeeping of train()'s one-time costs)
PAPERLIB_RUN_FIELDS = ("seed", "seconds_with_evals", "eval_seconds", "probe_seconds", "final_fvu", "warnings")
GPU_STEPS = 200  # --device cuda: timed steps (a step takes milliseconds there) and warm-up steps
GPU_WARMUP = 20
ADAM_BYTES_PER_PARAM = 28  # fp32 Adam per step: read parameter, gradient, m, v (16), write parameter, m, v (12)

# Peer name -> pip distribution, import name, packages removed after installing (with why).
PEERS: dict[str, dict[str, Any]] = {
    "sae-lens": {"dist": "sae-lens", "module": "sae_lens", "remove": {}},
    "eai-sparsify": {"dist": "eai-sparsify", "module": "sparsify", "remove": {}},
    "dictionary-learning": {
        "dist": "dictionary-learning",
        "module": "dictionary_learning",
        "remove": {
            "torchvision": "required by nnsight, but PyPI's torchvision wheel is linked against CUDA "
            "libraries, cannot load next to the CPU torch and breaks `import transformers`; "
            "nothing dictionary_learning's TopK trainer uses needs it"
        },
    },
}


# ----------------------------------------------------------------------------- shared helpers
def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _matmul_gflops(
    d: int, n: int, reps: int = 3, dtype: str = "float32", backend: str = "torch", rows: int = BATCH
) -> float | None:
    """Median dense rate of a [rows, d] x [d, n] matmul in ``dtype``, in GFLOP/s: through
    ``torch.matmul`` (MKL for float32 on CPU: what the peers use) or ``backend="onednn"``, torch's
    oneDNN linear (None where this torch lacks it)."""
    import torch

    a = torch.randn(rows, d, dtype=getattr(torch, dtype))
    b = torch.randn(d, n, dtype=a.dtype)
    if backend == "onednn":
        try:
            linear = torch.ops.mkldnn._linear_pointwise
        except (AttributeError, RuntimeError):
            return None

        def product() -> None:
            linear(a, b.T, None, "none", [], "")
    else:
        out = torch.empty(rows, n, dtype=a.dtype)

        def product() -> None:
            torch.matmul(a, b, out=out)

    product()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        product()
        times.append(time.perf_counter() - t0)
    return 2 * rows * d * n / statistics.median(times) / 1e9


def _sanitize(text: str) -> str:
    """Strip this machine's absolute paths from an error message."""
    for path, name in ((str(ROOT), "<repo>"), (tempfile.gettempdir(), "<tmp>"), (sys.base_prefix, "<python>")):
        text = text.replace(path, name)
    return re.sub(r"(?<![\w.<>])/(?:[\w.+-]+/)+([\w.+-]+)", r"<path>/\1", text)


def _tail(text: str, lines: int = 12) -> str:
    return _sanitize("\n".join(text.strip().splitlines()[-lines:]))


# ----------------------------------------------------------------------------- device helpers (--device cuda)
# Parameterised by the device, so the cuda code path also runs with CPU tensors (``--_rehearse``).
def _sync(dev: Any) -> None:
    """Wait for the device's queued work: CUDA kernels run asynchronously, so a host clock read
    without this would time the launches, not the work."""
    import torch

    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize(dev)


def _median_seconds(fn: Callable[[], Any], dev: Any, reps: int, inner: int = 1) -> float:
    """Median seconds per call of ``fn`` over ``reps`` timings of ``inner`` calls, after one warm-up
    call: CUDA events on a GPU (they time the device, not the launches), the host clock elsewhere."""
    import torch

    fn()
    _sync(dev)
    cuda = torch.device(dev).type == "cuda"
    times = []
    for _ in range(reps):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3 / inner)
        else:
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


def _device_matmul_gflops(
    d: int,
    n: int,
    dev: Any,
    dtype: str = "float32",
    tf32: bool = False,
    reps: int = 10,
    inner: int = 10,
    rows: int = BATCH,
) -> float:
    """Dense rate of a [rows, d] x [d, n] matmul on ``dev`` in ``dtype``, in GFLOP/s, on random data
    (zeros run faster). ``tf32`` lets fp32 matmuls use TF32; off, as in torch's default and in
    paperlib's fp32 training, they are true fp32."""
    import torch

    a = torch.randn(rows, d, device=dev).to(getattr(torch, dtype))
    b = torch.randn(d, n, device=dev).to(a.dtype)
    out = torch.empty(rows, n, device=dev, dtype=a.dtype)
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        seconds = _median_seconds(lambda: torch.matmul(a, b, out=out), dev, reps, inner)
    finally:
        torch.set_float32_matmul_precision(saved)
    return 2 * rows * d * n / seconds / 1e9


def _device_copy_gbps(dev: Any, nbytes: int = 2**30, reps: int = 10) -> float:
    """Device-memory bandwidth, GB/s: a device-to-device copy of ``nbytes``, bytes read + written."""
    import torch

    src = torch.randn(nbytes // 4, device=dev)
    dst = torch.empty_like(src)
    seconds = _median_seconds(lambda: dst.copy_(src), dev, reps)
    return 2 * nbytes / seconds / 1e9


def physical_limit_tokens_per_s(d: int, n: int, bf16_flops: float, bytes_per_s: float, batch: int = BATCH) -> float:
    """One TopK SAE's tokens/s bound (module docstring): its encoder forward at the bf16 rate plus its
    fp32 Adam state traffic at the memory bandwidth, per step of ``batch`` tokens."""
    params = 2 * d * n + d + n
    return batch / (2 * batch * d * n / bf16_flops + ADAM_BYTES_PER_PARAM * params / bytes_per_s)


def _check_placement(dev: Any, **tensors: Any) -> dict[str, Any]:
    """Refuse to time unless every tensor (the SAE's parameters, the data) lives on ``dev``: a "GPU"
    number from an SAE that silently stayed on the CPU would be wrong, so it raises instead."""
    import torch

    want = torch.device(dev).type
    wrong = {name: str(t.device) for name, t in tensors.items() if t.device.type != want}
    if wrong:
        raise RuntimeError(f"refusing to report: expected the SAE and the data on {want}, but {wrong}")
    return {"device": want, "tensors_checked": len(tensors)}


def _reset_peak_memory(dev: Any) -> None:
    import torch

    if torch.device(dev).type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def _peak_memory_mib(dev: Any) -> float | None:
    """Peak GPU memory allocated by this process since the last reset (None off the GPU)."""
    import torch

    if torch.device(dev).type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(dev) / 2**20, 1)


def _gpu_tag(name: str) -> str:
    """A results-file tag from the GPU's name: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "gpu"


def _gpu_info(dev: Any) -> dict[str, Any]:
    """The GPU and the software driving it (name, capability, torch, CUDA, cuDNN, Triton, driver)."""
    import torch

    if torch.device(dev).type != "cuda":
        return {
            "name": "none: a rehearsal of the cuda code path with CPU tensors (not GPU numbers)",
            "tag": "rehearsal",
        }
    props = torch.cuda.get_device_properties(dev)
    info: dict[str, Any] = {
        "name": props.name,
        "tag": _gpu_tag(props.name),
        "capability": f"{props.major}.{props.minor}",
        "multiprocessors": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "triton": _dist_version("triton"),
        "bf16_supported": torch.cuda.is_bf16_supported(),
    }
    fields = ["driver_version", "clocks.max.sm", "clocks.max.mem", "power.limit"]
    try:
        index = torch.device(dev).index or 0
        proc = subprocess.run(
            ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader", "-i", str(index)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if proc.returncode == 0 and proc.stdout.strip():
            info["nvidia_smi"] = dict(zip(fields, (v.strip() for v in proc.stdout.strip().split(","))))
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# ----------------------------------------------------------------------------- child side
def _batches(x: Any, steps: int, start: int = 0) -> list:
    """Consecutive batches of BATCH rows, cycling through x (contiguous slices, no copies)."""
    per_epoch = x.shape[0] // BATCH
    return [x[((start + i) % per_epoch) * BATCH : ((start + i) % per_epoch + 1) * BATCH] for i in range(steps)]


def _time_loop(
    step: Callable[[int, Any], None],
    x: Any,
    warmup: int,
    steps: int,
    gpu: bool = False,
    dev: Any = "cpu",
    placement: Callable[[], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Warm-up steps, then timed steps, of a peer's training step ``step(i, batch)``. ``gpu``: the
    device is synchronised around both, ``placement()`` checks where the SAE lives before timing, and
    the peak memory of the timed steps is recorded."""
    t0 = time.perf_counter()
    for i, batch in enumerate(_batches(x, warmup)):
        step(i, batch)
    if gpu:
        _sync(dev)
    warm = time.perf_counter() - t0
    placed = placement() if gpu and placement else None
    if gpu:
        _reset_peak_memory(dev)
    load_before = _load()
    t0 = time.perf_counter()
    for i, batch in enumerate(_batches(x, steps, start=warmup)):
        step(warmup + i, batch)
    if gpu:
        _sync(dev)
    seconds = time.perf_counter() - t0
    result = {"seconds": seconds, "warmup_seconds": warm, "loadavg_before": load_before, "loadavg_after": _load()}
    if gpu:
        result.update(peak_gpu_memory_mib=_peak_memory_mib(dev), placement=placed)
    return result


def _child_paperlib(
    args: argparse.Namespace, x: Any, precision: str = "fp32", aux_coeff: float = 0.0
) -> dict[str, Any]:
    import warnings

    sys.path.insert(0, str(ROOT))
    import paperlib.sae.train as paperlib_train
    from paperlib.runtime import compile_enabled
    from paperlib.sae.bank import SAEBank, SAEConfig
    from paperlib.sae.train import TrainConfig, train

    try:  # which closed-form step train() takes for this configuration
        from paperlib.sae.kernels.sparse_topk import sparse_pays_off

        step_path = "sparse_topk" if sparse_pays_off(args.k, args.n) else "dense_closed_form"
    except ImportError:
        step_path = "dense_closed_form"

    # train() evaluates the bank before the first and after the last step of every call; time
    # those evaluations where they happen (wrapping the module's evaluate) to subtract them.
    # On a GPU the device is synchronised around them, so their time is theirs alone.
    evaluate = paperlib_train.evaluate
    eval_seconds = [0.0]
    dev, gpu = args.device, args._gpu

    def timed_evaluate(*a: Any, **kw: Any) -> Any:
        if gpu:
            _sync(dev)
        t0 = time.perf_counter()
        try:
            return evaluate(*a, **kw)
        finally:
            if gpu:
                _sync(dev)
            eval_seconds[0] += time.perf_counter() - t0

    paperlib_train.evaluate = timed_evaluate
    # Likewise the thread-count probe (paperlib.sae.threads.MeasuredStep): once per call of train(), it runs
    # the first step on copies at every thread count; a one-time cost like the warm-up, timed to subtract.
    probe_seconds = [0.0]
    try:
        from paperlib.sae.threads import MeasuredStep
    except ImportError:  # an older paperlib without the probe
        MeasuredStep = None
    if MeasuredStep is not None:
        probe = MeasuredStep._probe

        def timed_probe(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return probe(*a, **kw)
            finally:
                probe_seconds[0] += time.perf_counter() - t0

        MeasuredStep._probe = staticmethod(timed_probe)
    runs = []
    for r in range(args.repeat):
        seed = args.seed + r * args.seeds
        cfg = SAEConfig(
            "topk",
            d_model=args.d,
            n_latents=args.n,
            k=args.k,
            n_seeds=args.seeds,
            seed=seed,
            decoder="unit",
            reconstruction="sum",
            aux_coeff=aux_coeff,
        )
        bank = SAEBank(cfg)

        def train_cfg(steps: int) -> TrainConfig:
            return TrainConfig(
                steps=steps, lr=LR, batch_size=args.batch, log_every=10**9, eval_rows=args.batch, precision=precision
            )

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            t0 = time.perf_counter()
            train(bank, x, train_cfg(args.warmup), progress=False, device=dev)
            if gpu:
                _sync(dev)
            warm = time.perf_counter() - t0
        placement = _check_placement(dev, data=x, **dict(bank.named_parameters())) if gpu else None
        if gpu:
            _reset_peak_memory(dev)
        load_before = _load()
        eval_seconds[0] = probe_seconds[0] = 0.0
        t0 = time.perf_counter()
        history = train(bank, x, train_cfg(args.steps), progress=False, device=dev)
        if gpu:
            _sync(dev)
        raw = time.perf_counter() - t0
        evals, probes = eval_seconds[0], probe_seconds[0]
        runs.append(
            {
                "seed": seed,
                "seconds": raw - evals - probes,
                "seconds_with_evals": raw,
                "eval_seconds": evals,
                "probe_seconds": probes,
                "warmup_seconds": warm,
                "loadavg_before": load_before,
                "loadavg_after": _load(),
                "final_fvu": [round(float(v), 4) for v in history.final("fvu")],
                "warnings": sorted({_sanitize(str(w.message))[:300] for w in caught}),
            }
        )
        if gpu:
            runs[-1].update(peak_gpu_memory_mib=_peak_memory_mib(dev), placement=placement)
    result = {
        "runs": runs,
        "compile_enabled": compile_enabled(),
        "step_path": step_path,
        "version": _dist_version("paperlib"),
        "closed_form_step": cfg.closed_form,
    }
    if gpu:
        result["precision"] = precision
    return result


def _child_sparsify(args: argparse.Namespace, x: Any) -> dict[str, Any]:
    import torch
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.utils import decoder_impl

    dev = args.device
    torch.manual_seed(args.seed)
    sae = SparseCoder(args.d, SparseCoderConfig(num_latents=args.n, k=args.k), device=dev, dtype=torch.float32)
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR)
    tokens_since_fired = torch.zeros(args.n, dtype=torch.long, device=dev)
    sae.b_dec.data = x[: args.batch].mean(0)  # the trainer's first-step decoder-bias initialisation

    # sparsify.trainer.Trainer.fit, loss_fn="fvu", no AuxK (its default auxk_alpha=0); on CUDA the
    # forward autocasts itself to bf16 (SparseCoder.forward's decorator), as in its trainer.
    def step(i: int, batch: Any) -> None:
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (batch - batch.mean(0)).pow(2).sum()
        out = sae(x=batch, y=batch, dead_mask=None, total_variance=total_variance)
        did_fire = torch.zeros(args.n, dtype=torch.bool, device=dev)
        did_fire[out.latent_indices.flatten()] = True
        float(out.fvu.detach())  # the trainer's logging accumulator
        out.fvu.backward()
        tokens_since_fired.add_(batch.shape[0])
        tokens_since_fired[did_fire] = 0
        sae.remove_gradient_parallel_to_decoder_directions()
        optimizer.step()
        optimizer.zero_grad()

    result = _time_loop(
        step,
        x,
        args.warmup,
        args.steps,
        args._gpu,
        dev,
        lambda: _check_placement(dev, data=x, **dict(sae.named_parameters())),
    )
    result.update(version=_dist_version("eai-sparsify"), decoder=getattr(decoder_impl, "__name__", str(decoder_impl)))
    if args._gpu:
        autocast = torch.device(dev).type == "cuda" and torch.cuda.is_bf16_supported()
        result["precision"] = "bf16" if autocast else "fp32"
    return result


def _child_sae_lens(args: argparse.Namespace, x: Any, autocast: bool = False) -> dict[str, Any]:
    import contextlib

    import torch
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    dev = args.device
    torch.manual_seed(args.seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d, d_sae=args.n, k=args.k, dtype="float32", device=dev))
    optimizer = torch.optim.Adam(sae.parameters(), lr=LR, betas=(0.9, 0.999))
    since_fired = torch.zeros(args.n, device=dev)
    act_freq = torch.zeros(args.n, device=dev)
    dead_window = 1000  # LanguageModelSAERunnerConfig.dead_feature_window's default
    # LanguageModelSAERunnerConfig.autocast (default False): the trainer's bf16 autocast context
    amp = (
        torch.autocast(device_type=torch.device(dev).type, dtype=torch.bfloat16)
        if autocast
        else contextlib.nullcontext()
    )

    # sae_lens.training.sae_trainer.SAETrainer._train_step (no autocast on CPU float32)
    def step(i: int, batch: Any) -> None:
        sae.train()
        with amp:
            out = sae.training_forward_pass(
                step_input=TrainStepInput(
                    sae_in=batch,
                    coefficients={},
                    dead_neuron_mask=since_fired > dead_window,
                    n_training_steps=i,
                    is_logging_step=False,
                )
            )
            with torch.no_grad():
                firing = out.feature_acts.bool().float()
                did_fire = firing.sum(-2).bool()
                since_fired.add_(1)
                since_fired[did_fire] = 0
                act_freq.add_(firing.sum(0))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    result = _time_loop(
        step,
        x,
        args.warmup,
        args.steps,
        args._gpu,
        dev,
        lambda: _check_placement(dev, data=x, **dict(sae.named_parameters())),
    )
    result.update(
        version=_dist_version("sae-lens"),
        use_sparse_activations=sae.cfg.use_sparse_activations,
        rescale_acts_by_decoder_norm=sae.cfg.rescale_acts_by_decoder_norm,
    )
    if args._gpu:
        result.update(precision="bf16" if autocast else "fp32", autocast=autocast)
    return result


def _child_dictionary_learning(args: argparse.Namespace, x: Any) -> dict[str, Any]:
    from dictionary_learning.trainers.top_k import TopKTrainer

    trainer = TopKTrainer(
        steps=args.warmup + args.steps + 1,
        activation_dim=args.d,
        dict_size=args.n,
        k=args.k,
        layer=0,
        lm_name="synthetic",
        lr=LR,
        warmup_steps=0,
        seed=args.seed,
        device=args.device,
    )

    # dictionary_learning.training.trainSAE calls trainer.update(step, act) per batch; step 0
    # also initialises the decoder bias to the geometric median (part of the warm-up here).
    def step(i: int, batch: Any) -> None:
        trainer.update(i, batch)

    result = _time_loop(
        step,
        x,
        args.warmup,
        args.steps,
        args._gpu,
        args.device,
        lambda: _check_placement(args.device, data=x, **dict(trainer.ae.named_parameters())),
    )
    result.update(version=_dist_version("dictionary-learning"), auxk_alpha=trainer.auxk_alpha)
    if args._gpu:
        result["precision"] = "fp32"
    return result


CHILDREN: dict[str, Callable[[argparse.Namespace, Any], dict[str, Any]]] = {
    "paperlib": _child_paperlib,
    "paperlib-bf16": lambda args, x: _child_paperlib(args, x, precision="bf16"),
    "paperlib-auxk": lambda args, x: _child_paperlib(args, x, aux_coeff=AUX_COEFF),
    "paperlib-auxk-bf16": lambda args, x: _child_paperlib(args, x, precision="bf16", aux_coeff=AUX_COEFF),
    "eai-sparsify": _child_sparsify,
    "sae-lens": _child_sae_lens,
    "sae-lens-bf16": lambda args, x: _child_sae_lens(args, x, autocast=True),  # --device cuda only
    "dictionary-learning": _child_dictionary_learning,
}


def _dist_version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _child(args: argparse.Namespace) -> None:
    import torch

    out: dict[str, Any] = {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    try:
        x = torch.load(args.data, weights_only=True)
        if args._gpu:
            x = x.to(args.device)  # once, before anything is timed: the data lives on the GPU
        out.update(CHILDREN[args._child](args, x))
        # The machine's matmul rate right after the measurement, as a check on interference.
        dtype = "bfloat16" if args._child.endswith("-bf16") else "float32"
        if args._gpu:
            out["matmul_gflops_after"] = round(_device_matmul_gflops(args.d, args.n, args.device, dtype, reps=3), 1)
        else:
            out["matmul_gflops_after"] = round(_matmul_gflops(args.d, args.n, reps=2, dtype=dtype), 1)
    except Exception as exc:  # reported, never raised: the parent records the reason and goes on
        out["error"] = _sanitize(f"{type(exc).__name__}: {exc}")
        out["traceback"] = _tail(traceback.format_exc(), 8)
    with open(args.result, "w") as f:
        json.dump(out, f)


# ----------------------------------------------------------------------------- parent side
def _peer_python(peer: str) -> Path:
    return PEERS_DIR / peer / "bin" / "python"


def _ensure_peer(peer: str) -> dict[str, Any]:
    """Create (or reuse) the peer's virtual environment; returns how, how long, or why not."""
    spec = PEERS[peer]
    venv = PEERS_DIR / peer
    stamp = venv / ".bench-stamp.json"
    key = hashlib.sha256(REQUIREMENTS.read_bytes() + peer.encode()).hexdigest()
    info: dict[str, Any] = {
        "venv": venv.relative_to(ROOT).as_posix(),
        "requirements": REQUIREMENTS.relative_to(ROOT).as_posix(),
    }
    if stamp.exists():
        try:
            saved = json.loads(stamp.read_text())
            if saved.get("key") == key and _peer_python(peer).exists():
                return {
                    **info,
                    "status": "reused",
                    "install_seconds": saved.get("install_seconds"),
                    "removed": saved.get("removed", {}),
                }
        except (OSError, ValueError):
            pass
    t0 = time.perf_counter()
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [
            str(_peer_python(peer)),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "-c",
            str(REQUIREMENTS),
            spec["dist"],
        ],
    ]
    if spec["remove"]:
        steps.append([str(_peer_python(peer)), "-m", "pip", "uninstall", "--yes", "--quiet", *spec["remove"]])
    print(f"   installing {peer} into {info['venv']} ...", flush=True)
    for cmd in steps:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            return {**info, "status": "failed", "reason": f"timed out: {' '.join(cmd[1:4])}"}
        if proc.returncode != 0:
            return {**info, "status": "failed", "reason": _tail(proc.stderr or proc.stdout)}
    seconds = time.perf_counter() - t0
    stamp.write_text(json.dumps({"key": key, "install_seconds": seconds, "removed": spec["remove"]}))
    return {**info, "status": "installed", "install_seconds": seconds, "removed": spec["remove"]}


def _run_child(
    python: str,
    name: str,
    d: int,
    n: int,
    steps: int,
    warmup: int,
    data: Path,
    timeout: float,
    seeds: int = 1,
    repeat: int = 1,
    gpu_device: str | None = None,
) -> dict[str, Any]:
    """One measurement in a fresh process; ``gpu_device``: the --device cuda code path, on that device."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [
            python,
            str(Path(__file__).resolve()),
            "--_child",
            name,
            "--d",
            str(d),
            "--n",
            str(n),
            "--k",
            str(K),
            "--batch",
            str(BATCH),
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--seeds",
            str(seeds),
            "--repeat",
            str(repeat),
            "--data",
            str(data),
            "--result",
            str(result),
        ]
        if gpu_device:
            cmd += ["--_gpu", "--device", gpu_device]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if not result.exists():
            return {"error": f"child exited with {proc.returncode} and no result", "stderr": _tail(proc.stderr)}
        out = json.loads(result.read_text())
        out["process_wall_seconds"] = wall
        return out


def _peer_importable(peer: str) -> dict[str, Any]:
    """--device cuda: whether the peer imports in this interpreter (a GPU machine has no network for a
    per-peer venv; wheels can be carried, see benchmarks/gpu_check.sh --fetch-wheels)."""
    spec = PEERS[peer]
    info: dict[str, Any] = {"python": "this interpreter (no per-peer venv on a GPU machine)"}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", f"import {spec['module']}"], capture_output=True, text=True, timeout=300, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {**info, "status": "failed", "reason": f"`import {spec['module']}` timed out"}
    if proc.returncode != 0:
        return {**info, "status": "failed", "reason": f"`import {spec['module']}` failed here: {_tail(proc.stderr, 1)}"}
    return {**info, "status": "importable", "version": _dist_version(spec["dist"])}


def _synthetic(d: int, path: Path) -> str:
    """Low-rank Gaussian activations [DATA_BATCHES * BATCH, d] float32 (+ noise, offset); returns a digest."""
    import torch

    gen = torch.Generator().manual_seed(DATA_SEED + d)
    rows = DATA_BATCHES * BATCH
    basis = torch.linalg.qr(torch.randn(d, DATA_RANK, generator=gen))[0].T  # [r, d] orthonormal rows
    spectrum = torch.logspace(1, -1, DATA_RANK)  # decaying variances along the structured directions
    latent = torch.randn(rows, DATA_RANK, generator=gen) * spectrum.sqrt()
    offset = torch.randn(d, generator=gen)
    x = latent @ basis + 0.3 * torch.randn(rows, d, generator=gen) + offset
    x = x.float().contiguous()
    torch.save(x, path)
    return hashlib.sha256(x.numpy().tobytes()).hexdigest()[:16]


def _machine() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown"
    flags: set[str] = set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        memory_gb = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        memory_gb = None
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "simd": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile"}),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "memory_gb": memory_gb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "paperlib": _dist_version("paperlib"),
        "matmul_gflops": {},  # per size, filled in as measured
    }


def _git_commit() -> str | None:
    """HEAD of this checkout (read-only), with "+modified" when paperlib/ has local changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "paperlib"], cwd=ROOT, capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+modified" if dirty else "")) or None


def _wait_for_quiet(limit_s: float = 120.0, quiet: float = 1.0) -> None:
    """Sleep until the 1-minute load average drops below ``quiet`` (at most ``limit_s``)."""
    t0 = time.perf_counter()
    while os.getloadavg()[0] >= quiet and time.perf_counter() - t0 < limit_s:
        time.sleep(5)


def _auto_steps(d: int, n: int) -> int:
    """Timed steps per measurement: ~0.6 TFLOP of encoder matmuls ([4096, d] x [d, n]), 3..20."""
    return max(3, min(20, round(6e11 / (2 * BATCH * d * n))))


def _write(path: Path, obj: dict[str, Any]) -> None:
    from paperlib.atomic import write_text  # imported here: peer interpreters run this file without paperlib

    write_text(path, json.dumps(obj, indent=1) + "\n")


def _measurement(
    library: str,
    version: str | None,
    d: int,
    n: int,
    seeds: int,
    steps: int,
    roofline: float,
    timing: dict[str, Any],
    extra: dict[str, Any],
) -> dict[str, Any]:
    per_sae = steps * BATCH / timing["seconds"]
    return {
        "library": library,
        "version": version,
        "d": d,
        "n": n,
        "k": K,
        "batch": BATCH,
        "seeds": seeds,
        "steps": steps,
        "seconds": round(timing["seconds"], 4),
        "warmup_seconds": round(timing["warmup_seconds"], 3),
        "tokens_per_s_per_sae": round(per_sae, 1),
        "tokens_per_s_aggregate": round(seeds * per_sae, 1),
        "fraction_of_roofline": round(seeds * per_sae / roofline, 4),
        "loadavg_before": timing["loadavg_before"],
        "loadavg_after": timing["loadavg_after"],
        **extra,
    }


def _fmt(m: dict[str, Any]) -> str:
    return (
        f"   {m['library']:<20} S={m['seeds']} {m['tokens_per_s_per_sae']:>9.0f} tok/s/SAE  "
        f"{m['fraction_of_roofline']:>6.1%} of roofline  ({m['steps']} steps in {m['seconds']:.1f} s, "
        f"warm-up {m['warmup_seconds']:.1f} s, load {m['loadavg_before'][0]:.1f})"
    )


def _gpu_ratios(size_meas: dict[str, Any], peers: list[str], limit: float) -> dict[str, Any]:
    """--device cuda: paperlib's bf16 runs (the CUDA default) against the fastest peer and the physical
    ``limit``, the cost of AuxK and of fp32, and 3 seeds in one bank against 3 separate runs (all bf16)."""
    ratios: dict[str, Any] = {}
    singles = [m for k, m in size_meas.items() if k.startswith("paperlib-bf16_S1_")]
    single = {"paperlib-bf16": statistics.median(m["tokens_per_s_per_sae"] for m in singles) if singles else None}
    for variant in ("paperlib", "paperlib-auxk", "paperlib-auxk-bf16"):
        entry = size_meas.get(f"{variant}_S1_0")
        single[variant] = entry["tokens_per_s_per_sae"] if entry else None
    bank = size_meas.get(f"paperlib-bf16_S{BANK_SEEDS}_0")
    measured = [size_meas[p] for p in peers if p in size_meas]
    if single["paperlib-bf16"]:
        ratios["paperlib_bf16_tokens_per_s_per_sae"] = single["paperlib-bf16"]
        ratios["paperlib_bf16_fraction_of_physical_limit"] = round(single["paperlib-bf16"] / limit, 4)
    if measured:
        best = max(measured, key=lambda m: m["tokens_per_s_per_sae"])
        ratios["fastest_peer"] = best["library"]
        for variant, ours in single.items():
            if ours:
                ratios[f"{variant.replace('-', '_')}_over_fastest_peer"] = round(ours / best["tokens_per_s_per_sae"], 3)
        if single["paperlib-bf16"]:
            ratios["paperlib_bf16_over_each_peer"] = {
                m["library"]: round(single["paperlib-bf16"] / m["tokens_per_s_per_sae"], 3) for m in measured
            }
        if bank:
            ratios[f"paperlib_bf16_bank{BANK_SEEDS}_aggregate_over_fastest_peer"] = round(
                bank["tokens_per_s_aggregate"] / best["tokens_per_s_per_sae"], 3
            )
    if single["paperlib-bf16"] and single["paperlib-auxk-bf16"]:
        ratios["auxk_cost_bf16"] = round(single["paperlib-bf16"] / single["paperlib-auxk-bf16"], 3)
    if single["paperlib"] and single["paperlib-auxk"]:
        ratios["auxk_cost_fp32"] = round(single["paperlib"] / single["paperlib-auxk"], 3)
    if single["paperlib-bf16"] and single["paperlib"]:
        ratios["bf16_over_fp32"] = round(single["paperlib-bf16"] / single["paperlib"], 3)
    if bank and len(singles) == BANK_SEEDS:
        ratios[f"together_over_separate_{BANK_SEEDS}"] = round(sum(m["seconds"] for m in singles) / bank["seconds"], 3)
        ratios["together_over_separate_definition"] = (
            f"sum of the {BANK_SEEDS} single-seed bf16 runs' seconds / the {BANK_SEEDS}-seed bf16 bank's seconds"
        )
    return ratios


def _new_result(machine: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The result file's skeleton (CPU and GPU runs alike), filled measurement by measurement."""
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": [_sanitize(a) for a in sys.argv[1:]],
        "paperlib_commit": _git_commit(),
        "machine": machine,
        "config": config,
        "peers": {},
        "measurements": [],
        "skipped": [],
        "ratios": {},
    }


def _main_gpu(args: argparse.Namespace, sizes: list[tuple[int, int]], dev: str) -> None:
    """--device cuda (module docstring). ``dev`` is "cuda", or "cpu" for a rehearsal of this code path
    with CPU tensors (``--_rehearse``: tests of this script; its numbers are not GPU numbers)."""
    import torch

    rehearsal = dev != "cuda"
    gpu = _gpu_info(dev)
    default_out = (
        Path(tempfile.gettempdir()) / "train_throughput.rehearsal.json"
        if rehearsal
        else ROOT / "benchmarks" / "results" / f"train_throughput.{gpu['tag']}.json"
    )
    out = args.out or default_out
    out_path = out if out.is_absolute() else Path.cwd() / out
    steps = args.steps or GPU_STEPS
    warmup = args.warmup if args.warmup is not None else GPU_WARMUP
    t_start = time.perf_counter()
    bandwidth = _device_copy_gbps(dev, nbytes=2**24 if rehearsal else 2**30)  # GB/s, bytes read + written
    machine = _machine()
    machine.pop("matmul_gflops")
    machine.update(gpu=gpu, device_copy_gbps=round(bandwidth, 1), gpu_matmul_gflops={}, physical_limit_tokens_per_s={})
    result = _new_result(
        machine,
        {
            "architecture": "topk",
            "k": K,
            "batch": BATCH,
            "optimizer": "Adam",
            "lr": LR,
            "steps": steps,
            "warmup": warmup,
            "device": "cuda" if not rehearsal else "cpu (rehearsal of the cuda code path)",
            "dtype": "fp32 weights and Adam state; each measurement's 'precision' is its matmuls': paperlib bf16 = "
            "TrainConfig(precision='bf16') (what 'auto' means on CUDA), sparsify = its forward's bf16 "
            "autocast, sae-lens-bf16 = its autocast=True; fp32 = TF32 off (torch's default)",
            "data": f"{DATA_BATCHES * BATCH} rows per size: Gaussian, rank-{DATA_RANK} structure (log-spaced variances "
            f"10..0.1) + N(0, 0.3^2) noise + a random offset, seed {DATA_SEED}+d; moved to the device once",
            "paperlib": "SAEConfig('topk', k=32, decoder='unit', reconstruction='sum'), train(..., TrainConfig("
            "lr=1e-4, batch_size=4096, log_every=1e9, eval_rows=4096, precision=...), device='cuda')",
            "timing": "device synchronised before and after the timed part and around each subtracted evaluation; "
            "the SAE's parameters and the data checked on the device before timing ('placement')",
            "tokens_per_s_per_sae": "steps * batch / seconds (a bank of S seeds: every seed sees every token)",
            "fraction_of_roofline": "S * tokens_per_s_per_sae / (FLOP/s of a [4096,d]x[d,n] matmul on the device in "
            "the measurement's precision / (2 d n))",
            "fraction_of_bf16_roofline": "the same against the bf16 matmul rate, for every measurement",
            "fraction_of_physical_limit": f"S * tokens_per_s_per_sae / (B / (2 B d n / R_bf16 + {ADAM_BYTES_PER_PARAM} "
            "(2 d n + d + n) / W)): one TopK SAE's encoder forward at the bf16 rate "
            "R_bf16 plus fp32 Adam traffic at the copy bandwidth W (device_copy_gbps)",
            "peak_gpu_memory_mib": "torch.cuda.max_memory_allocated over the timed part, in the measuring process",
        },
    )
    print(
        f"== {'GPU ' + gpu['name'] if not rehearsal else 'REHEARSAL on the CPU (not GPU numbers)'}, torch "
        f"{torch.__version__}, CUDA {torch.version.cuda}; copy bandwidth {bandwidth:.0f} GB/s",
        flush=True,
    )
    for peer in args.peers:
        result["peers"][peer] = info = _peer_importable(peer)
        print(f"   {peer}: {info['status']}" + (f" ({info['reason']})" if info.get("reason") else ""), flush=True)
    _write(out_path, result)

    with tempfile.TemporaryDirectory() as tmp:
        for d, n in sizes:
            data = Path(tmp) / f"x_{d}.pt"
            digest = _synthetic(d, data)
            rates = {
                "bf16": _device_matmul_gflops(d, n, dev, "bfloat16"),
                "fp32": _device_matmul_gflops(d, n, dev),
                "tf32": _device_matmul_gflops(d, n, dev, tf32=True),
            }
            rooflines = {p: r * 1e9 / (2 * d * n) for p, r in rates.items()}
            limit = physical_limit_tokens_per_s(d, n, rates["bf16"] * 1e9, bandwidth * 1e9)
            size_key = f"{d}x{n}"
            machine["gpu_matmul_gflops"][size_key] = {p: round(r, 1) for p, r in rates.items()}
            machine["physical_limit_tokens_per_s"][size_key] = round(limit, 1)
            tflops = ", ".join(f"{p} {r / 1e3:.3g}" for p, r in rates.items())
            print(
                f"== d={d} n={n}: {steps} timed steps, {warmup} warm-up; matmul TFLOP/s {tflops} -> bf16 roofline "
                f"{rooflines['bf16']:.0f} tok/s; physical limit {limit:.0f} tok/s; data sha256 {digest}",
                flush=True,
            )
            size_meas: dict[str, Any] = {}

            def record(entry: dict[str, Any], key: str, precision: str, extra: dict[str, Any]) -> None:
                entry.update(
                    precision=precision,
                    fraction_of_bf16_roofline=round(entry["tokens_per_s_aggregate"] / rooflines["bf16"], 4),
                    fraction_of_physical_limit=round(entry["tokens_per_s_aggregate"] / limit, 4),
                    **extra,
                    data_sha256=digest,
                )
                result["measurements"].append(entry)
                size_meas[key] = entry
                result["ratios"][size_key] = _gpu_ratios(size_meas, peer_names, limit)
                print(_fmt(entry) + f"  [{precision}, peak {entry.get('peak_gpu_memory_mib')} MiB]", flush=True)
                _write(out_path, result)

            def skip(library: str, reason: str, **extra: Any) -> None:
                result["skipped"].append({"library": library, "d": d, "n": n, "reason": reason, **extra})
                print(f"   {library:<20} skipped: {reason}", flush=True)
                _write(out_path, result)

            def measure(name: str, seeds: int = 1, repeat: int = 1) -> dict[str, Any]:
                """One child; measured once more when its matmul check shows the GPU was shared."""
                reference = rates["bf16" if name.endswith("-bf16") else "fp32"]
                child = _run_child(
                    sys.executable,
                    name,
                    d,
                    n,
                    steps,
                    warmup,
                    data,
                    args.child_timeout,
                    seeds=seeds,
                    repeat=repeat,
                    gpu_device=dev,
                )
                rate = child.get("matmul_gflops_after")
                if "error" not in child and rate is not None and rate < CONTENDED * reference:
                    print(
                        f"   {name}: matmul check {rate:.0f} GFLOP/s < {CONTENDED:.0%} of {reference:.0f}: measuring "
                        "again",
                        flush=True,
                    )
                    retry = _run_child(
                        sys.executable,
                        name,
                        d,
                        n,
                        steps,
                        warmup,
                        data,
                        args.child_timeout,
                        seeds=seeds,
                        repeat=repeat,
                        gpu_device=dev,
                    )
                    if "error" not in retry:
                        retry["contended_first_attempt"] = {"matmul_gflops_after": rate}
                        child = retry
                if "error" not in child:
                    child["contended"] = child.get("matmul_gflops_after", 0.0) < CONTENDED * reference
                return child

            def run_paperlib(library: str, seeds: int, repeat: int) -> None:
                child = measure(library, seeds=seeds, repeat=repeat)
                if "error" in child:
                    skip(library, child["error"], seeds=seeds, detail=child.get("traceback") or child.get("stderr"))
                    return
                precision = child["precision"]
                for i, run in enumerate(child["runs"]):
                    extra = {k: run[k] for k in (*PAPERLIB_RUN_FIELDS, "peak_gpu_memory_mib", "placement")}
                    extra.update(
                        compile_enabled=child["compile_enabled"],
                        step_path=child["step_path"],
                        contended=child["contended"],
                        contended_first_attempt=child.get("contended_first_attempt"),
                        matmul_gflops_after=child["matmul_gflops_after"],
                    )
                    record(
                        _measurement(library, child["version"], d, n, seeds, steps, rooflines[precision], run, {}),
                        f"{library}_S{seeds}_{i}",
                        precision,
                        extra,
                    )

            def run_peer(name: str) -> None:
                child = measure(name)
                if "error" in child:
                    skip(name, child["error"], detail=child.get("traceback") or child.get("stderr"))
                    return
                precision = child.pop("precision")
                extra = {
                    k: v
                    for k, v in child.items()
                    if k
                    not in (
                        "seconds",
                        "warmup_seconds",
                        "loadavg_before",
                        "loadavg_after",
                        "version",
                        "torch",
                        "process_wall_seconds",
                    )
                }
                extra["peer_torch"] = child["torch"]
                record(
                    _measurement(name, child["version"], d, n, 1, steps, rooflines[precision], child, {}),
                    name,
                    precision,
                    extra,
                )

            # The CUDA default first (bf16: three single-seed runs), then the peers, then the rest.
            peer_names = [p for p in args.peers if result["peers"][p]["status"] != "failed"]
            peer_names += ["sae-lens-bf16"] if "sae-lens" in peer_names else []
            for peer in args.peers:
                if result["peers"][peer]["status"] == "failed":
                    skip(peer, result["peers"][peer]["reason"])
            run_paperlib("paperlib-bf16", 1, BANK_SEEDS)
            for peer in peer_names:
                run_peer(peer)
            for library, seeds in (
                ("paperlib-bf16", BANK_SEEDS),
                ("paperlib-auxk-bf16", 1),
                ("paperlib", 1),
                ("paperlib-auxk", 1),
            ):
                run_paperlib(library, seeds, 1)
            ratios = result["ratios"].get(size_key, {})
            print(
                f"   ratios: {json.dumps({k: v for k, v in ratios.items() if not k.endswith('definition')})}",
                flush=True,
            )
            _write(out_path, result)

    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    _write(out_path, result)
    shown = out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path
    print(f"== wrote {shown} in {result['total_seconds']:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["576x4096", "768x16384"], help="d_model x n_latents")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per measurement (default: by size, 3..20)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 2 if steps >= 10 else 1)")
    ap.add_argument("--peers", nargs="*", default=list(PEERS), choices=list(PEERS))
    ap.add_argument("--child-timeout", type=float, default=900.0)
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="result file (default: benchmarks/results/"
        "train_throughput.json; --device cuda: train_throughput.<gpu>.json there)",
    )
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: every library on this machine's GPU, peers imported in this interpreter",
    )
    ap.add_argument("--_rehearse", action="store_true", help=argparse.SUPPRESS)  # the cuda code path, CPU tensors
    # child mode (internal)
    ap.add_argument("--_child", choices=list(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--_gpu", action="store_true", help=argparse.SUPPRESS)  # a child of the cuda code path
    for name in ("d", "n", "k", "batch", "seeds", "repeat", "seed"):
        ap.add_argument(f"--{name}", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        _child(args)
        return
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))  # paperlib from this checkout, also where it is not installed (a GPU machine)
    if args.device == "cuda":
        from paperlib.runtime import resolve_device

        try:  # refused before anything is measured, with the fix
            resolve_device(
                "cuda",
                "--device",
                "run with --device cpu on this machine, or on a machine with an "
                "NVIDIA GPU (there: bash benchmarks/gpu_check.sh, or make gpu-check)",
            )
        except ValueError as exc:
            ap.error(str(exc))

    import torch

    from paperlib.runtime import cpu_has_native_bf16

    native_bf16 = cpu_has_native_bf16()
    sizes = []
    for text in args.sizes:
        try:
            d, n = (int(v) for v in text.lower().split("x"))
        except ValueError:
            ap.error(f"--sizes takes d_modelxn_latents such as 576x4096, got {text!r}")
        sizes.append((d, n))
    if args.steps is not None and args.steps < 1:
        ap.error("--steps must be >= 1")
    if args.device == "cuda" or args._rehearse:
        _main_gpu(args, sizes, "cuda" if args.device == "cuda" else "cpu")
        return
    out = args.out or DEFAULT_OUT
    out_path = out if out.is_absolute() else Path.cwd() / out

    t_start = time.perf_counter()
    result = _new_result(
        _machine(),
        {
            "architecture": "topk",
            "k": K,
            "batch": BATCH,
            "optimizer": "Adam",
            "lr": LR,
            "dtype": "float32 (paperlib-bf16: bf16 matmul inputs)",
            "device": "cpu",
            "data": f"{DATA_BATCHES * BATCH} rows per size: Gaussian, rank-{DATA_RANK} "
            "structure (log-spaced variances 10..0.1) + N(0, 0.3^2) noise + a random offset, "
            f"seed {DATA_SEED}+d",
            "paperlib": "SAEConfig('topk', k=32, decoder='unit', reconstruction='sum'), "
            "train(..., TrainConfig(lr=1e-4, batch_size=4096, log_every=1e9, eval_rows=4096))",
            "tokens_per_s_per_sae": "steps * batch / seconds (a bank of S seeds: every seed sees every token)",
            "fraction_of_roofline": "S * tokens_per_s_per_sae / (FLOP/s of the faster of torch.matmul and "
            "oneDNN's linear on [4096,d]x[d,n] fp32 / (2 d n)); paperlib-bf16: torch.matmul in bf16",
        },
    )
    print(
        f"== machine: {result['machine']['cpu']}, {result['machine']['logical_cores']} cores, torch "
        f"{torch.__version__}, load {_load()}",
        flush=True,
    )

    for peer in args.peers:
        result["peers"][peer] = info = _ensure_peer(peer)
        print(
            f"   {peer}: {info['status']}"
            + (f" in {info['install_seconds']:.0f} s" if info.get("install_seconds") else "")
            + (f" ({info['reason']})" if info.get("reason") else ""),
            flush=True,
        )
    _write(out_path, result)

    with tempfile.TemporaryDirectory() as tmp:
        for d, n in sizes:
            steps = args.steps or _auto_steps(d, n)
            warmup = args.warmup if args.warmup is not None else (2 if steps >= 10 else 1)
            data = Path(tmp) / f"x_{d}.pt"
            digest = _synthetic(d, data)
            gflops = _matmul_gflops(d, n, reps=5)  # MKL: the peers' GEMM, and the reference of the contention check
            onednn_gflops = _matmul_gflops(d, n, reps=5, backend="onednn")
            roofline = max(gflops, onednn_gflops or 0.0) * 1e9 / (2 * d * n)  # the faster of torch's two fp32 GEMMs
            bf16_gflops = _matmul_gflops(d, n, reps=5, dtype="bfloat16") if native_bf16 else None
            size_key = f"{d}x{n}"
            result["machine"]["matmul_gflops"][size_key] = {"gflops": round(gflops, 1), "loadavg": _load()}
            if onednn_gflops:
                result["machine"]["matmul_gflops"][size_key]["onednn_gflops"] = round(onednn_gflops, 1)
            if bf16_gflops:
                result["machine"]["matmul_gflops"][size_key]["bf16_gflops"] = round(bf16_gflops, 1)
            print(
                f"== d={d} n={n}: {steps} timed steps, {warmup} warm-up; matmul {gflops:.0f} GFLOP/s (torch), "
                f"{onednn_gflops or float('nan'):.0f} (oneDNN) -> roofline {roofline:.0f} tok/s; "
                f"data sha256 {digest}",
                flush=True,
            )
            size_meas: dict[str, Any] = {}

            def record(entry: dict[str, Any], key: str) -> None:
                entry["data_sha256"] = digest
                result["measurements"].append(entry)
                size_meas[key] = entry
                print(_fmt(entry), flush=True)
                _write(out_path, result)

            def skip(library: str, reason: str, **extra: Any) -> None:
                result["skipped"].append({"library": library, "d": d, "n": n, "reason": reason, **extra})
                print(f"   {library:<20} skipped: {reason}", flush=True)
                _write(out_path, result)

            def measure(python: str, name: str, reference: float = gflops, **kw: int) -> dict[str, Any]:
                """One child measurement; measured again once when its matmul check (against the
                ``reference`` rate of its precision) shows contention."""
                child = _run_child(python, name, d, n, steps, warmup, data, args.child_timeout, **kw)
                rate = child.get("matmul_gflops_after")
                if "error" not in child and rate is not None and rate < CONTENDED * reference:
                    print(
                        f"   {name}: matmul check {rate:.0f} GFLOP/s < {CONTENDED:.0%} of {reference:.0f}: "
                        "the CPU was shared; waiting for a quieter moment and measuring again",
                        flush=True,
                    )
                    _wait_for_quiet()
                    retry = _run_child(python, name, d, n, steps, warmup, data, args.child_timeout, **kw)
                    if "error" not in retry:
                        first = child.get("runs", [child])
                        retry["contended_first_attempt"] = {
                            "matmul_gflops_after": rate,
                            "loadavg_before": [r["loadavg_before"] for r in first],
                            "seconds": [round(r["seconds"], 3) for r in first],
                        }
                        child = retry
                if "error" not in child:
                    child["contended"] = child.get("matmul_gflops_after", 0.0) < CONTENDED * reference
                return child

            # paperlib: three separate single-seed runs (seeds 0, 1, 2), then one bank of three seeds,
            # then (on a CPU with native bf16) one single-seed run with bf16 matmuls.
            variants = [("paperlib", 1, BANK_SEEDS, gflops, roofline), ("paperlib", BANK_SEEDS, 1, gflops, roofline)]
            variants.append(("paperlib-auxk", 1, 1, gflops, roofline))
            if bf16_gflops:
                variants.append(("paperlib-bf16", 1, 1, bf16_gflops, bf16_gflops * 1e9 / (2 * d * n)))
                variants.append(("paperlib-auxk-bf16", 1, 1, bf16_gflops, bf16_gflops * 1e9 / (2 * d * n)))
            for library, seeds, repeat, reference, library_roofline in variants:
                child = measure(sys.executable, library, reference, seeds=seeds, repeat=repeat)
                if "error" in child:
                    skip(library, child["error"], seeds=seeds, detail=child.get("traceback") or child.get("stderr"))
                    continue
                for i, run in enumerate(child["runs"]):
                    extra = {k: run[k] for k in PAPERLIB_RUN_FIELDS}
                    extra.update(
                        compile_enabled=child["compile_enabled"],
                        step_path=child["step_path"],
                        contended=child["contended"],
                        contended_first_attempt=child.get("contended_first_attempt"),
                        torch_threads=child["torch_threads"],
                        matmul_gflops_after=child["matmul_gflops_after"],
                    )
                    record(
                        _measurement(library, child["version"], d, n, seeds, steps, library_roofline, run, extra),
                        f"{library}_S{seeds}_{i}",
                    )

            for peer in args.peers:
                info = result["peers"][peer]
                if info["status"] == "failed":
                    skip(peer, f"install failed: {info['reason']}")
                    continue
                child = measure(str(_peer_python(peer)), peer)
                if "error" in child:
                    skip(peer, child["error"], detail=child.get("traceback") or child.get("stderr"))
                    continue
                extra = {
                    k: v
                    for k, v in child.items()
                    if k
                    not in (
                        "seconds",
                        "warmup_seconds",
                        "loadavg_before",
                        "loadavg_after",
                        "version",
                        "torch",
                        "process_wall_seconds",
                    )
                }
                extra["peer_torch"] = child["torch"]
                record(_measurement(peer, child["version"], d, n, 1, steps, roofline, child, extra), peer)

            ratios: dict[str, Any] = {}
            singles = [m for k, m in size_meas.items() if k.startswith("paperlib_S1_")]
            bank = size_meas.get(f"paperlib_S{BANK_SEEDS}_0")
            peers = [size_meas[p] for p in args.peers if p in size_meas]
            if singles:
                ours = statistics.median(m["tokens_per_s_per_sae"] for m in singles)
                ratios["paperlib_tokens_per_s_per_sae"] = ours
                if peers:
                    best = max(peers, key=lambda m: m["tokens_per_s_per_sae"])
                    ratios["fastest_peer"] = best["library"]
                    ratios["paperlib_over_fastest_peer"] = round(ours / best["tokens_per_s_per_sae"], 3)
                    ratios["paperlib_over_each_peer"] = {
                        m["library"]: round(ours / m["tokens_per_s_per_sae"], 3) for m in peers
                    }
                    if bank:
                        ratios[f"paperlib_bank{BANK_SEEDS}_aggregate_over_fastest_peer"] = round(
                            bank["tokens_per_s_aggregate"] / best["tokens_per_s_per_sae"], 3
                        )
                    for variant in ("paperlib-bf16", "paperlib-auxk", "paperlib-auxk-bf16"):
                        if f"{variant}_S1_0" in size_meas:
                            ratios[f"{variant.replace('-', '_')}_over_fastest_peer_fp32"] = round(
                                size_meas[f"{variant}_S1_0"]["tokens_per_s_per_sae"] / best["tokens_per_s_per_sae"], 3
                            )
                if "paperlib-auxk_S1_0" in size_meas:
                    ratios["auxk_cost"] = round(ours / size_meas["paperlib-auxk_S1_0"]["tokens_per_s_per_sae"], 3)
                if bank and len(singles) == BANK_SEEDS:
                    separate = sum(m["seconds"] for m in singles)
                    ratios[f"together_over_separate_{BANK_SEEDS}"] = round(separate / bank["seconds"], 3)
                    ratios[f"together_over_separate_{BANK_SEEDS}_with_warmup"] = round(
                        (separate + sum(m["warmup_seconds"] for m in singles))
                        / (bank["seconds"] + bank["warmup_seconds"]),
                        3,
                    )
                    ratios["together_over_separate_definition"] = (
                        f"sum of the {BANK_SEEDS} single-seed runs' seconds / the {BANK_SEEDS}-seed bank's seconds "
                        "(same steps; = aggregate throughput ratio)"
                    )
            result["ratios"][size_key] = ratios
            print(
                f"   ratios: {json.dumps({k: v for k, v in ratios.items() if not k.endswith('definition')})}",
                flush=True,
            )
            _write(out_path, result)

    result["total_seconds"] = round(time.perf_counter() - t_start, 1)
    _write(out_path, result)
    shown = out_path.relative_to(ROOT) if out_path.is_relative_to(ROOT) else out_path
    print(f"== wrote {shown} in {result['total_seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
