"""ChatEndpoint / ChatEndpointExplainer / JudgeSimilarity over real HTTP on loopback.

Failure modes (unreachable, silent, slow, malformed, empty, 429 with Retry-After, 5xx, 401) are
served by a small stdlib HTTP server that really answers that way. The test marked
``integration`` starts ``transformers serve`` on the packaged SmolLM2-135M-Instruct and checks
that the endpoint path gives the same greedy text as the in-process model; it needs
``transformers[serving]`` (fastapi, uvicorn, openai, rich) in ``$PAPERLIB_SERVE_PYTHON`` or in this
interpreter, and takes one to two minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from paperlib.explain import (
    ChatEndpoint,
    ChatEndpointExplainer,
    EndpointConfig,
    EndpointError,
    Example,
    ExplainPrompt,
    JudgeSimilarity,
    LatentExamples,
    LocalChat,
    MalformedReply,
    PartialFailure,
    explain_latents,
    explanation_cache,
)
from paperlib.store import Store


def latent(i: int, token: str) -> LatentExamples:
    top = tuple(Example(f"in the year «{token}» the city grew", token, 3.0 - k, 10 * i + k) for k in range(3))
    return LatentExamples(i, top, (), 0.01)


class Handler(BaseHTTPRequestHandler):
    """POST /<mode>/v1/chat/completions answers as <mode> says (see the modes below)."""

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def reply(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def completion(self, content: str) -> None:
        body = {
            "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}],
        }
        self.reply(200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        mode = self.path.split("/")[1]
        server = self.server
        with server.lock:
            server.requests.append((mode, body, self.headers.get("Authorization")))
            seen = sum(1 for m, _, _ in server.requests if m == mode)
        text = body["messages"][-1]["content"]
        if mode == "slow":
            time.sleep(3)
        if mode == "malformed":
            return self.reply(200, b"<html>not json</html>")
        if mode == "nochoices":
            return self.reply(200, b'{"object": "chat.completion", "choices": []}')
        if mode == "empty":
            return self.completion("   ")
        if mode == "unauthorized":
            return self.reply(401, b'{"error": "invalid api key"}')
        if mode == "ratelimit" and seen == 1:
            return self.reply(429, b'{"error": "slow down"}', {"Retry-After": "1"})
        if mode == "ratelimit-long":
            return self.reply(429, b'{"error": "quota"}', {"Retry-After": "3600"})
        if mode == "flaky" and seen == 1:
            return self.reply(503, b"overloaded")
        if mode == "down":
            return self.reply(500, b"internal error")
        if "«bad»" in text:
            return self.reply(500, b"cannot handle this one")
        if "How similar" in text:
            return self.completion("no idea" if "gibberish" in text else "Score: 7/10")
        return self.completion("**Years of events**\nThe marked tokens are all years.")


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that timed out and left is expected
            super().handle_error(request, client_address)


@pytest.fixture(scope="module")
def server():
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.lock, httpd.requests = threading.Lock(), []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def endpoint(server, mode: str, **kw) -> EndpointConfig:
    settings = dict(model="test-model", timeout=2.0, max_retries=2, backoff=0.05, max_backoff=5.0, concurrency=2)
    settings.update(kw)
    return EndpointConfig(base_url=f"http://127.0.0.1:{server.server_port}/{mode}/v1", **settings)


def requests_of(server, mode: str) -> list:
    with server.lock:
        return [r for r in server.requests if r[0] == mode]


def test_explainer_reads_and_cleans_replies_and_sends_the_key(server, tmp_path):
    explainer = ChatEndpointExplainer(endpoint(server, "ok"), api_key="sk-test")
    assert explainer.explain([latent(0, "1999"), latent(1, "2001")]) == ["Years of events"] * 2
    _, body, auth = requests_of(server, "ok")[-1]
    assert auth == "Bearer sk-test" and body["model"] == "test-model" and body["temperature"] == 0
    assert "«2001»" in body["messages"][0]["content"] or "«1999»" in body["messages"][0]["content"]
    assert "sk-test" not in explainer.id


def test_unreachable_endpoint_names_the_url_after_retries():
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = ChatEndpoint(
        EndpointConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=1, backoff=0.01)
    )
    expected = rf"127\.0\.0\.1:{port}/v1/chat/completions failed after 2 attempts: cannot connect"
    with pytest.raises(EndpointError, match=expected):
        client.complete([{"role": "user", "content": "hi"}], 4)


def test_server_that_never_answers_times_out():
    with socket.socket() as silent:  # accepts connections (backlog) but never replies
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        client = ChatEndpoint(
            EndpointConfig(base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout=0.3, max_retries=1, backoff=0.01)
        )
        start = time.monotonic()
        with pytest.raises(EndpointError, match=r"no reply within timeout=0\.3 s"):
            client.complete([{"role": "user", "content": "hi"}], 4)
        assert time.monotonic() - start < 5


def test_slow_server_times_out(server):
    client = ChatEndpoint(endpoint(server, "slow", timeout=0.5, max_retries=0))
    with pytest.raises(EndpointError, match="no reply within timeout=0.5 s"):
        client.complete([{"role": "user", "content": "hi"}], 4)


@pytest.mark.parametrize(
    "mode, message",
    [("malformed", "not a chat completion.*html"), ("nochoices", "not a chat completion"), ("empty", "empty reply")],
)
def test_malformed_and_empty_replies_are_clear_errors_and_not_retried(server, mode, message):
    client = ChatEndpoint(endpoint(server, mode))
    with pytest.raises(MalformedReply, match=message) as info:
        client.complete([{"role": "user", "content": "hi"}], 4)
    assert f"/{mode}/v1/chat/completions" in str(info.value)
    assert len(requests_of(server, mode)) == 1


def test_rate_limit_honours_retry_after_then_succeeds(server):
    client = ChatEndpoint(endpoint(server, "ratelimit", backoff=0.01))
    start = time.monotonic()
    assert client.complete([{"role": "user", "content": "hi"}], 4).startswith("**Years")
    assert time.monotonic() - start >= 0.95  # waited the server's Retry-After: 1, not the 0.01 s back-off
    assert len(requests_of(server, "ratelimit")) == 2


def test_rate_limit_asking_too_long_a_wait_is_an_error(server):
    client = ChatEndpoint(endpoint(server, "ratelimit-long", max_backoff=5.0))
    with pytest.raises(EndpointError, match="asks to wait 3600 s, more than max_backoff=5 s"):
        client.complete([{"role": "user", "content": "hi"}], 4)


def test_server_errors_are_retried_with_backoff(server):
    assert ChatEndpoint(endpoint(server, "flaky")).complete([{"role": "user", "content": "hi"}], 4)
    assert len(requests_of(server, "flaky")) == 2
    with pytest.raises(EndpointError, match=r"failed after 3 attempts: HTTP 500"):
        ChatEndpoint(endpoint(server, "down")).complete([{"role": "user", "content": "hi"}], 4)
    assert len(requests_of(server, "down")) == 3


def test_client_errors_are_not_retried(server):
    with pytest.raises(EndpointError, match="refused the request: HTTP 401.*invalid api key"):
        ChatEndpoint(endpoint(server, "unauthorized")).complete([{"role": "user", "content": "hi"}], 4)
    assert len(requests_of(server, "unauthorized")) == 1


def test_bad_configuration_is_refused(monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.delenv("OPENAI_MODEL", raising=False)
    with pytest.raises(ValueError, match="base URL must start with http"):
        ChatEndpoint(EndpointConfig(model="m"))
    with pytest.raises(ValueError, match="no model named"):
        ChatEndpoint(EndpointConfig(base_url="http://127.0.0.1:1/v1"))
    with pytest.raises(ValueError, match="concurrency"):
        EndpointConfig(concurrency=0)
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/v1")
    monkeypatch.setenv("OPENAI_MODEL", "from-env")
    assert ChatEndpoint().model == "from-env"


def test_partial_failure_keeps_finished_explanations_and_the_next_run_resumes(server, tmp_path):
    store = Store(tmp_path)
    examples = [latent(0, "1999"), latent(1, "bad"), latent(2, "2001"), latent(3, "1871")]
    failing = ChatEndpointExplainer(endpoint(server, "partial", max_retries=1))
    with pytest.raises(EndpointError, match=r"(?s)1 of 4 requests.*3 of 4 explanations are saved"):
        explain_latents(failing, examples, "run-a", store=store, batch_size=4)
    cache = explanation_cache(failing, "run-a", store).load()
    assert sorted(cache) == ["latent:0", "latent:2", "latent:3"]

    before = len(requests_of(server, "partial"))
    examples[1] = latent(1, "1066")  # the contexts changed: its fingerprint differs, so it is explained anew
    texts = explain_latents(failing, examples, "run-a", store=store, batch_size=4)
    assert texts == ["Years of events"] * 4
    assert len(requests_of(server, "partial")) - before == 1  # only the missing latent was requested


def test_judge_parses_scores_records_nan_and_caches(server, tmp_path):
    judge = JudgeSimilarity(ChatEndpoint(endpoint(server, "ok")), store=Store(tmp_path))
    scores = judge(["years", "gibberish", "rivers", ""], ["dates", "rivers", "streams", "empty"])
    assert scores[0] == 7 and scores[2] == 7 and math.isnan(scores[1]) and math.isnan(scores[3])
    records = judge.cache().load()
    assert sorted(r["reply"] for r in records.values()) == ["Score: 7/10", "Score: 7/10", "no idea"]
    before = len(requests_of(server, "ok"))
    again = judge(["years", "gibberish"], ["dates", "rivers"])
    assert again[0] == 7 and math.isnan(again[1]) and len(requests_of(server, "ok")) == before


def test_judge_keeps_ratings_when_some_requests_fail(server, tmp_path):
    judge = JudgeSimilarity(ChatEndpoint(endpoint(server, "partial", max_retries=0)), store=Store(tmp_path))
    with pytest.raises(PartialFailure, match="ratings so far are saved"):
        judge(["years", "«bad»"], ["dates", "rivers"])
    assert len(judge.cache().load()) == 1


# ---------------------------------------------------------------- the real OpenAI-compatible server


def _serve_python() -> str:
    python = os.environ.get("PAPERLIB_SERVE_PYTHON", sys.executable)
    probe = subprocess.run(
        [python, "-c", "import fastapi, uvicorn, openai, rich, transformers"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        pytest.skip(
            f"`transformers serve` needs transformers[serving] (fastapi, uvicorn, openai, rich) in {python}; "
            "pip install them or point PAPERLIB_SERVE_PYTHON at a Python that has them"
        )
    return python


@pytest.fixture(scope="module")
def real_server(tmp_path_factory):
    from paperlib.sources.llm import load_tokenizer

    python = _serve_python()
    model_dir = load_tokenizer("smollm2").name_or_path  # the dequantised packaged model as an HF directory
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                python,
                "-m",
                "transformers.cli.transformers",
                "serve",
                model_dir,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--device",
                "cpu",
                "--log-level",
                "warning",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 240
        while True:
            if proc.poll() is not None:
                pytest.fail(f"transformers serve exited with {proc.returncode}:\n{Path(log).read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve did not become ready in 240 s:\n{Path(log).read_text()[-3000:]}")
            time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1", model_dir
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.integration
def test_real_openai_compatible_server_matches_the_local_model(real_server, tmp_path):
    base_url, model_dir = real_server
    config = EndpointConfig(base_url=base_url, model=model_dir, timeout=180, concurrency=2, max_retries=1)
    prompt = ExplainPrompt(n_top=3, n_quantile=0)
    explainer = ChatEndpointExplainer(config, prompt=prompt, max_tokens=12)
    examples = [latent(0, "1999"), latent(1, "Paris")]
    texts = explain_latents(explainer, examples, "real-server", store=Store(tmp_path), batch_size=2)
    assert all(isinstance(t, str) and t for t in texts)

    # Same weights, same chat template, greedy: the server's raw reply equals the in-process model's.
    conversation = prompt.conversation(examples[0])
    served = ChatEndpoint(config).complete(conversation, 12)
    local = LocalChat("smollm2").complete_many([conversation], 12)[0]
    assert served.strip() == local.strip()

    judge = JudgeSimilarity(ChatEndpoint(config), store=Store(tmp_path), max_tokens=6)
    scores = judge(texts, texts[::-1])
    replies = {r["key"]: r for r in judge.cache().load().values()}
    assert len(scores) == 2 and len(replies) == 2  # every reply recorded, a score wherever one could be read
    assert all(math.isnan(s) or 1 <= s <= 10 for s in scores)
