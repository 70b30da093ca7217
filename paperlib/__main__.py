"""Command line: ``python -m paperlib consistency RUN RUN ...``, ``python -m paperlib cache info|clean``.

``consistency`` reads the decoder of every RUN (any layout ``paperlib.io.read_decoder`` knows:
paperlib, SAELens, sparsify, dictionary_learning), matches every pair of runs exactly and reports
PW-MCC with the chance level of random dictionaries of the same shapes (for runs of several widths,
the mean over pairs of each pair's chance level), so a number is never shown without the baseline
it has to beat, and whether every matching was certified optimal. Zero-norm decoder rows (dead
latents) score cosine 0 and keep their slot, at every size; ``--drop-dead`` leaves them out
instead. ``--json`` prints the same as one JSON object for scripts.

``cache info`` lists entries per namespace and the temporary files interrupted writes left behind;
``cache clean`` removes those older than ``--max-age`` minutes (the store also does so when opened).

Problems with the inputs are reported as ``paperlib: error: ...`` naming the run, exit code 2, and
no traceback: they are the user's to fix, not bugs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np


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
    cons.add_argument("--device", help="torch device for the matcher's similarity scans: cpu (default), cuda, "
                      "cuda:N or auto")
    cons.add_argument("--drop-dead", action="store_true",
                      help="leave zero-norm decoder rows (dead latents) out of the matching instead of scoring them 0")
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
    clean = cache_sub.add_parser("clean", help="remove temporary files that interrupted writes left behind")
    clean.add_argument("--max-age", type=float, default=None, metavar="MINUTES",
                       help="only those older than this (default: the store's own limit, 60 minutes; a younger "
                       "one may belong to a write still in progress)")
    clean.set_defaults(func=_cache_clean)
    return parser


def _resolve_device(device: str | None) -> str:
    """``--device``, else the CPU: only the matcher's similarity scans run there, so the numbers do
    not depend on it (the CUDA scan path has not been exercised on a GPU yet, hence opt-in). A
    device this machine lacks is refused before any run is read."""
    from paperlib.runtime import resolve_device

    if device is None:
        return "cpu"
    try:
        return str(resolve_device(device, "--device", "use --device cpu or --device auto"))
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


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
    device = _resolve_device(args.device)
    from paperlib.consistency import chance_pw_mcc, pw_mcc

    decoders = _read_runs(args.runs)
    signed = not args.abs
    dead = [int((~np.asarray(d.W_dec).any(axis=1)).sum()) for d in decoders]
    if args.drop_dead:
        for run, d, n in zip(args.runs, decoders, dead):
            if n == d.n_latents:
                raise UsageError(f"run {run!r} has only zero-norm decoder rows; nothing is left with --drop-dead")
    live = [d.n_latents - n if args.drop_dead else d.n_latents for d, n in zip(decoders, dead)]
    try:
        consistency = pw_mcc([_live_rows(d.W_dec) if args.drop_dead else d.W_dec for d in decoders], signed,
                             device=device)
        chance, by_widths = None, None
        if args.chance_samples > 0:
            c = chance_pw_mcc(live, decoders[0].d_model, args.chance_samples, signed=signed, device=device)
            chance = {"mean": c.mean, "std": c.std, "samples": c.n_samples}
            by_widths = [{"n_a": a, "n_b": b, "pairs": c.pairs[(a, b)], "mean": v.mean, "std": v.std}
                         for (a, b), v in c.by_widths.items()]
    except (ValueError, RuntimeError) as exc:
        raise UsageError(f"cannot match runs {', '.join(map(repr, args.runs))}: {exc}") from exc
    pairs, d_model = consistency.pairs, decoders[0].d_model
    result = {
        "runs": list(args.runs),
        "layouts": [d.layout for d in decoders],
        "n_latents": [d.n_latents for d in decoders],
        "zero_rows": dead,
        "drop_dead": bool(args.drop_dead),
        "d_model": d_model,
        "signed": signed,
        "pw_mcc": consistency.mean,
        "pw_mcc_std": consistency.std,
        "certified": all(m.certified for m in consistency.matches),
        "pairs": [{"a": args.runs[i], "b": args.runs[j], "mcc": float(v), "certified": bool(m.certified)}
                  for (i, j, v), m in zip(pairs, consistency.matches)],
        "chance": chance,
        "chance_by_widths": by_widths,
    }
    print(json.dumps(result, indent=1) if args.json else _table(result, pairs))
    return 0


def _live_rows(W):
    """The decoder rows with a non-zero norm (``--drop-dead``)."""
    W = np.asarray(W)
    return W[W.any(axis=1)]


def _table(result: dict, pairs: list[tuple[int, int, float]]) -> str:
    """Runs as numbered rows (paths can be long), then the symmetric MCC matrix and the summary."""
    runs, R = result["runs"], len(result["runs"])
    kind = "signed cosine" if result["signed"] else "|cos|"
    lines = [f"PW-MCC of {R} runs ({kind}), d_model = {result['d_model']}", ""]
    for i, (run, layout, n, z) in enumerate(zip(runs, result["layouts"], result["n_latents"], result["zero_rows"]), 1):
        note = ""
        if z:
            how = "left out" if result["drop_dead"] else "scored 0; --drop-dead leaves them out"
            note = f", {z} zero-norm rows {how}"
        lines.append(f"  [{i}] {run}  ({layout}, {n} latents{note})")
    matrix = [["—"] * R for _ in range(R)]
    for i, j, v in pairs:
        matrix[i][j] = matrix[j][i] = f"{v:.4f}"
    width = max(7, len(f"[{R}]"))
    lines += ["", "pairwise MCC", " " * (width + 1) + " ".join(f"[{j + 1}]".rjust(width) for j in range(R))]
    for i in range(R):
        lines.append(f"[{i + 1}]".ljust(width + 1) + " ".join(cell.rjust(width) for cell in matrix[i]))
    lines += ["", f"PW-MCC = {result['pw_mcc']:.4f} ± {result['pw_mcc_std']:.4f} over {len(pairs)} pairs"]
    uncertified = [f"[{i + 1}]-[{j + 1}]" for (i, j, _), p in zip(pairs, result["pairs"]) if not p["certified"]]
    if uncertified:
        lines.append(f"matchings: {len(uncertified)} of {len(pairs)} NOT certified optimal ({', '.join(uncertified)}); "
                     "their MCC may be too low")
    else:
        lines.append(f"matchings: all {len(pairs)} certified optimal")
    chance = result["chance"]
    if chance is None:
        lines.append("chance level: skipped (--chance-samples 0)")
    elif len(result["chance_by_widths"]) == 1:
        n_a, n_b = result["chance_by_widths"][0]["n_a"], result["chance_by_widths"][0]["n_b"]
        lines.append(
            f"chance  = {chance['mean']:.4f} ± {chance['std']:.4f} ({chance['samples']} pairs of random "
            f"Gaussian dictionaries, {n_a} x {n_b} latents, d_model {result['d_model']})"
        )
    else:
        parts = ", ".join(f"{w['n_a']} x {w['n_b']}: {w['mean']:.4f} ({w['pairs']} pairs)"
                          for w in result["chance_by_widths"])
        lines.append(
            f"chance  = {chance['mean']:.4f} ± {chance['std']:.4f} (mean over the {len(pairs)} pairs of each pair's "
            f"chance level; {chance['samples']} pairs of random Gaussian dictionaries per width pair, d_model "
            f"{result['d_model']}: {parts})"
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
    from paperlib.atomic import STALE_AFTER_S, temporaries
    from paperlib.store import default_root

    root = default_root()
    spaces = []
    if root.is_dir():
        for ns in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            entries = [p for p in ns.iterdir() if p.is_dir() and not p.name.startswith(".")]
            spaces.append({"namespace": ns.name, "entries": len(entries), "bytes": _size(ns)})
    temps, stale = temporaries(root), set(temporaries(root, STALE_AFTER_S))
    temp_bytes = sum(_size(t) if t.is_dir() else t.stat().st_size for t in temps)
    orphans = {"count": len(temps), "stale": len(stale), "bytes": temp_bytes}
    if args.json:
        print(json.dumps({"root": str(root), "exists": root.is_dir(), "namespaces": spaces, "temporaries": orphans},
                         indent=1))
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
    if temps:
        print(f"temporary files of interrupted writes: {len(temps)} ({_human(temp_bytes)}, counted above), "
              f"{len(stale)} older than {STALE_AFTER_S / 60:.0f} min; `python -m paperlib cache clean` removes those")
    return 0


def _cache_clean(args: argparse.Namespace) -> int:
    from paperlib.atomic import STALE_AFTER_S, remove_stale_temporaries
    from paperlib.store import default_root

    if args.max_age is not None and not args.max_age >= 0:
        raise UsageError(f"--max-age must be >= 0 minutes, got {args.max_age}")
    max_age = STALE_AFTER_S if args.max_age is None else args.max_age * 60
    root = default_root()
    removed = remove_stale_temporaries(root, max_age)
    print(f"removed {len(removed)} temporary file(s) older than {max_age / 60:g} min under {root}")
    for path in removed:
        print(f"  {path.relative_to(root)}")
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
