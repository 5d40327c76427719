"""One request through an upstream pool (``adapters/upstream_pool.py``): placement, the adapter load, the
member's stream, and the retry or continuation on another member when one fails."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import replace

from persona_router.adapters.continued_text import ContinuedText, Decode
from persona_router.adapters.engine_api import GenerationHandle, GenerationRequest, TokenEvent, events_until_finished
from persona_router.adapters.upstream_member import MemberState, Placement
from persona_router.core.errors import (
    AdapterError,
    PersonaRouterError,
    QueueFullError,
    UpstreamFailedError,
    UpstreamUnavailableError,
)

log = logging.getLogger(__name__)


class PoolHandle:
    """One request through the pool: placement, adapter load, member stream, retry or continuation."""

    def __init__(self, pool: Placement, request: GenerationRequest, decode: Decode | None = None) -> None:
        self.request_id = request.request_id
        self._decode = decode  # with it, a continuation's text is decoded here (``ContinuedText``)
        self._sent: list[str] = []  # the text of every event delivered
        self._continued: ContinuedText | None = None
        self._pool = pool
        self._request = request
        self._queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._member_handle: GenerationHandle | None = None
        self._cancelled = False
        self._done = False
        self.served_by: list[str] = []  # members tried, in order (the last one answered)
        self._generated: list[int] = []  # token ids delivered so far
        self._untracked_text = False  # text delivered without a token id: a failure then cannot be resumed

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._task is None and not self._done:
            self._task = asyncio.get_running_loop().create_task(self._run())
        return self._events()

    def _events(self) -> AsyncIterator[TokenEvent]:
        return events_until_finished(self._queue)

    def cancel(self) -> None:
        if self._done or self._cancelled:
            return
        self._cancelled = True
        if self._member_handle is not None:
            self._member_handle.cancel()  # the member ends its stream with a "cancelled" event
        else:
            if self._task is not None:
                self._task.cancel()
            self._finish(TokenEvent(self.request_id, None, "", finish_reason="cancelled"))

    def _finish(self, event: TokenEvent) -> None:
        if not self._done:
            self._done = True
            self._put(event)

    def _put(self, event: TokenEvent) -> None:
        self._sent.append(event.text)
        self._queue.put_nowait(event)

    def _error(self, message: str, failure: PersonaRouterError | None = None) -> None:
        self._finish(TokenEvent(self.request_id, None, "", finish_reason="error", error=message, failure=failure))

    async def _run(self) -> None:
        tried: list[str] = []
        adapter = self._request.adapter
        while not self._done:
            try:
                state = self._pool.choose(adapter, exclude=tried)
            except UpstreamUnavailableError as exc:
                message = f"{exc} (tried: {', '.join(tried) or 'none'})"
                self._error(message, UpstreamUnavailableError(message))
                return
            tried.append(state.name)
            self.served_by.append(state.name)
            retry = False
            try:
                retry = await self._attempt(state, adapter)
            except asyncio.CancelledError:
                self._finish(TokenEvent(self.request_id, None, "", finish_reason="cancelled"))
                raise
            except Exception as exc:  # a bug or an unforeseen library error must still end the stream
                log.exception("request %s failed on upstream %s", self.request_id, state.name)
                self._error(f"upstream {state.name} failed: {type(exc).__name__}: {exc}")
            finally:
                self._pool.release(state, retried=retry)
            if not retry:
                return
            log.warning("request %s failed on upstream %s after %d tokens; %s elsewhere", self.request_id,
                        state.name, len(self._generated), "continuing" if self._generated else "retrying")

    async def _attempt(self, state: MemberState, adapter: str | None) -> bool:
        """Run the request on one member; True when the member failed and the request may go to another.

        A member that lost the adapter (restarted between two probes) gets it again and one more try."""
        reloaded = False
        while True:
            try:
                return await self._stream(state, adapter)
            except QueueFullError:
                return True  # this member's own queue is full: spill to the next one
            except UpstreamFailedError as exc:
                if exc.adapter_missing and adapter is not None and not reloaded:
                    self._pool.forget(state, adapter)
                    reloaded = True
                    continue
                self._pool.mark_down(state, str(exc))
                return True
            except AdapterError as exc:
                self._error(str(exc), exc)
                return False

    def _deliver(self, events: list[TokenEvent]) -> None:
        for event in events:
            assert event.token_id is not None
            self._generated.append(event.token_id)
            self._put(event)

    def _resumable(self) -> bool:
        return not self._untracked_text

    def _next_request(self) -> GenerationRequest | None:
        """The request for the next attempt: the original, or after a failure mid-answer its continuation
        (the prompt plus the tokens already delivered, for the tokens still allowed). None: nothing is left."""
        if not self._generated:
            return self._request
        remaining = self._request.sampling.max_new_tokens - len(self._generated)
        if remaining < 1:
            return None
        return replace(self._request, prompt_ids=(*self._request.prompt_ids, *self._generated),
                       sampling=replace(self._request.sampling, max_new_tokens=remaining))

    async def _stream(self, state: MemberState, adapter: str | None) -> bool:
        try:
            if adapter is not None:
                await self._pool.ensure_adapter(state, adapter)
            request = self._next_request()
            if self._cancelled or request is None:
                reason = "cancelled" if self._cancelled else "length"
                self._finish(TokenEvent(self.request_id, None, "", finish_reason=reason))
                return False
            handle = state.member.submit(request)
            self._member_handle = handle
            self._continued = (ContinuedText(self._decode, self._generated, "".join(self._sent), request.stop)
                               if self._generated and self._decode is not None else None)
            # Tokens whose text the member holds back (a possible stop string, part of a character) go out
            # with the next token that brings text. If the member fails first they are dropped and the next
            # member generates them again, with their text: continuing after them would lose that text.
            held: list[TokenEvent] = []
            async for event in handle:
                member_failed = (event.finish_reason == "error" and event.token_id is None and event.failure is None
                                 and self._resumable())  # a refused request is the request's fault, not the member's
                if member_failed and not await self._pool.check(state):  # the member itself failed: go elsewhere
                    return True
                if self._continued is not None and event.finish_reason not in ("error", "cancelled"):
                    event, stopped_here = _recoded(event, self._continued)
                    if stopped_here:
                        handle.cancel()  # a stop string across the two members, which this member cannot see
                if event.token_id is not None and not event.text and event.finish_reason is None:
                    held.append(event)
                    continue
                self._deliver(held)
                held = []
                if event.token_id is not None:
                    self._generated.append(event.token_id)
                elif event.text:
                    self._untracked_text = True
                if event.finish_reason is not None:
                    self._finish(event)
                    return False
                self._put(event)
            self._deliver(held)
            self._finish(TokenEvent(self.request_id, None, "", finish_reason="stop"))
            return False
        except UpstreamFailedError as exc:
            if not self._resumable():  # text went out that we cannot continue from exactly
                self._pool.mark_down(state, str(exc))
                self._error(f"upstream {state.name} failed mid-answer: {exc}")
                return False
            raise
        finally:
            if self._member_handle is not None and not self._done:
                self._member_handle.cancel()
            self._member_handle = None


def _recoded(event: TokenEvent, continued: ContinuedText) -> tuple[TokenEvent, bool]:
    """A continuation's event with the pool's own text; True when that text reached a stop string the member
    had not ended on."""
    text, reached = continued.step(event.token_id) if event.token_id is not None else ("", False)
    if reached:
        return replace(event, text=text, finish_reason="stop"), event.finish_reason is None
    if event.finish_reason is not None:  # end of sequence or the length limit: held text was no stop string
        text += continued.flush()
    return replace(event, text=text), False
