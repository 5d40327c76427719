"""One answer, from request to tokens: validate, route, pick the adapter, build the prompt, generate.

Both HTTP APIs (``/v1/answer`` and the OpenAI-compatible one) go through ``Answerer``: ``start`` does
everything that can fail with a clean HTTP status (bad input, unknown persona, full queue) before any
byte of the response is sent, and returns a ``Running`` generation that streams ``TokenEvent``s and then
a ``Finished`` summary. A request that outlives the timeout is cancelled in the engine; so is one whose
client went away: a stream's consumer closes it, and ``collect_or_cancel`` watches a non-streaming
request's connection while it waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from persona_router.adapters.engine_api import Engine, GenerationHandle, GenerationRequest, TokenEvent
from persona_router.adapters.generation import SamplingConfig, decode_answer
from persona_router.adapters.prompts import build_messages, prompt_ids
from persona_router.adapters.residency import AdapterResidency, Lease
from persona_router.adapters.stop_strings import check_stop_strings, truncate_at_stop
from persona_router.core.errors import ConfigError, InvalidRequestError, PersonaRouterError
from persona_router.core.pack import PersonaPack
from persona_router.router.decision import Decision
from persona_router.service.ab_serving import LiveSplits, served
from persona_router.service.ab_split import Assignment
from persona_router.service.catalog import CatalogHolder, Decide, fallback_decider
from persona_router.service.metrics import ServiceMetrics
from persona_router.service.schemas import AnswerRequest, Usage
from persona_router.service.settings import ServiceSettings
from persona_router.service.stream_trim import StrippedStream

log = logging.getLogger(__name__)
LIVE = "live"
PROMPT_ONLY = "none"


@dataclass(frozen=True)
class Finished:
    """What a generation produced, for the final response or event."""

    answer: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    timings: dict[str, float]

    @property
    def usage(self) -> Usage:
        return Usage(self.prompt_tokens, self.completion_tokens, self.prompt_tokens + self.completion_tokens)


CloseHook = Callable[["Running"], None]


@dataclass
class Running:
    """A submitted generation: iterate ``tokens()``, then read ``finished``; ``close`` is idempotent.

    The generation owns its life cycle: ``close`` (the stream's end, a timeout, a client that left or the
    safety timer) computes ``finished`` and then tells ``on_close`` once, which releases the adapter and
    records metrics from it without writing back.
    """

    request_id: str
    decision: Decision
    lease: Lease | None
    assignment: Assignment | None
    prompt_tokens: int
    handle: GenerationHandle
    endpoint: str
    started: float
    deadline: float
    timeout_s: float
    routing_ms: float
    decode: Callable[[list[int]], str]
    on_close: CloseHook
    stop: tuple[str, ...] = ()
    pieces: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    completion_tokens: int = 0
    first_token_at: float | None = None
    finish_reason: str | None = None
    finished: Finished | None = None
    _text: str | None = None
    _closed: bool = False
    _timer: asyncio.TimerHandle | None = None

    @property
    def adapter(self) -> dict[str, Any] | None:
        return {"persona": self.lease.persona, "version": self.lease.version} if self.lease else None

    @property
    def adapter_version(self) -> str:
        return served(self.lease)

    async def tokens(self) -> AsyncIterator[str]:
        """Yield text pieces that add up to the final (stripped) answer; raises TimeoutError past the deadline
        and GenerationFailedError on engine errors.

        The deadline is applied per event with ``wait_for`` rather than one ``asyncio.timeout`` around the
        loop: a timeout scope must not stay open across a ``yield`` of an async generator.
        """
        loop = asyncio.get_running_loop()
        events = aiter(self.handle)
        stripped = StrippedStream()
        try:
            while True:
                remaining = self.deadline - loop.time()
                if remaining <= 0:
                    raise TimeoutError
                try:
                    event = await asyncio.wait_for(anext(events), remaining)
                except StopAsyncIteration:
                    self.finish_reason = self.finish_reason or "stop"
                    return
                piece = self._take(event)
                if event.finish_reason is not None:
                    piece += self._remainder()
                piece = stripped.piece(piece)
                if piece:
                    yield piece
                if event.finish_reason is not None:
                    return
        except TimeoutError:
            self.finish_reason = "timeout"
            self.close(cancel=True)
            raise TimeoutError(f"no answer within the {self.timeout_s:g} s request timeout") from None
        finally:
            if self.finish_reason is None:
                self.finish_reason = "cancelled"  # the consumer stopped early (client disconnected)
            self.close(cancel=self.finish_reason == "cancelled")

    def text(self) -> str:
        """The decode of every token, exactly what ``generate_one`` returns; decoded once, after the last
        token (the stream's end or ``close``), and reused by the stream's remainder and the summary."""
        if self._text is None:
            text = self.decode(self.token_ids) if self.token_ids else ""
            self._text = truncate_at_stop(text, self.stop) if self.stop else text
        return self._text

    def _remainder(self) -> str:
        """Text the engine held back (a character cut by the length limit): the stream ends with the same
        text as the final answer."""
        full = self.text()
        sent = "".join(self.pieces)
        if len(full) > len(sent) and full.startswith(sent):
            rest = full[len(sent):]
            self.pieces.append(rest)
            return rest
        return ""

    def _take(self, event: TokenEvent) -> str:
        if event.token_id is not None:
            self.token_ids.append(event.token_id)
            self.completion_tokens += 1
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason
            if event.finish_reason == "error":
                self.close(cancel=False)
                if event.failure is not None:
                    raise event.failure
                raise GenerationFailedError(event.error or "the engine failed")
        if event.text:
            self.pieces.append(event.text)
        return event.text

    async def collect(self) -> Finished:
        async for _ in self.tokens():
            pass
        assert self.finished is not None
        return self.finished

    async def collect_or_cancel(self, receive: Callable[[], Awaitable[Any]]) -> Finished:
        """``collect``, but cancel the generation as soon as the client disconnects (``receive`` is the
        request's ASGI receive; once the body is read, its next message is ``http.disconnect``)."""
        return (await collect_all_or_cancel([self], receive))[0]

    def close(self, *, cancel: bool) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if cancel:
            self.handle.cancel()
        self.finished = self._summary()
        self.on_close(self)

    def expire(self) -> None:
        """The safety timer: free a request nobody consumed (its client left before the stream began)."""
        if not self._closed:
            self.finish_reason = self.finish_reason or "cancelled"
            self.close(cancel=True)

    def _summary(self) -> Finished:
        now = time.perf_counter()
        total_ms = (now - self.started) * 1000
        timings = {"total_ms": round(total_ms, 2), "routing_ms": round(self.routing_ms, 2)}
        if self.first_token_at is not None:
            timings["first_token_ms"] = round((self.first_token_at - self.started) * 1000, 2)
            decode_s = now - self.first_token_at
            if self.completion_tokens > 1 and decode_s > 0:
                timings["tokens_per_s"] = round((self.completion_tokens - 1) / decode_s, 2)
        return Finished(answer=self.text().strip(), finish_reason=self.finish_reason or "cancelled",
                        prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens, timings=timings)


class GenerationFailedError(PersonaRouterError):
    """The engine reported an error for this request."""


class ClientDisconnectedError(PersonaRouterError):
    """The client went away before a non-streaming answer was ready (nobody reads the response)."""


async def collect_all_or_cancel(runs: list[Running], receive: Callable[[], Awaitable[Any]]) -> list[Finished]:
    """Collect every generation of one HTTP request; cancel them all as soon as its client disconnects."""
    collecting: asyncio.Future[Any] = asyncio.ensure_future(asyncio.gather(*(running.collect() for running in runs)))
    watching: asyncio.Future[Any] = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait([collecting, watching], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
    if not collecting.done():
        log.info("request %s: the client went away; cancelling its generation",
                 ", ".join(running.request_id for running in runs))
        for running in runs:
            running.finish_reason = running.finish_reason or "cancelled"
            running.close(cancel=True)
        collecting.cancel()
        await asyncio.gather(collecting, return_exceptions=True)
        raise ClientDisconnectedError("the client closed the connection before the answer was ready")
    return list(collecting.result())


async def _disconnected(receive: Callable[[], Awaitable[Any]]) -> None:
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


class Answerer:
    """Turns an ``AnswerRequest`` (from either API) into a running generation; shared by every request."""

    def __init__(self, *, settings: ServiceSettings, catalog: CatalogHolder, engine: Engine,
                 residency: AdapterResidency, tokenizer: Any, metrics: ServiceMetrics,
                 max_positions: int | None = None) -> None:
        self.settings = settings
        self.catalog = catalog
        self.engine = engine
        self.residency = residency
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.max_positions = max_positions
        self.splits = LiveSplits(settings.ab_splits, residency, metrics)
        self.in_flight = 0

    @property
    def pack(self) -> PersonaPack:
        return self.catalog.current.pack

    @property
    def decide(self) -> Decide:
        return self.catalog.current.decide

    def sampling(self, inp: AnswerRequest) -> SamplingConfig:
        limit = self.settings.max_new_tokens_limit
        max_new = self.settings.default_max_new_tokens if inp.max_new_tokens is None else inp.max_new_tokens
        if not 1 <= max_new <= limit:
            raise InvalidRequestError(f"{max_new} must be between 1 and {limit}", field="max_new_tokens")
        try:
            check_stop_strings(tuple(inp.stop or ()))
            return SamplingConfig(max_new_tokens=max_new, temperature=inp.temperature, top_p=inp.top_p,
                                  seed=inp.seed)
        except ConfigError as exc:
            raise InvalidRequestError(exc.detail, field=exc.field) from exc

    def validate(self, inp: AnswerRequest) -> SamplingConfig:
        if not inp.question.strip():
            raise InvalidRequestError("must not be empty or only whitespace", field="question")
        if len(inp.question) > self.settings.max_question_chars:
            raise InvalidRequestError(f"is {len(inp.question)} characters; the limit is "
                                      f"{self.settings.max_question_chars}", field="question")
        if inp.context is not None and len(inp.context) > self.settings.max_context_chars:
            raise InvalidRequestError(f"is {len(inp.context)} characters; the limit is "
                                      f"{self.settings.max_context_chars}", field="context")
        if inp.persona is not None and (not inp.persona.strip() or len(inp.persona) > 64):
            raise InvalidRequestError("must be a persona name (at most 64 characters) or omitted", field="persona")
        adapter_choice(inp.adapter)
        if inp.user is not None and len(inp.user) > 256:
            raise InvalidRequestError("must be at most 256 characters", field="user")
        if inp.seed is not None and not 0 <= inp.seed < 2**63:
            raise InvalidRequestError(f"{inp.seed} must be between 0 and 2**63 - 1", field="seed")
        return self.sampling(inp)

    async def start(self, inp: AnswerRequest, *, endpoint: str) -> Running:
        """Validate, route, lease the adapter and submit; every failure here maps to a clean status.

        ``endpoint`` (``answer`` or ``chat``) labels the request's metrics.
        """
        started = time.perf_counter()
        sampling = self.validate(inp)
        catalog = self.catalog.current  # one snapshot of pack + router for the whole request
        decision = await asyncio.to_thread(catalog.decide, inp.question, inp.persona)
        routing_ms = (time.perf_counter() - started) * 1000
        self.metrics.decisions.inc(source=decision.source, persona=decision.persona)
        persona = catalog.pack.get(decision.persona)
        assignment, lease = await self._lease(persona.name, inp.user, adapter_choice(inp.adapter))
        try:
            messages = build_messages(inp.question, system_prompt=persona.system_prompt, context=inp.context)
            ids = prompt_ids(self.tokenizer, messages)
            self._check_length(len(ids), sampling.max_new_tokens, has_context=bool(inp.context))
            request_id = f"ans-{uuid.uuid4().hex[:24]}"
            stop = tuple(inp.stop or ())
            request = GenerationRequest(request_id=request_id, prompt_ids=tuple(ids),
                                        adapter=lease.name if lease else None, sampling=sampling, stop=stop)
            handle = self.engine.submit(request)
        except BaseException:
            if lease is not None:
                self.residency.release(lease)
            raise
        timeout_s = self.settings.request_timeout_s
        running = Running(request_id=request_id, decision=decision, lease=lease, assignment=assignment,
                          prompt_tokens=len(ids), handle=handle, endpoint=endpoint, started=started,
                          deadline=asyncio.get_running_loop().time() + timeout_s, timeout_s=timeout_s,
                          routing_ms=routing_ms, decode=self._decode, on_close=self._closed, stop=stop)
        # If nobody consumes the stream (the client left before it began), the deadline still frees it.
        running._timer = asyncio.get_running_loop().call_at(running.deadline + 1.0, running.expire)
        self.in_flight += 1
        return running

    async def _lease(self, persona: str, user: str | None,
                     choice: int | str = LIVE) -> tuple[Assignment | None, Lease | None]:
        if choice == PROMPT_ONLY:
            return None, None
        if isinstance(choice, int):  # a named version: no A/B, and no silent substitute if it is unusable
            try:
                return None, await self.residency.acquire(persona, choice)
            except PersonaRouterError as exc:
                if exc.field == "version":  # the residency's name for it; this request calls it "adapter"
                    exc.field = "adapter"
                raise
        split = self.splits.get(persona)
        if split is None:
            return None, await self.residency.acquire(persona)
        return await self.splits.lease(split, user)

    def _check_length(self, prompt_tokens: int, max_new_tokens: int, *, has_context: bool) -> None:
        if self.max_positions is None or prompt_tokens + max_new_tokens <= self.max_positions:
            return
        field_name = "context" if has_context else "question"
        raise InvalidRequestError(
            f"the prompt is {prompt_tokens} tokens; with max_new_tokens={max_new_tokens} it exceeds the model's "
            f"{self.max_positions}-token window", field=field_name)

    def _decode(self, token_ids: list[int]) -> str:
        return decode_answer(self.tokenizer, token_ids)

    def _closed(self, running: Running) -> None:
        """``Running.on_close``: release the adapter and record metrics, once per request."""
        finished = running.finished
        assert finished is not None
        self.in_flight -= 1
        if running.lease is not None:
            self.residency.release(running.lease)
        labels = {"endpoint": running.endpoint, "persona": running.decision.persona,
                  "adapter_version": running.adapter_version}
        status = {"stop": "200", "length": "200", "timeout": "504", "error": "500"}.get(finished.finish_reason, "499")
        self.metrics.requests.inc(1.0, status=status, **labels)
        self.metrics.latency.observe(finished.timings["total_ms"] / 1000, **labels)
        if running.first_token_at is not None:
            self.metrics.first_token.observe(running.first_token_at - running.started, **labels)
        persona, version = running.decision.persona, running.adapter_version
        self.metrics.tokens.inc(running.prompt_tokens, kind="prompt", persona=persona, adapter_version=version)
        self.metrics.tokens.inc(running.completion_tokens, kind="completion", persona=persona, adapter_version=version)
        self.metrics.completion_tokens.observe(running.completion_tokens, persona=persona, adapter_version=version)


def adapter_choice(raw: str | int | None) -> int | str:
    """``AnswerRequest.adapter``: the live version (default), prompt-only, or a version number (a JSON number
    or its digits in a string)."""
    text = str(raw) if isinstance(raw, int) and not isinstance(raw, bool) else raw
    if text is None or text == LIVE:
        return LIVE
    if text == PROMPT_ONLY:
        return PROMPT_ONLY
    if isinstance(text, str) and text.isascii() and text.isdigit() and int(text) >= 1:
        return int(text)
    raise InvalidRequestError(f"{raw!r} is not an adapter choice; valid: {LIVE!r}, {PROMPT_ONLY!r} or a version "
                              "number such as '2'", field="adapter")


__all__ = ["Answerer", "Running", "adapter_choice", "fallback_decider"]
