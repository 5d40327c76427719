"""OpenAI-compatible endpoints: ``POST /v1/chat/completions`` and ``GET /v1/models``.

``model`` is ``persona:<name>`` for an explicit persona or ``persona:auto`` to infer it from the last user
message. The last user message is the question; the persona supplies the system prompt, so client system
messages and earlier turns are not used. Omitted ``temperature`` means greedy (OpenAI's default is 1).
The routing decision travels in the extra field ``persona_routing`` of the response (and of the first and
last chunk when streaming).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from litestar import Request, Response, get, post
from litestar.response import Stream
from persona_router.core.errors import InvalidRequestError, PersonaRouterError
from persona_router.service.answering import Running
from persona_router.service.http_errors import error_body
from persona_router.service.schemas import (
    AnswerRequest,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatMessage,
    Choice,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
    ResponseMessage,
    decode_body,
    sse,
)
from persona_router.service.state import service

MODEL_PREFIX = "persona:"
AUTO = "auto"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def parse_model(model: str) -> str | None:
    """``persona:auto`` -> None (infer), ``persona:NAME`` -> NAME; anything else is a 400 on ``model``."""
    if not model.startswith(MODEL_PREFIX) or not model[len(MODEL_PREFIX):]:
        raise InvalidRequestError(f"{model!r} is not a model of this server; use 'persona:auto' or "
                                  "'persona:<name>' (GET /v1/models lists them)", field="model")
    name = model[len(MODEL_PREFIX):]
    return None if name == AUTO else name


def last_user_text(messages: list[ChatMessage]) -> str:
    for message in reversed(messages):
        if message.role != "user":
            continue
        if isinstance(message.content, str):
            return message.content
        if isinstance(message.content, list):
            return "\n".join(part.text for part in message.content if part.type == "text" and part.text)
        break
    raise InvalidRequestError("needs a message with role 'user' and text content", field="messages")


def to_input(body: ChatCompletionRequest) -> AnswerRequest:
    """The chat request as the ``/v1/answer`` request it amounts to (the question is the last user message)."""
    if body.n not in (None, 1):
        raise InvalidRequestError(f"{body.n} is not supported; only n=1", field="n")
    if body.stop:
        raise InvalidRequestError("stop sequences are not supported", field="stop")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return AnswerRequest(
        question=last_user_text(body.messages), persona=parse_model(body.model), max_new_tokens=max_tokens,
        temperature=0.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed, user=body.user)


def routing(running: Running) -> dict[str, Any]:
    extra: dict[str, Any] = {"decision": running.decision.to_json(), "adapter": running.adapter}
    if running.assignment is not None:
        extra["ab"] = running.assignment.to_json()
    if running.finished is not None:
        extra["timings"] = running.finished.timings
    return extra


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
    state = service(request)
    body = decode_body(await request.body(), ChatCompletionRequest)
    running = await state.answerer.start(to_input(body), endpoint="chat")
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chunks(running, completion_id, created, body.model, include_usage=include_usage)
        return Stream(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        finished = await running.collect()
    finally:
        running.close(cancel=True)
    choice = Choice(index=0, message=ResponseMessage(role="assistant", content=finished.answer),
                    finish_reason=_finish_reason(finished.finish_reason))
    return Response(ChatCompletion(id=completion_id, created=created, model=body.model, choices=[choice],
                                   usage=finished.usage, persona_routing=routing(running)))


async def _chunks(running: Running, completion_id: str, created: int, model: str, *,
                  include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(delta: Delta, finish: str | None = None, **extra: Any) -> bytes:
        return sse(ChatCompletionChunk(id=completion_id, created=created, model=model,
                                       choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish)], **extra))

    yield chunk(Delta(role="assistant", content=""), persona_routing=routing(running))
    try:
        async for piece in running.tokens():
            yield chunk(Delta(content=piece))
    except (TimeoutError, PersonaRouterError) as exc:  # headers are sent: report in-band as OpenAI does
        yield sse({"error": error_body(exc)})
        yield sse("[DONE]")
        return
    finished = running.finished
    assert finished is not None
    yield chunk(Delta(), _finish_reason(finished.finish_reason), persona_routing=routing(running))
    if include_usage:
        yield sse(ChatCompletionChunk(id=completion_id, created=created, model=model, choices=[],
                                      usage=finished.usage))
    yield sse("[DONE]")


@get("/v1/models")
async def list_models(request: Request[Any, Any, Any]) -> ModelList:
    state = service(request)
    created = int(state.started_at)
    names = [AUTO, *state.pack.names]
    return ModelList(data=[ModelCard(id=f"{MODEL_PREFIX}{name}", created=created) for name in names])
