"""Paper A's LLM sweep on one device: how fast ``train_many`` trains its 144 SAEs in lockstep, and the time the
paper's 500M tokens would take at that rate.

    python benchmarks/sweep_throughput.py --device cuda [--steps 3 8] [--out PATH]   # paper A's sizes, on a GPU
    python benchmarks/sweep_throughput.py --tiny                                     # toy sizes on the CPU, seconds

The group is paper A's sweep: its 8 architectures (``runs.zoo.rule_config``: the zoo rule's configuration at a
target L0, the L1 family's coefficient uncalibrated) x 6 target L0s (20 ... 640) x 3 seeds = 48 banks of 3 seeds,
16,384 latents at d = 768, batches of 2,048 and lr 3e-4 (the paper profile's), precision "auto" (bf16 matmuls on
CUDA), trained by ``train_many`` from one ``TensorStream`` of random Gaussian rows (262,144 x 768, on the CPU, as a
stream's blocks are).

The language model's forward, which a live stream adds once per token for the whole group, is timed on its own: a
GPT-NeoX with Pythia-160M's configuration (12 blocks of 768, 12 heads, rotary on a quarter of each head, vocabulary
50,304) and random weights, built in code (no hub here), run by ``sources.llm.residual`` to block 8 in fp32 as
``ModelStream`` runs it, on random token ids in contexts of 1,024 (random weights and tokens cost what real ones
do: the arithmetic is the same). The projection with the forward adds the two times per token (a stream extracts a
block, then the group trains on it).

Two calls of ``train_many`` on fresh banks, of ``--steps A B`` steps; the time per step is the difference over
B - A, so the per-call costs (the first slice, the memory plan, thread probes, the banks' move to the device)
cancel; a one-step call first takes the per-process ones (compilation). Reported: stream tokens/s (every SAE sees
every token), SAE-tokens/s, the projected hours for 500M tokens (goal of issue #17: <= 6 h on one H200), the memory
plan's passes and the peak device memory. The JSON goes to ``benchmarks/results/sweep_throughput.<device>.json``
(``--tiny``: a temporary file unless ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAPER = {"d": 768, "n": 16_384, "l0s": (20, 40, 80, 160, 320, 640), "batch": 2048, "rows": 262_144}
TINY = {"d": 32, "n": 256, "l0s": (4, 8), "batch": 256, "rows": 8192}
# Pythia-160M-deduped's shape (its config.json) and paper A's hook, context and forward batch; tiny: a rehearsal
PYTHIA = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072,
          "vocab_size": 50_304, "rotary_pct": 0.25, "max_position_embeddings": 2048, "layer": 8, "context": 1024,
          "contexts": 16}  # fmt: skip
TINY_LLM = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 4, "intermediate_size": 64,
            "vocab_size": 400, "rotary_pct": 0.25, "max_position_embeddings": 128, "layer": 1, "context": 64,
            "contexts": 8}  # fmt: skip
SEEDS, LR, PAPER_TOKENS = 3, 3e-4, 500_000_000


def _group(sizes: dict) -> list:
    from paperlib.runs.zoo import rule_config
    from paperlib.sae.bank import SAEBank
    from paperlib.sae.zoo_presets import ZOO

    return [
        SAEBank(rule_config(arch, sizes["d"], sizes["n"], l0, n_seeds=SEEDS, seed=i))
        for i, (arch, l0) in enumerate((arch, l0) for arch in ZOO for l0 in sizes["l0s"])
    ]


def forward_tokens_per_s(shape: dict, device, repeats: int = 3) -> float:
    """Tokens/s of the residual stream to block ``layer`` of a random GPT-NeoX of ``shape`` (module docstring)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    from paperlib.sources.llm import residual

    fields = {k: v for k, v in shape.items() if k not in ("layer", "context", "contexts")}
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**fields)).eval().requires_grad_(False).to(device)
    tokens = torch.randint(0, shape["vocab_size"], (shape["contexts"], shape["context"]), device=device)

    def once() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        rows = residual(model, shape["layer"], tokens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        assert rows.device.type == device.type, f"the forward ran on {rows.device}, not {device}"
        return time.perf_counter() - start

    once()  # warm-up: kernels chosen, memory allocated
    return tokens.numel() / min(once() for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--tiny", action="store_true", help="toy sizes (a rehearsal of this script on the CPU)")
    ap.add_argument("--steps", type=int, nargs=2, default=None, metavar=("A", "B"), help="default 3 8 (tiny: 2 6)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()

    import numpy as np
    import torch

    from paperlib.atomic import write_text
    from paperlib.sae.train import TrainConfig, train_many
    from paperlib.sources.stream import TensorStream

    sizes = TINY if args.tiny else PAPER
    short, long = args.steps or ((2, 6) if args.tiny else (3, 8))
    if not 0 < short < long:
        ap.error(f"--steps A B needs 0 < A < B, got {short} {long}")
    device = torch.device(args.device)
    rows = np.random.default_rng(0).standard_normal((sizes["rows"], sizes["d"]), dtype=np.float32)
    stream = TensorStream(rows, block_rows=min(65_536, sizes["rows"]))
    cuda = device.type == "cuda"

    def timed(steps: int) -> tuple[float, str]:
        banks = _group(sizes)
        cfg = TrainConfig(steps=steps, lr=LR, batch_size=sizes["batch"], log_every=10**9, stats_rows=sizes["batch"])
        plan = io.StringIO()
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with contextlib.redirect_stdout(plan), contextlib.redirect_stderr(io.StringIO()):  # the plan; no bars
            train_many(banks, stream, [cfg] * len(banks), device=device, progress=True)
        if cuda:
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        if cuda:  # the banks' parameters must have trained on the device named
            assert all(p.device.type == "cuda" for bank in banks for p in bank.parameters()), "trained off the GPU"
        return seconds, plan.getvalue().strip().splitlines()[0]

    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    timed(1)  # per-process one-time costs (compilation of the closed-form steps) before either timed call
    (t_short, plan), (t_long, _) = timed(short), timed(long)
    per_step = (t_long - t_short) / (long - short)
    tokens_per_s = sizes["batch"] / per_step
    llm = TINY_LLM if args.tiny else PYTHIA
    forward = forward_tokens_per_s(llm, device)
    with_forward = 1 / (1 / tokens_per_s + 1 / forward)
    n_saes = len(sizes["l0s"]) * 8 * SEEDS
    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
            "cpu_cores": os.cpu_count(),
            "torch": torch.__version__,
        },
        "sizes": {**sizes, "l0s": list(sizes["l0s"]), "saes": n_saes, "banks": n_saes // SEEDS, "tiny": args.tiny},
        "steps": [short, long],
        "seconds": [t_short, t_long],
        "seconds_per_step": per_step,
        "stream_tokens_per_s": tokens_per_s,
        "sae_tokens_per_s": tokens_per_s * n_saes,
        "projected_hours_500M_tokens": PAPER_TOKENS / tokens_per_s / 3600,
        "llm": {**llm, "weights": "random (Pythia-160M's configuration, built in code)", "precision": "fp32"},
        "llm_forward_tokens_per_s": forward,
        "projected_hours_500M_tokens_with_forward": PAPER_TOKENS / with_forward / 3600,
        "memory_plan": plan,
        "peak_device_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if cuda else None,
    }
    name = "tiny-" + device.type if args.tiny else (torch.cuda.get_device_name(device) if cuda else "cpu")
    default = Path(tempfile.gettempdir()) if args.tiny else ROOT / "benchmarks" / "results"
    out = args.out or default / f"sweep_throughput.{name.lower().replace(' ', '-')}.json"
    write_text(out, json.dumps(result, indent=2) + "\n")
    print(
        f"{n_saes} SAEs ({result['sizes']['banks']} banks) on {device}: {per_step:.3f} s/step, "
        f"{tokens_per_s:,.0f} stream tokens/s, {result['sae_tokens_per_s']:,.0f} SAE-tokens/s; "
        f"500M tokens in {result['projected_hours_500M_tokens']:.1f} h, with the LLM forward ({forward:,.0f} tokens/s) "
        f"{result['projected_hours_500M_tokens_with_forward']:.1f} h; {plan}; -> {out}"
    )


if __name__ == "__main__":
    main()
