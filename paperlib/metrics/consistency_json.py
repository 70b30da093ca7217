"""A consistency comparison as a versioned JSON document that others can consume without the weights.

``compare`` reads two or more SAE runs (any layout ``paperlib.interop.read_decoder`` knows), matches every
pair exactly and returns one document: every pair's complete matching (row, column, cosine), PW-MCC,
per-latent stability with its chance curve, the chance level of PW-MCC, and provenance (each run's
path as given, layout, shape and the SHA-256 of its weight file; the software versions; the solver
and whether each matching was certified optimal; signed or absolute cosine). The document's shape is
the JSON Schema shipped beside this module (``schemas/consistency.v<N>.schema.json``); ``read``
validates a file against it, refuses a schema version it does not know, and checks that the weight
files still present have the hashes recorded (a result must not be quoted for files that changed).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import platform
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import numpy as np

SCHEMA_VERSION = 1
DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def schema(version: int = SCHEMA_VERSION) -> dict:
    """The JSON Schema of documents of ``version`` (shipped with the package)."""
    text = resources.files("paperlib.metrics").joinpath(f"schemas/consistency.v{version}.schema.json").read_text()
    return json.loads(text)


def sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_runs(paths: Sequence[str]) -> list:
    """The decoders of ``paths`` (as ``paperlib.interop.Decoder``), refusing runs that cannot be compared."""
    from paperlib.interop import read_decoder

    decoders = []
    for run in paths:
        if not Path(run).exists():
            raise ValueError(f"run {run!r} does not exist; check the path")
        try:
            decoders.append(read_decoder(run))
        except (ValueError, OSError) as exc:
            raise ValueError(f"cannot read run {run!r}: {exc}") from exc
    for run, dec in zip(paths[1:], decoders[1:]):
        if dec.d_model != decoders[0].d_model:
            raise ValueError(
                f"run {run!r} has d_model {dec.d_model} but run {paths[0]!r} has d_model {decoders[0].d_model}; "
                "compare SAEs trained on the same activations (same model and layer)"
            )
    return decoders


def compare(paths: Sequence[str], **options) -> dict:
    """Compare the SAE runs saved at ``paths`` (at least two); ``options`` as for ``document``."""
    paths = [str(p) for p in paths]
    if len(paths) < 2:
        raise ValueError(
            f"consistency needs at least two runs to compare, got {len(paths)} "
            f"({', '.join(map(repr, paths))}); pass the SAEs of two or more seeds"
        )
    decoders = read_runs(paths)
    return document(
        [d.W_dec for d in decoders],
        paths,
        layouts=[d.layout for d in decoders],
        weight_files=[d.path for d in decoders],
        **options,
    )


def document(
    dictionaries: Sequence,
    names: Sequence[str],
    *,
    layouts: Sequence[str] | None = None,
    weight_files: Sequence[str | Path] | None = None,
    signed: bool = True,
    drop_dead: bool = False,
    device: str = "cpu",
    chance_samples: int = 3,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
) -> dict:
    """The document (module docstring) for decoders ``dictionaries`` ([n_latents, d_model] each) named
    ``names``. Runs read from files give their ``layouts`` and ``weight_files`` (hashed); in-memory
    runs (e.g. the seeds of a bank) are layout "paperlib" and their decoder rows, as float32, are
    hashed instead. ``drop_dead`` leaves zero-norm decoder rows out of the matchings instead of
    scoring them 0; ``chance_samples`` = 0 skips the chance levels."""
    import scipy
    import torch

    import paperlib
    from paperlib.metrics.consistency import chance_pw_mcc, pw_mcc
    from paperlib.metrics.stability import chance_curve, latent_stability

    names = [str(n) for n in names]
    W = [np.ascontiguousarray(_float32(d)) for d in dictionaries]
    if len(W) != len(names) or len(W) < 2:
        raise ValueError(f"document needs two or more dictionaries and one name each, got {len(W)} and {len(names)}")
    if chance_samples < 0:
        raise ValueError(f"chance_samples must be >= 0, got {chance_samples}")
    thresholds = [float(t) for t in thresholds]
    live = [w.any(axis=1) for w in W]
    if drop_dead:
        for run, mask in zip(names, live):
            if not mask.any():
                raise ValueError(
                    f"run {run!r} has only zero-norm decoder rows; nothing is left when dead latents are dropped"
                )
    alive = live if drop_dead else None
    try:
        result = pw_mcc(W, signed=signed, device=device, alive=alive)
        chance = None
        if chance_samples:
            widths = [int(m.sum()) if drop_dead else len(w) for m, w in zip(live, W)]
            chance = chance_pw_mcc(widths, W[0].shape[1], n_samples=chance_samples, signed=signed, device=device)
    except (ValueError, RuntimeError) as exc:
        raise ValueError(f"cannot match runs {', '.join(map(repr, names))}: {exc}") from exc
    stability = latent_stability(result, [len(w) for w in W], alive=alive)
    files = [None] * len(W) if weight_files is None else [str(f) for f in weight_files]
    return {
        "schema_version": SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "software": {
            "paperlib": paperlib.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
            "python": platform.python_version(),
        },
        "cosine": "signed" if signed else "absolute",
        "drop_dead": bool(drop_dead),
        "d_model": int(W[0].shape[1]),
        "runs": [
            {
                "path": name,
                "layout": layout,
                "weights": f,
                "sha256": sha256(f) if f is not None else hashlib.sha256(w.astype("<f4").tobytes()).hexdigest(),
                "sha256_of": "weights" if f is not None else "decoder",
                "n_latents": len(w),
                "zero_rows": int((~m).sum()),
            }
            for name, layout, f, w, m in zip(names, layouts or ["paperlib"] * len(W), files, W, live)
        ],
        "pw_mcc": result.mean,
        "pw_mcc_std": result.std,
        "certified": all(m.certified for m in result.matches),
        "pairs": [
            {
                "a": i,
                "b": j,
                "mcc": float(v),
                "certified": bool(m.certified),
                "solver": m.solver,
                "rows": m.rows.tolist(),
                "cols": m.cols.tolist(),
                "cosine": m.similarity.tolist(),
            }
            for (i, j, v), m in zip(result.pairs, result.matches)
        ],
        "chance": None
        if chance is None
        else {
            "mean": chance.mean,
            "std": chance.std,
            "samples": chance.n_samples,
            "by_widths": [
                {"n_a": a, "n_b": b, "pairs": chance.pairs[(a, b)], "mean": c.mean, "std": c.std}
                for (a, b), c in chance.by_widths.items()
            ],
        },
        "stability": {
            "thresholds": thresholds,
            "curve": stability.curve(thresholds).tolist(),
            "everywhere": stability.everywhere(thresholds).tolist(),
            "chance_curve": None if chance is None else chance_curve(chance, thresholds).tolist(),
            "latents": [[[None if np.isnan(v) else float(v) for v in row] for row in c] for c in stability.cosines],
        },
    }


def _float32(dictionary) -> np.ndarray:
    """A decoder [n_latents, d_model] as a float32 numpy array (torch tensors from any device)."""
    if hasattr(dictionary, "detach"):
        dictionary = dictionary.detach().float().cpu().numpy()
    array = np.asarray(dictionary, dtype=np.float32)
    if array.ndim != 2 or min(array.shape) == 0:
        raise ValueError(f"a decoder must be a non-empty 2-D array [n_latents, d_model], got shape {array.shape}")
    return array


def validate(document: object, source: str = "document") -> dict:
    """``document`` if it is a consistency document of a known schema version, else a ValueError
    naming ``source``, what is wrong and where."""
    import jsonschema

    if not isinstance(document, dict):
        raise ValueError(f"{source}: not a paperlib consistency document (a JSON object was expected)")
    version = document.get("schema_version")
    try:
        spec = schema(version) if isinstance(version, int) and not isinstance(version, bool) else None
    except FileNotFoundError:
        spec = None
    if spec is None:
        raise ValueError(
            f"{source}: unknown schema_version {version!r}; this paperlib reads version {SCHEMA_VERSION} "
            "(a newer paperlib may read it)"
        )
    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(spec).iter_errors(document))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise ValueError(f"{source}: not a valid consistency document at {where}: {error.message}")
    runs, stability = document["runs"], document["stability"]
    for pair in document["pairs"]:
        if not 0 <= pair["a"] < pair["b"] < len(runs):
            raise ValueError(f"{source}: pair ({pair['a']}, {pair['b']}) names runs outside 0..{len(runs) - 1}")
        if not len(pair["rows"]) == len(pair["cols"]) == len(pair["cosine"]):
            raise ValueError(f"{source}: pair ({pair['a']}, {pair['b']}) has rows, cols and cosine of unequal lengths")
    curves = [stability[k] for k in ("curve", "everywhere", "chance_curve") if stability[k] is not None]
    if any(len(c) != len(stability["thresholds"]) for c in curves):
        raise ValueError(f"{source}: stability curves must have one value per threshold")
    if [len(r) for r in stability["latents"]] != [run["n_latents"] for run in runs]:
        raise ValueError(f"{source}: stability.latents must list every latent of every run")
    return document


def read(path: str | Path) -> tuple[dict, list[str]]:
    """The document in ``path``, validated, and per run whether its weight file was checked:
    "verified" (hash equal), or "absent" (the file is not here: a document is meant to travel
    without the weights). A file whose hash changed is refused."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except OSError as exc:
        raise ValueError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON ({exc})") from exc
    validate(document, str(path))
    checks = []
    for i, run in enumerate(document["runs"]):
        if run["sha256_of"] == "decoder":
            checks.append("in memory")  # a bank's seeds: no file to check
            continue
        weights = Path(run["weights"])
        if not weights.is_file():
            checks.append("absent")
            continue
        found = sha256(weights)
        if found != run["sha256"]:
            raise ValueError(
                f"{path}: run [{i + 1}] {run['path']!r}: its weight file {str(weights)!r} changed since the "
                f"document was written (SHA-256 {found[:12]}… vs {run['sha256'][:12]}… recorded); "
                "re-run `python -m paperlib consistency` on the current files"
            )
        checks.append("verified")
    return document, checks
