"""``Running``, one generation's life cycle, without a model: a scripted engine handle and a counting decoder.

Checks that the answer text is decoded once per request (shared by the stream's remainder and the final
answer), that ``close`` computes the summary itself and tells its hook exactly once, and the error,
cancel and timeout paths.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

import pytest
from persona_router.adapters.engine_api import TokenEvent
from persona_router.router.decision import explicit
from persona_router.service.answering import GenerationFailedError, Running


class ScriptedHandle:
    """Streams the given events, then ends; ``delay_s`` before each event simulates a slow engine."""

    def __init__(self, events: Sequence[TokenEvent], delay_s: float = 0.0) -> None:
        self.request_id = "r1"
        self.events = list(events)
        self.delay_s = delay_s
        self.cancelled = False

    async def _stream(self) -> AsyncIterator[TokenEvent]:
        for event in self.events:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            if self.cancelled:
                return
            yield event

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        return self._stream()

    def cancel(self) -> None:
        self.cancelled = True


class Decoder:
    """Decodes ids as letters (1 -> "a"), skipping the special id 9 as ``skip_special_tokens`` does; counts
    its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, ids: list[int]) -> str:
        self.calls += 1
        return "".join(chr(ord("a") + i - 1) for i in ids if i != 9)


def make_running(events: Sequence[TokenEvent], *, timeout_s: float = 30.0, delay_s: float = 0.0
                 ) -> tuple[Running, Decoder, list[Running]]:
    decoder, closed = Decoder(), []
    running = Running(request_id="r1", decision=explicit("student"), lease=None, assignment=None, prompt_tokens=5,
                      handle=ScriptedHandle(events, delay_s), endpoint="answer", started=time.perf_counter(),
                      deadline=asyncio.get_running_loop().time() + timeout_s, timeout_s=timeout_s,
                      routing_ms=1.0, decode=decoder, on_close=closed.append)
    return running, decoder, closed


def ev(token: int | None, text: str, finish: str | None = None, error: str | None = None) -> TokenEvent:
    return TokenEvent("r1", token, text, finish_reason=finish, error=error)


async def _stream_all(running: Running) -> list[str]:
    return [piece async for piece in running.tokens()]


def test_answer_decoded_once_and_stream_ends_with_the_held_back_text() -> None:
    async def scenario() -> None:
        # The engine held back the last character (cut by the length limit): the stream's remainder and the
        # final answer both come from the one decode.
        running, decoder, closed = make_running([ev(1, "a"), ev(2, "b"), ev(3, "", "length")])
        pieces = await _stream_all(running)
        assert pieces == ["a", "b", "c"]
        assert decoder.calls == 1
        assert closed == [running]
        finished = running.finished
        assert finished is not None
        assert (finished.answer, finished.finish_reason, finished.completion_tokens) == ("abc", "length", 3)
        assert finished.usage.total_tokens == 8
        running.close(cancel=True)  # idempotent: no second summary, no second hook call
        assert closed == [running] and decoder.calls == 1

    asyncio.run(scenario())


def test_collect_gives_the_summary_and_a_stop_token_adds_no_text() -> None:
    async def scenario() -> None:
        running, decoder, closed = make_running([ev(1, "a"), ev(2, "b"), ev(9, "", "stop")])
        finished = await running.collect()
        assert finished.answer == "ab"
        assert finished.finish_reason == "stop" and finished.completion_tokens == 3
        assert decoder.calls == 1 and len(closed) == 1

    asyncio.run(scenario())


def test_engine_error_closes_once_and_raises() -> None:
    async def scenario() -> None:
        running, _, closed = make_running([ev(1, "a"), ev(None, "", "error", "boom")])
        with pytest.raises(GenerationFailedError, match="boom"):
            await running.collect()
        assert len(closed) == 1
        assert running.finished is not None and running.finished.finish_reason == "error"

    asyncio.run(scenario())


def test_consumer_leaving_early_cancels_the_engine_request() -> None:
    async def scenario() -> None:
        running, _, closed = make_running([ev(1, "a"), ev(2, "b"), ev(3, "c", "stop")])
        stream = running.tokens()
        assert await anext(stream) == "a"
        await stream.aclose()  # the client went away
        assert running.handle.cancelled  # type: ignore[attr-defined]
        assert len(closed) == 1
        assert running.finished is not None
        assert (running.finished.finish_reason, running.finished.answer) == ("cancelled", "a")

    asyncio.run(scenario())


def test_timeout_cancels_and_reports() -> None:
    async def scenario() -> None:
        running, _, closed = make_running([ev(1, "a"), ev(2, "b", "stop")], timeout_s=0.05, delay_s=0.5)
        with pytest.raises(TimeoutError, match=r"0\.05 s request timeout"):
            await running.collect()
        assert running.handle.cancelled  # type: ignore[attr-defined]
        assert len(closed) == 1 and running.finished is not None
        assert running.finished.finish_reason == "timeout"

    asyncio.run(scenario())
