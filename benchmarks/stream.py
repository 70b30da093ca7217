"""Benchmark training from a stream of rows (``paperlib.sources.stream``) against one in-memory tensor.

    python benchmarks/stream.py [--steps 600] [--repeats 2] [--out benchmarks/results/stream.json]

cost
    Notebook 06's TopK bank (d 576, 1,152 latents, k 32, 3 seeds, batches of 1,024, lr 4e-3, fp32, normalised)
    trained for ``--steps`` steps on the same 262,144 float16 rows (synthetic, fixed seed), stored as a ``.npy``
    file like the activation cache: once as the default profile does (the rows read into one float32 tensor,
    ``train(bank, x)``), once from ``TensorStream`` over the memory-mapped file (blocks of 65,536 rows). Each run
    in a fresh subprocess, the two alternating, ``--repeats`` times; seconds from opening the file to the end of
    ``train()`` (both pay the same evaluations and thread probe), tokens/s = steps x batch / seconds.
    ``stream_cost`` = the median in-memory tokens/s / the median stream tokens/s (the goal: <= 1.10).
memory
    ``ModelStream`` (the packaged SmolLM2, block 19, packaged Wikipedia, contexts of 128, blocks of 32 contexts)
    feeding a TopK bank (d 576, 1,152 latents, k 32) at three token budgets 4x apart, each in a fresh subprocess:
    the process's peak resident memory (``VmHWM``) beside the size the same rows would take as one float32
    tensor. The goal: the same peak at every budget.

lockstep
    The same live stream feeding three TopK banks (k = 16, 32, 64) through ``train_many``, one forward per batch for
    all three, against one bank alone, ``LOCKSTEP_STEPS`` steps each: ``lockstep_over_separate`` = the three banks'
    seconds / three times one bank's (what three separate runs, each with its own forward, would take).

``--parts`` runs some of these and keeps the others from ``--out``. The load average is recorded with every run;
the JSON is written atomically after every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from consistency import peak_rss_gb  # noqa: E402  (benchmarks/, this script's directory)

ROWS, D, LATENTS, K, SEEDS, BATCH, LR = 262_144, 576, 1152, 32, 3, 1024, 4e-3
LIVE_BATCH, LIVE_BUDGETS = 512, (16, 64, 256)  # steps of the ModelStream runs (4x apart)
LOCKSTEP_K, LOCKSTEP_STEPS = (16, 32, 64), 64  # the lockstep part: three TopK banks from one live stream


def _child(kind: str, argument: str, steps: int) -> dict:
    import numpy as np
    import torch

    from paperlib.sae.bank import SAEBank, SAEConfig
    from paperlib.sae.train import TrainConfig, train, train_many
    from paperlib.sources.activations import ActivationConfig
    from paperlib.sources.stream import ModelStream, TensorStream

    torch.manual_seed(0)
    batch = LIVE_BATCH if kind.startswith("live") else BATCH
    # the same evaluation rows for both (the first 16,384; eval_rows=None would evaluate on all rows in memory)
    cfg = TrainConfig(
        steps=steps, lr=LR, batch_size=batch, normalize=True, log_every=10**9, stats_rows=16_384, eval_rows=16_384
    )
    start = time.perf_counter()
    if kind == "memory":
        data = torch.from_numpy(np.load(argument).astype(np.float32))
    elif kind == "stream":
        data = TensorStream(np.load(argument, mmap_mode="r"), block_rows=65_536)
    else:
        data = ModelStream(ActivationConfig(context_length=128), block_contexts=32)
        cfg = TrainConfig(
            steps=steps, lr=LR, batch_size=batch, normalize=True, log_every=10**9, stats_rows=2048, eval_rows=2048
        )
    if kind == "live-lockstep":  # three banks from the one stream: TopK at k = 16, 32, 64
        banks = [SAEBank(SAEConfig("topk", D, LATENTS, k=k)) for k in LOCKSTEP_K]
        history = train_many(banks, data, [cfg] * len(banks), progress=False, device="cpu")[1]
    else:
        bank = SAEBank(SAEConfig("topk", D, LATENTS, k=K, n_seeds=1 if kind == "live" else SEEDS))
        history = train(bank, data, cfg, progress=False, device="cpu")
    seconds = time.perf_counter() - start
    return {
        "kind": kind,
        "steps": steps,
        "batch": batch,
        "seconds": seconds,
        "tokens_per_s": steps * batch / seconds,
        "peak_rss_mib": peak_rss_gb() * 1024,  # VmHWM: ru_maxrss keeps the forking parent's peak across exec
        "final_fvu": [round(float(v), 4) for v in history.final("fvu")],
        "loadavg": list(os.getloadavg()),
    }


def _run(kind: str, argument: str, steps: int) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--_child", kind, argument, str(steps)], capture_output=True, text=True, check=False
    )
    if out.returncode:
        return {"kind": kind, "steps": steps, "error": out.stderr[-2000:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "stream.json")
    ap.add_argument(
        "--parts", default="cost,memory,lockstep", help="comma-separated parts to run; the others are kept from --out"
    )
    ap.add_argument("--_child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        kind, argument, steps = args._child
        print(json.dumps(_child(kind, argument, int(steps))))
        return

    import numpy as np

    from paperlib.atomic import write_text

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    parts = set(args.parts.split(","))
    if parts - {"cost", "memory", "lockstep"}:
        ap.error(f"--parts takes cost, memory and lockstep, got {args.parts!r}")
    result: dict = json.loads(args.out.read_text()) if parts != {"cost", "memory", "lockstep"} else {}
    result.update(
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        machine={"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform()},
        config={"rows": ROWS, "d": D, "latents": LATENTS, "k": K, "seeds": SEEDS, "batch": BATCH, "lr": LR},
    )

    def save() -> None:
        write_text(args.out, json.dumps(result, indent=2) + "\n")

    def measure(part: str, kind: str, argument: str, steps: int, **extra: Any) -> dict:
        run = {**_run(kind, argument, steps), **extra}
        result[part].append(run)
        print(json.dumps(run)[:300], flush=True)
        save()
        return run

    if "cost" in parts:
        result["cost"] = []
        with tempfile.TemporaryDirectory() as tmp:
            rows = Path(tmp) / "rows.npy"
            generator = np.random.default_rng(0)
            np.save(rows, (generator.standard_normal((ROWS, D), dtype=np.float32) + 0.5).astype(np.float16))
            for _ in range(args.repeats):
                for kind in ("memory", "stream"):
                    measure("cost", kind, str(rows), args.steps)
        rates = {
            kind: statistics.median(r["tokens_per_s"] for r in result["cost"] if r["kind"] == kind and "error" not in r)
            for kind in ("memory", "stream")
        }
        result["stream_cost"] = round(rates["memory"] / rates["stream"], 3)
        print(f"stream_cost {result['stream_cost']}")
    if "memory" in parts:
        result["memory"] = []
        for steps in LIVE_BUDGETS:
            measure("memory", "live", "-", steps, as_one_fp32_tensor_mib=steps * LIVE_BATCH * D * 4 / 2**20)
        print(f"peak RSS {[r.get('peak_rss_mib') for r in result['memory']]} MiB")
    if "lockstep" in parts:
        result["lockstep"] = []
        one = measure("lockstep", "live", "-", LOCKSTEP_STEPS)
        many = measure("lockstep", "live-lockstep", "-", LOCKSTEP_STEPS, k=list(LOCKSTEP_K))
        if "error" not in one and "error" not in many:
            result["lockstep_over_separate"] = round(many["seconds"] / (len(LOCKSTEP_K) * one["seconds"]), 3)
            print(f"lockstep / separate runs: {result['lockstep_over_separate']}")
    save()  # with the ratios


if __name__ == "__main__":
    main()
