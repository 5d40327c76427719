"""Wire types of the HTTP API (msgspec Structs) and the one function that decodes request bodies.

Only the HTTP service uses these. ``AnswerRequest`` is the one description of a question to answer: the
OpenAI-compatible endpoint maps its request onto it (``service/openai_compat.py``) and
``service/answering.py`` takes it from either API.
"""

from __future__ import annotations

import re
from typing import Any, TypeVar

import msgspec
from persona_router.core.errors import InvalidRequestError

T = TypeVar("T")
_PATH = re.compile(r"at `\$((?:\.[A-Za-z_][\w-]*|\[\d+\])+)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")
_MISSING = re.compile(r"missing required field `([^`]+)`")


# -- /v1/answer -------------------------------------------------------------------------------------------
class AnswerRequest(msgspec.Struct, forbid_unknown_fields=True):
    question: str
    persona: str | None = None
    context: str | None = None
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    user: str | None = None
    stream: bool | None = None  # null = false, as on the OpenAI endpoint
    stop: list[str] | None = None  # stop strings: generation ends there, they are not part of the answer
    # Which adapter answers: omitted or "live" = the persona's live version (and its A/B split, if any),
    # "none" = the system prompt alone, "3" (or 3) = that version. The compare view sets it per arm.
    adapter: str | int | None = None


class AdapterRef(msgspec.Struct):
    persona: str
    version: int


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AnswerResponse(msgspec.Struct):
    id: str
    answer: str
    decision: dict[str, Any]
    adapter: AdapterRef | None
    usage: Usage
    timings: dict[str, float]
    finish_reason: str
    ab: dict[str, Any] | None = None


# -- /v1/chat/completions ---------------------------------------------------------------------------------
class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class ChatCompletionRequest(msgspec.Struct):
    """OpenAI's request. Fields that change what the answer must be and that this server cannot honour
    (``tools``, ``response_format`` other than text, ``logprobs``, ``n > 1``) are refused with a 400 naming
    them; other unknown fields are ignored, as OpenAI-compatible servers do."""

    model: str
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stream: bool | None = None  # OpenAI's schema allows null (= false); proxies send it
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class ResponseMessage(msgspec.Struct):
    role: str
    content: str


class Choice(msgspec.Struct):
    index: int
    message: ResponseMessage
    finish_reason: str


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    persona_routing: dict[str, Any]
    object: str = "chat.completion"


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | msgspec.UnsetType = msgspec.UNSET  # unset fields are left out of the JSON
    persona_routing: dict[str, Any] | msgspec.UnsetType = msgspec.UNSET


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "persona-router"
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


# -- errors -----------------------------------------------------------------------------------------------
class ErrorBody(msgspec.Struct, omit_defaults=True, kw_only=True):
    message: str
    type: str
    # OpenAI's error always carries these two, null where they do not apply: typed clients require the keys.
    param: str | None  # the offending parameter
    code: str | None  # the machine-readable code, e.g. "model_not_found", "rate_limit_exceeded"
    field: str | None = None
    valid: list[str] | None = None
    retry_after_s: int | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody


# -- decoding ---------------------------------------------------------------------------------------------
def decode_body(body: bytes, type_: type[T]) -> T:
    """Decode a JSON body into ``type_``; any problem becomes an ``InvalidRequestError`` naming the field."""
    if not body.strip():
        raise InvalidRequestError("the request body is empty; send a JSON object", field="body")
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as exc:
        raise InvalidRequestError(_clean(str(exc)), field=_field_of(str(exc))) from exc
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"malformed JSON ({exc})", field="body") from exc


def _field_of(message: str) -> str:
    for pattern in (_UNKNOWN, _MISSING):
        found = pattern.search(message)
        if found:
            prefix = _PATH.search(message)
            return f"{prefix.group(1).lstrip('.')}.{found.group(1)}" if prefix else found.group(1)
    found = _PATH.search(message)
    return found.group(1).lstrip(".") if found else "body"


def _clean(message: str) -> str:
    """msgspec says ``- at `$.x```; the field is reported separately, so keep only the complaint."""
    return re.sub(r"\s*-\s*at `\$[^`]*`", "", message)


def sse(data: Any, *, event: str | None = None) -> bytes:
    """One Server-Sent Event, framed by Litestar's ``ServerSentEventMessage``; ``data`` is JSON-encoded unless it
    is already text (OpenAI's ``[DONE]``).

    The handlers still return a plain ``Stream`` of these rather than Litestar's ``ServerSentEvent`` response:
    that one iterates our generator inside a wrapper generator of its own and never closes ours when the client
    disconnects (its ``finally``, which cancels the generation and frees the batch row, would wait for garbage
    collection), and it always frames with CRLF.
    """
    from litestar.response.sse import ServerSentEventMessage

    payload = data if isinstance(data, str) else msgspec.json.encode(data).decode()
    return ServerSentEventMessage(data=payload, event=event, sep="\n").encode()
