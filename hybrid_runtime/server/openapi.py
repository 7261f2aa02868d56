"""The server's OpenAPI document (served at /openapi.json): the request shapes the routes accept.
A schema-driven fuzzer (schemathesis) reads it in the tests and checks that nothing is a 5xx."""

from __future__ import annotations

_MESSAGE = {"type": "object", "required": ["role", "content"], "properties": {
    "role": {"type": "string", "enum": ["system", "developer", "user", "assistant", "tool"]},
    "content": {"type": "string"}}}
_SAMPLING = {
    "model": {"type": "string"}, "max_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2}, "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "top_k": {"type": "integer", "minimum": 0}, "min_p": {"type": "number", "minimum": 0, "maximum": 1},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "seed": {"type": "integer"}, "stream": {"type": "boolean"},
    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
}
_ERROR = {"description": "an OpenAI error object", "content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {"type": "object"}}}}}}


def _post(body: dict, summary: str) -> dict:
    return {"post": {"summary": summary, "security": [{"bearer": []}],
                     "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                     "responses": {"200": {"description": "the completion (JSON, or SSE when stream is true)"},
                                   "400": _ERROR, "401": _ERROR, "404": _ERROR, "413": _ERROR, "415": _ERROR,
                                   "503": _ERROR}}}


def openapi_document() -> dict:
    chat = {"type": "object", "required": ["messages"],
            "properties": {"messages": {"type": "array", "minItems": 1, "items": _MESSAGE}, **_SAMPLING}}
    completion = {"type": "object", "required": ["prompt"], "properties": {"prompt": {"oneOf": [
        {"type": "string"}, {"type": "array", "items": {"type": "integer", "minimum": 0}}]}, **_SAMPLING}}
    models = {"get": {"summary": "the served model", "security": [{"bearer": []}],
                      "responses": {"200": {"description": "a list with the served model"}, "401": _ERROR}}}
    return {
        "openapi": "3.0.3", "info": {"title": "hybrid_runtime", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {"/v1/chat/completions": _post(chat, "chat completion"),
                  "/v1/completions": _post(completion, "text completion"),
                  "/v1/models": models,
                  "/health": {"get": {"summary": "200 when ready, 503 while loading",
                                      "responses": {"200": {"description": "ready"}, "503": {"description": "loading"}}}}},
    }
