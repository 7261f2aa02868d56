"""Hostile clients against a real server process (server/validation.py and the app behind it):
bad requests get 4xx OpenAI error bodies, never a 5xx or a hang; load, abandonment, slow clients."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest
from serve_process import serve_process

from hybrid_runtime.server.validation import MAX_BODY, allowed_hosts, strict_json
from hybrid_runtime.synth import cached_model

KEY = "abuse-key"
N_CTX = 256
AUTH = {"Authorization": f"Bearer {KEY}"}
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = cached_model("kimi-k2-tiny", "Q4_K_M", tmp_path_factory.getbasetemp() / "models")[0]
    args = ("--n-ctx", str(N_CTX), "--max-queue", "4", "--api-key", KEY, "--model-name", "tiny", "--threads", "1")
    with serve_process(model, *args) as running:
        yield running


def post(base, body, path="/v1/chat/completions", timeout=30, headers=None, raw: bytes | None = None):
    content = raw if raw is not None else json.dumps(body).encode()
    h = {**AUTH, "Content-Type": "application/json", **(headers or {})}
    return httpx.post(base + path, content=content, headers=h, timeout=timeout)


def chat(**kw):
    return {"model": "tiny", "messages": MSG, "max_tokens": 2, **kw}


BAD_CHAT = {
    "messages null": chat(messages=None), "messages a string": chat(messages="hi"), "messages [123]": chat(messages=[123]),
    "messages [{}]": chat(messages=[{}]), "messages empty": chat(messages=[]),
    "unknown role": chat(messages=[{"role": "wizard", "content": "x"}]),
    "content a number": chat(messages=[{"role": "user", "content": 5}]),
    "temperature a string": chat(temperature="hot"), "max_tokens a string": chat(max_tokens="5"),
    "stream a string": chat(stream="yes"), "stop a number": chat(stop=5), "model a list": chat(model=["tiny"]),
    "temperature -1": chat(temperature=-1), "temperature 3": chat(temperature=3), "top_p 2": chat(top_p=2),
    "max_tokens 0": chat(max_tokens=0), "max_tokens -5": chat(max_tokens=-5), "n 2": chat(n=2),
    "presence_penalty 5": chat(presence_penalty=5), "top_k -1": chat(top_k=-1), "seed a float": chat(seed=1.5),
    "over the context": chat(messages=[{"role": "user", "content": "word " * (2 * N_CTX)}]),
    "a list body": [1, 2],
}
BAD_RAW = {
    "malformed JSON": b'{"model": "tiny", "messages": [',
    "NaN temperature": b'{"model": "tiny", "messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    "invalid UTF-8": b'{"model": "tiny", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
    "deep nesting": b"[" * 100_000 + b"]" * 100_000,
    "empty body": b"",
}
BAD_COMPLETION = {
    "empty prompt": {"model": "tiny", "prompt": "", "max_tokens": 2},
    "token id out of the vocabulary": {"model": "tiny", "prompt": [1, 10 ** 9], "max_tokens": 2},
    "negative token id": {"model": "tiny", "prompt": [1, -1], "max_tokens": 2},
    "prompt a dict": {"model": "tiny", "prompt": {"a": 1}, "max_tokens": 2},
    "over the context": {"model": "tiny", "prompt": [1] * (N_CTX + 10), "max_tokens": 2},
}


def _is_openai_error(r, status_range=range(400, 500)) -> None:
    assert r.status_code in status_range, (r.status_code, r.text[:300])
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["type"] == "invalid_request_error"


@pytest.mark.parametrize("case", sorted(BAD_CHAT))
def test_bad_chat_requests_are_4xx(server, case):
    _is_openai_error(post(server[0], BAD_CHAT[case]))


@pytest.mark.parametrize("case", sorted(BAD_RAW))
def test_bad_bodies_are_400(server, case):
    _is_openai_error(post(server[0], None, raw=BAD_RAW[case]), range(400, 401))


@pytest.mark.parametrize("case", sorted(BAD_COMPLETION))
def test_bad_completion_requests_are_4xx(server, case):
    _is_openai_error(post(server[0], BAD_COMPLETION[case], path="/v1/completions"))


def test_wrong_content_type_is_415(server):
    r = httpx.post(server[0] + "/v1/chat/completions", content=json.dumps(chat()), timeout=10,
                   headers={**AUTH, "Content-Type": "text/plain"})
    _is_openai_error(r, range(415, 416))


def test_huge_max_tokens_is_a_400_and_a_large_one_is_clamped(server):
    r = post(server[0], chat(max_tokens=10 ** 12), timeout=120)
    _is_openai_error(r, range(400, 401))
    assert "max_tokens" in r.json()["error"]["message"]
    r = post(server[0], chat(max_tokens=N_CTX), timeout=120)  # fits the context, not the room left
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= N_CTX


def _raw_request(port: int, head: bytes, body: bytes = b"", timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(head + body)
        out = b""
        while b"\r\n\r\n" not in out:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def test_oversized_bodies_are_413(server):
    _, port, _ = server
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {KEY}\r\nContent-Length: {MAX_BODY + 1}\r\n\r\n").encode()
    assert _raw_request(port, head).startswith(b"HTTP/1.1 413")
    chunked = head.replace(f"Content-Length: {MAX_BODY + 1}".encode(), b"Transfer-Encoding: chunked")
    piece = b"x" * (1 << 20)
    body = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(MAX_BODY // len(piece) + 2))
    try:
        reply = _raw_request(port, chunked, body)
    except (ConnectionResetError, BrokenPipeError):  # refused while still sending
        return
    assert reply.startswith(b"HTTP/1.1 413")


def test_host_header_is_checked_on_loopback(server):
    base = server[0]
    r = httpx.get(base + "/v1/models", headers={**AUTH, "Host": "evil.example:8000"}, timeout=10)
    assert r.status_code == 403 and r.json()["error"]["code"] == "invalid_host"
    assert httpx.get(base + "/health", headers={"Host": "attacker.test"}, timeout=10).status_code == 403
    for host in ("localhost", f"127.0.0.1:{server[1]}", "[::1]:80"):
        assert httpx.get(base + "/v1/models", headers={**AUTH, "Host": host}, timeout=10).status_code == 200
    assert allowed_hosts("0.0.0.0") is None  # exposed on purpose: no check


def test_api_key_on_v1_routes(server):
    base = server[0]
    for h in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Bearer " + KEY + "x"}):
        r = httpx.post(base + "/v1/chat/completions", json=chat(), headers=h, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(base + "/v1/models", headers=h, timeout=10).status_code == 401
    assert httpx.get(base + "/v1/models", headers=AUTH, timeout=10).status_code == 200


def test_the_key_is_compared_in_constant_time(monkeypatch):
    import hmac

    from hybrid_runtime.server import app as server_app

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(server_app.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    cfg = server_app.ServerConfig("m.gguf", api_key="secret")

    class Req:
        headers = {"authorization": "Bearer guess"}

    with pytest.raises(server_app.AuthError):
        server_app._check_auth(cfg, Req())
    assert calls == [(b"guess", b"secret")]


def test_strict_json_refuses_constants_and_bad_bytes():
    assert strict_json(b'{"a": [1, 2.5, "x"]}') == {"a": [1, 2.5, "x"]}
    for raw in (b"NaN", b'{"a": Infinity}', b'"\xff"', b"[" * 50_000):
        with pytest.raises(Exception, match="JSON|UTF-8|nested"):
            strict_json(raw)


# -- under load ----------------------------------------------------------------------------------
def test_64_concurrent_clients_are_served_or_told_503(server):
    base = server[0]

    def one(_):
        return post(base, chat(max_tokens=4), timeout=120)

    with ThreadPoolExecutor(64) as pool:
        replies = list(pool.map(one, range(64)))
    codes = [r.status_code for r in replies]
    assert set(codes) <= {200, 503} and codes.count(200) >= 1, codes
    for r in replies:
        if r.status_code == 503:
            assert r.headers.get("retry-after") and r.json()["error"]["type"] == "server_error"


def test_abandoned_requests_then_a_new_one_is_served(server):
    base = server[0]

    def abandon(_):
        try:
            post(base, chat(max_tokens=N_CTX), timeout=0.5)
        except httpx.TimeoutException:
            pass

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(abandon, range(200)))
    deadline = time.monotonic() + 5.0  # the bound: served within 5 s (honouring Retry-After)
    while True:
        r = post(base, chat(max_tokens=2), timeout=max(0.1, deadline - time.monotonic()))
        if r.status_code != 503 or time.monotonic() + float(r.headers["retry-after"]) > deadline:
            break
        time.sleep(float(r.headers["retry-after"]))
    assert r.status_code == 200


def test_memory_stays_flat_over_1000_requests(server):
    base, _, proc = server
    rss = lambda: psutil.Process(proc.pid).memory_info().rss  # noqa: E731
    bodies = [chat(max_tokens=1), BAD_CHAT["unknown role"], {"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 1}]
    with httpx.Client(headers=AUTH, timeout=30) as c:
        def run(n):
            for i in range(n):
                path = "/v1/completions" if "prompt" in bodies[i % 3] else "/v1/chat/completions"
                assert c.post(base + path, json=bodies[i % 3]).status_code < 500
        run(200)  # warm: caches, allocator pools
        before = rss()
        run(1000)
        grown = rss() - before
    assert grown < 10 * (1 << 20), f"grew {grown / 2**20:.1f} MiB over 1,000 requests"


def test_slowloris_and_a_stalled_stream_reader_do_not_block_others(server):
    base, port, _ = server
    slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
    for s in slow:  # headers that never end, and a body that never comes
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    trickle = socket.create_connection(("127.0.0.1", port))
    trickle.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{").encode())
    stalled = socket.create_connection(("127.0.0.1", port))
    body = json.dumps(chat(max_tokens=N_CTX, stream=True)).encode()
    stalled.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)  # and never read
    try:
        for _ in range(3):
            assert post(base, chat(max_tokens=2), timeout=60).status_code == 200
            assert httpx.get(base + "/health", timeout=10).status_code == 200
    finally:
        for s in [*slow, trickle, stalled]:
            s.close()


# -- schema-driven fuzzing -------------------------------------------------------------------------
def _bounded(case):
    """Keep each generated request short: no streams, at most 4 new tokens."""
    if isinstance(case.body, dict):
        case.body.pop("stream", None)
        case.body["max_tokens"] = 4
    return case


def test_schemathesis_finds_no_5xx(server):
    """Requests generated from the server's own OpenAPI document: never a 5xx (bounded count)."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    schema = schemathesis.openapi.from_url(server[0] + "/openapi.json")
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) == 4
    strategy = st.one_of([op.as_strategy() for op in operations]).map(_bounded)

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(strategy)
    def no_server_error(case):
        response = case.call(headers=AUTH, timeout=60)
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

    no_server_error()
