"""The OpenAI-compatible server as a real process, driven by the `openai` client and httpx."""

import json
import threading
import time

import httpx
import openai
import pytest
from serve_process import serve_process

from hybrid_runtime.synth import cached_model

KEY = "test-key"
N_CTX = 4096
LONG = 3000  # max_tokens of requests that must be cancelled or rejected before they finish
# ... and they must not end early at an end-of-generation token (the random model samples one now and then)
NO_EOS = {"ignore_eos": True}


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    return cached_model("kimi-k2-tiny", "Q4_K_M", tmp_path_factory.getbasetemp() / "models")[0]


@pytest.fixture(scope="module")
def server(model_path):
    # a batch of one and a queue of one: the queue test fills both with two requests (batching has
    # its own server in test_batching.py)
    args = ("--n-ctx", str(N_CTX), "--max-batch", "1", "--max-queue", "1", "--api-key", KEY, "--model-name", "tiny",
            "--threads", "1")
    with serve_process(model_path, *args) as (base, _, _):
        yield base


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


def cancelled_count(base: str) -> float:
    text = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).text
    line = next(l for l in text.splitlines() if l.startswith("hybrid_runtime_requests_cancelled_total"))
    return float(line.split()[-1])


def wait_cancelled(base: str, at_least: float, limit: float = 30.0) -> None:
    deadline = time.monotonic() + limit
    while cancelled_count(base) < at_least:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.1)


MSG = [{"role": "user", "content": "Tell me a story."}]


def test_plain_chat(client):
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=8, seed=1)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_streaming_chat_shape(client):
    chunks = list(client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, seed=2, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    with_choice = [c for c in chunks if c.choices]
    assert with_choice[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in with_choice[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 6


def test_sse_ends_with_done(server):
    body = {"model": "tiny", "messages": MSG, "max_tokens": 3, "stream": True}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = [l for l in r.iter_lines() if l]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[0][6:])["choices"][0]["delta"]["role"] == "assistant"


def test_seed_determinism_and_stop(client):
    def run(**kw):
        r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=24, seed=7, temperature=1.0, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason

    text, _ = run()
    assert run()[0] == text
    stop = text[8:11]
    assert len(stop) == 3
    stopped, reason = run(stop=[stop])
    assert stopped == text[: text.index(stop)]
    assert reason == "stop"


def test_completions_endpoint(client):
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, seed=3, logprobs=2)
    assert r.object == "text_completion" and r.usage.completion_tokens <= 5
    assert len(r.choices[0].logprobs.tokens) == r.usage.completion_tokens or r.choices[0].finish_reason == "stop"
    pieces = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, seed=3, stream=True))
    assert "".join(c.choices[0].text for c in pieces if c.choices) == r.choices[0].text


def test_invalid_requests(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=MSG, n=2)
    assert e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSG, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=MSG)
    bad = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="tiny", messages=MSG)
    r = httpx.post(server + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [', timeout=10,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.post(server + "/v1/chat/completions", json=[1, 2], timeout=10, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400


def test_over_context_is_400_before_streaming(client):
    long = [{"role": "user", "content": "word " * (N_CTX + 100)}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=long, stream=True)
    assert e.value.body["code"] == "context_length_exceeded"


def test_health_and_metrics(server):
    assert httpx.get(server + "/health", timeout=5).json() == {"status": "ok"}
    assert httpx.get(server + "/metrics", timeout=5).status_code == 401
    text = httpx.get(server + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=5).text
    for name in ("requests_total", "prompt_tokens_total", "generated_tokens_total", "queue_length",
                 "request_duration_seconds_count"):
        assert f"hybrid_runtime_{name}" in text


def test_disconnect_cancels_generation(client, server):
    before = cancelled_count(server)
    body = {"model": "tiny", "messages": MSG, "max_tokens": LONG, "stream": True, **NO_EOS}
    with httpx.stream("POST", server + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i >= 6:
                break
    wait_cancelled(server, before + 1)
    r = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_queue_full_is_503(client, server):
    before = cancelled_count(server)
    running = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=LONG, stream=True,
                                             extra_body=NO_EOS)
    next(iter(running))  # the role chunk: the request is in the engine
    waiting = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=LONG, stream=True,
                                             extra_body=NO_EOS)
    try:
        with pytest.raises(openai.InternalServerError) as e:
            client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4)
        assert e.value.status_code == 503
        assert e.value.body["code"] == "server_busy"
    finally:
        running.close()
        waiting.close()
    wait_cancelled(server, before + 2)
    assert client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2).choices


# -- in process: /health while the model loads -------------------------------------------------------
def test_health_503_while_loading_and_after_failure():
    from fastapi.testclient import TestClient

    from hybrid_runtime.errors import ModelFormatError
    from hybrid_runtime.server.app import ServerConfig, create_app

    gate = threading.Event()

    def slow_loader(path, **opts):
        gate.wait(10)
        raise ModelFormatError("not a GGUF file")

    app = create_app(ServerConfig("/nowhere/model.gguf"), loader=slow_loader)
    with TestClient(app) as c:
        assert c.get("/health").status_code == 503
        r = c.post("/v1/chat/completions", json={"messages": MSG})
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready"
        assert c.get("/v1/models").json()["data"][0]["id"] == "model"
        gate.set()
        deadline = time.monotonic() + 10
        while c.get("/health").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.05)
        r = c.get("/health")
        assert r.status_code == 503 and "not a GGUF" in r.json()["error"]
        assert c.get("/nope").json()["error"]["type"] == "invalid_request_error"


def test_shutdown_closes_the_model(capsys):
    """Leaving the app closes the engine, then the model (which writes --expert-profile); a failure is one line."""
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from hybrid_runtime.errors import HybridError
    from hybrid_runtime.server.app import ServerConfig, create_app

    closed = []

    def close():
        closed.append(True)
        raise HybridError("could not write the expert profile /x/p.json: No space left on device")

    fake = SimpleNamespace(tokenizer=None, new_cache=lambda: None, close=close, n_ctx=64)
    app = create_app(ServerConfig("/nowhere/model.gguf"), loader=lambda path, **opts: fake)
    with TestClient(app) as c:
        deadline = time.monotonic() + 10
        while c.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not closed
    assert closed == [True]
    err = capsys.readouterr().err
    assert "hybrid-runtime: error: could not write the expert profile /x/p.json" in err and "Traceback" not in err


def test_tools_accepted_and_bad_tools_rejected(client):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    r = client.chat.completions.create(model="tiny", messages=MSG, tools=tools, max_tokens=4, seed=1)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    history = MSG + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "functions.get_weather:0", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "functions.get_weather:0", "content": "sunny"}]
    r = client.chat.completions.create(model="tiny", messages=history, tools=tools, tool_choice="auto", max_tokens=4)
    assert r.choices
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=MSG, tools=tools,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])


def test_keep_alive_comments_during_a_long_prefill(model_cache):
    """While the prompt is being processed, the SSE stream sends `: keep-alive` comments."""
    import time as _time

    from fastapi.testclient import TestClient

    import hybrid_runtime as hr
    from hybrid_runtime.server.app import ServerConfig, create_app
    from hybrid_runtime.synth import cached_model

    path, _ = cached_model("kimi-k2-tiny", "Q4_K_M", model_cache)

    def slow_loader(p, **opts):
        m = hr.load(p, **opts)
        forward = m.forward

        def slow_forward(ids, cache, all_logits=False):
            if len(ids) > 1:  # the prefill
                _time.sleep(0.5)
            return forward(ids, cache, all_logits)

        segments = m.forward_segments

        def slow_segments(segs, caches):  # a short prompt joins the decode step through here
            if max(map(len, segs)) > 1:
                _time.sleep(0.5)
            return segments(segs, caches)

        m.forward, m.forward_segments = slow_forward, slow_segments
        return m

    app = create_app(ServerConfig(str(path), keepalive_s=0.05, load_options={"threads": 1}), loader=slow_loader)
    with TestClient(app) as c:
        for _ in range(200):
            if c.get("/health").status_code == 200:
                break
            _time.sleep(0.05)
        body = {"model": path.stem, "messages": [{"role": "user", "content": "hello there"}],
                "max_tokens": 2, "stream": True}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            text = "".join(r.iter_text())
    assert r.status_code == 200
    assert ": keep-alive" in text
    assert text.rstrip().endswith("data: [DONE]")
