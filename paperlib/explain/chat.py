"""Chat backends for explainers and judges: the packaged LLM, or any OpenAI-compatible endpoint.

Both take a batch of conversations (lists of ``{"role", "content"}`` messages) and return one reply
per conversation, in order (``complete_many``). A conversation that ends with an ``assistant``
message asks the model to *continue* that message (a prefill): ``LocalChat`` appends it after the
generation prompt; endpoints receive it as-is (many servers continue it, OpenAI's does not).

- ``LocalChat`` runs the packaged SmolLM2-135M-Instruct (``paperlib.sources.llm``) on this machine:
  batched generation with left padding (prompts sorted by length so a batch pads little), greedy
  by default, offline. A 135M model writes weak explanations; it is here so the pipeline runs
  everywhere, not because its labels are good.
- ``ChatEndpoint`` speaks ``POST {base_url}/chat/completions`` with the standard library
  (``urllib``; no new dependency). Requests of a batch run on ``concurrency`` threads. Connection
  errors, timeouts, 429 and 5xx are retried with exponential back-off (``backoff`` s, doubling, at
  most ``max_backoff`` s per wait); a ``Retry-After`` header is honoured, and one asking for more
  than ``max_backoff`` s ends the call with an error instead of a silent long sleep. Other 4xx
  replies (bad key, unknown model) and malformed or empty replies are not retried. Every error
  names the URL. When some requests of a batch fail, ``PartialFailure`` carries the replies that
  did arrive, so callers can keep them (``paperlib.explain.explainers`` does).

The key is read from the environment variable ``api_key_env`` (never stored in configs, cache
keys or error messages); base URL and model fall back to ``OPENAI_BASE_URL`` / ``OPENAI_MODEL``.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import torch

Conversation = list[dict[str, str]]


class ChatBackend(Protocol):
    """Anything that answers batches of conversations; ``id`` names it in cache keys."""

    @property
    def id(self) -> str: ...

    def complete_many(self, conversations: Sequence[Conversation], max_tokens: int) -> list[str]: ...


class EndpointError(RuntimeError):
    """A chat endpoint failed (unreachable, timed out, refused, rate-limited past the retries)."""


class MalformedReply(EndpointError):
    """The endpoint answered, but not with a chat completion that has non-empty content."""


class PartialFailure(EndpointError):
    """Some requests of a batch failed: ``results[i]`` is the reply or None, ``errors[i]`` the error."""

    def __init__(self, message: str, results: list[str | None], errors: list[Exception | None]) -> None:
        super().__init__(message)
        self.results, self.errors = results, errors


def check_conversations(conversations: Sequence[Conversation], max_tokens: int) -> None:
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive integer, got {max_tokens!r}")
    for i, conv in enumerate(conversations):
        if (
            not isinstance(conv, list)
            or not conv
            or any(
                not isinstance(m, dict)
                or m.get("role") not in ("system", "user", "assistant")
                or not isinstance(m.get("content"), str)
                for m in conv
            )
        ):
            raise ValueError(
                f"conversation {i} must be a non-empty list of {{'role': system|user|assistant, "
                f"'content': str}} messages, got {str(conv)[:200]}"
            )


@dataclass(frozen=True)
class EndpointConfig:
    """Where and how to reach an OpenAI-compatible chat endpoint (see the module docstring)."""

    base_url: str = ""  # e.g. "http://127.0.0.1:8000/v1"; empty: $OPENAI_BASE_URL
    model: str = ""  # empty: $OPENAI_MODEL
    api_key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0  # seconds for connecting and for each read
    max_retries: int = 4
    backoff: float = 1.0  # first wait before a retry; doubles each time
    max_backoff: float = 60.0  # longest single wait, Retry-After included
    concurrency: int = 4
    temperature: float = 0.0

    def __post_init__(self) -> None:
        for name in ("timeout", "backoff", "max_backoff"):
            if not getattr(self, name) > 0:
                raise ValueError(f"EndpointConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name, low in (("max_retries", 0), ("concurrency", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"EndpointConfig.{name} must be an integer >= {low}, got {value!r}")
        if not 0 <= self.temperature <= 2:
            raise ValueError(f"EndpointConfig.temperature must be in [0, 2], got {self.temperature!r}")


class ChatEndpoint:
    """A client for one OpenAI-compatible endpoint and model (see the module docstring)."""

    def __init__(self, config: EndpointConfig = EndpointConfig(), api_key: str | None = None) -> None:
        self.config = config
        base = (config.base_url or os.environ.get("OPENAI_BASE_URL", "")).strip().rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ValueError(
                f"chat endpoint base URL must start with http:// or https:// (e.g. "
                f"'http://127.0.0.1:8000/v1'), got {base!r}; set base_url or OPENAI_BASE_URL"
            )
        self.model = (config.model or os.environ.get("OPENAI_MODEL", "")).strip()
        if not self.model:
            raise ValueError(f"no model named for the chat endpoint {base}; set model or OPENAI_MODEL")
        self.url = base + "/chat/completions"
        self._key = api_key if api_key is not None else os.environ.get(config.api_key_env, "")

    @property
    def id(self) -> str:
        return f"endpoint:{self.model}@{self.url}:t{self.config.temperature:g}"

    def complete_many(self, conversations: Sequence[Conversation], max_tokens: int) -> list[str]:
        """One reply per conversation; ``PartialFailure`` if any failed after its retries."""
        check_conversations(conversations, max_tokens)
        results: list[str | None] = [None] * len(conversations)
        errors: list[Exception | None] = [None] * len(conversations)

        def one(i: int) -> None:
            try:
                results[i] = self.complete(conversations[i], max_tokens)
            except EndpointError as exc:
                errors[i] = exc

        with ThreadPoolExecutor(max_workers=min(self.config.concurrency, max(len(conversations), 1))) as pool:
            list(pool.map(one, range(len(conversations))))
        failed = [i for i, e in enumerate(errors) if e is not None]
        if failed:
            raise PartialFailure(
                f"{len(failed)} of {len(conversations)} requests to {self.url} failed; first: {errors[failed[0]]}",
                results,
                errors,
            )
        return [r for r in results if r is not None]

    def complete(self, conversation: Conversation, max_tokens: int) -> str:
        """One reply, retrying transient failures (see the module docstring)."""
        body = json.dumps(
            {
                "model": self.model,
                "messages": conversation,
                "max_tokens": max_tokens,
                "temperature": self.config.temperature,
                "stream": False,
            }
        ).encode()
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        cfg = self.config
        for attempt in range(cfg.max_retries + 1):
            wait, problem = None, ""
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=cfg.timeout) as response:
                    return self._content(response.read())
            except urllib.error.HTTPError as exc:
                detail = _snippet(exc.read() if exc.fp else b"")
                if exc.code != 429 and exc.code < 500:
                    raise EndpointError(
                        f"{self.url} refused the request: HTTP {exc.code} {exc.reason} {detail}"
                        f"; check the URL, the model name {self.model!r} and the key in "
                        f"${cfg.api_key_env}"
                    ) from None
                problem = f"HTTP {exc.code} {exc.reason} {detail}".strip()
                wait = _retry_after(exc.headers.get("Retry-After") if exc.headers else None)
                if wait is not None and wait > cfg.max_backoff:
                    raise EndpointError(
                        f"{self.url} is rate-limiting (HTTP {exc.code}) and asks to wait {wait:.0f} s, "
                        f"more than max_backoff={cfg.max_backoff:g} s; rerun later (finished work "
                        "is cached) or raise max_backoff"
                    ) from None
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, OSError) as exc:
                reason = getattr(exc, "reason", exc)
                timed_out = isinstance(reason, (TimeoutError, socket.timeout))
                problem = (
                    f"no reply within timeout={cfg.timeout:g} s"
                    if timed_out
                    else f"cannot connect ({type(reason).__name__}: {reason})"
                )
            if attempt == cfg.max_retries:
                raise EndpointError(
                    f"{self.url} failed after {cfg.max_retries + 1} attempts: {problem}; check that "
                    "the server is running and reachable, or raise timeout / max_retries"
                )
            delay = min(cfg.backoff * 2**attempt, cfg.max_backoff)
            time.sleep(wait if wait is not None else delay * (1 + 0.1 * random.random()))
        raise AssertionError("unreachable")

    def _content(self, raw: bytes) -> str:
        try:
            reply = json.loads(raw)
            content = reply["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise MalformedReply(
                f"{self.url} sent a reply that is not a chat completion with "
                f"choices[0].message.content: {_snippet(raw)}"
            ) from None
        if not isinstance(content, str) or not content.strip():
            raise MalformedReply(
                f"{self.url} sent an empty reply (content={content!r}); the model may have refused or run out of tokens"
            )
        return content


def _snippet(raw: bytes, n: int = 200) -> str:
    text = raw.decode("utf-8", "replace").strip().replace("\n", " ")
    return repr(text[:n] + ("…" if len(text) > n else ""))


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date), None if absent/unreadable."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)


class LocalChat:
    """A local Hugging Face chat model (default: the packaged SmolLM2-135M-Instruct), batched.

    ``temperature`` 0 is greedy decoding; above 0 samples with ``torch`` seeded by ``seed`` per
    batch. The model loads on first use (``paperlib.sources.llm.load_model``: shared in-process)."""

    def __init__(
        self,
        model: str = "smollm2",
        batch_size: int = 8,
        temperature: float = 0.0,
        seed: int = 0,
        store=None,
        device: str | None = None,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"LocalChat batch_size must be a positive integer, got {batch_size!r}")
        if not 0 <= temperature <= 2:
            raise ValueError(f"LocalChat temperature must be in [0, 2], got {temperature!r}")
        self.name, self.batch_size, self.temperature, self.seed = model, batch_size, temperature, seed
        self.store, self.device = store, device

    @property
    def id(self) -> str:
        sampling = "greedy" if self.temperature == 0 else f"t{self.temperature:g}-s{self.seed}"
        return f"local:{self.name}:{sampling}"

    def _model(self):
        from paperlib.sources.llm import load_model

        return load_model(self.name, self.store, self.device)

    def render(self, conversation: Conversation) -> str:
        """The prompt text: the chat template, then any trailing assistant message to continue."""
        _, tokenizer = self._model()
        if conversation[-1]["role"] == "assistant":
            head = tokenizer.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
            return head + conversation[-1]["content"]
        return tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def complete_many(self, conversations: Sequence[Conversation], max_tokens: int) -> list[str]:
        check_conversations(conversations, max_tokens)
        model, tokenizer = self._model()
        ids = [tokenizer(self.render(c), add_special_tokens=False)["input_ids"] for c in conversations]
        limit = getattr(model.config, "max_position_embeddings", None)
        for i, seq in enumerate(ids):
            if limit and len(seq) + max_tokens > limit:
                raise ValueError(
                    f"conversation {i} has {len(seq)} prompt tokens; with max_tokens={max_tokens} it "
                    f"exceeds the model's {limit}-token context; use fewer or shorter examples"
                )
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        replies: list[str] = [""] * len(ids)
        dev = next(model.parameters()).device
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = max(len(ids[i]) for i in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids[i])) + ids[i] for i in batch], device=dev)
            mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in batch], device=dev)
            sampling = (
                {"do_sample": False} if self.temperature == 0 else {"do_sample": True, "temperature": self.temperature}
            )
            if self.temperature:
                torch.manual_seed(self.seed + start)
            with torch.no_grad():
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=mask,
                    max_new_tokens=max_tokens,
                    pad_token_id=pad,
                    top_p=None,
                    top_k=None,
                    **sampling,
                )
            for row, i in enumerate(batch):
                replies[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
        return replies
