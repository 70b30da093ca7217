"""Benchmark exact PW-MCC matching: paperlib.metrics.matching vs scipy / lap / lapjv.

    python benchmarks/consistency.py [--sizes 4096 16384 65536] [--out benchmarks/results/consistency.json]

Every measurement runs in a fresh subprocess that loads the two dictionaries from .npy
files and reports wall time (excluding imports and the load) and peak RSS (VmHWM,
which includes the interpreter and the 2 x n x d x 4 bytes of loaded data;
``rss_after_load_gb`` is reported too). Dense solvers are skipped, with the reason recorded, when the n x n float64 cost
matrix would exceed ``--max-dense-gb`` or the package is not importable. ``lap`` and
``lapjv`` are looked up in ``--peer-python`` (default: the peers' own virtual environment
``benchmarks/.venv-peers``, which ``make bench`` creates), scipy and paperlib in this interpreter.
Results are written atomically after every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- child side
def peak_rss_gb() -> float:
    """Peak resident set size of this process (VmHWM; ru_maxrss can include the parent's
    pre-exec RSS on Linux, so it is only the fallback)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _child(method: str, data_dir: str) -> None:
    if method == "paperlib":  # import before timing
        sys.path.insert(0, str(ROOT))
        from paperlib.metrics.matching import match
    a = np.load(os.path.join(data_dir, "a.npy"))
    b = np.load(os.path.join(data_dir, "b.npy"))
    rss_load = peak_rss_gb()
    out: dict = {}
    t0 = time.perf_counter()
    if method == "paperlib":
        m = match(a, b)
        out.update(objective=float(m.weights.sum()), certified=m.certified, stats={k: v for k, v in m.stats.items()})
    else:

        def unit(x):
            x = x.astype(np.float64)
            return x / np.linalg.norm(x, axis=1, keepdims=True)

        w = unit(a) @ unit(b).T
        t_cost = time.perf_counter() - t0
        if method == "scipy":
            from scipy.optimize import linear_sum_assignment

            r, c = linear_sum_assignment(w, maximize=True)
        elif method == "lap":
            import lap

            np.negative(w, out=w)
            _, x, _ = lap.lapjv(w, extend_cost=w.shape[0] != w.shape[1])
            np.negative(w, out=w)
            r = np.flatnonzero(x >= 0)
            c = x[r]
        elif method == "lapjv":
            from lapjv import lapjv

            np.negative(w, out=w)
            x, _, _ = lapjv(w)
            np.negative(w, out=w)
            r, c = np.arange(w.shape[0]), np.asarray(x)
        else:
            raise SystemExit(f"unknown method {method}")
        out.update(objective=float(w[r, c].sum()), cost_matrix_seconds=t_cost, certified=None)
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_gb"] = peak_rss_gb()
    out["rss_after_load_gb"] = rss_load
    print("RESULT " + json.dumps(out))


def _probe_child() -> None:
    info = {"python": platform.python_version(), "numpy": np.__version__}
    for mod in ("scipy", "lap", "lapjv", "torch"):
        try:
            info[mod] = getattr(__import__(mod), "__version__", "installed")
        except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
            info[mod] = None
            info[mod + "_error"] = f"{type(exc).__name__}: {exc}"[:200]
    print("RESULT " + json.dumps(info))


# ---------------------------------------------------------------------------- parent side
def _run(python: str, args: list[str], timeout: float) -> dict:
    try:
        p = subprocess.run(
            [python, __file__, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    except subprocess.TimeoutExpired:
        return {"skipped": f"timeout after {timeout:.0f}s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"skipped": f"failed (rc={p.returncode}): {p.stderr.strip()[-500:]}"}


def _machine() -> dict:
    import torch

    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        pass
    gflops = {}
    for dt in (torch.float32, torch.bfloat16):
        x, y = torch.randn(4096, 768).to(dt), torch.randn(16384, 768).to(dt)
        out = torch.empty(4096, 16384, dtype=dt)
        torch.matmul(x, y.T, out=out)
        t = time.perf_counter()
        for _ in range(3):
            torch.matmul(x, y.T, out=out)
        gflops[str(dt).replace("torch.", "")] = round(3 * 2 * 4096 * 16384 * 768 / (time.perf_counter() - t) / 1e9, 1)
    import scipy

    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": mem,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "matmul_gflops_4096x768x16384": gflops,
    }


def _data(kind: str, n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, d), dtype=np.float32)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    if kind == "random":
        b = rng.standard_normal((n, d), dtype=np.float32)
    else:  # trained-like: permuted copy + noise of norm 0.5 (cos ~ 0.89)
        b = a[rng.permutation(n)] + (0.5 / np.sqrt(d)) * rng.standard_normal((n, d), dtype=np.float32)
    return a, b


def _write(path: Path, obj: dict) -> None:
    from paperlib.atomic import write_text  # imported here: peer interpreters run this file without paperlib

    write_text(path, json.dumps(obj, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--kinds", nargs="+", default=["trained", "random"], choices=["trained", "random"])
    ap.add_argument("--d", type=int, default=768)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/consistency.json")
    ap.add_argument("--methods", nargs="+", default=["paperlib", "scipy", "lap", "lapjv"])
    peers = ROOT / "benchmarks" / ".venv-peers" / "bin" / "python"
    default_peer = str(peers) if peers.exists() else sys.executable
    ap.add_argument("--peer-python", default=default_peer)
    ap.add_argument("--max-dense-gb", type=float, default=6.0)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    envs = {"main": _run(sys.executable, ["--_probe"], 120), "peer": _run(args.peer_python, ["--_probe"], 120)}
    result = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "machine": _machine(),
        "environments": {
            "main": "this environment",
            "peer": ("peers' environment" if args.peer_python != sys.executable else "this environment"),
            "versions": envs,
        },
        "measurements": [],
    }
    _write(args.out, result)
    for n in args.sizes:
        for kind in args.kinds:
            a, b = _data(kind, n, args.d, args.seed)
            with tempfile.TemporaryDirectory() as tmp:
                np.save(os.path.join(tmp, "a.npy"), a)
                np.save(os.path.join(tmp, "b.npy"), b)
                del a, b
                ref = None
                for method in sorted(args.methods, key=lambda m: m != "scipy"):  # scipy first
                    rec = {"n": n, "d": args.d, "kind": kind, "method": method, "loadavg_before": list(os.getloadavg())}
                    dense_gb = n * n * 8 / 2**30
                    env = "peer" if method in ("lap", "lapjv") else "main"
                    python = args.peer_python if env == "peer" else sys.executable
                    if method != "paperlib" and dense_gb > args.max_dense_gb:
                        rec["skipped"] = f"dense float64 cost matrix needs {dense_gb:.1f} GB > {args.max_dense_gb} GB"
                    elif method != "paperlib" and not envs[env].get(method):
                        rec["skipped"] = f"{method} not importable in {python}: {envs[env].get(method + '_error')}"
                    else:
                        rec.update(_run(python, ["--_child", method, tmp], args.timeout))
                    if method == "scipy" and "objective" in rec:
                        ref = rec["objective"]
                    if ref is not None and "objective" in rec:
                        rec["abs_diff_vs_scipy"] = abs(rec["objective"] - ref)
                    if "objective" in rec:
                        rec["mcc"] = rec["objective"] / n
                    result["measurements"].append(rec)
                    _write(args.out, result)
                    brief = {
                        k: rec.get(k)
                        for k in ("seconds", "peak_rss_gb", "mcc", "certified", "abs_diff_vs_scipy", "skipped")
                    }
                    print(f"n={n} {kind:8s} {method:9s} {brief}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child":
        _child(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "--_probe":
        _probe_child()
    else:
        main()
