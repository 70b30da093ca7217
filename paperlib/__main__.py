"""Command line: ``python -m paperlib consistency RUN RUN ...`` and ``python -m paperlib cache info``.

``consistency`` reads the decoder of every RUN (any layout ``paperlib.io.read_decoder`` knows:
paperlib, SAELens, sparsify, dictionary_learning), matches every pair of runs exactly and reports
PW-MCC with the chance level of random dictionaries of the same shapes, so a number is never shown
without the baseline it has to beat. ``--json`` prints the same as one JSON object for scripts.

Problems with the inputs are reported as ``paperlib: error: ...`` naming the run, exit code 2, and
no traceback: they are the user's to fix, not bugs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


class UsageError(Exception):
    """An input problem the user can fix; printed without a traceback."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paperlib", description="Companion tools for the SAE consistency papers.")
    sub = parser.add_subparsers(dest="command", required=True)
    cons = sub.add_parser(
        "consistency",
        help="pairwise MCC (PW-MCC) between SAE runs",
        description="PW-MCC between the decoders of two or more SAE runs, with the chance level. "
        "A RUN is a paperlib or SAELens directory (cfg.json + sae_weights.safetensors) or that "
        ".safetensors file, a sparsify directory (cfg.json + sae.safetensors), or a "
        "dictionary_learning ae.pt (or its directory).",
    )
    cons.add_argument("runs", nargs="+", metavar="RUN", help="SAE runs to compare (at least two)")
    cons.add_argument("--abs", action="store_true", help="use |cos| (the paper's formula) instead of signed cosine")
    cons.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    cons.add_argument("--device", help="torch device for the matcher's similarity scans (default: cpu)")
    cons.add_argument(
        "--chance-samples", type=int, default=3, metavar="N",
        help="random dictionary pairs for the chance level (default 3; 0 skips it)",
    )
    cons.set_defaults(func=_consistency)
    cache = sub.add_parser("cache", help="inspect the result cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    info = cache_sub.add_parser("info", help="cache root, and entries and size per namespace")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_cache_info)
    return parser


def _resolve_device(device: str | None) -> str:
    """``--device``, else the CPU: only the matcher's similarity scans run there, so the numbers do
    not depend on it (the CUDA scan path has not been exercised on a GPU yet, hence opt-in)."""
    import torch

    if device is None:
        return "cpu"
    try:
        return str(torch.device(device))
    except RuntimeError as exc:
        raise UsageError(f"--device {device} is not a torch device; use e.g. cpu or cuda") from exc


def _read_runs(runs: Sequence[str]) -> list:
    from paperlib.io import read_decoder

    decoders = []
    for run in runs:
        if not Path(run).exists():
            raise UsageError(f"run {run!r} does not exist; check the path")
        try:
            decoders.append(read_decoder(run))
        except (ValueError, OSError) as exc:
            raise UsageError(f"cannot read run {run!r}: {exc}") from exc
    first = decoders[0]
    for run, dec in zip(runs[1:], decoders[1:]):
        if dec.d_model != first.d_model:
            raise UsageError(
                f"run {run!r} has d_model {dec.d_model} but run {runs[0]!r} has d_model {first.d_model}; "
                "compare SAEs trained on the same activations (same model and layer)"
            )
    return decoders


def _consistency(args: argparse.Namespace) -> int:
    if len(args.runs) < 2:
        raise UsageError(
            f"consistency needs at least two runs to compare, got 1 ({args.runs[0]!r}); "
            "pass the SAEs of two or more seeds"
        )
    if args.chance_samples < 0:
        raise UsageError(f"--chance-samples must be >= 0, got {args.chance_samples}")
    from paperlib.consistency import chance_mcc, pw_mcc

    decoders = _read_runs(args.runs)
    signed, device = not args.abs, _resolve_device(args.device)
    try:
        consistency = pw_mcc([d.W_dec for d in decoders], signed, device=device)
        chance = None
        if args.chance_samples > 0:
            c = chance_mcc(decoders[0].n_latents, decoders[1].n_latents, decoders[0].d_model, args.chance_samples,
                           signed=signed, device=device)
            chance = {"mean": c.mean, "std": c.std, "samples": c.n_samples}
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot match runs {', '.join(map(repr, args.runs))}: {exc}") from exc
    pairs, d_model = consistency.pairs, decoders[0].d_model
    result = {
        "runs": list(args.runs),
        "layouts": [d.layout for d in decoders],
        "n_latents": [d.n_latents for d in decoders],
        "d_model": d_model,
        "signed": signed,
        "pw_mcc": consistency.mean,
        "pw_mcc_std": consistency.std,
        "certified": all(m.certified for m in consistency.matches),
        "pairs": [{"a": args.runs[i], "b": args.runs[j], "mcc": float(v)} for i, j, v in pairs],
        "chance": chance,
    }
    print(json.dumps(result, indent=1) if args.json else _table(result, pairs))
    return 0


def _table(result: dict, pairs: list[tuple[int, int, float]]) -> str:
    """Runs as numbered rows (paths can be long), then the symmetric MCC matrix and the summary."""
    runs, R = result["runs"], len(result["runs"])
    kind = "signed cosine" if result["signed"] else "|cos|"
    lines = [f"PW-MCC of {R} runs ({kind}), d_model = {result['d_model']}", ""]
    for i, (run, layout, n) in enumerate(zip(runs, result["layouts"], result["n_latents"]), 1):
        lines.append(f"  [{i}] {run}  ({layout}, {n} latents)")
    matrix = [["—"] * R for _ in range(R)]
    for i, j, v in pairs:
        matrix[i][j] = matrix[j][i] = f"{v:.4f}"
    width = max(7, len(f"[{R}]"))
    lines += ["", "pairwise MCC", " " * (width + 1) + " ".join(f"[{j + 1}]".rjust(width) for j in range(R))]
    for i in range(R):
        lines.append(f"[{i + 1}]".ljust(width + 1) + " ".join(cell.rjust(width) for cell in matrix[i]))
    lines += ["", f"PW-MCC = {result['pw_mcc']:.4f} ± {result['pw_mcc_std']:.4f} over {len(pairs)} pairs"]
    chance = result["chance"]
    if chance is None:
        lines.append("chance level: skipped (--chance-samples 0)")
    else:
        n_a, n_b = result["n_latents"][:2]
        lines.append(
            f"chance  = {chance['mean']:.4f} ± {chance['std']:.4f} ({chance['samples']} pairs of random "
            f"Gaussian dictionaries, {n_a} x {n_b} latents, d_model {result['d_model']})"
        )
    return "\n".join(lines)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _entries(n: int) -> str:
    return f"{n:>6} {'entry  ' if n == 1 else 'entries'}"


def _cache_info(args: argparse.Namespace) -> int:
    from paperlib.store import default_root

    root = default_root()
    spaces = []
    if root.is_dir():
        for ns in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            entries = [p for p in ns.iterdir() if p.is_dir() and not p.name.startswith(".")]
            spaces.append({"namespace": ns.name, "entries": len(entries), "bytes": _size(ns)})
    if args.json:
        print(json.dumps({"root": str(root), "exists": root.is_dir(), "namespaces": spaces}, indent=1))
        return 0
    print(f"cache root: {root}" + ("" if root.is_dir() else " (does not exist yet)"))
    if not spaces:
        print("no cached results")
    width = max([len(s["namespace"]) for s in spaces] + [9])
    for s in spaces:
        print(f"  {s['namespace']:<{width}}  {_entries(s['entries'])}  {_human(s['bytes']):>10}")
    if spaces:
        total = sum(s["bytes"] for s in spaces)
        print(f"  {'total':<{width}}  {_entries(sum(s['entries'] for s in spaces))}  {_human(total):>10}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m paperlib`` and the ``paperlib`` script; returns the exit code."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed usage or help already
        return int(exc.code or 0)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"paperlib: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
