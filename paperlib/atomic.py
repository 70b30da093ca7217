"""Atomic file output: write to a temporary sibling, then rename over the target.

A crash or interrupt leaves either the old file or the new one, never half of one. What a killed
process cannot clean up is its temporary: every temporary file or directory paperlib makes is named
``.<target name>.<random>.paperlib-tmp[<suffix>]`` (``is_temporary`` also knows the names used
before this tag), and ``remove_stale_temporaries`` deletes those not touched for ``STALE_AFTER_S``
(an hour: far longer than any single write, so a concurrent writer is never hurt). The store does
so when opened; ``python -m paperlib cache info`` counts them and ``cache clean`` removes them.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

TEMP_TAG = ".paperlib-tmp"
STALE_AFTER_S = 3600.0
# Temporaries named before TEMP_TAG existed: mkstemp/mkdtemp's 8 random characters after ".<name>."
_LEGACY = re.compile(r"^\..+\.[a-z0-9_]{8}(\.tmp(\.[^.]*)?)?$")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # the target's suffix last: np.save and friends append their own extension otherwise
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=TEMP_TAG + target.suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(0o666 & ~_umask())  # mkstemp makes owner-only files; outputs are meant to be shared
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(target: str | os.PathLike, text: str) -> Path:
    """Atomically write ``text`` (UTF-8) to ``target``."""
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def temporary_dir(parent: str | os.PathLike, name: str) -> Path:
    """A new temporary directory in ``parent`` for assembling ``name`` (then renamed into place),
    named so that ``remove_stale_temporaries`` recognises it if the writer dies."""
    Path(parent).mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=TEMP_TAG, dir=parent))


def is_temporary(name: str) -> bool:
    """Whether a file or directory name is one of paperlib's temporaries (current or legacy naming)."""
    return name.startswith(".") and (TEMP_TAG in name or bool(_LEGACY.match(name)))


def _last_touched(path: Path) -> float:
    """Newest mtime of ``path`` and, for a directory, of everything in it (a writer filling it keeps it young)."""
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for sub in path.rglob("*"):
            with contextlib.suppress(OSError):
                newest = max(newest, sub.lstat().st_mtime)
    return newest


def temporaries(root: str | os.PathLike, max_age_s: float = 0.0, recursive: bool = True) -> list[Path]:
    """paperlib temporaries under ``root`` (only directly in it unless ``recursive``) not touched for
    ``max_age_s`` seconds (0: all of them)."""
    root, now = Path(root), time.time()
    found: list[Path] = []
    if not root.is_dir():
        return found
    for parent, dirs, files in os.walk(root):
        for name in [d for d in dirs if is_temporary(d)] + [f for f in files if is_temporary(f)]:
            path = Path(parent) / name
            try:
                if now - _last_touched(path) >= max_age_s:
                    found.append(path)
            except OSError:  # removed meanwhile by its writer
                continue
        dirs[:] = [d for d in dirs if not is_temporary(d)] if recursive else []
    return sorted(found)


def remove_stale_temporaries(
    root: str | os.PathLike, max_age_s: float = STALE_AFTER_S, recursive: bool = True
) -> list[Path]:
    """Delete the temporaries under ``root`` older than ``max_age_s`` (see the module docstring);
    returns what was removed. Failures (permissions, a concurrent cleaner) are skipped."""
    removed = []
    for path in temporaries(root, max_age_s, recursive):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
        except OSError:
            continue
    return removed
