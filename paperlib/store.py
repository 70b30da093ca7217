"""Content-addressed cache: configuration -> key -> directory of results.

An entry lives in ``<root>/<namespace>/<key>/`` with ``tensors.safetensors``, ``meta.json`` and
``manifest.json`` (the sha256 of every file, written last). The key hashes the namespace, the
configuration (dataclasses, mappings, numbers, strings) and ``CACHE_VERSION``, which is bumped
whenever a change in paperlib changes what an existing configuration computes.

Entries are assembled in a temporary directory and renamed into place, so an interrupted write
leaves nothing behind under the key. Every load verifies the manifest; a corrupt or partial
entry (a file that does not match its hash, a manifest that is unreadable or not of the shape
``{"files": {name: sha256}, ...}``) is reported with a warning, deleted and recomputed, never used.
Temporaries that a killed writer left behind are removed when a ``Store`` is first opened on a
root in a process, once they are an hour old (``paperlib.atomic.remove_stale_temporaries``).

The root is ``PAPERLIB_CACHE`` if set, else ``data/cache`` of the checkout paperlib runs from,
else ``~/.cache/paperlib``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from paperlib._stack import user_stacklevel
from paperlib.atomic import remove_stale_temporaries, temporary_dir

CACHE_VERSION = 1
_TENSORS, _META, _MANIFEST = "tensors.safetensors", "meta.json", "manifest.json"


def default_root() -> Path:
    if os.environ.get("PAPERLIB_CACHE"):
        return Path(os.environ["PAPERLIB_CACHE"])
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").exists() and (checkout / "data").is_dir():
        return checkout / "data" / "cache"
    return Path.home() / ".cache" / "paperlib"


def jsonable(value: Any) -> Any:
    """A canonical JSON-ready form of a configuration. Dataclasses keep their type name and only
    the fields that differ from their defaults, so adding a field with a default keeps existing
    cache keys valid (changing a default's meaning requires bumping ``CACHE_VERSION``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {
            f.name: jsonable(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.default is dataclasses.MISSING or getattr(value, f.name) != f.default
        }
        return {"__type__": type(value).__name__, **fields}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot use {type(value).__name__} in a cache key; use numbers, strings, lists or dataclasses")


def config_key(namespace: str, config: Any) -> str:
    payload = json.dumps({"namespace": namespace, "config": jsonable(config), "version": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks (never the whole file in memory)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Entry:
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]
    path: Path


class Store:
    """A cache rooted at ``root`` (see the module docstring for the layout and guarantees)."""

    _cleaned: set[Path] = set()  # roots whose stale temporaries this process has removed already

    def __init__(self, root: str | os.PathLike | None = None) -> None:
        self.root = Path(root) if root is not None else default_root()
        if self.root not in Store._cleaned:
            Store._cleaned.add(self.root)
            remove_stale_temporaries(self.root)  # what interrupted writes left (paperlib.atomic)

    def path(self, namespace: str, config: Any) -> Path:
        if not namespace or "/" in namespace or namespace.startswith("."):
            raise ValueError(f"cache namespace must be a plain name, got {namespace!r}")
        return self.root / namespace / config_key(namespace, config)

    def load(self, namespace: str, config: Any) -> Entry | None:
        """The verified entry, or None if absent (a corrupt entry is reported and removed)."""
        path = self.path(namespace, config)
        if not path.exists():
            return None
        problem = self._verify(path)
        if problem is None:
            try:
                meta = json.loads((path / _META).read_text())
                if not isinstance(meta, dict) or not isinstance(meta.get("meta"), dict):
                    raise ValueError(f'{_META} is not of the form {{"meta": {{...}}}}')
                return Entry(load_file(path / _TENSORS), meta["meta"], path)
            except Exception as exc:  # hashes matched but content unreadable: treat as corrupt
                problem = f"unreadable ({exc})"
        warnings.warn(
            f"cache entry {path} is corrupt: {problem}; deleting it and recomputing", stacklevel=user_stacklevel()
        )
        shutil.rmtree(path, ignore_errors=True)
        return None

    @staticmethod
    def _verify(path: Path) -> str | None:
        try:
            manifest = json.loads((path / _MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            return f"no readable manifest ({exc})"
        files = manifest.get("files") if isinstance(manifest, dict) else None
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            return f'{_MANIFEST} is not of the form {{"files": {{name: sha256}}}} (got {str(manifest)[:80]})'
        if set(files) != {_TENSORS, _META}:
            return "manifest lists the wrong files"
        for name, expected in files.items():
            file = path / name
            if not file.exists():
                return f"{name} is missing"
            if file_sha256(file) != expected:
                return f"{name} does not match its hash"
        return None

    def save(
        self, namespace: str, config: Any, tensors: Mapping[str, torch.Tensor], meta: Mapping | None = None
    ) -> Entry:
        """Write an entry atomically, replacing any previous entry under the same key."""
        path = self.path(namespace, config)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        meta = dict(meta or {})
        tmp = temporary_dir(path.parent, path.name)
        try:
            save_file(tensors, tmp / _TENSORS)
            (tmp / _META).write_text(json.dumps({"config": jsonable(config), "meta": meta}, indent=1, sort_keys=True))
            files = {name: file_sha256(tmp / name) for name in (_TENSORS, _META)}
            (tmp / _MANIFEST).write_text(json.dumps({"files": files, "version": CACHE_VERSION}, indent=1))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return Entry(tensors, meta, path)

    def cached(
        self, namespace: str, config: Any, compute: Callable[[], tuple[Mapping[str, torch.Tensor], Mapping]]
    ) -> Entry:
        """The entry for ``config``, computing and saving it first if it is absent or corrupt."""
        entry = self.load(namespace, config)
        if entry is not None:
            return entry
        tensors, meta = compute()
        return self.save(namespace, config, tensors, meta)
