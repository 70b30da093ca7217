"""Command line: ``python -m paperlib consistency RUN RUN ...``, ``sweep FILE``, ``cache info|clean``.

``consistency`` reads the decoder of every RUN (any layout ``paperlib.interop.read_decoder`` knows:
paperlib, SAELens, sparsify, dictionary_learning), matches every pair of runs exactly and reports
PW-MCC with the chance level of random dictionaries of the same shapes (for runs of several widths,
the mean over pairs of each pair's chance level), so a number is never shown without the baseline
it has to beat, whether every matching was certified optimal, and per-latent stability over
thresholds beside its chance curve. Zero-norm decoder rows (dead latents) score cosine 0 and keep
their slot, at every size; ``--drop-dead`` leaves them out instead. ``--json`` prints, and ``--out
FILE`` writes, the whole result as a versioned document (``paperlib.metrics.consistency_json``: complete
matchings, per-latent stability, provenance); ``consistency show FILE`` reads one back, checks it
against its schema and the weight files still present, and prints the table.

``sweep FILE`` trains the configurations of a sweep file from one stream as jobs (``paperlib.runs.sweep``).

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
from typing import Any
from pathlib import Path

from paperlib.metrics.consistency_json import DEFAULT_THRESHOLDS


class UsageError(Exception):
    """An input problem the user can fix; printed without a traceback."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="paperlib", description="Companion tools for the SAE consistency papers.")
    sub = parser.add_subparsers(dest="command", required=True)
    cons = sub.add_parser(
        "consistency",
        help="pairwise MCC (PW-MCC) between SAE runs",
        description="PW-MCC between the decoders of two or more SAE runs, with the chance level and per-latent "
        "stability. A RUN is a paperlib or SAELens directory (cfg.json + sae_weights.safetensors) or that "
        ".safetensors file, a sparsify directory (cfg.json + sae.safetensors), or a dictionary_learning ae.pt "
        "(or its directory). `paperlib consistency show FILE` prints a document written with --out "
        "(a run directory named 'show' can be given as ./show).",
    )
    cons.add_argument("runs", nargs="+", metavar="RUN", help="SAE runs to compare (at least two)")
    cons.add_argument("--abs", action="store_true", help="use |cos| (the paper's formula) instead of signed cosine")
    cons.add_argument(
        "--json",
        action="store_true",
        help="print the versioned JSON document (every matching, per-latent stability, provenance) instead of a table",
    )
    cons.add_argument("--out", metavar="FILE", help="also write the JSON document to FILE")
    cons.add_argument(
        "--html", metavar="FILE", help="also write the consistency explorer page (the first run's latents) to FILE"
    )
    cons.add_argument(
        "--device", help="torch device for the matcher's similarity scans: cpu (default), cuda, cuda:N or auto"
    )
    cons.add_argument(
        "--drop-dead",
        action="store_true",
        help="leave zero-norm decoder rows (dead latents) out of the matching instead of scoring them 0",
    )
    cons.add_argument(
        "--chance-samples",
        type=int,
        default=3,
        metavar="N",
        help="random dictionary pairs for the chance level (default 3; 0 skips it)",
    )
    cons.add_argument(
        "--thresholds",
        type=_thresholds,
        metavar="T,T,...",
        default=",".join(map(str, DEFAULT_THRESHOLDS)),
        help="cosines at which per-latent stability is reported (default %(default)s)",
    )
    cons.set_defaults(func=_consistency)
    sweep = sub.add_parser(
        "sweep",
        help="train a sweep of SAE configurations from one activation stream, as jobs",
        description="Train every configuration of a sweep file (YAML or JSON: stream, members, and optionally "
        "jobs, executor, folder, slurm, device; README, 'A sweep as jobs') from one stream, split into jobs run "
        "inline, as local subprocesses or on SLURM. Configurations already in the store are not trained again; "
        "a killed job resumes from its checkpoints when the same command runs again.",
    )
    sweep.add_argument("file", metavar="FILE", help="the sweep file")
    sweep.add_argument("--executor", choices=("inline", "local", "slurm"), help="overrides the file's executor")
    sweep.add_argument("--jobs", type=int, metavar="N", help="overrides the file's number of jobs")
    sweep.add_argument(
        "--dry-run", action="store_true", help="list the members and which are stored already; train nothing"
    )
    sweep.set_defaults(func=_sweep)
    cache = sub.add_parser("cache", help="inspect the result cache")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True)
    info = cache_sub.add_parser("info", help="cache root, and entries and size per namespace")
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=_cache_info)
    clean = cache_sub.add_parser("clean", help="remove temporary files that interrupted writes left behind")
    clean.add_argument(
        "--max-age",
        type=float,
        default=None,
        metavar="MINUTES",
        help="only those older than this (default: the store's own limit, 60 minutes; a younger "
        "one may belong to a write still in progress)",
    )
    clean.set_defaults(func=_cache_clean)
    return parser


def _show_parser() -> argparse.ArgumentParser:
    show = argparse.ArgumentParser(
        prog="paperlib consistency show",
        description="Print a consistency document written by `paperlib consistency ... --out FILE`, after checking "
        "it against its schema and the hashes of the weight files that are still present.",
    )
    show.add_argument("file", metavar="FILE", help="the JSON document")
    show.add_argument("--html", metavar="PAGE", help="also write its consistency explorer page to PAGE")
    show.set_defaults(func=_show)
    return show


def _thresholds(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(-1 <= v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated cosines in [-1, 1], e.g. 0.5,0.7,0.9; got {text!r}")
    return values


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


def _consistency(args: argparse.Namespace) -> int:
    if len(args.runs) < 2:
        raise UsageError(
            f"consistency needs at least two runs to compare, got 1 ({args.runs[0]!r}); "
            "pass the SAEs of two or more seeds"
        )
    if args.chance_samples < 0:
        raise UsageError(f"--chance-samples must be >= 0, got {args.chance_samples}")
    device = _resolve_device(args.device)
    from paperlib.atomic import write_text
    from paperlib.metrics.consistency_json import compare

    try:
        document = compare(
            args.runs,
            signed=not args.abs,
            drop_dead=args.drop_dead,
            device=device,
            chance_samples=args.chance_samples,
            thresholds=args.thresholds,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    if args.out:
        write_text(args.out, json.dumps(document) + "\n")
    _write_page(args.html, document)
    print(json.dumps(document) if args.json else _table(document))
    return 0


def _write_page(path: str | None, document: dict) -> None:
    """The consistency explorer of the document's first run, when ``--html`` asks for it."""
    from paperlib.explorer import write_consistency_explorer

    if path:
        write_consistency_explorer(path, document, title=f"Consistency of {len(document['runs'])} SAE runs")


def _show(args: argparse.Namespace) -> int:
    from paperlib.metrics.consistency_json import read

    try:
        document, checks = read(args.file)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    _write_page(args.html, document)
    print(
        f"{args.file}: written {document['created']} by paperlib {document['software']['paperlib']}; weight files: "
        + ", ".join(f"[{i}] {c}" for i, c in enumerate(checks, 1))
    )
    print(_table(document))
    return 0


def _table(doc: dict) -> str:
    """Runs as numbered rows (paths can be long), then the symmetric MCC matrix, the summary and
    the per-latent stability curve."""
    runs, R, d_model = doc["runs"], len(doc["runs"]), doc["d_model"]
    kind = "signed cosine" if doc["cosine"] == "signed" else "|cos|"
    lines = [f"PW-MCC of {R} runs ({kind}), d_model = {d_model}", ""]
    for i, run in enumerate(runs, 1):
        note = ""
        if run["zero_rows"]:
            how = "left out" if doc["drop_dead"] else "scored 0; --drop-dead leaves them out"
            note = f", {run['zero_rows']} zero-norm rows {how}"
        lines.append(f"  [{i}] {run['path']}  ({run['layout']}, {run['n_latents']} latents{note})")
    matrix = [["—"] * R for _ in range(R)]
    for p in doc["pairs"]:
        matrix[p["a"]][p["b"]] = matrix[p["b"]][p["a"]] = f"{p['mcc']:.4f}"
    width = max(7, len(f"[{R}]"))
    lines += ["", "pairwise MCC", " " * (width + 1) + " ".join(f"[{j + 1}]".rjust(width) for j in range(R))]
    for i in range(R):
        lines.append(f"[{i + 1}]".ljust(width + 1) + " ".join(cell.rjust(width) for cell in matrix[i]))
    pairs = doc["pairs"]
    lines += ["", f"PW-MCC = {doc['pw_mcc']:.4f} ± {doc['pw_mcc_std']:.4f} over {len(pairs)} pairs"]
    uncertified = [f"[{p['a'] + 1}]-[{p['b'] + 1}]" for p in pairs if not p["certified"]]
    if uncertified:
        lines.append(
            f"matchings: {len(uncertified)} of {len(pairs)} NOT certified optimal ({', '.join(uncertified)}); "
            "their MCC may be too low"
        )
    else:
        lines.append(f"matchings: all {len(pairs)} certified optimal")
    chance = doc["chance"]
    if chance is None:
        lines.append("chance level: skipped (--chance-samples 0)")
    elif len(chance["by_widths"]) == 1:
        w = chance["by_widths"][0]
        lines.append(
            f"chance  = {chance['mean']:.4f} ± {chance['std']:.4f} ({chance['samples']} pairs of random "
            f"Gaussian dictionaries, {w['n_a']} x {w['n_b']} latents, d_model {d_model})"
        )
    else:
        parts = ", ".join(f"{w['n_a']} x {w['n_b']}: {w['mean']:.4f} ({w['pairs']} pairs)" for w in chance["by_widths"])
        lines.append(
            f"chance  = {chance['mean']:.4f} ± {chance['std']:.4f} (mean over the {len(pairs)} pairs of each pair's "
            f"chance level; {chance['samples']} pairs of random Gaussian dictionaries per width pair, d_model "
            f"{d_model}: {parts})"
        )
    stability = doc["stability"]
    lines += [
        "",
        "per-latent stability at cosine t: mean = share of the other runs where a latent's match reaches t, "
        "averaged over latents; in all = share of latents that reach t in every other run",
    ]
    header = ["t", "mean", "in all"] + ([] if stability["chance_curve"] is None else ["chance"])
    lines.append("  " + " ".join(h.rjust(9) for h in header))
    chance_curve = stability["chance_curve"] or [None] * len(stability["thresholds"])
    for t, mean, every, c in zip(stability["thresholds"], stability["curve"], stability["everywhere"], chance_curve):
        cells = [f"{t:g}", f"{mean:.3f}", f"{every:.3f}"] + ([] if c is None else [f"{c:.3f}"])
        lines.append("  " + " ".join(cell.rjust(9) for cell in cells))
    return "\n".join(lines)


def _sweep(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from paperlib.runs.sweep import read_sweep, stored, sweep_runs

    try:
        plan = read_sweep(args.file)
        plan = replace(plan, **{k: v for k, v in (("executor", args.executor), ("jobs", args.jobs)) if v is not None})
        done = stored(plan.stream, plan.members, device=plan.device)
        print(
            f"{args.file}: {len(plan.members)} configurations, {sum(done)} stored already; "
            f"{plan.jobs} job(s), executor {plan.executor}"
        )
        if args.dry_run:
            for i, ((sae, cfg), is_stored) in enumerate(zip(plan.members, done)):
                what = f"{sae.architecture} {sae.d_model}x{sae.n_latents}, {sae.n_seeds} seed(s), {cfg.steps} steps"
                print(f"  [{i}] {what}: {'stored' if is_stored else 'to train'}")
            return 0
        runs = sweep_runs(
            plan.stream,
            plan.members,
            jobs=plan.jobs,
            executor=plan.executor,
            folder=plan.folder,
            slurm=plan.slurm,
            device=plan.device,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    for i, ((sae, _), run) in enumerate(zip(plan.members, runs)):
        fvu, l0 = run.history["fvu"][-1].mean(), run.history["l0"][-1].mean()
        print(f"  [{i}] {sae.architecture} {sae.d_model}x{sae.n_latents}: FVU {fvu:.4f}, L0 {l0:.1f}  ({run.key})")
    return 0


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(n: float) -> str:
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
    spaces: list[dict[str, Any]] = []
    if root.is_dir():
        for ns in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            entries = [p for p in ns.iterdir() if p.is_dir() and not p.name.startswith(".")]
            spaces.append({"namespace": ns.name, "entries": len(entries), "bytes": _size(ns)})
    temps, stale = temporaries(root), set(temporaries(root, STALE_AFTER_S))
    temp_bytes = sum(_size(t) if t.is_dir() else t.stat().st_size for t in temps)
    orphans = {"count": len(temps), "stale": len(stale), "bytes": temp_bytes}
    if args.json:
        print(
            json.dumps(
                {"root": str(root), "exists": root.is_dir(), "namespaces": spaces, "temporaries": orphans}, indent=1
            )
        )
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
        print(
            f"temporary files of interrupted writes: {len(temps)} ({_human(temp_bytes)}, counted above), "
            f"{len(stale)} older than {STALE_AFTER_S / 60:.0f} min; `python -m paperlib cache clean` removes those"
        )
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
    argv = sys.argv[1:] if argv is None else list(argv)
    show = argv[:2] == ["consistency", "show"]
    parser = _show_parser() if show else _parser()
    try:
        args = parser.parse_args(argv[2:] if show else argv)
    except SystemExit as exc:  # argparse has printed usage or help already
        return int(exc.code or 0)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"paperlib: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
