"""The OpenAI-compatible HTTP server (FastAPI) on top of the engine.

The socket opens at once; the model loads on a background thread (`/health` answers 503 until
then). Every request is validated before a stream starts, so bad input gets a 4xx error object,
never a 5xx (the openai client retries those).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hybrid_runtime.cli_options import close_model, inert_note
from hybrid_runtime.engine.scheduler import CacheBudgetError, Engine, EngineClosedError, QueueFullError, RequestHandle
from hybrid_runtime.errors import ContextOverflowError, HybridError
from hybrid_runtime.server.metrics import Metrics
from hybrid_runtime.server.protocol import ParamError, UnknownModelError, check_model, parse_chat, parse_completion
from hybrid_runtime.server.responses import Output, sse

_MAX_BODY = 64 << 20


class AuthError(HybridError):
    """Missing or wrong API key (HTTP 401)."""


class NotReadyError(HybridError):
    """The model is still loading or failed to load (HTTP 503)."""


@dataclass(slots=True)
class ServerConfig:
    model_path: str
    model_name: str | None = None  # None: the file's stem
    api_key: str | None = None
    load_options: dict = field(default_factory=dict)
    max_queue: int = 16
    keepalive_s: float = 5.0
    max_batch: int = 16  # sequences decoded together
    cache_mib: float | None = None  # latent-cache budget of the running requests (None: see cache_budget_tokens)
    exact_reuse: bool = True  # reuse only prefixes that give the same bits (batch-invariant serving)

    @property
    def served_name(self) -> str:
        return self.model_name or default_model_name(self.model_path)


@dataclass(slots=True)
class ServerState:
    status: str = "loading"  # loading | ready | failed
    error: str | None = None
    model: object = None
    engine: Engine | None = None
    metrics: Metrics = field(default_factory=Metrics)
    started: float = field(default_factory=time.time)


def cache_budget_tokens(model, cfg: ServerConfig) -> int:
    """Latent-cache tokens the running requests may reserve together: --cache-mib, else
    max_batch full contexts within a quarter of the memory available now (at least one context)."""
    c = getattr(model, "config", None)
    if c is None:  # not a deepseek2 model (tests' stand-ins): full contexts
        return cfg.max_batch * model.n_ctx
    per_token = c.n_layer * (c.kv_lora_rank + c.qk_rope) * 4
    if cfg.cache_mib is not None:
        return max(1, int(cfg.cache_mib * 2**20 // per_token))
    import psutil

    fits = int(psutil.virtual_memory().available // 4 // per_token)
    return max(model.n_ctx, min(cfg.max_batch * model.n_ctx, fits))


def default_model_name(path: str) -> str:
    """`kimi-k2-Q4_K_M-00001-of-00013.gguf` → `kimi-k2-Q4_K_M`."""
    return re.sub(r"-\d{5}-of-\d{5}$", "", Path(path).stem)


# -- errors ----------------------------------------------------------------------------------------
_STATUS = [  # most specific first
    (UnknownModelError, 404, "invalid_request_error", "model_not_found"),
    (ContextOverflowError, 400, "invalid_request_error", "context_length_exceeded"),
    (CacheBudgetError, 400, "invalid_request_error", "cache_budget_exceeded"),
    (AuthError, 401, "invalid_request_error", "invalid_api_key"),
    (QueueFullError, 503, "server_error", "server_busy"),
    (NotReadyError, 503, "server_error", "model_not_ready"),
    (EngineClosedError, 503, "server_error", "shutting_down"),
    (HybridError, 400, "invalid_request_error", "invalid_value"),
]


def error_body(exc: BaseException) -> tuple[int, dict]:
    for cls, status, kind, code in _STATUS:
        if isinstance(exc, cls):
            param = getattr(exc, "param", None)
            code = getattr(exc, "code", code)
            return status, {"error": {"message": str(exc), "type": kind, "param": param, "code": code}}
    print(f"hybrid-runtime: internal error: {exc!r}", file=sys.stderr, flush=True)
    return 500, {"error": {"message": "internal server error", "type": "server_error", "param": None, "code": None}}


def error_response(exc: BaseException) -> JSONResponse:
    status, body = error_body(exc)
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _http_error(status: int, message: str) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": None}}, status_code=status)


# -- the app ---------------------------------------------------------------------------------------
def create_app(cfg: ServerConfig, loader: Callable | None = None,
               on_load_error: Callable[[str], None] | None = None) -> FastAPI:
    """The FastAPI app; `loader(path, **options)` defaults to hybrid_runtime.api.load."""
    state = ServerState()

    async def lifespan(app):
        threading.Thread(target=_load_model, args=(state, cfg, loader, on_load_error), daemon=True,
                         name="hybrid-load").start()
        yield
        if state.engine is not None:
            state.engine.close(timeout=2.0)
        if state.model is not None:
            failed = close_model(state.model)  # writes --expert-profile, closes --record-routing
            if failed:
                print(f"hybrid-runtime: error: {failed}", file=sys.stderr, flush=True)

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hr = state
    _install_error_handlers(app)
    _install_routes(app, cfg, state)
    return app


def _load_model(state: ServerState, cfg: ServerConfig, loader, on_load_error) -> None:
    if loader is None:
        from hybrid_runtime.api import load as loader
    t0 = time.perf_counter()
    try:
        model = loader(cfg.model_path, **cfg.load_options)
        state.engine = Engine(model, max_queue=cfg.max_queue, max_running=cfg.max_batch,
                              cache_tokens=cache_budget_tokens(model, cfg), pool_size=max(2, cfg.max_batch),
                              exact_reuse=cfg.exact_reuse)
        state.model = model
        state.status = "ready"
        print(f"hybrid-runtime: model '{cfg.served_name}' loaded in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
        note = inert_note(model)
        if note:
            print(f"hybrid-runtime: note: {note}", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001 - report any failure, the server cannot serve without it
        state.status, state.error = "failed", str(e) if isinstance(e, HybridError) else repr(e)
        print(f"hybrid-runtime: could not load the model: {state.error}", file=sys.stderr, flush=True)
        if on_load_error is not None:
            on_load_error(state.error)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc):
        return _http_error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request, exc):
        return _http_error(400, "invalid request")

    @app.exception_handler(HybridError)
    async def hybrid_error(request, exc):
        return error_response(exc)


async def _read_json(request: Request) -> dict:
    raw = await request.body()
    if len(raw) > _MAX_BODY:
        raise ParamError("the request body is too large", None)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ParamError("the request body is not valid JSON", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise ParamError("the request body must be a JSON object", None)
    return body


def _check_auth(cfg: ServerConfig, request: Request) -> None:
    if cfg.api_key is None:
        return
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
        raise AuthError("Incorrect or missing API key; send it as 'Authorization: Bearer KEY'")


def _ready(state: ServerState) -> Engine:
    if state.status == "loading":
        raise NotReadyError("the model is still loading; retry shortly")
    if state.status == "failed":
        raise NotReadyError(f"the model failed to load: {state.error}")
    return state.engine


def _install_routes(app: FastAPI, cfg: ServerConfig, state: ServerState) -> None:
    name = cfg.served_name

    @app.get("/health")
    async def health():
        if state.status == "ready":
            return {"status": "ok"}
        body = {"status": state.status} | ({"error": state.error} if state.error else {})
        return JSONResponse(body, status_code=503)

    @app.get("/metrics")
    async def metrics(request: Request):
        _check_auth(cfg, request)
        e = state.engine
        text = state.metrics.render(e.stats() if e else None, state.status == "ready")
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        _check_auth(cfg, request)
        return {"object": "list", "data": [_model_card(name, state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        _check_auth(cfg, request)
        if model_id != name:
            raise UnknownModelError(f"The model '{model_id}' does not exist; this server serves '{name}'")
        return _model_card(name, state)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _generate(request, cfg, state, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(request, cfg, state, "completion")


def _model_card(name: str, state: ServerState) -> dict:
    card = {"id": name, "object": "model", "created": int(state.started), "owned_by": "hybrid_runtime"}
    if state.model is not None:
        card["context_length"] = state.model.n_ctx
    return card


# -- generation ------------------------------------------------------------------------------------
async def _generate(request: Request, cfg: ServerConfig, state: ServerState, kind: str):
    endpoint = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    t0 = time.perf_counter()
    try:
        _check_auth(cfg, request)
        body = await _read_json(request)
        engine = _ready(state)
        check_model(body, cfg.served_name)
        parse = parse_chat if kind == "chat" else parse_completion
        req = parse(body, engine.tokenizer, engine.model.n_ctx)
        handle = engine.submit(req.prompt, req.params, loop=asyncio.get_running_loop(), constraint=req.constraint)
    except Exception as e:  # noqa: BLE001 - every failure becomes an error object
        resp = error_response(e)
        state.metrics.count_request(endpoint, resp.status_code)
        return resp
    state.metrics.count_request(endpoint, 200)
    out = Output(req, engine.tokenizer, cfg.served_name)
    if req.stream:
        return StreamingResponse(_stream(request, handle, out, state, cfg.keepalive_s, t0), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return await _complete(request, handle, out, state, t0)


async def _complete(request: Request, handle: RequestHandle, out: Output, state: ServerState, t0: float):
    ttft, step = None, None
    try:
        while True:
            step = await handle.aget(timeout=1.0)
            if step is None:
                if await request.is_disconnected():
                    handle.cancel()
                    state.metrics.finished(None, time.perf_counter() - t0, ttft, cancelled=True)
                    return JSONResponse({}, status_code=499)
                continue
            ttft = ttft if ttft is not None or step.token is None else time.perf_counter() - t0
            out.on_step(step)
            if step.finish_reason is not None:
                break
    except Exception as e:  # noqa: BLE001
        handle.cancel()
        return error_response(e)
    finally:
        if step is None or step.finish_reason is None:
            handle.cancel()
    state.metrics.finished(step.stats, time.perf_counter() - t0, ttft, cancelled=step.finish_reason == "cancelled")
    return JSONResponse(out.response(step.finish_reason, step.stats))


async def _stream(request: Request, handle: RequestHandle, out: Output, state: ServerState, keepalive_s: float, t0: float):
    ttft, finish, stats = None, None, None
    try:
        for c in out.first_chunks():
            yield sse(c)
        while finish is None:
            step = await handle.aget(timeout=keepalive_s)
            if step is None:
                if await request.is_disconnected():
                    return
                yield ": keep-alive\n\n"
                continue
            ttft = ttft if ttft is not None or step.token is None else time.perf_counter() - t0
            for c in out.on_step(step):
                yield sse(c)
            if step.finish_reason is not None:
                finish, stats = step.finish_reason, step.stats
                for c in out.final_chunks(finish, stats):
                    yield sse(c)
                yield sse("[DONE]")
    except HybridError as e:
        yield sse(error_body(e)[1])
        yield sse("[DONE]")
    finally:
        if finish is None:
            handle.cancel()
        state.metrics.finished(stats, time.perf_counter() - t0, ttft, cancelled=finish in (None, "cancelled"))
