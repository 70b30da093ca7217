"""Explainers: one short natural-language explanation per latent, cached and resumable.

Every explainer has an ``id`` and ``explain(examples) -> list[str]`` over a batch of
``LatentExamples`` (``paperlib.explain.contexts``), plus ``fingerprint(example)``, a hash of exactly what
it would read for that latent:

- ``TopTokensExplainer`` — deterministic baseline: the most frequent marked tokens of the top
  contexts ("tokens: 'Paris', 'London'"). A floor any LLM explainer should beat.
- ``LocalExplainer`` — the packaged SmolLM2-135M-Instruct through ``paperlib.explain.chat.LocalChat``:
  offline, greedy, batched. With 135M parameters it mostly paraphrases the marked tokens or
  guesses loosely; it is the offline default so the pipeline runs anywhere, not a good explainer.
- ``ChatEndpointExplainer`` — any OpenAI-compatible endpoint (``paperlib.explain.chat.ChatEndpoint``):
  use a strong model here for explanations worth reading.

The LLM prompt shows the top contexts (strongest first) and a few quantile samples with the
activating token marked «like this», lists the marked tokens, and asks what they have in common.
The local model gets the start of its answer ("Common theme:", see ``LOCAL_PROMPT``) to keep it
from rambling, and a shorter prompt; replies are cut to their first line (``clean_explanation``).

``explain_latents`` caches per (run id, latent, explainer id, ``PROMPT_VERSION``) in one JSON-lines
file per (run, explainer, prompt version) under ``<store root>/explanations/``; each record also
holds the fingerprint, so changed contexts are explained again instead of silently reused. The
file is rewritten atomically after every batch: an interrupted or failed run keeps every finished
explanation (including the successful requests of a partly failed batch) and the next run
resumes. Bump ``PROMPT_VERSION`` whenever the prompt or the cleaning changes.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from paperlib.atomic import write_text
from paperlib.explain.chat import ChatBackend, ChatEndpoint, EndpointConfig, EndpointError, LocalChat, PartialFailure
from paperlib.explain.contexts import LatentExamples
from paperlib.store import Store

PROMPT_VERSION = "explain-v2"  # v2: echoes after "Marked tokens:" are dropped
INSTRUCTION = "In a few words, what do the marked tokens have in common? Answer with one short phrase."


class Explainer(Protocol):
    @property
    def id(self) -> str: ...

    def fingerprint(self, example: LatentExamples) -> str: ...

    def explain(self, examples: Sequence[LatentExamples]) -> list[str]: ...


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_active(examples: Sequence[LatentExamples]) -> None:
    if not all(isinstance(e, LatentExamples) for e in examples):
        raise ValueError(
            "explainers take a list of paperlib.explain.contexts.LatentExamples (TopContexts.examples(...))"
        )
    dead = [e.latent for e in examples if not e.active]
    if dead:
        raise ValueError(
            f"latents {dead[:10]}{'…' if len(dead) > 10 else ''} never fired on the rows read, so there "
            "is nothing to explain; keep only examples with .active (or read more rows)"
        )


class TopTokensExplainer:
    """The ``n_tokens`` most frequent marked tokens of the top contexts (ties: first seen first)."""

    def __init__(self, n_tokens: int = 5) -> None:
        if not isinstance(n_tokens, int) or n_tokens < 1:
            raise ValueError(f"TopTokensExplainer n_tokens must be a positive integer, got {n_tokens!r}")
        self.n_tokens = n_tokens

    @property
    def id(self) -> str:
        return f"top-tokens:{self.n_tokens}"

    def fingerprint(self, example: LatentExamples) -> str:
        return _sha(json.dumps([e.token for e in example.top]))

    def explain(self, examples: Sequence[LatentExamples]) -> list[str]:
        _check_active(examples)
        out = []
        for ex in examples:
            counts = Counter(e.token.strip() or repr(e.token) for e in ex.top)
            out.append("tokens: " + ", ".join(repr(t) for t, _ in counts.most_common(self.n_tokens)))
        return out


@dataclass(frozen=True)
class ExplainPrompt:
    """What the LLM sees: ``n_top`` top contexts, ``n_quantile`` quantile samples (spread from the
    weakest to the strongest sample), each cut to ``max_chars`` around the marked token; ``prefill``
    starts the answer (local models; leave empty for endpoints). On a CPU the local model's time
    goes mostly into reading the prompt, so its default prompt is shorter."""

    n_top: int = 8
    n_quantile: int = 2
    max_chars: int = 160
    prefill: str = ""

    def __post_init__(self) -> None:
        if self.n_top < 1 or self.n_quantile < 0 or self.max_chars < 20:
            raise ValueError(f"ExplainPrompt needs n_top >= 1, n_quantile >= 0, max_chars >= 20, got {self}")

    def conversation(self, ex: LatentExamples) -> list[dict[str, str]]:
        def line(text: str) -> str:  # at most max_chars, centred on the marked token
            text = " ".join(text.split())
            if len(text) <= self.max_chars:
                return "- " + text
            start = min(max(text.find("«") - self.max_chars // 2, 0), len(text) - self.max_chars)
            cut = text[start : start + self.max_chars]
            return "- " + ("…" if start > 0 else "") + cut + ("…" if start + self.max_chars < len(text) else "")

        q = ex.quantiles
        spread = (
            sorted({round(j * (len(q) - 1) / max(self.n_quantile - 1, 1)) for j in range(self.n_quantile)}) if q else []
        )
        shown = list(ex.top[: self.n_top]) + [q[j] for j in spread]  # quantile samples spread weak to strong
        tokens = list(dict.fromkeys(" ".join(e.token.split()) for e in ex.top[: self.n_top]))
        user = (
            "Text snippets where one feature of a language model is active. The token it fires on is "
            "marked like «this».\n" + "\n".join(line(e.text) for e in shown) + "\n"
            f"Marked tokens: {', '.join(tokens)}.\n" + INSTRUCTION
        )
        messages = [{"role": "user", "content": user}]
        if self.prefill:
            messages.append({"role": "assistant", "content": self.prefill})
        return messages


def clean_explanation(reply: str, max_chars: int = 200) -> str:
    """First non-empty line of a reply, without list markers, quotes or emphasis, at most
    ``max_chars`` (cut at a word). Empty if the reply had no text or only echoed the question
    (small models do: "In a few words, what do…"), so that similarity measures give it NaN."""
    line = next((ln.strip() for ln in reply.splitlines() if ln.strip()), "")
    line = re.sub(r"^(?:[-*•]|\d+[.)])\s+", "", line)
    line = line.replace("**", "").strip().strip("\"'`“”").strip()
    echo = re.sub(r"^marked tokens:\s*", "", line.lower()).rstrip("?.:, ")
    if (len(echo) >= 8 and INSTRUCTION.lower().startswith(echo)) or INSTRUCTION.lower()[:25] in line.lower():
        return ""
    if len(line) > max_chars:
        line = line[:max_chars].rsplit(" ", 1)[0] + "…"
    return line


class LLMExplainer:
    """Explanations from any chat backend with prompt ``prompt`` and ``max_tokens`` new tokens."""

    def __init__(self, backend: ChatBackend, prompt: ExplainPrompt = ExplainPrompt(), max_tokens: int = 32) -> None:
        self.backend, self.prompt, self.max_tokens = backend, prompt, max_tokens

    @property
    def id(self) -> str:
        p = self.prompt
        shape = f"top{p.n_top}-q{p.n_quantile}-c{p.max_chars}-pre{_sha(p.prefill)[:6]}-m{self.max_tokens}"
        return f"llm:{self.backend.id}:{shape}"

    def fingerprint(self, example: LatentExamples) -> str:
        return _sha(json.dumps(self.prompt.conversation(example)))

    def explain(self, examples: Sequence[LatentExamples]) -> list[str]:
        _check_active(examples)
        conversations = [self.prompt.conversation(ex) for ex in examples]
        try:
            replies = self.backend.complete_many(conversations, self.max_tokens)
        except PartialFailure as exc:
            raise PartialFailure(
                str(exc), [None if r is None else clean_explanation(r) for r in exc.results], exc.errors
            ) from exc
        return [clean_explanation(r) for r in replies]


# Chosen on 24 matched pairs of a small TopK SAE on SmolLM2 activations among four prefills ("They
# are all", none, "The marked tokens are", "Common theme:"): "Common theme:" gave the shortest
# replies with content and the largest gap between matched and random pairs (embedding cosine 0.35
# vs 0.18); six top contexts and one quantile sample of <= 100 characters keep the prompt near 250
# tokens, which is where a CPU spends its time.
LOCAL_PROMPT = ExplainPrompt(n_top=6, n_quantile=1, max_chars=100, prefill="Common theme:")


class LocalExplainer(LLMExplainer):
    """The offline default: the packaged SmolLM2-135M-Instruct, greedy, in batches (weak; see above)."""

    def __init__(
        self,
        model: str = "smollm2",
        batch_size: int = 8,
        max_tokens: int = 20,
        prompt: ExplainPrompt = LOCAL_PROMPT,
        store: Store | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__(LocalChat(model, batch_size, store=store, device=device), prompt, max_tokens)


class ChatEndpointExplainer(LLMExplainer):
    """Explanations from an OpenAI-compatible endpoint (base URL, model, key: see ``EndpointConfig``)."""

    def __init__(
        self,
        config: EndpointConfig = EndpointConfig(),
        api_key: str | None = None,
        prompt: ExplainPrompt = ExplainPrompt(),
        max_tokens: int = 48,
    ) -> None:
        super().__init__(ChatEndpoint(config, api_key), prompt, max_tokens)


def _slug(text: str, n: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:n].strip("._") + "-" + _sha(text)[:8]


class JsonlCache:
    """Records ``{"key", "fingerprint", "text", ...}`` in one JSON-lines file, rewritten atomically
    on every ``update``. Unreadable lines are reported by ``load`` and dropped (recomputed)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        records, bad = {}, 0
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
                records[str(record["key"])] = record
            except (ValueError, KeyError, TypeError):
                bad += 1
        if bad:
            import warnings

            # stacklevel 3: the user's call of explain_latents or of a judge (similarity.py), which load the cache
            warnings.warn(
                f"{self.path}: {bad} unreadable lines ignored; those entries will be recomputed", stacklevel=3
            )
        return records

    def update(self, records: dict[str, dict], new: Sequence[dict]) -> None:
        for record in new:
            records[str(record["key"])] = record
        write_text(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records.values()))


def explanation_cache(explainer: Explainer, run_id: str, store: Store | None = None) -> JsonlCache:
    """The cache file of one (run, explainer, prompt version)."""
    if not isinstance(run_id, str) or not run_id.strip():
        raise ValueError(
            f"run_id must name the SAE run whose latents are explained (e.g. its store key), got {run_id!r}"
        )
    root = (store or Store()).root / "explanations"
    return JsonlCache(root / _slug(run_id) / f"{_slug(explainer.id)}-{PROMPT_VERSION}.jsonl")


def explain_latents(
    explainer: Explainer,
    examples: Sequence[LatentExamples],
    run_id: str,
    *,
    store: Store | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> list[str]:
    """One explanation per example (same order), from the cache where present, else computed in
    batches of ``batch_size`` and saved after each batch (see the module docstring)."""
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    _check_active(examples)
    keys = [f"latent:{ex.latent}" for ex in examples]
    if len(set(keys)) != len(keys):
        raise ValueError("examples name some latent twice; explain each latent of a run once (one run id per SAE seed)")
    cache = explanation_cache(explainer, run_id, store)
    records = cache.load()
    prints = [explainer.fingerprint(ex) for ex in examples]
    todo = [i for i, (k, f) in enumerate(zip(keys, prints)) if records.get(k, {}).get("fingerprint") != f]
    batches = range(0, len(todo), batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"explaining ({explainer.id[:40]})", unit="batch")
    for start in batches:
        batch = todo[start : start + batch_size]

        def record(i: int, text: str) -> dict:
            return {
                "key": keys[i],
                "latent": examples[i].latent,
                "fingerprint": prints[i],
                "text": text,
                "explainer": explainer.id,
                "prompt_version": PROMPT_VERSION,
            }

        try:
            texts = explainer.explain([examples[i] for i in batch])
        except PartialFailure as exc:
            done = [record(i, t) for i, t in zip(batch, exc.results) if t is not None]
            cache.update(records, done)
            kept = sum(1 for k, f in zip(keys, prints) if records.get(k, {}).get("fingerprint") == f)
            raise EndpointError(
                f"{exc}\n{kept} of {len(examples)} explanations are saved in {cache.path}; "
                "run again to resume with the rest"
            ) from exc
        if len(texts) != len(batch):
            raise RuntimeError(f"explainer {explainer.id} returned {len(texts)} explanations for {len(batch)} latents")
        cache.update(records, [record(i, t) for i, t in zip(batch, texts)])
    return [records[k]["text"] for k in keys]
