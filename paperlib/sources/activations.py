"""Real LLM activations for the SAEs: extracted once, cached on disk, memory-mapped when read.

``load_activations(ActivationConfig(...))`` returns :class:`Activations`: the residual stream after
block ``layer`` of ``model`` (see :mod:`paperlib.sources.llm`) on ``n_tokens`` tokens of ``corpus`` packed into
contexts of ``context_length`` (see :mod:`paperlib.sources.corpus`), one row per token position that is not a
special token and not before ``first_position``. Which positions have no row, and why:

- special tokens (the tokenizer's ``all_special_ids`` and the document separator): position 0 of every
  context, an attention sink whose residual norm is ~100× the typical one (SmolLM2 block 19: ≈15,000-
  20,000 vs a median of 220), and the separators between documents;
- position 1 (``first_position=2``): in SmolLM2 the token right after the sink often becomes a second
  sink. At block 19 on 256 packed Wikipedia contexts, 28 of the 254 position-1 rows had norms of
  8-107× the median of 220 (tokens ',', '.', ' to', ' (': contexts that start mid-sentence), and these
  28 rows held 73 % of the total squared norm of all 32k rows; from position 2 on no row exceeds
  2.05× the median. Dropping position 1 costs 1/128 of the tokens and keeps those rows from
  dominating the normalisation and the SAE loss.

All positions stay in ``tokens``; ``row_context`` / ``row_position`` map each row back to its
context, so notebooks can show text (``context_text``).

Cache layout, ``<store root>/activations/<config_key("activations", config)>/``:

- ``tokens.npy`` — int32 ``[n_contexts, context_length]``;
- ``x.bin`` — all rows, ``[n_rows, d_model]`` float16 or bfloat16 (computed in float32), one file so
  that ``Activations.x`` is a single memory-mapped tensor (1M tokens × 576 × 2 bytes = 1.2 GB is
  paged in on demand, never held twice). The rows of consecutive contexts form *shards* of
  ``shard_tokens`` tokens, each a contiguous byte range of ``x.bin``;
- ``progress.json`` during extraction — the journal: the plan and, per finished shard, its sha256 and
  sum of squared norms. A shard counts only once its bytes are written, fsynced, and recorded by an
  atomic replace of the journal, so an interruption leaves finished shards plus at most one
  unrecorded byte range, and a rerun continues with the first unrecorded shard;
- ``manifest.json`` — written last, when every shard is done: the journal plus the normalisation
  factor and provenance. Every load checks the sizes and the sha256 of ``tokens.npy`` and of every
  shard (≈1-2 s per GB on one core); a mismatching shard is reported by index and row range and
  re-extracted alone.

The manifest and the journal carry a ``sha256`` of their own content (canonical JSON of every other
field), and every read checks their shape: an edited ``scale``, a manifest that is not JSON or not
of the expected shape (``[]``, ``null``, a missing field) is reported with a warning and the entry
re-extracted (a bad journal is ignored: the extraction starts over). A manifest written before
the seal existed is accepted once if its ``scale`` agrees with its shards' recorded norms, and sealed.

``scale`` = 1 / sqrt(mean ‖x‖²) over the stored rows: ``x * scale`` has unit mean squared norm, the
normalisation of Paper A's SAE training.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from paperlib.atomic import atomic_path, write_text
from paperlib.checks import is_int, is_real
from paperlib.sources.corpus import check_corpus, count_tokens, describe, documents, pack, separator_id, special_ids
from paperlib.sources.llm import (
    PACKAGED,
    check_layer,
    decoder_blocks,
    load_model,
    load_tokenizer,
    mean_next_token_loss,
    residual,
)
from paperlib.store import Store, config_key, jsonable

__all__ = [
    "ActivationConfig",
    "Activations",
    "load_activations",
    "contexts",
    "token_counts",
    "next_token_loss",
    "load_model",
    "load_tokenizer",
]

_FORMAT = 1
_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_MANIFEST, _PROGRESS, _TOKENS, _X = "manifest.json", "progress.json", "tokens.npy", "x.bin"


@dataclass(frozen=True)
class ActivationConfig:
    """What to extract. ``layer`` 19 by default: both papers read the residual stream about two thirds
    up the model (Paper A: Pythia-160M after block 8 of 12; Paper B: GPT-2 small before block 8 of 12,
    i.e. after block 7), and the output of block 19 of SmolLM2's 30 is 20/30 = 2/3 of the way."""

    model: str = PACKAGED  # packaged SmolLM2-135M-Instruct (dequantised Q4_1); else a hub id or a local directory
    layer: int = 19  # residual stream OUTPUT of block `layer` (0-based) = hidden_states[layer + 1]
    corpus: str = "wikipedia"  # packaged; "hf:<dataset>[:<split>[:<text column>]]"; or .txt/.jsonl file(s)/dir
    context_length: int = 128
    n_tokens: int = 200_000  # contexts × context_length (rounded down to whole contexts)
    dtype: str = "float16"  # storage: float16 | bfloat16; compute is float32
    batch_contexts: int = 32  # contexts per forward pass
    shard_tokens: int = 65_536  # tokens per shard (unit of resumption and of re-extraction)
    first_position: int = 2  # rows start at this position of each context (module docstring: why 2)

    def __post_init__(self) -> None:
        for name in ("layer", "first_position", "context_length", "n_tokens", "batch_contexts", "shard_tokens"):
            value = getattr(self, name)
            nonneg = name in ("layer", "first_position")
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if nonneg else 1):
                raise ValueError(
                    f"ActivationConfig.{name} must be a {'non-negative' if nonneg else 'positive'} "
                    f"integer, got {value!r}"
                )
        if self.context_length < 2:
            raise ValueError(
                f"ActivationConfig.context_length must be >= 2 (separator + text), got {self.context_length}"
            )
        if self.first_position >= self.context_length:
            raise ValueError(
                f"ActivationConfig.first_position={self.first_position} leaves no position of a "
                f"{self.context_length}-token context; lower it"
            )
        if self.n_tokens < self.context_length:
            raise ValueError(
                f"ActivationConfig.n_tokens={self.n_tokens} is less than one context of "
                f"{self.context_length} tokens; raise n_tokens"
            )
        if self.shard_tokens < self.context_length:
            raise ValueError(
                f"ActivationConfig.shard_tokens={self.shard_tokens} is less than one context of "
                f"{self.context_length} tokens; raise shard_tokens"
            )
        if self.dtype not in _DTYPES:
            raise ValueError(f"ActivationConfig.dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        check_corpus(self.corpus)

    @property
    def n_contexts(self) -> int:
        return self.n_tokens // self.context_length

    @property
    def shard_contexts(self) -> int:
        return self.shard_tokens // self.context_length


def contexts(cfg: ActivationConfig, *, store: Store | None = None) -> torch.Tensor:
    """The token contexts ``[n_contexts, context_length]`` (int32) the activations are read from;
    cached in the Store (they depend only on tokenizer, corpus and sizes, not on the layer)."""
    store = store or Store()
    key = {"model": cfg.model, "corpus": cfg.corpus, "context_length": cfg.context_length, "n_contexts": cfg.n_contexts}

    def compute():
        tokenizer = load_tokenizer(cfg.model, store)
        tokens = pack(tokenizer, documents(cfg.corpus), cfg.context_length, cfg.n_contexts, cfg.corpus)
        return {"tokens": tokens}, {"corpus": describe(cfg.corpus), "separator": separator_id(tokenizer)}

    return store.cached("contexts", key, compute).tensors["tokens"]


def token_counts(cfg: ActivationConfig, *, store: Store | None = None) -> torch.Tensor:
    """Frequency of every token id (int64 ``[vocab]``) over the config's contexts, special tokens
    excluded — for the rank-frequency (Zipf) plot; Paper A used 1M tokens (``n_tokens=1_000_000``)."""
    tokenizer = load_tokenizer(cfg.model, store)
    return count_tokens(contexts(cfg, store=store), special_ids(tokenizer), len(tokenizer))


def next_token_loss(
    cfg: ActivationConfig,
    tokens: torch.Tensor,
    *,
    replace: Callable[[torch.Tensor], torch.Tensor] | None = None,
    store: Store | None = None,
) -> float:
    """The model's mean next-token cross-entropy (nats) on ``tokens`` [n, seq], over every target that
    is not a special token. With ``replace``, the residual after block ``cfg.layer`` at the positions
    that have activation rows (not special, not before ``cfg.first_position``) is replaced by
    ``replace(resid)`` (float32 ``[n_positions, d_model]``, *unscaled*; for an SAE trained on
    ``x * scale`` pass ``lambda r: sae(r * scale) / scale``): the "loss when spliced"."""
    integer = isinstance(tokens, torch.Tensor) and not tokens.dtype.is_floating_point and tokens.dtype != torch.bool
    if not integer or tokens.ndim != 2:
        got = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"tokens must be an integer tensor [n_contexts, seq_len] (e.g. Activations.tokens), got {got}")
    model, tokenizer = load_model(cfg.model, store)
    check_layer(model, cfg.layer, cfg.model)
    vocab = model.get_input_embeddings().weight.shape[0]
    if tokens.numel() == 0 or tokens.shape[1] < 2 or int(tokens.min()) < 0 or int(tokens.max()) >= vocab:
        ids = f", ids {int(tokens.min())}..{int(tokens.max())}" if tokens.numel() else ""
        raise ValueError(
            f"tokens must hold at least 2 positions of ids in 0..{vocab - 1} for model {cfg.model!r}, "
            f"got shape {tuple(tokens.shape)}{ids}"
        )
    return mean_next_token_loss(
        model, tokens, special_ids(tokenizer), cfg.layer, replace, cfg.batch_contexts, cfg.first_position
    )


class Activations:
    """Extracted activations (see the module docstring). ``x`` is memory-mapped copy-on-write: writing
    to it changes this process's view only, never the cache."""

    def __init__(self, config: ActivationConfig, path: Path, manifest: dict, tokenizer: Any) -> None:
        plan = manifest["plan"]
        self.config, self.path, self.meta, self.tokenizer = config, path, manifest["meta"], tokenizer
        self.scale: float = float(manifest["scale"])
        self.d_model: int = int(plan["d_model"])
        self.special_ids: list[int] = list(self.meta["special_ids"])
        self.tokens = torch.from_numpy(np.load(path / _TOKENS)).long()
        keep = torch.from_numpy(row_mask(self.tokens.numpy(), self.special_ids, int(plan["first_position"])))
        self.row_context, self.row_position = keep.nonzero(as_tuple=True)
        n_rows = int(plan["n_rows"])
        if len(self.row_context) != n_rows:
            raise RuntimeError(
                f"activation cache {path} is inconsistent ({len(self.row_context)} non-special "
                f"positions, {n_rows} rows); delete the directory to re-extract"
            )
        raw = np.memmap(path / _X, dtype=np.int16, mode="c", shape=(n_rows, self.d_model))
        self.x: torch.Tensor = torch.from_numpy(raw).view(_DTYPES[plan["dtype"]])

    def __len__(self) -> int:
        return self.x.shape[0]

    def __repr__(self) -> str:
        return (
            f"Activations({len(self)} rows × {self.d_model}, {self.config.model} layer {self.config.layer}, "
            f"{self.config.corpus}, {self.x.dtype}, scale={self.scale:.4g})"
        )

    def fp32(self, rows: torch.Tensor | slice | None = None, scaled: bool = False) -> torch.Tensor:
        """Rows (all by default) as float32, times ``scale`` when ``scaled`` (unit mean squared norm)."""
        out = (self.x if rows is None else self.x[rows]).float()
        return out * self.scale if scaled else out

    def token_text(self, row: int) -> str:
        """Row ``row``'s own token as text (what a latent firing on that row fired on)."""
        return self.tokenizer.decode([int(self.tokens[self.row_context[row], self.row_position[row]])])

    def context_text(self, row: int, window: int = 16, mark: str = "«»") -> str:
        """The text around row ``row``'s token — ``window`` tokens either side — with that token between
        ``mark[0]`` and ``mark[1]`` (its leading space outside: " «Paris»"); special tokens show as the
        tokenizer writes them."""
        if not 0 <= int(row) < len(self):
            raise IndexError(f"row {row} is out of range for {len(self)} activation rows")
        if len(mark) != 2 or window < 0:
            raise ValueError(f"need window >= 0 and mark = two strings (opening, closing), got {window!r}, {mark!r}")
        ids = self.tokens[self.row_context[row]].tolist()
        pos = int(self.row_position[row])
        decode = self.tokenizer.decode
        token = decode(ids[pos : pos + 1])
        lead = len(token) - len(token.lstrip())
        return (
            decode(ids[max(0, pos - window) : pos])
            + token[:lead]
            + mark[0]
            + token[lead:]
            + mark[1]
            + decode(ids[pos + 1 : pos + 1 + window])
        )


def load_activations(
    cfg: ActivationConfig, *, store: Store | None = None, progress: bool = True, verify: bool = True
) -> Activations:
    """The activations for ``cfg``: from the cache (verified; a corrupt shard is re-extracted), else
    extracted now, continuing an interrupted extraction from its last complete shard."""
    store = store or Store()
    path = store.root / "activations" / config_key("activations", cfg)
    manifest = _ready(path, verify)
    if manifest is None:
        model, tokenizer = load_model(cfg.model, store)
        check_layer(model, cfg.layer, cfg.model)  # bad inputs fail before anything is written
        tokens = contexts(cfg, store=store).numpy()
        path.mkdir(parents=True, exist_ok=True)
        with _locked(path / ".lock"):  # one extraction per entry at a time (e.g. make -j)
            manifest = _ready(path, verify)  # another process may have finished it meanwhile
            if manifest is None:
                manifest = _extract(cfg, model, tokenizer, tokens, path, progress)
    return Activations(cfg, path, manifest, load_tokenizer(cfg.model, store))


def row_mask(tokens: np.ndarray, special: list[int], first_position: int) -> np.ndarray:
    """Which positions of ``tokens`` [n, seq] have an activation row: not special, not before
    ``first_position``."""
    keep = ~np.isin(tokens, special)
    keep[:, :first_position] = False
    return keep


# ----------------------------------------------------------------------------------- cache internals
def _read_json(file: Path) -> Any:
    """The parsed JSON of ``file`` (any shape: callers validate it), or None if absent or not JSON."""
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def _content_sha(record: dict) -> str:
    """sha256 of ``record``'s canonical JSON, without its own ``sha256`` field."""
    body = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _seal(record: dict) -> dict:
    """``record`` (as JSON will read it back) with the hash of its content, so an edit is detected."""
    record = json.loads(json.dumps({k: v for k, v in record.items() if k != "sha256"}))
    return {**record, "sha256": _content_sha(record)}


def _shape_problem(record: Any, complete: bool) -> str | None:
    """Why a journal (``complete=False``) or manifest read from disk does not have the shape this
    module writes, or None. Checked before any field is used, so junk never becomes an AttributeError."""
    if not isinstance(record, dict):
        return f"is a JSON {type(record).__name__}, not an object"
    if record.get("format") != _FORMAT:
        return f"was written by another cache format ({record.get('format')!r}, this is {_FORMAT})"
    plan, done = record.get("plan"), record.get("done")
    if not isinstance(plan, dict) or not isinstance(done, dict):
        return "has no 'plan' and 'done' objects"
    ints = ("n_contexts", "context_length", "first_position", "d_model", "n_rows")
    if (
        not all(is_int(plan.get(k), 0) for k in ints)
        or plan.get("dtype") not in _DTYPES
        or not isinstance(plan.get("tokens_sha256"), str)
        or not isinstance(plan.get("shards"), list)
    ):
        return f"has a malformed 'plan' (needs integers {', '.join(ints)}, dtype, tokens_sha256 and shards)"
    if not all(isinstance(sh, list) and len(sh) == 4 and all(is_int(v, 0) for v in sh) for sh in plan["shards"]):
        return "has a malformed 'plan.shards' (needs [context start, stop, row start, stop] per shard)"
    for key, value in done.items():
        if not (
            key.isdigit()
            and int(key) < len(plan["shards"])
            and isinstance(value, dict)
            and isinstance(value.get("sha256"), str)
            and is_real(value.get("sumsq"))
        ):
            return f"has a malformed 'done' record for shard {key!r} (needs sha256 and sumsq)"
    if not complete:
        return None
    if not (is_real(record.get("scale")) and record["scale"] > 0):
        return f"has no positive finite 'scale' (got {record.get('scale')!r})"
    meta = record.get("meta")
    if (
        not isinstance(meta, dict)
        or not isinstance(meta.get("special_ids"), list)
        or not all(is_int(v, 0) for v in meta["special_ids"])
    ):
        return "has a malformed 'meta' (needs special_ids)"
    return None


def _scale_from_shards(manifest: dict) -> float:
    """The normalisation factor as ``_extract`` computes it from the shards' recorded squared norms."""
    mean_sq = sum(v["sumsq"] for v in manifest["done"].values()) / manifest["plan"]["n_rows"]
    return float(mean_sq**-0.5)


def _seal_problem(path: Path, manifest: dict) -> str | None:
    """Why the manifest's content does not match its own hash, or None. An unsealed manifest (written
    before the seal existed) is sealed in place when its scale agrees with its shards' norms."""
    if "sha256" in manifest:
        if manifest["sha256"] != _content_sha(manifest):
            return "does not match its own hash (it was edited or damaged)"
        return None
    if len(manifest["done"]) != len(manifest["plan"]["shards"]) or manifest["scale"] != _scale_from_shards(manifest):
        return "has no hash of its own and its scale does not agree with its shards' recorded norms"
    write_text(path / _MANIFEST, json.dumps(_seal(manifest), indent=1))
    manifest["sha256"] = _content_sha(manifest)
    return None


def _read_journal(path: Path) -> dict:
    """The extraction journal if it is intact, else ``{}`` (with a warning when one was there)."""
    journal = _read_json(path / _PROGRESS)
    if journal is None:
        return {}
    problem = _shape_problem(journal, complete=False)
    if problem is None and journal.get("sha256") != _content_sha(journal):
        problem = "does not match its own hash (it was edited, damaged or written by an older paperlib)"
    if problem:
        # stacklevel: _read_journal <- _extract <- load_activations <- the user's call
        warnings.warn(
            f"activation cache {path}: {_PROGRESS} {problem}; ignoring it and extracting every shard", stacklevel=4
        )
        return {}
    return journal


def _tokens_sha(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int32).tobytes()).hexdigest()


def _region_sha(file: Path, start: int, stop: int) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as fh:
        fh.seek(start)
        left = stop - start
        while left > 0:
            block = fh.read(min(left, 1 << 22))
            if not block:
                break
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def _problems(path: Path, manifest: dict, hashes: bool, shards: list[int] | None = None) -> dict:
    """``{"all": why}`` if the entry is unusable as a whole, else ``{shard: why}`` for bad shards.
    ``manifest`` has passed ``_shape_problem``."""
    plan = manifest["plan"]
    try:
        if _tokens_sha(np.load(path / _TOKENS)) != plan["tokens_sha256"]:
            return {"all": f"{_TOKENS} does not match its hash"}
    except (OSError, ValueError) as exc:
        return {"all": f"{_TOKENS} is missing or unreadable ({exc})"}
    row_bytes = plan["d_model"] * 2
    size = (path / _X).stat().st_size if (path / _X).exists() else None
    if size != plan["n_rows"] * row_bytes:
        return {"all": f"{_X} has {size} bytes, expected {plan['n_rows'] * row_bytes}"}
    bad = {}
    for i in shards if shards is not None else range(len(plan["shards"])):
        c0, c1, r0, r1 = plan["shards"][i]
        record = manifest.get("done", {}).get(str(i))
        if record is None:
            bad[i] = "was never finished"
        elif hashes and _region_sha(path / _X, r0 * row_bytes, r1 * row_bytes) != record["sha256"]:
            bad[i] = f"(contexts {c0}..{c1 - 1}, rows {r0}..{r1 - 1} of {_X}) does not match its hash"
    return bad


def _demote(path: Path, manifest: dict, problems: dict) -> None:
    """Turn a damaged complete entry back into a journal without the bad shards (or delete it)."""
    # stacklevel 4 in both warnings: _demote <- _ready <- load_activations <- the user's call
    if "all" in problems:
        warnings.warn(f"activation cache {path} is corrupt: {problems['all']}; re-extracting it", stacklevel=4)
        shutil.rmtree(path, ignore_errors=True)
        return
    for i, why in problems.items():
        warnings.warn(f"activation cache {path}: shard {i} {why}; re-extracting that shard", stacklevel=4)
    done = {k: v for k, v in manifest["done"].items() if int(k) not in problems}
    write_text(path / _PROGRESS, json.dumps(_seal({"format": _FORMAT, "plan": manifest["plan"], "done": done})))
    (path / _MANIFEST).unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(file: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``file`` (POSIX; elsewhere no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with file.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ready(path: Path, verify: bool) -> dict | None:
    """The manifest of a complete, verified entry; a damaged one is demoted (see ``_demote``)."""
    if not (path / _MANIFEST).exists():
        return None
    manifest = _read_json(path / _MANIFEST)
    problem = "is not readable JSON" if manifest is None else _shape_problem(manifest, complete=True)
    if problem is None:
        problem = _seal_problem(path, manifest)
    if problem is not None:
        _demote(path, manifest, {"all": f"{_MANIFEST} {problem}"})
        return None
    problems = _problems(path, manifest, hashes=verify)
    if not problems:
        return manifest
    _demote(path, manifest, problems)
    return None


def _extract(cfg: ActivationConfig, model, tokenizer, tokens: np.ndarray, path: Path, progress: bool) -> dict:
    from tqdm.auto import tqdm

    special = special_ids(tokenizer)
    keep = row_mask(tokens, special, cfg.first_position)
    d_model = int(model.get_input_embeddings().weight.shape[1])
    bounds = np.concatenate([[0], np.cumsum(keep.sum(1))])
    starts = range(0, len(tokens), cfg.shard_contexts)
    plan: dict[str, Any] = {
        "n_contexts": len(tokens),
        "context_length": cfg.context_length,
        "first_position": cfg.first_position,
        "d_model": d_model,
        "dtype": cfg.dtype,
        "n_rows": int(bounds[-1]),
        "tokens_sha256": _tokens_sha(tokens),
        "shards": [
            [
                c0,
                min(c0 + cfg.shard_contexts, len(tokens)),
                int(bounds[c0]),
                int(bounds[min(c0 + cfg.shard_contexts, len(tokens))]),
            ]
            for c0 in starts
        ],
    }
    if plan["n_rows"] == 0:
        raise ValueError(f"corpus {cfg.corpus!r} gave only special tokens; nothing to extract")
    journal = _read_journal(path)
    row_bytes = d_model * 2
    done: dict = {}
    if journal.get("plan") == plan:
        bad = _problems(path, journal, hashes=True, shards=[int(k) for k in journal["done"]])
        if "all" not in bad:
            done = {k: v for k, v in journal["done"].items() if int(k) not in bad}
    if not done:  # fresh start: tokens, an empty x.bin of the final size, an empty journal
        path.mkdir(parents=True, exist_ok=True)
        (path / _MANIFEST).unlink(missing_ok=True)
        with atomic_path(path / _TOKENS) as tmp:
            with tmp.open("wb") as fh:
                np.save(fh, tokens)
        with atomic_path(path / _X) as tmp:
            with tmp.open("wb") as fh:
                fh.truncate(plan["n_rows"] * row_bytes)
    journal = {"format": _FORMAT, "plan": plan, "done": done}
    write_text(path / _PROGRESS, json.dumps(_seal(journal)))

    todo = [i for i in range(len(plan["shards"])) if str(i) not in done]
    finished = sum(plan["shards"][i][1] - plan["shards"][i][0] for i in range(len(plan["shards"])) if str(i) in done)
    dev = next(model.parameters()).device
    storage = _DTYPES[cfg.dtype]
    bar = tqdm(
        total=len(tokens) * cfg.context_length,
        initial=finished * cfg.context_length,
        unit="tok",
        unit_scale=True,
        disable=not progress,
        desc=f"{cfg.model} block {cfg.layer}",
    )
    t0, extracted = time.perf_counter(), 0
    with (path / _X).open("r+b") as fh, bar:
        for i in todo:
            c0, c1, r0, _ = plan["shards"][i]
            fh.seek(r0 * row_bytes)
            digest, sumsq = hashlib.sha256(), 0.0
            for b0 in range(c0, c1, cfg.batch_contexts):
                b1 = min(b0 + cfg.batch_contexts, c1)
                ids = torch.from_numpy(tokens[b0:b1]).long().to(dev)
                rows = residual(model, cfg.layer, ids)[torch.from_numpy(keep[b0:b1]).to(dev)]
                stored = rows.to(storage).cpu()
                if not torch.isfinite(stored).all():
                    finite = bool(torch.isfinite(rows).all())
                    raise ValueError(
                        f"activations of {cfg.model!r} block {cfg.layer} in contexts {b0}..{b1 - 1} are "
                        + (
                            f"too large for {cfg.dtype}; use dtype='bfloat16'"
                            if finite
                            else "NaN or Inf: the model itself produced them; check the model and its weights"
                        )
                    )
                sumsq += float(stored.double().pow(2).sum())
                data = stored.view(torch.int16).numpy().tobytes()
                digest.update(data)
                fh.write(data)
                bar.update((b1 - b0) * cfg.context_length)
                extracted += (b1 - b0) * cfg.context_length
            fh.flush()
            os.fsync(fh.fileno())
            done[str(i)] = {"sha256": digest.hexdigest(), "sumsq": sumsq}
            write_text(path / _PROGRESS, json.dumps(_seal(journal)))
    seconds = time.perf_counter() - t0
    mean_sq = sum(v["sumsq"] for v in done.values()) / plan["n_rows"]
    sep = separator_id(tokenizer)
    meta = {
        "model": cfg.model,
        "model_class": type(model).__name__,
        "n_blocks": len(decoder_blocks(model)),
        "layer": cfg.layer,
        "d_model": d_model,
        "corpus": describe(cfg.corpus),
        "separator": {"id": sep, "token": tokenizer.convert_ids_to_tokens(sep)},
        "special_ids": special,
        "excluded_positions": int(keep.size - plan["n_rows"]),
        "mean_squared_norm": mean_sq,
        "device": str(dev),
        "extraction": {
            "shards_this_run": todo,
            "tokens_this_run": extracted,
            "seconds": seconds,
            "tokens_per_s": extracted / seconds if seconds > 0 else None,
        },
    }
    if cfg.model == PACKAGED:
        meta["model_note"] = "SmolLM2-135M-Instruct, 4-bit GGUF (Q4_1) dequantised to float32"
    manifest = _seal(
        {
            "format": _FORMAT,
            "config": jsonable(cfg),
            "plan": plan,
            "done": done,
            "scale": float(mean_sq**-0.5),
            "meta": meta,
        }
    )
    write_text(path / _MANIFEST, json.dumps(manifest, indent=1))
    (path / _PROGRESS).unlink(missing_ok=True)
    return manifest


@dataclass(frozen=True)
class MemoryActivations:
    """Activations already in memory ([n_rows, d_model] float), for ``train_family`` on your own data
    and in tests. ``config`` (the cache key) is the name and the sha256 of the rows."""

    x: Tensor
    name: str = "in-memory"

    def __post_init__(self) -> None:
        if not isinstance(self.x, Tensor) or self.x.ndim != 2 or self.x.shape[0] < 2 or not self.x.is_floating_point():
            got = tuple(self.x.shape) if isinstance(self.x, Tensor) else type(self.x).__name__
            raise ValueError(f"MemoryActivations needs a float tensor [n_rows >= 2, d_model], got {got}")
        if not torch.isfinite(self.x).all():
            raise ValueError("MemoryActivations: x has NaN/Inf entries; clean or drop those rows first")

    @property
    def config(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.x.detach().float().cpu().numpy().tobytes()).hexdigest()
        return {"name": self.name, "shape": list(self.x.shape), "sha256": digest}

    @property
    def d_model(self) -> int:
        return self.x.shape[1]

    def __len__(self) -> int:
        return self.x.shape[0]

    def fp32(self, rows: slice | Tensor | None = None) -> Tensor:
        return (self.x if rows is None else self.x[rows]).float()
