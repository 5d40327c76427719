"""The published OpenAPI document (``GET /schema/openapi.json``): Litestar's, completed where it cannot see.

Litestar builds the document from the route handlers. Two things it cannot know are filled in here from
the msgspec types the service really encodes and decodes (``service/schemas.py``):

- request bodies: the answer endpoints read and validate their JSON themselves (``decode_body``, to name
  the offending field), so their ``requestBody`` is added from ``AnswerRequest`` / ``ChatCompletionRequest``;
  their 200 responses are the JSON answer or, with ``stream: true``, an event stream;
- errors: every error response of the service has the shape ``ErrorResponse`` (``service/http_errors.py``),
  so each operation's ``default`` response is that, replacing Litestar's generic 400. ``/ready`` answers 503
  with its own status object while loading.
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec
from litestar import Request
from litestar.openapi.plugins import JsonRenderPlugin
from persona_router.service.schemas import (
    AnswerRequest,
    AnswerResponse,
    ChatCompletion,
    ChatCompletionRequest,
    ErrorResponse,
)

SCHEMA_PATH = "/schema"
_REF = "#/components/schemas/{name}"
_BODIES: dict[tuple[str, str], tuple[type[Any], type[Any]]] = {
    ("/v1/answer", "post"): (AnswerRequest, AnswerResponse),
    ("/v1/chat/completions", "post"): (ChatCompletionRequest, ChatCompletion),
}
_READY_503 = {"type": "object", "required": ["status"], "properties": {
    "status": {"type": "string", "enum": ["loading", "warming up", "failed"]}, "error": {"type": "string"}}}


def complete(schema: dict[str, Any]) -> dict[str, Any]:
    """Litestar's document with request bodies, answer responses and the error shape filled in."""
    doc = copy.deepcopy(schema)
    types = [t for pair in _BODIES.values() for t in pair] + [ErrorResponse]
    refs, components = msgspec.json.schema_components(types, ref_template=_REF)
    named = dict(zip(types, refs, strict=True))
    doc.setdefault("components", {}).setdefault("schemas", {}).update(components)
    error = {"description": "Error: {error: {message, type, field?, param?, code?, ...}}",
             "content": {"application/json": {"schema": named[ErrorResponse]}}}
    for path, item in doc.get("paths", {}).items():
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            responses = {code: r for code, r in operation["responses"].items() if code.startswith("2")}
            body = _BODIES.get((path, method))
            if body is not None:
                request_type, response_type = body
                operation["requestBody"] = {"required": True,
                                            "content": {"application/json": {"schema": named[request_type]}}}
                responses["200"] = {"description": "The answer; with `stream: true` a text/event-stream instead",
                                    "content": {"application/json": {"schema": named[response_type]},
                                                "text/event-stream": {"schema": {
                                                    "description": "Server-Sent Events whose data are JSON "
                                                    "objects (see the README)"}}}}
            if path.startswith("/v1/admin/"):  # no body needed, but the JSON content type is (cross-site guard)
                operation["requestBody"] = {"required": False, "description": "Send `Content-Type: application/json`"
                                            " (an empty object will do)", "content": {"application/json": {
                                                "schema": {"type": "object"}}}}
            if path == "/ready":
                responses["503"] = {"description": "Still loading or warming up",
                                    "content": {"application/json": {"schema": _READY_503}}}
            responses["default"] = error
            operation["responses"] = responses
    return doc


class CompletedJsonRenderPlugin(JsonRenderPlugin):
    """Serves ``complete(schema)`` at ``/schema/openapi.json`` (computed once)."""

    def __init__(self) -> None:
        super().__init__(path="/openapi.json")
        self._rendered: bytes | None = None

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        if self._rendered is None:
            self._rendered = msgspec.json.encode(complete(openapi_schema))
        return self._rendered


def openapi_config(version: str) -> Any:
    from litestar.openapi import OpenAPIConfig

    return OpenAPIConfig(title="persona-router", version=version, path=SCHEMA_PATH,
                         render_plugins=[CompletedJsonRenderPlugin()],
                         description="Answers questions in the style of the asker's persona; OpenAI-compatible "
                         "chat completions; admin endpoints for the adapters.")
