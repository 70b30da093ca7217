"""Top-activating contexts of SAE latents, streamed over an activation cache.

``top_contexts`` reads activation rows in chunks, encodes each chunk, and keeps per latent only
what an explanation needs, so 100k rows x 8k latents never become one dense matrix:

- the ``n_top`` strongest activations and their rows (``torch.topk`` of the running best merged
  with each chunk);
- a uniform random sample of the rows where the latent fires (a *reservoir*: every firing
  (row, latent) gets a pseudo-random key hashed from row, latent and seed, and the ``reservoir``
  largest keys are kept, again by a topk merge). Keys depend on nothing else, so the sample, like
  the top rows, is the same for any chunk size. From the sample, ``n_quantile`` rows at evenly
  spaced activation quantiles show what weak and medium activations look like (explanations
  written from top examples alone over-fit the extremes);
- how many rows fire (activation > 0), for the latent's frequency.

Results carry a leading seed axis S (1 for codes of one SAE). ``TokenContexts`` turns rows back
into readable text with the activating token marked; ``TopContexts.examples`` packs both into
``LatentExamples``, the input of every explainer (``paperlib.explain.explainers``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Codes = Callable[[Tensor], Tensor] | Tensor
_MASK = (1 << 62) - 1
_M1, _M2, _M3 = 0x1E3779B97F4A7C15, 0x3F58476D1CE4E5B9, 0x14D049BB133111EB  # odd, below 2^62
_FIELDS = ("values", "rows", "quantile_values", "quantile_rows", "n_fired", "latents")


@dataclass(frozen=True)
class TopContexts:
    """Per seed and latent: top activations ``values``/``rows`` [S, L, n_top] (strongest first,
    row -1 where a latent fired on fewer rows), quantile samples ``quantile_values``/
    ``quantile_rows`` [S, L, n_quantile] (weakest first), ``n_fired`` [S, L] and ``latents`` [S, L]."""

    values: Tensor
    rows: Tensor
    quantile_values: Tensor
    quantile_rows: Tensor
    n_fired: Tensor
    latents: Tensor
    n_rows: int

    def tensors(self) -> dict[str, Tensor]:
        """The tensors, for ``Store.cached`` (``n_rows`` goes in the meta)."""
        return {name: getattr(self, name) for name in _FIELDS}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], n_rows: int) -> TopContexts:
        missing = [k for k in _FIELDS if k not in tensors]
        if missing:
            raise ValueError(f"TopContexts.from_tensors: missing {missing}; was this entry written by top_contexts?")
        return cls(**{k: tensors[k] for k in _FIELDS}, n_rows=int(n_rows))

    def frequency(self) -> Tensor:
        """Fraction of rows on which each latent fires [S, L]."""
        return self.n_fired.double() / max(self.n_rows, 1)

    def examples(
        self, contexts: TokenContexts, seed: int = 0, window: int = 12, mark: tuple[str, str] = ("«", "»")
    ) -> list[LatentExamples]:
        """Readable examples of every latent of seed index ``seed`` (position in the S axis)."""
        if not 0 <= seed < self.latents.shape[0]:
            raise IndexError(f"seed index {seed} is out of range for {self.latents.shape[0]} seeds")
        freq = self.frequency()[seed]

        def pack(values: Tensor, rows: Tensor) -> tuple[Example, ...]:
            seen: set[int] = set()  # a latent firing on fewer rows than samples repeats rows: show each once
            kept = []
            for v, r in zip(values.tolist(), rows.tolist()):
                if r >= 0 and r not in seen:
                    seen.add(r)
                    kept.append(Example(contexts.text(r, window, mark), contexts.token(r), float(v), r))
            return tuple(kept)

        return [
            LatentExamples(
                int(latent),
                pack(self.values[seed, i], self.rows[seed, i]),
                pack(self.quantile_values[seed, i], self.quantile_rows[seed, i]),
                float(freq[i]),
            )
            for i, latent in enumerate(self.latents[seed].tolist())
        ]


@dataclass(frozen=True)
class Example:
    """One context: the text with the activating token marked, that token alone, the activation."""

    text: str
    token: str
    activation: float
    row: int


@dataclass(frozen=True)
class LatentExamples:
    """What an explainer sees of one latent: top contexts (strongest first), quantile samples
    (weakest first) and the fraction of tokens it fires on."""

    latent: int
    top: tuple[Example, ...]
    quantiles: tuple[Example, ...] = ()
    frequency: float = 0.0

    @property
    def active(self) -> bool:
        """False for a latent that never fired on the rows read (nothing to explain)."""
        return len(self.top) > 0

    def readable(self, n: int | None = None) -> str:
        """A plain-text view for notebooks: activation and marked context, one per line."""
        lines = [f"latent {self.latent}: fires on {100 * self.frequency:.3g}% of tokens"]
        lines += [f"  {e.activation:8.3f}  {e.text}" for e in self.top[:n]]
        if self.quantiles:
            lines.append("  quantile samples (weakest first):")
            lines += [f"  {e.activation:8.3f}  {e.text}" for e in self.quantiles]
        return "\n".join(line.replace("\n", " ") for line in lines)


@dataclass(frozen=True)
class TokenContexts:
    """Where activation rows come from: token ids ``tokens`` [n_contexts, length] and, per row, its
    context and position. ``decode`` turns a list of token ids into text (a tokenizer's decode)."""

    tokens: Tensor
    row_context: Tensor
    row_position: Tensor
    decode: Callable[[list[int]], str]

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, Tensor) or self.tokens.ndim != 2:
            raise ValueError(f"tokens must be a tensor [n_contexts, context_length], got {_shape(self.tokens)}")
        for name in ("row_context", "row_position"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.ndim != 1 or value.shape != self.row_context.shape:
                raise ValueError(
                    f"{name} must be a 1-D tensor with one entry per row like row_context, got {_shape(value)}"
                )
        if len(self.row_context) and (
            int(self.row_context.max()) >= self.tokens.shape[0]
            or int(self.row_position.max()) >= self.tokens.shape[1]
            or min(int(self.row_context.min()), int(self.row_position.min())) < 0
        ):
            raise ValueError(f"row_context / row_position point outside tokens {tuple(self.tokens.shape)}")

    @classmethod
    def from_activations(cls, acts: Any) -> TokenContexts:
        """From a ``paperlib.sources.activations.Activations`` (or anything with the same four attributes)."""
        return cls(acts.tokens, acts.row_context, acts.row_position, acts.tokenizer.decode)

    def __len__(self) -> int:
        return len(self.row_context)

    def _locate(self, row: int) -> tuple[list[int], int]:
        if not 0 <= int(row) < len(self):
            raise IndexError(f"row {row} is out of range for {len(self)} rows")
        return self.tokens[self.row_context[row]].tolist(), int(self.row_position[row])

    def text(self, row: int, window: int = 12, mark: tuple[str, str] = ("«", "»")) -> str:
        """``window`` tokens either side of row ``row``'s token, which is wrapped in ``mark``
        (its leading whitespace stays outside the mark)."""
        if window < 0 or len(mark) != 2:
            raise ValueError(f"need window >= 0 and mark = (opening, closing), got {window!r}, {mark!r}")
        ids, pos = self._locate(row)
        token = self.decode(ids[pos : pos + 1])
        lead = len(token) - len(token.lstrip())  # " Paris" is shown as " «Paris»"
        return (
            self.decode(ids[max(0, pos - window) : pos])
            + token[:lead]
            + mark[0]
            + token[lead:]
            + mark[1]
            + self.decode(ids[pos + 1 : pos + 1 + window])
        )

    def token(self, row: int) -> str:
        ids, pos = self._locate(row)
        return self.decode(ids[pos : pos + 1])


def _shape(value: Any) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def _keys(rows: Tensor, latents: Tensor, seed: int) -> Tensor:
    """Pseudo-random int64 keys in [0, 2^62) per (row, latent) pair: a splitmix64-style mix, so the
    reservoir sample does not depend on how rows are chunked."""
    h = (rows * _M1 + latents * _M2 + (seed * _M3 & _MASK)) & _MASK
    h = ((h ^ (h >> 31)) * _M3) & _MASK
    h = ((h ^ (h >> 29)) * _M2) & _MASK
    return h ^ (h >> 32)


def _latent_index(latents: Any, n_seeds: int | None) -> Tensor:
    index = torch.as_tensor(latents)
    if index.dtype.is_floating_point or index.dtype == torch.bool or index.ndim not in (1, 2) or index.numel() == 0:
        raise ValueError(
            f"latents must be integer indices [L] (every seed) or [S, L] (one list per seed), "
            f"got {_shape(index)} of {index.dtype}"
        )
    index = index.long()
    if index.ndim == 2 and n_seeds is not None and index.shape[0] != n_seeds:
        raise ValueError(f"latents has {index.shape[0]} rows but the codes have {n_seeds} seeds; give [L] or [S, L]")
    return index


def top_contexts(
    codes: Codes,
    x: Tensor | None,
    latents: Sequence[int] | Tensor,
    *,
    n_top: int = 10,
    n_quantile: int = 5,
    chunk_rows: int = 1024,
    reservoir: int = 200,
    seed: int = 0,
    progress: bool = False,
) -> TopContexts:
    """Top-activating rows and quantile samples of ``latents`` (see the module docstring).

    ``codes``: a function from a chunk of rows (float32 [B, d]) to codes [B, n_latents] or
    [S, B, n_latents] (e.g. ``lambda x: bank.encode(x.cuda())``: it may compute on a GPU, only the
    firing entries come back to the CPU), or precomputed codes of all
    rows [n_rows, n] / [S, n_rows, n] (then ``x`` may be None). ``latents``: [L] for every seed or
    [S, L]. ``reservoir``: the size of the random sample the quantile rows are drawn from."""
    for name, value, low in (
        ("n_top", n_top, 1),
        ("n_quantile", n_quantile, 0),
        ("chunk_rows", chunk_rows, 1),
        ("reservoir", reservoir, 1),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"top_contexts: {name} must be an integer >= {low}, got {value!r}")
    if reservoir < n_quantile:
        raise ValueError(f"top_contexts: reservoir={reservoir} must be >= n_quantile={n_quantile}")
    if isinstance(codes, Tensor):
        if codes.ndim not in (2, 3):
            raise ValueError(
                f"precomputed codes must be [n_rows, n_latents] or [S, n_rows, n_latents], got {_shape(codes)}"
            )
        n_rows = codes.shape[-2]
        stored = codes if codes.ndim == 3 else codes[None]

        def encode(a: int, b: int) -> Tensor:
            return stored[:, a:b]
    elif callable(codes):
        if not isinstance(x, Tensor) or x.ndim != 2:
            raise ValueError(
                f"x must be the activation rows [n_rows, d_model] when codes is a function, got {_shape(x)}"
            )
        n_rows = x.shape[0]

        def encode(a: int, b: int) -> Tensor:
            with torch.no_grad():
                out = codes(x[a:b].float())
            if not isinstance(out, Tensor) or out.ndim not in (2, 3) or out.shape[-2] != b - a:
                raise ValueError(
                    f"the codes function must return [B, n_latents] or [S, B, n_latents] for a chunk "
                    f"of B={b - a} rows, got {_shape(out)}"
                )
            return out if out.ndim == 3 else out[None]
    else:
        raise ValueError(
            f"codes must be a function of a chunk of rows or a tensor of codes, got {type(codes).__name__}"
        )
    if n_rows < 1:
        raise ValueError("top_contexts needs at least one activation row")

    index = _latent_index(latents, codes.shape[0] if isinstance(codes, Tensor) and codes.ndim == 3 else None)
    acc: _Accumulator | None = None
    chunks = range(0, n_rows, chunk_rows)
    if progress:
        from tqdm.auto import tqdm

        chunks = tqdm(chunks, desc="top contexts", unit="chunk")
    for start in chunks:
        stop = min(start + chunk_rows, n_rows)
        c = encode(start, stop)
        if acc is None:
            if index.ndim == 2 and index.shape[0] != c.shape[0]:
                raise ValueError(
                    f"latents has {index.shape[0]} rows but the codes have {c.shape[0]} seeds; give [L] or [S, L]"
                )
            index = index.expand(c.shape[0], -1) if index.ndim == 1 else index
            if int(index.min()) < 0 or int(index.max()) >= c.shape[-1]:
                raise ValueError(
                    f"latents must lie in 0..{c.shape[-1] - 1} (the SAE has {c.shape[-1]} latents), "
                    f"got {int(index.min())}..{int(index.max())}"
                )
            acc = _Accumulator(index, c.shape[-1], n_top, reservoir, seed)
        elif c.shape[0] != index.shape[0]:
            raise ValueError(
                f"the codes function returned {c.shape[0]} seeds for rows {start}:{stop}, {index.shape[0]} before"
            )
        acc.add(c, start)
    assert acc is not None
    return acc.result(n_quantile, n_rows)


class _Accumulator:
    """Running top-n and reservoir per (seed, latent), flattened to G = S * L groups. Each chunk
    touches only the entries that fired, grouped by latent into a small dense block [G, m]
    (m = most firings of one latent in the chunk) that is merged by topk."""

    def __init__(self, index: Tensor, n_latents: int, n_top: int, reservoir: int, seed: int) -> None:
        self.index, self.seed = index, seed
        S, L = index.shape
        self.flat_latents = index.reshape(-1)
        self.identity = L == n_latents and bool(torch.equal(index, torch.arange(L).expand(S, L)))
        G = S * L
        self.values, self.rows = torch.full((G, n_top), -torch.inf), torch.full((G, n_top), -1)
        self.keys, self.res_rows = torch.full((G, reservoir), -1), torch.full((G, reservoir), -1)
        self.res_values, self.n_fired = torch.zeros(G, reservoir), torch.zeros(G, dtype=torch.long)

    def add(self, c: Tensor, start: int) -> None:
        S, B, _ = c.shape
        L = self.index.shape[1]
        if not torch.isfinite(c.sum(dtype=torch.float64)):  # one pass; NaN and Inf propagate into the sum
            raise ValueError(f"codes of rows {start}:{start + B} contain NaN or Inf; check the activations and the SAE")
        a = c if self.identity else c.gather(2, self.index.to(c.device)[:, None, :].expand(S, B, L))  # [S, B, L]
        fired = (a > 0).nonzero()  # on the codes' device; only the few firing entries come to the CPU
        if len(fired) == 0:
            return
        values = a[fired[:, 0], fired[:, 1], fired[:, 2]].float().cpu()
        s, b, lat = fired.cpu().unbind(1)
        group = s * L + lat
        order = torch.sort(group, stable=True).indices  # groups ascending, rows ascending within a group
        group, values, rows = group[order], values[order], b[order] + start
        counts = torch.bincount(group, minlength=len(self.n_fired))
        self.n_fired += counts
        rank = torch.arange(len(group)) - (counts.cumsum(0) - counts)[group]
        m = int(counts.max())
        block_values, block_rows = torch.full((len(counts), m), -torch.inf), torch.full((len(counts), m), -1)
        block_values[group, rank], block_rows[group, rank] = values, rows
        self.values, pick = torch.cat([self.values, block_values], 1).topk(self.values.shape[1], dim=1)
        self.rows = torch.cat([self.rows, block_rows], 1).gather(1, pick)
        block_keys = torch.full((len(counts), m), -1)
        block_keys[group, rank] = _keys(rows, self.flat_latents[group], self.seed)
        self.keys, pick = torch.cat([self.keys, block_keys], 1).topk(self.keys.shape[1], dim=1)
        self.res_rows = torch.cat([self.res_rows, block_rows], 1).gather(1, pick)
        self.res_values = torch.cat([self.res_values, block_values.clamp(min=0)], 1).gather(1, pick)

    def result(self, n_quantile: int, n_rows: int) -> TopContexts:
        S, L = self.index.shape
        fired = self.values > 0  # a latent firing on fewer than n_top rows leaves -inf slots
        values = torch.where(fired, self.values, torch.zeros(()))
        rows = torch.where(fired, self.rows, torch.tensor(-1))
        q_values, q_rows = _quantile_samples(self.res_values, self.res_rows, self.keys >= 0, n_quantile)
        shape = lambda t: t.reshape(S, L, -1)  # noqa: E731
        return TopContexts(
            shape(values),
            shape(rows),
            shape(q_values),
            shape(q_rows),
            self.n_fired.reshape(S, L),
            self.index.clone(),
            n_rows,
        )


def _quantile_samples(values: Tensor, rows: Tensor, valid: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Rows at activation quantiles (j + 0.5) / n, j = 0..n-1, of each latent's valid sample."""
    order = torch.where(valid, values, torch.inf).argsort(dim=-1)
    sorted_values, sorted_rows = values.gather(-1, order), rows.gather(-1, order)
    count = valid.sum(-1, keepdim=True)
    position = ((torch.arange(n) + 0.5) / max(n, 1) * count).long().clamp(max=values.shape[-1] - 1)
    has = count > 0
    q_values = torch.where(has, sorted_values.gather(-1, position), torch.zeros(()))
    q_rows = torch.where(has, sorted_rows.gather(-1, position), torch.tensor(-1))
    return q_values, q_rows


def top_tokens(found: TopContexts, decode_row, *, n: int = 3) -> list[list[str]]:
    """Per latent of ``found`` (seed 0): its ``n`` most common activating tokens among its top rows,
    most common first (ties: stronger activation first). ``decode_row(row)`` gives a row's token."""
    out = []
    for rows in found.rows[0].tolist():
        counts: dict[str, int] = {}
        for row in rows:
            if row >= 0:
                token = decode_row(row).strip() or repr(decode_row(row))
                counts[token] = counts.get(token, 0) + 1
        out.append(sorted(counts, key=lambda t: -counts[t])[:n])  # sorted is stable: first seen wins ties
    return out
