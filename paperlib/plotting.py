"""One visual style, and figure/number outputs that carry their provenance.

Outputs go to ``figures/<profile>/`` of the checkout (or ``PAPERLIB_FIGURES/<profile>/``):
``save_figure`` writes ``<name>.pdf`` and ``<name>.png``; ``save_numbers`` writes the numbers
behind a notebook's figures as ``<notebook>.json``. Each records the profile, the git commit of
the checkout (with a ``-dirty`` mark for uncommitted changes) and the package versions, so a
figure can always be traced to the code and scale that made it. Profiles are separate
directories, so a smoke run never overwrites default or paper outputs.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

from paperlib.atomic import atomic_path, write_text

PROFILES = ("smoke", "default", "paper")
_CHECKOUT = Path(__file__).resolve().parents[1]


def check_profile(profile: str) -> str:
    """The profile, validated. Every notebook calls this first, so it also refuses parameters that
    papermill injected but the notebook does not declare (a misspelled ``-p stepz 5`` would
    otherwise run to the end on the defaults: papermill itself only logs a warning)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    refuse_unknown_parameters()
    return profile


INJECTED = "# Parameters\n"  # how papermill's injected-parameters cell begins


def refuse_unknown_parameters(history: list[str] | None = None) -> None:
    """Under papermill, raise if the injected-parameters cell sets a name that the notebook's own
    parameters cell (the cell executed just before it) does not. ``history``: the executed cells'
    sources (default: IPython's ``In``); outside IPython, or without an injected cell, nothing to do."""
    if history is None:
        try:
            from IPython import get_ipython
        except ImportError:
            return
        shell = get_ipython()
        history = list(shell.user_ns.get("In", [])) if shell is not None else []
    injected = [i for i, source in enumerate(history) if source.startswith(INJECTED)]
    if not injected or injected[-1] == 0:
        return
    declared, given = (_assigned(history[i]) for i in (injected[-1] - 1, injected[-1]))
    unknown = sorted(given - declared)
    if unknown:
        raise ValueError(
            f"unknown notebook parameter(s) {', '.join(unknown)}: this notebook takes "
            f"{', '.join(sorted(declared))}; check the spelling of the -p / -f values given to papermill"
        )


def _assigned(source: str) -> set[str]:
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return set()
    return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets if isinstance(t, ast.Name)}


def figures_dir(profile: str) -> Path:
    """Where a profile's figures and numbers go (created on demand)."""
    root = Path(os.environ.get("PAPERLIB_FIGURES", _CHECKOUT / "figures"))
    path = root / check_profile(profile)
    path.mkdir(parents=True, exist_ok=True)
    return path


@lru_cache(maxsize=1)
def _git_commit() -> str:
    try:
        run = lambda *args: subprocess.run(  # noqa: E731
            ["git", *args], cwd=_CHECKOUT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        commit = run("rev-parse", "--short=12", "HEAD")
        dirty = run("status", "--porcelain", "--untracked-files=no")
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance(profile: str) -> dict[str, str]:
    import torch

    import paperlib

    return {
        "profile": check_profile(profile),
        "commit": _git_commit(),
        "paperlib": paperlib.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def use_style() -> None:
    """The companion's one plotting style (seaborn's paper context, colour-blind palette)."""
    import seaborn as sns

    sns.set_theme(context="paper", style="whitegrid", palette="colorblind", font_scale=1.1)
    matplotlib.rcParams.update({"figure.dpi": 110, "savefig.dpi": 200, "savefig.bbox": "tight", "pdf.fonttype": 42})


def save_figure(fig, name: str, profile: str) -> list[Path]:
    """Write ``fig`` as ``<name>.pdf`` and ``<name>.png`` with provenance in their metadata."""
    info = provenance(profile)
    stamp = ", ".join(f"{k}={v}" for k, v in info.items())
    out = figures_dir(profile)
    paths = []
    for ext, metadata in (("pdf", {"Subject": stamp, "Creator": "paperlib"}), ("png", {"Description": stamp})):
        target = out / f"{name}.{ext}"
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=ext, metadata=metadata)
        paths.append(target)
    return paths


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def save_numbers(numbers: Mapping[str, Any], notebook: str, profile: str) -> Path:
    """Write the numbers behind a notebook's figures to ``<notebook>.json`` with provenance."""
    payload = {"provenance": provenance(profile), **_plain(numbers)}
    return write_text(figures_dir(profile) / f"{notebook}.json", json.dumps(payload, indent=2, allow_nan=True) + "\n")
