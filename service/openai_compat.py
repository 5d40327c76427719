"""OpenAI-compatible endpoints: ``POST /v1/chat/completions``, ``GET /v1/models`` and ``GET /v1/models/{id}``.

``model`` is ``persona:<name>`` for an explicit persona or ``persona:auto`` to infer it from the last user
message. The last user message is the question; the persona supplies the system prompt, so client system
messages and earlier turns are not used. Omitted ``temperature`` means greedy (OpenAI's default is 1).
The routing decision travels in the extra field ``persona_routing`` of the response (and of the first and
last chunk when streaming). ``stop`` strings end the answer (the engine stops there; they are not part of
the text, streamed or not). Errors name OpenAI's parameters (``max_tokens``, ``messages``, ``model``), and
an unknown model or persona is a 404 with code ``model_not_found``.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from litestar import Request, Response, get, post
from litestar.response import Stream
from persona_router.core.errors import InvalidRequestError, PersonaRouterError, UnknownPersonaError
from persona_router.core.names import AUTO
from persona_router.service.answering import Running
from persona_router.service.http_errors import ModelNotFoundError, error_body, read_body
from persona_router.service.protection import json_body_guard
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
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# Our request fields as OpenAI calls them, for the ``param`` of an error.
OPENAI_PARAMS = {"question": "messages", "context": "messages", "persona": "model", "max_new_tokens": "max_tokens"}
# Unsupported request fields: (is it set to something we cannot honour?, why).
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "tools": (lambda v: v is not None, "tool calls are not supported"),
    "tool_choice": (lambda v: v not in (None, "none"), "tool calls are not supported"),
    "functions": (lambda v: v is not None, "function calls are not supported"),
    "function_call": (lambda v: v not in (None, "none"), "function calls are not supported"),
    "response_format": (lambda v: v is not None and v.get("type") != "text",
                        "structured output is not supported (only response_format type 'text')"),
    "logprobs": (lambda v: bool(v), "log probabilities are not supported"),
    "top_logprobs": (lambda v: v is not None, "log probabilities are not supported"),
    "n": (lambda v: v not in (None, 1), "more than one choice per request is not supported (n=1)"),
}


def model_ids(personas: list[str]) -> list[str]:
    return [f"{MODEL_PREFIX}{name}" for name in (AUTO, *personas)]


def parse_model(model: str, personas: list[str]) -> str | None:
    """``persona:auto`` -> None (infer), ``persona:NAME`` -> NAME; anything else is a 404 on ``model``."""
    name = model[len(MODEL_PREFIX):] if model.startswith(MODEL_PREFIX) else None
    if name == AUTO:
        return None
    if name is None or name not in personas:
        raise ModelNotFoundError(model, model_ids(personas))
    return name


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


def to_input(body: ChatCompletionRequest, personas: list[str]) -> AnswerRequest:
    """The chat request as the ``/v1/answer`` request it amounts to (the question is the last user message)."""
    for name, (refused, why) in UNSUPPORTED.items():
        if refused(getattr(body, name)):
            raise InvalidRequestError(f"{why}; leave {name!r} out", field=name)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    stop = [body.stop] if isinstance(body.stop, str) else body.stop
    temperature = 0.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0.0 <= top_p <= 1.0:  # OpenAI's range, which takes 0 (SamplingConfig's own is (0, 1])
        raise InvalidRequestError(f"{top_p} must be in [0, 1]", field="top_p")
    if top_p == 0.0:  # OpenAI's range includes 0: the smallest nucleus, the most likely token alone = greedy
        temperature, top_p = 0.0, 1.0
    # OpenAI takes any 64-bit seed, negative ones included; the engines take 0 .. 2**63 - 1.
    seed = None if body.seed is None else body.seed % 2**63
    return AnswerRequest(
        question=last_user_text(body.messages), persona=parse_model(body.model, personas),
        max_new_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, user=body.user,
        stop=stop or None)


def openai_error(exc: PersonaRouterError, body: ChatCompletionRequest) -> PersonaRouterError:
    """The same error, naming OpenAI's parameter; an unknown persona is an unknown model."""
    if isinstance(exc, UnknownPersonaError):
        return ModelNotFoundError(body.model, model_ids(exc.valid))
    if exc.field in OPENAI_PARAMS:
        exc.field = OPENAI_PARAMS[exc.field]
        if exc.field == "max_tokens" and body.max_completion_tokens is not None:
            exc.field = "max_completion_tokens"
    return exc


def routing(running: Running) -> dict[str, Any]:
    extra: dict[str, Any] = {"decision": running.decision.to_json(), "adapter": running.adapter}
    if running.assignment is not None:
        extra["ab"] = running.assignment.to_json()
    if running.finished is not None:
        extra["timings"] = running.finished.timings
    return extra


def _finish_reason(reason: str) -> str:
    return "length" if reason == "length" else "stop"


@post("/v1/chat/completions", status_code=200, guards=[json_body_guard])
async def chat_completions(request: Request[Any, Any, Any]) -> Response[Any]:
    state = service(request)
    body = decode_body(await read_body(request), ChatCompletionRequest)
    personas = list(state.pack.names)
    try:
        running = await state.answerer.start(to_input(body, personas), endpoint="chat")
    except PersonaRouterError as exc:
        raise openai_error(exc, body) from exc
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = _chunks(running, completion_id, created, body.model, include_usage=include_usage)
        return Stream(chunks, media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        finished = await running.collect_or_cancel(request.receive)
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
    return ModelList(data=[ModelCard(id=model, created=created) for model in model_ids(list(state.pack.names))])


@get("/v1/models/{model_id:str}")
async def retrieve_model(request: Request[Any, Any, Any], model_id: str) -> ModelCard:
    state = service(request)
    known = model_ids(list(state.pack.names))
    if model_id not in known:
        raise ModelNotFoundError(model_id, known)
    return ModelCard(id=model_id, created=int(state.started_at))
