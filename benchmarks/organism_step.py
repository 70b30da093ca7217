"""Benchmark the closed-form training step of small SAEs: paperlib's fused CPU kernel vs its torch path.

    python benchmarks/organism_step.py [--repeats N] [--out PATH]

At the model organism's sizes a step is memory- and overhead-bound, not GEMM-bound, so this is where
the fused kernel (``paperlib/sae/kernels/fused.py``) matters: notebook 01 runs 60,000 such steps. Measured per
shape, in this process: ``SAEBank.loss_and_grads`` (gradients and loss sums of every seed; the
torch path compiled as in training) with ``PAPERLIB_FUSED=1`` and ``0``, and a whole ``train()``
(Adam included, two evaluations included) of ``--train-steps`` steps with each. The step's FLOPs are
those of its five [rows, d] x [d, n]-sized matmuls per seed; they are set against the machine's
dense fp32 matmul rate, measured here on a 2048-cube (through torch.matmul, i.e. MKL, and through
oneDNN's linear; the faster is the reference) and on the step's own skinny shape.

Shapes: notebook 01's (d=16, n=32, 50,000 rows full-batch, 5 seeds; ReLU and TopK k=3) and
notebook 02's (d=20, n=40, batches of 512, 3 seeds, TopK k=8). Peers are compared at LLM sizes in
``train_throughput.py``.

Under load (``--load-seconds``, 4 by default; 0 skips it): each step above, notebook 05's matched-organism
steps (most of them on the torch path) and notebook 06's sparse TopK step (d=576, n=1152, k=32, batches of
1,024, 3 seeds, whose tail runs in ``fused_sparse.cpp``), each a whole training step with Adam as
``train()`` runs it, is run for a few seconds on the quiet machine, then beside a busy loop this script
starts and stops itself (one process spinning on one core), then beside a copy of itself (a second
process training the same shape, as two notebooks run side by side). Once with thread counts measured as
``train()`` measures them (``paperlib.sae.threads.MeasuredStep``), once pinned to torch's full thread
count (what training did before). Reported: steps/s under load as a fraction of quiet steps/s, and whether
the probe let the step's thread count be chosen at all. On 2 cores a fair share is 50 %; the target is >= 40 %.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import _git_commit, _load, _machine, _matmul_gflops, _write  # noqa: E402

from paperlib.sae.bank import SAEBank, SAEConfig  # noqa: E402
from paperlib.sae.threads import MeasuredStep, ThreadChooser  # noqa: E402
from paperlib.sae.train import TrainConfig, _iteration, train  # noqa: E402
from paperlib.sae.zoo_presets import mean_sq_norm, zoo_config  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "organism_step.json"
SHAPES = [  # (label, architecture, d, n, k, rows per step, seeds)
    ("01 ReLU", "relu", 16, 32, None, 50_000, 5),
    ("01 TopK", "topk", 16, 32, 3, 50_000, 5),
    ("02 TopK", "topk", 20, 40, 8, 512, 3),
]


def _median_seconds(fn, repeats: int) -> float:
    fn()
    fn()  # compile and first-touch outside the timing
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(
    architecture: str, d: int, n: int, k: int | None, rows: int, seeds: int, repeats: int, train_steps: int
) -> dict:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, d, generator=gen).abs() * (torch.rand(rows, d, generator=gen) < 0.2)
    config = SAEConfig(architecture, d, n, k=k, l1_coeff=1e-2 if architecture == "relu" else 0.0, n_seeds=seeds)
    out = {}
    for path, flag in (("fused", "1"), ("torch", "0")):
        os.environ["PAPERLIB_FUSED"] = flag
        bank = SAEBank(config)
        step = _median_seconds(lambda bank=bank: bank.loss_and_grads(x, rows), repeats)
        train(SAEBank(config), x, TrainConfig(steps=2, log_every=2), progress=False)  # first-call costs
        schedule = TrainConfig(steps=train_steps, lr=1e-4, log_every=train_steps)
        t0 = time.perf_counter()
        train(SAEBank(config), x, schedule, progress=False)
        out[path] = {
            "step_ms": round(step * 1e3, 3),
            "train_ms_per_step": round((time.perf_counter() - t0) / train_steps * 1e3, 3),
        }
    os.environ.pop("PAPERLIB_FUSED")
    flops = 5 * 2 * rows * d * n * seeds
    out["gflop_per_step"] = round(flops / 1e9, 4)
    out["fused_gflops"] = round(flops / out["fused"]["step_ms"] / 1e6, 1)
    out["torch_gflops"] = round(flops / out["torch"]["step_ms"] / 1e6, 1)
    out["skinny_matmul_gflops"] = round(_matmul_gflops(d, n, reps=20, rows=rows), 1)
    out["speedup_step"] = round(out["torch"]["step_ms"] / out["fused"]["step_ms"], 2)
    out["speedup_train"] = round(out["torch"]["train_ms_per_step"] / out["fused"]["train_ms_per_step"], 2)
    return out


# (label, architecture, d, n, k, rows per step, seeds): notebook 05's matched organism trains every zoo
# architecture, most of them on the torch path, at its preset configuration (paperlib.sae.zoo_presets).
LOAD_SHAPES = [
    *SHAPES,
    ("05 ReLU/dnorm", "relu_dnorm", 16, 32, None, 1024, 5),
    ("05 BatchTopK", "batchtopk", 16, 32, 3, 1024, 5),
    ("05 Gated", "gated", 16, 32, None, 1024, 5),
    ("05 Matryoshka", "matryoshka", 16, 32, 3, 1024, 5),
    ("05 ReLU/dnorm L1 pilot (1 seed)", "relu_dnorm", 16, 32, None, 1024, 1),
    ("06 sparse TopK", "topk", 576, 1152, 32, 1024, 3),
]
COMPETITORS = ("busy loop", "copy of itself")


DATA_ROWS = 50_000  # rows of data the mini-batch shapes draw their batches from (the organisms' sample size)


def _load_step(label: str):
    """One training iteration of ``label``'s shape as ``train()`` runs it (the batch drawn from the epoch's
    permutation and gathered, Adam; thread count measured where a probe allows:
    ``paperlib.sae.threads.MeasuredStep``), as a function of nothing."""
    _, architecture, d, n, k, rows, seeds = next(shape for shape in LOAD_SHAPES if shape[0] == label)
    gen = torch.Generator().manual_seed(0)
    n_data = max(rows, DATA_ROWS)
    x = torch.randn(n_data, d, generator=gen).abs() * (torch.rand(n_data, d, generator=gen) < 0.2)
    if label.startswith("05"):
        config = zoo_config(
            architecture, d_model=d, n_latents=n, sparsity=k or 3, data_scale=mean_sq_norm(x), n_seeds=seeds
        )
    else:
        config = SAEConfig(architecture, d, n, k=k, l1_coeff=1e-2 if architecture == "relu" else 0.0, n_seeds=seeds)
    bank, schedule, measured = SAEBank(config), TrainConfig(steps=10**9, lr=1e-4, batch_size=rows), MeasuredStep()
    optimizer = torch.optim.Adam(bank.parameters(), lr=schedule.lr, foreach=True)
    counter = iter(range(1, 10**9))

    def iteration() -> None:
        _iteration(measured, bank, optimizer, x, schedule, next(counter))

    iteration.measured = measured  # type: ignore[attr-defined]  # its probes' verdicts, for the report
    return iteration


def _steps_per_second(step, seconds: float) -> float:
    step()
    step()  # the probe and first-call costs outside the timing
    start, count = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        step()
        count += 1
    return count / (time.perf_counter() - start)


def _pin_threads() -> None:
    """Every step at torch's full thread count, as training ran before thread counts were measured."""
    ThreadChooser.pick = lambda self: torch.get_num_threads()


def _competitor(kind: str, label: str, policy: str) -> subprocess.Popen:
    if kind == "busy loop":
        return subprocess.Popen([sys.executable, "-c", "while True: pass"])
    # the same training in a second process, as when two notebooks run side by side
    return subprocess.Popen([sys.executable, __file__, "--rival", label, *(["--pinned"] if policy == "pinned" else [])])


def _under_load(label: str, seconds: float) -> dict:
    """Quiet steps/s and steps/s beside each competitor, with measured and with pinned thread counts."""
    out = {}
    chosen = ThreadChooser.pick
    for policy in ("chosen", "pinned"):
        if policy == "pinned":
            _pin_threads()
        try:
            step = _load_step(label)
            quiet = _steps_per_second(step, seconds)
            result = {"quiet_steps_per_s": round(quiet, 1), "probe_passed": all(step.measured.choosers.values())}
            for kind in COMPETITORS:
                rival = _competitor(kind, label, policy)
                try:
                    time.sleep(3.0 if kind == "copy of itself" else 0.2)  # the copy imports torch and warms up
                    loaded = _steps_per_second(step, seconds)
                finally:
                    rival.kill()
                    rival.wait()
                result[kind] = {"steps_per_s": round(loaded, 1), "fraction_of_quiet": round(loaded / quiet, 3)}
        finally:
            ThreadChooser.pick = chosen
        out[policy] = result
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--load-seconds", type=float, default=4.0, help="seconds per quiet / loaded timing (0: skip)")
    parser.add_argument("--rival", choices=[shape[0] for shape in LOAD_SHAPES], help=argparse.SUPPRESS)
    parser.add_argument("--pinned", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rival:  # a competitor of _under_load: train until killed
        if args.pinned:
            _pin_threads()
        step = _load_step(args.rival)
        while True:
            step()
    result = {"machine": _machine(), "commit": _git_commit(), "loadavg_before": _load(), "shapes": {}}
    rates = result["machine"]["matmul_gflops"]
    rates["2048^3"] = round(_matmul_gflops(2048, 2048, reps=5, rows=2048), 1)
    rates["2048^3_onednn"] = round(_matmul_gflops(2048, 2048, reps=5, rows=2048, backend="onednn") or 0.0, 1)
    peak = max(rates["2048^3"], rates["2048^3_onednn"])  # the faster of torch's two fp32 GEMMs
    for label, architecture, d, n, k, rows, seeds in SHAPES:
        m = _measure(architecture, d, n, k, rows, seeds, args.repeats, args.train_steps)
        m.update(
            architecture=architecture,
            d=d,
            n=n,
            k=k,
            rows=rows,
            seeds=seeds,
            fused_fraction_of_matmul_peak=round(m["fused_gflops"] / peak, 3),
        )
        result["shapes"][label] = m
        print(
            f"{label}: step fused {m['fused']['step_ms']:.2f} ms vs torch {m['torch']['step_ms']:.2f} ms "
            f"(x{m['speedup_step']}); train() x{m['speedup_train']}; fused {m['fused_gflops']:.0f} GFLOP/s = "
            f"{m['fused_fraction_of_matmul_peak']:.0%} of the best 2048^3 matmul rate ({peak:.0f})"
        )
        _write(args.out, result)
    if args.load_seconds > 0:
        result["under_load"] = {}
        for label, *_ in LOAD_SHAPES:
            m = result["under_load"][label] = _under_load(label, args.load_seconds)
            print(
                f"{label}: of quiet steps/s, measured thread counts keep "
                + ", ".join(f"{m['chosen'][kind]['fraction_of_quiet']:.0%} beside a {kind}" for kind in COMPETITORS)
                + f"; pinned to {torch.get_num_threads()}: "
                + ", ".join(f"{m['pinned'][kind]['fraction_of_quiet']:.0%}" for kind in COMPETITORS)
                + ("" if m["chosen"]["probe_passed"] else " (the probe found bits that depend on the count: pinned)")
            )
            _write(args.out, result)
    result["loadavg_after"] = _load()
    _write(args.out, result)


if __name__ == "__main__":
    main()
