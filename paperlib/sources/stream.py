"""Activation rows as a stream of shuffled blocks, for training on more tokens than fit in memory.

``train(bank, x, cfg)`` with a tensor holds every row at once: the paper profile's token budgets (500M
tokens at d = 768 is 1.5 TB in fp32) never fit. A :class:`RowStream` instead hands rows out one *block*
at a time, and ``train`` keeps only the current block (plus a batch, and the first rows it normalises
and evaluates on), so memory does not grow with the number of training tokens.

* Block ``i`` is a deterministic function of the stream's ``identity()`` and ``i``: its rows in source
  order (``raw_block``), then shuffled by a permutation seeded by ``(seed, i)``. Batches are consecutive
  rows of consecutive blocks. So a training checkpoint need only record ``(block, offset)``: a resumed
  run rebuilds that one block and continues with exactly the batches an uninterrupted run would see.
* ``max_norm_factor`` leaves out a block's massive rows (``sources.massive``: norm above that multiple of
  the block's median norm), as training on cached rows does with the median of all of them.
* Shuffling is within a block. A batch of 1,024 rows from a block of 256 contexts mixes rows of all of
  them, as dictionary_learning's and SAELens's activation buffers (a few hundred to a few thousand
  contexts) do; a bigger ``block_contexts`` mixes more at the price of memory.

Two sources:

* :class:`TensorStream`: rows already stored, a tensor or a numpy array, memory-mapped or not (the
  activation cache's ``Activations.x``): cut into blocks of ``block_rows`` and read cyclically, so
  training may run several passes over it.
* :class:`ModelStream`: live activations, the residual stream of a language model on the packed
  contexts of a corpus (``sources.corpus.packed``), extracted block by block with the rows
  ``sources.activations`` would cache (special tokens and positions before ``first_position`` left
  out), in float32. When the corpus is exhausted it starts over (a second pass over the same contexts).
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from paperlib.checks import is_int
from paperlib.sources.activations import ActivationConfig, row_mask
from paperlib.sources.corpus import documents, packed, special_ids
from paperlib.sources.llm import check_layer, load_model, residual
from paperlib.sources.massive import checked_norm_factor, without_massive_rows
from paperlib.store import Store, jsonable


class RowStream(ABC):
    """Rows ``[*, d_model]`` in deterministic, shuffled blocks (module docstring)."""

    def __init__(self, d_model: int, seed: int, max_norm_factor: float | None = None) -> None:
        if not is_int(seed):
            raise ValueError(f"a stream's seed must be an integer, got {seed!r}")
        self.d_model, self.seed = d_model, seed
        self.max_norm_factor = checked_norm_factor(max_norm_factor)

    @abstractmethod
    def raw_block(self, index: int) -> Tensor:
        """Block ``index`` in source order, float32 ``[rows >= 1, d_model]``."""

    @abstractmethod
    def identity(self) -> dict[str, Any]:
        """What determines every block (JSON-able): a checkpoint resumes only on an equal identity."""

    def _filter(self) -> dict[str, Any]:
        """The massive-row filter in an identity (absent when off, so unfiltered identities stay as before)."""
        return {} if self.max_norm_factor is None else {"max_norm_factor": self.max_norm_factor}

    def block(self, index: int) -> Tensor:
        rows = without_massive_rows(self.raw_block(index), factor=self.max_norm_factor)
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(self.seed * 1_000_003 + index))
        return rows[order]


class Feed:
    """Batches of consecutive rows of a stream's blocks, starting at ``position`` = (block, offset); holds
    one block at a time."""

    def __init__(self, stream: RowStream, position: tuple[int, int] = (0, 0)) -> None:
        self.stream = stream
        self.block_index, self.offset = position
        self.rows = stream.block(self.block_index)

    @property
    def position(self) -> tuple[int, int]:
        """Where the next batch starts: what a training checkpoint records."""
        return self.block_index, self.offset

    def take(self, size: int) -> Tensor:
        pieces, need = [], size
        while need:
            if self.offset == len(self.rows):
                self.block_index, self.offset = self.block_index + 1, 0
                self.rows = self.stream.block(self.block_index)
            piece = self.rows[self.offset : self.offset + need]
            pieces.append(piece)
            self.offset += len(piece)
            need -= len(piece)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


class TensorStream(RowStream):
    """Stored rows (a tensor or numpy array, e.g. a memory map) in blocks of ``block_rows``, read cyclically."""

    def __init__(
        self, rows: Tensor | np.ndarray, block_rows: int = 65_536, seed: int = 0, max_norm_factor: float | None = None
    ) -> None:
        if not hasattr(rows, "shape") or len(rows.shape) != 2 or rows.shape[0] == 0:
            raise ValueError(
                f"TensorStream takes rows [n_rows >= 1, d_model], got {getattr(rows, 'shape', type(rows).__name__)}"
            )
        if not is_int(block_rows) or block_rows < 1:
            raise ValueError(f"TensorStream.block_rows must be a positive integer, got {block_rows!r}")
        super().__init__(int(rows.shape[1]), seed, max_norm_factor)
        self.rows, self.block_rows = rows, min(block_rows, int(rows.shape[0]))  # a block never repeats a row
        self._identity: dict[str, Any] | None = None

    def raw_block(self, index: int) -> Tensor:
        n = self.rows.shape[0]
        start = (index * self.block_rows) % n
        positions = (np.arange(start, start + self.block_rows) % n) if start + self.block_rows > n else None
        part = self.rows[positions] if positions is not None else self.rows[start : start + self.block_rows]
        if isinstance(part, Tensor):
            return part.float()
        return torch.from_numpy(np.array(part, dtype=np.float32))  # a copy: a memory map is read-only

    def identity(self) -> dict[str, Any]:
        if self._identity is None:  # hashing every row once (~1 GB/s) ties a checkpoint to these bytes
            from paperlib.sae.train import data_fingerprint

            self._identity = {
                "kind": "rows",
                **data_fingerprint(self.rows),
                "block_rows": self.block_rows,
                "seed": self.seed,
                **self._filter(),
            }
        return self._identity


class ModelStream(RowStream):
    """Live activations: ``config.model``'s residual stream after block ``config.layer`` on packed contexts
    of ``config.corpus`` (``config.n_tokens``, ``dtype`` and ``shard_tokens`` are not used: the stream has no
    end and stores nothing), ``block_contexts`` contexts per block, forward passes of
    ``config.batch_contexts`` contexts on ``device``. The first ``skip_contexts`` contexts of the corpus are
    never served: they hold the rows a notebook evaluates on (``runs.rows.StreamedRows``)."""

    def __init__(
        self,
        config: ActivationConfig,
        *,
        block_contexts: int = 256,
        seed: int = 0,
        skip_contexts: int = 0,
        max_norm_factor: float | None = None,
        device: str | torch.device = "cpu",
        store: Store | None = None,
    ) -> None:
        if not is_int(block_contexts) or block_contexts < 1:
            raise ValueError(f"ModelStream.block_contexts must be a positive integer, got {block_contexts!r}")
        if not is_int(skip_contexts) or skip_contexts < 0:
            raise ValueError(f"ModelStream.skip_contexts must be an integer >= 0, got {skip_contexts!r}")
        self.config, self.block_contexts, self.skip_contexts = config, block_contexts, skip_contexts
        self.model, self.tokenizer = load_model(config.model, store, device=device)
        check_layer(self.model, config.layer, config.model)
        super().__init__(int(self.model.get_input_embeddings().weight.shape[1]), seed, max_norm_factor)
        self.special = special_ids(self.tokenizer)
        self._contexts: Iterator[np.ndarray] = iter(())
        self._next_context: int | None = None  # index of the next context self._contexts yields; None: not started

    def identity(self) -> dict[str, Any]:
        source = jsonable(self.config)
        for unused in ("n_tokens", "dtype", "shard_tokens"):
            source.pop(unused, None)
        skip = {"skip_contexts": self.skip_contexts} if self.skip_contexts else {}
        return {
            "kind": "model",
            **source,
            "block_contexts": self.block_contexts,
            "seed": self.seed,
            **skip,
            **self._filter(),
        }

    def _passes(self) -> Iterator[np.ndarray]:
        """The corpus's contexts after the first ``skip_contexts``, pass after pass."""
        for _ in itertools.count():
            empty = True
            contexts = packed(self.tokenizer, documents(self.config.corpus), self.config.context_length)
            for context in itertools.islice(contexts, self.skip_contexts, None):
                empty = False
                yield context
            if empty:
                raise ValueError(
                    f"corpus {self.config.corpus!r} gives not one context of {self.config.context_length} tokens"
                    + (f" after the {self.skip_contexts} held out" if self.skip_contexts else "")
                    + "; point it at (more) non-empty documents"
                )

    def _contexts_from(self, first: int, count: int) -> np.ndarray:
        """Contexts ``first .. first + count - 1`` of the stream; tokenising from the start again only when
        asked for an earlier one (a resumed run)."""
        if self._next_context is None or first < self._next_context:
            self._contexts, self._next_context = self._passes(), 0
        skip = first - self._next_context
        taken = list(itertools.islice(self._contexts, skip, skip + count))
        self._next_context = first + count
        return np.stack(taken)

    def raw_block(self, index: int) -> Tensor:
        cfg = self.config
        tokens = self._contexts_from(index * self.block_contexts, self.block_contexts)
        keep = torch.from_numpy(row_mask(tokens, self.special, cfg.first_position))
        device = next(self.model.parameters()).device
        rows = [
            residual(self.model, cfg.layer, torch.from_numpy(tokens[b : b + cfg.batch_contexts]).long().to(device))[
                keep[b : b + cfg.batch_contexts].to(device)
            ].cpu()
            for b in range(0, len(tokens), cfg.batch_contexts)
        ]
        return torch.cat(rows)
