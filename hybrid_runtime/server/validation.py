"""Request hygiene in front of the app (plain ASGI): the Host header when bound to loopback (DNS
rebinding), the content type, the body size and read time, and strict JSON. Each refusal is an
OpenAI error object with a 4xx status; the app behind sees only well-formed JSON bodies.
"""

from __future__ import annotations

import asyncio
import json

from hybrid_runtime.server.openapi import openapi_document

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}
MAX_BODY = 16 << 20  # bytes; a 128K-token prompt as text is well under 1 MiB
BODY_TIMEOUT_S = 30.0  # a client that trickles its body (slowloris) is cut off after this


def allowed_hosts(bind_host: str) -> set[str] | None:
    """Host header names accepted when bound to loopback; None (no check) when exposed on purpose."""
    return set(LOOPBACK) if bind_host in LOOPBACK else None


def _host_name(value: str) -> str:
    if value.startswith("["):  # [::1]:8000
        return value.split("]")[0] + "]"
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class _Refused(Exception):
    def __init__(self, status: int, message: str, code: str):
        super().__init__(message)
        self.status, self.code = status, code


def strict_json(raw: bytes):
    """json.loads without NaN/Infinity, with invalid UTF-8 and absurd nesting as a 400."""
    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=no_constants)
    except UnicodeDecodeError:
        raise _Refused(400, "the request body is not valid UTF-8", "invalid_json") from None
    except RecursionError:
        raise _Refused(400, "the request body is nested too deeply", "invalid_json") from None
    except ValueError as e:
        raise _Refused(400, f"the request body is not valid JSON ({e})", "invalid_json") from None


class RequestGuard:
    """ASGI middleware: `RequestGuard(app, hosts=allowed_hosts(bind_host))`."""

    def __init__(self, app, hosts: set[str] | None = None, max_body: int = MAX_BODY,
                 body_timeout_s: float = BODY_TIMEOUT_S):
        self.app, self.hosts, self.max_body, self.body_timeout_s = app, hosts, max_body, body_timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            self._check_host(headers)
            if scope["method"] == "GET" and scope["path"] == "/openapi.json":
                return await _send_json(send, 200, openapi_document())
            if scope["method"] == "POST" and scope["path"].startswith("/v1/"):
                body = await self._read_body(headers, receive)
                receive = _replay(body, receive)
        except _Refused as e:
            return await _send_error(send, e)
        await self.app(scope, receive, send)

    def _check_host(self, headers: dict) -> None:
        host = headers.get("host")
        if self.hosts is not None and host is not None and _host_name(host.strip().lower()) not in self.hosts:
            raise _Refused(403, f"Host '{host[:100]}' is not allowed: this server is bound to loopback", "invalid_host")

    async def _read_body(self, headers: dict, receive) -> bytes:
        ctype = headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise _Refused(415, "the request body must be JSON (Content-Type: application/json)", "invalid_content_type")
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            raise _Refused(413, f"the request body is larger than {self.max_body} bytes", "body_too_large")
        chunks, size, more = [], 0, True
        try:
            async with asyncio.timeout(self.body_timeout_s):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise _Refused(400, "the client went away", "disconnected")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > self.max_body:
                        raise _Refused(413, f"the request body is larger than {self.max_body} bytes", "body_too_large")
                    chunks.append(chunk)
                    more = message.get("more_body", False)
        except TimeoutError:
            raise _Refused(408, f"the request body did not arrive within {self.body_timeout_s:g} s", "timeout") from None
        body = b"".join(chunks)
        strict_json(body)  # the app parses it again; here only well-formedness is judged
        return body


def _replay(body: bytes, original):
    """The body once, then the client's own messages (its disconnect cancels the generation)."""
    sent = False

    async def receive():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await original()

    return receive


async def _send_error(send, e: _Refused) -> None:
    await _send_json(send, e.status, {"error": {"message": str(e), "type": "invalid_request_error", "param": None,
                                                "code": e.code}})


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
