"""Benchmark LLM activation extraction: paperlib's truncated hooked forward vs a plain full forward.

    python benchmarks/extraction.py [--layers 19] [--contexts 64] [--batch 32] [--out results/extraction.json]

On the packaged SmolLM2-135M-Instruct and packaged Wikipedia contexts (the default profile's data):

- ``load``: the first ``load_model("smollm2")`` (dequantise the GGUF, write and verify the converted
  directory) and a later one (read the converted directory, sha256-verify it), each in a fresh
  subprocess with an empty in-process cache;
- ``forward``: tokens/s of ``paperlib.sources.llm.residual`` (runs blocks 0..layer only, stops by a hook) vs
  ``model(ids, output_hidden_states=True).hidden_states[layer + 1]`` (all 30 blocks and the
  unembedding), same contexts and batch size, one warm-up batch each, then alternating repeats; the
  largest difference between the two outputs is recorded;
- ``end_to_end``: ``load_activations`` on ``--e2e-tokens`` tokens from an empty cache (tokenising,
  forwards, float16 writes, hashing, manifest), tokens/s as reported in the manifest.

Threads: torch's default unless ``--threads``; the load average before each measurement is recorded
because other jobs on the machine slow every number down. Results are written atomically after every
measurement.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _write(path: Path, obj: dict) -> None:
    from paperlib.atomic import write_text  # imported here: peer interpreters run this file without paperlib

    write_text(path, json.dumps(obj, indent=2) + "\n")


def _machine() -> dict:
    import numpy as np
    import torch
    import transformers

    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    x, y = torch.randn(4096, 576), torch.randn(1536, 576)
    torch.matmul(x, y.T)
    t = time.perf_counter()
    for _ in range(5):
        torch.matmul(x, y.T)
    gflops = 5 * 2 * 4096 * 1536 * 576 / (time.perf_counter() - t) / 1e9
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "matmul_gflops_fp32_4096x576x1536": round(gflops, 1),
    }


def _load_child(store_root: str) -> None:
    t = time.perf_counter()
    import importlib

    importlib.import_module("transformers.models.llama.modeling_llama")  # import time reported apart

    from paperlib.sources.llm import load_model
    from paperlib.store import Store

    imports = time.perf_counter() - t
    t = time.perf_counter()
    load_model("smollm2", Store(store_root), device="cpu")
    print("RESULT " + json.dumps({"seconds": time.perf_counter() - t, "import_seconds": imports}))


def _run_load(store_root: str) -> dict:
    p = subprocess.run(
        [sys.executable, __file__, "--_load", store_root],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"failed": f"rc={p.returncode}: {p.stderr.strip()[-500:]}"}


def _forward_rates(model, tokens, layer: int, batch: int, repeats: int) -> dict:
    import torch

    from paperlib.sources.llm import residual

    def ours(ids):
        return residual(model, layer, ids)

    def plain(ids):
        with torch.inference_mode():
            return model(input_ids=ids, output_hidden_states=True, use_cache=False).hidden_states[layer + 1]

    batches = [tokens[i : i + batch] for i in range(0, len(tokens), batch)]
    diff = max(float((ours(b) - plain(b)).abs().max()) for b in batches[:1])  # also the warm-up
    rates: dict[str, list[float]] = {"paperlib_truncated": [], "full_output_hidden_states": []}
    for _ in range(repeats):
        for name, fn in (("paperlib_truncated", ours), ("full_output_hidden_states", plain)):
            t = time.perf_counter()
            for b in batches:
                fn(b)
            rates[name].append(tokens.numel() / (time.perf_counter() - t))
    out = {name: {"tokens_per_s_median": statistics.median(r), "tokens_per_s_all": r} for name, r in rates.items()}
    medians = [out[k]["tokens_per_s_median"] for k in ("paperlib_truncated", "full_output_hidden_states")]
    out["speedup"] = medians[0] / medians[1]
    out["max_abs_diff"] = diff
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[19])
    ap.add_argument("--contexts", type=int, default=64)
    ap.add_argument("--context-length", type=int, default=128)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--e2e-tokens", type=int, default=16384)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/extraction.json")
    args = ap.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from paperlib.sources.activations import ActivationConfig, contexts, load_activations
    from paperlib.sources.llm import load_model
    from paperlib.store import Store

    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "machine": _machine(),
        "model": "smollm2 (SmolLM2-135M-Instruct, dequantised Q4_1 GGUF, float32)",
        "corpus": "wikipedia",
        "device": "cpu",
        "measurements": [],
    }
    _write(args.out, result)
    with tempfile.TemporaryDirectory() as root:
        for kind in ("first_load_converts_gguf", "later_load_converted_dir"):
            rec = {"what": "load", "kind": kind, "loadavg_before": list(os.getloadavg()), **_run_load(root)}
            result["measurements"].append(rec)
            _write(args.out, result)
            print(rec, flush=True)
        store = Store(root)
        model, _ = load_model("smollm2", store, device="cpu")
        n_tokens = args.contexts * args.context_length
        for layer in args.layers:
            cfg = ActivationConfig(layer=layer, context_length=args.context_length, n_tokens=n_tokens)
            tokens = contexts(cfg, store=store).long()
            rec = {
                "what": "forward",
                "layer": layer,
                "contexts": args.contexts,
                "context_length": args.context_length,
                "batch": args.batch,
                "loadavg_before": list(os.getloadavg()),
                **_forward_rates(model, tokens, layer, args.batch, args.repeats),
            }
            result["measurements"].append(rec)
            _write(args.out, result)
            print(
                {k: rec[k] for k in ("layer", "speedup", "max_abs_diff")},
                {k: round(v["tokens_per_s_median"]) for k, v in rec.items() if isinstance(v, dict)},
                flush=True,
            )
            cfg = ActivationConfig(
                layer=layer, context_length=args.context_length, n_tokens=args.e2e_tokens, batch_contexts=args.batch
            )
            rec = {
                "what": "end_to_end",
                "layer": layer,
                "n_tokens": args.e2e_tokens,
                "batch": args.batch,
                "loadavg_before": list(os.getloadavg()),
            }
            t = time.perf_counter()
            acts = load_activations(cfg, store=store, progress=False)
            rec.update(wall_seconds=time.perf_counter() - t, rows=len(acts), **acts.meta["extraction"])
            result["measurements"].append(rec)
            _write(args.out, result)
            print({k: rec[k] for k in ("layer", "n_tokens", "wall_seconds", "tokens_per_s")}, flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--_load":
        _load_child(sys.argv[2])
    else:
        main()
