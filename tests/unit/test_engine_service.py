"""Engine behaviour the service relies on: cancellation, queue bound, hot adapter swaps, stops, streaming
text, seeded sampling, request validation (CPU, tiny model)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from persona_router.adapters.engine import BatchedEngine
from persona_router.adapters.engine_api import GenerationRequest, TokenEvent
from persona_router.adapters.generation import SamplingConfig
from persona_router.core.errors import AdapterError, InvalidRequestError, QueueFullError

from tests.unit.test_engine_equivalence import (
    PeftReference,
    collect,
    engine_adapters,
    generated,
    make_engine,
    peft_reference,
    prompts,
    request,
    run_with,
)

__all__ = ["engine_adapters", "peft_reference"]  # fixtures shared with the equivalence tests


def test_cancel_stops_only_that_request(tiny_model_dir: Path, engine_adapters: dict[str, Path],
                                        peft_reference: PeftReference) -> None:
    engine = make_engine(tiny_model_dir, engine_adapters, stop_token_ids=())
    first, second, _ = prompts(peft_reference.tokenizer)

    async def body(engine: BatchedEngine) -> tuple[list[TokenEvent], list[TokenEvent]]:
        doomed = engine.submit(request("doomed", first, "alpha", max_new_tokens=200))
        survivor = engine.submit(request("survivor", second, "beta"))
        events: list[TokenEvent] = []
        async for event in doomed:
            events.append(event)
            if len(events) == 3:
                doomed.cancel()
        return events, await collect(survivor)

    doomed_events, survivor_events = run_with(engine, body)
    assert doomed_events[-1].finish_reason == "cancelled"
    assert 3 <= len(generated(doomed_events)) < 200
    assert generated(survivor_events) == peft_reference.tokens("beta", second)
    assert engine.stats().running == 0
    assert engine.bank.in_use() == 3  # adapters stay resident; only the request's reference went away


def test_cancel_while_queued(tiny_model_dir: Path, peft_reference: PeftReference) -> None:
    engine = make_engine(tiny_model_dir, max_batch=1, stop_token_ids=())
    prompt = prompts(peft_reference.tokenizer)[0]

    async def body(engine: BatchedEngine) -> tuple[list[TokenEvent], list[TokenEvent]]:
        running = engine.submit(request("running", prompt, None, max_new_tokens=30))
        queued = engine.submit(request("queued", prompt, None, max_new_tokens=30))
        queued.cancel()
        return await collect(queued), await collect(running)

    queued_events, running_events = run_with(engine, body)
    assert [e.finish_reason for e in queued_events] == ["cancelled"]
    assert len(generated(running_events)) == 30
    assert engine.stats().queued == 0


def test_queue_full_raises(tiny_model_dir: Path, peft_reference: PeftReference) -> None:
    engine = make_engine(tiny_model_dir, max_queue=2)
    prompt = prompts(peft_reference.tokenizer)[0]

    async def body() -> None:
        # Not started: nothing leaves the queue.
        engine.submit(request("a", prompt, None))
        engine.submit(request("b", prompt, None))
        with pytest.raises(QueueFullError) as info:
            engine.submit(request("c", prompt, None))
        assert info.value.retry_after_s >= 1
        assert engine.stats().queued == 2

    asyncio.run(body())


def test_swap_and_remove_adapter_while_running(tiny_model_dir: Path, engine_adapters: dict[str, Path],
                                               peft_reference: PeftReference) -> None:
    """A running request keeps the weights it started with; new requests see the replacement."""
    engine = make_engine(tiny_model_dir, {"live": engine_adapters["alpha"]}, max_adapters=2)
    first, second, _ = prompts(peft_reference.tokenizer)

    async def body(engine: BatchedEngine) -> tuple[list[int], list[int]]:
        old = engine.submit(request("old", first, "live", max_new_tokens=40))
        iterator = old.__aiter__()
        events = [await iterator.__anext__() for _ in range(3)]
        await asyncio.to_thread(engine.add_adapter, "live", engine_adapters["beta"])  # replace mid-flight
        new = engine.submit(request("new", second, "live"))
        engine.remove_adapter("live")
        with pytest.raises(AdapterError):
            engine.submit(request("gone", second, "live"))
        events.extend([e async for e in iterator])
        return generated(events), generated(await collect(new))

    old_tokens, new_tokens = run_with(engine, body)
    assert old_tokens == peft_reference.tokens("alpha", first, 40)
    assert new_tokens == peft_reference.tokens("beta", second)
    assert engine.adapter_names() == []
    assert engine.bank.in_use() == 0  # retired slots were freed when their requests finished


def test_adapter_slots_are_bounded(tiny_model_dir: Path, engine_adapters: dict[str, Path]) -> None:
    engine = make_engine(tiny_model_dir, {"a": engine_adapters["alpha"]}, max_adapters=1)
    with pytest.raises(QueueFullError, match="slots"):  # busy, not broken: a retry
        engine.add_adapter("b", engine_adapters["beta"])
    assert engine.adapter_names() == ["a"]


def test_stop_ids_length_and_streamed_text(tiny_model_dir: Path, peft_reference: PeftReference) -> None:
    engine = make_engine(tiny_model_dir, stop_token_ids=())
    prompt = prompts(peft_reference.tokenizer)[1]
    expected = peft_reference.tokens(None, prompt)
    stop_at = next(i for i in range(2, len(expected)) if expected[i] not in expected[:i])

    async def body(engine: BatchedEngine) -> tuple[list[TokenEvent], list[TokenEvent]]:
        stopped = engine.submit(GenerationRequest("s", prompt, None, SamplingConfig(max_new_tokens=16),
                                                  stop_token_ids=(expected[stop_at],)))
        full = engine.submit(request("f", prompt, None, max_new_tokens=16))
        return await collect(stopped), await collect(full)

    stopped, full = run_with(engine, body)
    assert generated(stopped) == expected[:stop_at + 1]
    assert stopped[-1].finish_reason == "stop" and stopped[-1].text == ""
    assert full[-1].finish_reason == "length" and generated(full) == expected
    assert all(e.finish_reason is None for e in full[:-1])
    text = "".join(e.text for e in full)
    assert text == peft_reference.tokenizer.decode(expected, skip_special_tokens=True)


def test_cache_end_finishes_with_length(tiny_model_dir: Path, peft_reference: PeftReference) -> None:
    prompt = prompts(peft_reference.tokenizer)[0]
    engine = make_engine(tiny_model_dir, max_len=len(prompt) + 4, stop_token_ids=())

    async def body(engine: BatchedEngine) -> list[TokenEvent]:
        return await collect(engine.submit(request("r", prompt, None, max_new_tokens=50)))

    events = run_with(engine, body)
    assert events[-1].finish_reason == "length"
    assert len(generated(events)) == 5  # positions len(prompt) .. max_len - 1, plus the last token's logits


def test_seeded_sampling_ignores_batch_company(tiny_model_dir: Path, engine_adapters: dict[str, Path],
                                               peft_reference: PeftReference) -> None:
    engine = make_engine(tiny_model_dir, engine_adapters, stop_token_ids=())
    first, second, third = prompts(peft_reference.tokenizer)
    hot: dict[str, Any] = {"temperature": 1.5, "top_p": 0.95}

    async def body(engine: BatchedEngine) -> tuple[list[int], list[int], list[int], list[int]]:
        alone = generated(await collect(engine.submit(request("alone", first, "alpha", seed=7, **hot))))
        handles = [engine.submit(request("crowd0", second, "beta", seed=1, **hot)),
                   engine.submit(request("crowd1", first, "alpha", seed=7, **hot)),
                   engine.submit(request("crowd2", third, None))]
        crowd = [generated(events) for events in await asyncio.gather(*(collect(h) for h in handles))]
        other = generated(await collect(engine.submit(request("other", first, "alpha", seed=8, **hot))))
        narrow = generated(await collect(engine.submit(request("narrow", first, "alpha", seed=3,
                                                               temperature=1.0, top_p=1e-6))))
        return alone, crowd[1], other, narrow

    alone, in_crowd, other_seed, narrow = run_with(engine, body)
    assert alone == in_crowd
    assert alone != other_seed
    assert narrow == peft_reference.tokens("alpha", first)  # top-p keeping one token is greedy


@pytest.mark.parametrize(("prompt", "field"), [((), "prompt_ids"), ((1, 10_000), "prompt_ids"),
                                                (tuple(range(1, 300)), "prompt_ids")])
def test_invalid_requests_are_refused(tiny_model_dir: Path, prompt: tuple[int, ...], field: str) -> None:
    engine = make_engine(tiny_model_dir)

    async def body() -> None:
        with pytest.raises(InvalidRequestError) as info:
            engine.submit(request("bad", prompt, None))
        assert info.value.field == field

    asyncio.run(body())


def test_unknown_adapter_is_refused(tiny_model_dir: Path, peft_reference: PeftReference) -> None:
    engine = make_engine(tiny_model_dir)
    prompt = prompts(peft_reference.tokenizer)[0]

    async def body() -> None:
        with pytest.raises(AdapterError, match="no adapter named"):
            engine.submit(request("r", prompt, "nobody"))
        assert engine.stats().queued == 0

    asyncio.run(body())


def test_stats_and_stop_end_pending_requests(tiny_model_dir: Path, engine_adapters: dict[str, Path],
                                             peft_reference: PeftReference) -> None:
    engine = make_engine(tiny_model_dir, {"a": engine_adapters["alpha"]})
    prompt = prompts(peft_reference.tokenizer)[0]

    async def body() -> list[TokenEvent]:
        handle = engine.submit(request("r", prompt, "a"))  # queued on a stopped engine
        engine.stop()
        return await collect(handle)

    events = asyncio.run(body())
    assert [e.finish_reason for e in events] == ["error"]
    stats = engine.stats()
    assert stats.resident_adapters == ["a"] and stats.queued == 0 and stats.running == 0


def test_warmup_then_serve(tiny_model_dir: Path, peft_reference: PeftReference) -> None:
    engine = make_engine(tiny_model_dir)
    engine.warmup()
    assert engine.stats().steps == 0 and engine.stats().queued == 0 and engine.stats().running == 0
    prompt = prompts(peft_reference.tokenizer)[0]

    async def body(engine: BatchedEngine) -> list[int]:
        return generated(await collect(engine.submit(request("r", prompt, None))))

    assert run_with(engine, body) == peft_reference.tokens(None, prompt)


def test_failed_step_ends_its_requests_and_engine_recovers(tiny_model_dir: Path,
                                                           peft_reference: PeftReference) -> None:
    engine = make_engine(tiny_model_dir)
    prompt = prompts(peft_reference.tokenizer)[0]
    working = engine.scheduler.decoder
    calls = []

    def flaky(rows: int, kv_len: int, m: int) -> Any:
        calls.append(rows)
        if len(calls) == 1:
            raise RuntimeError("device fell over")
        return working(rows, kv_len, m)

    engine.scheduler.decoder = flaky

    async def body(engine: BatchedEngine) -> tuple[list[TokenEvent], list[TokenEvent]]:
        failed = await collect(engine.submit(request("failed", prompt, None)))
        return failed, await collect(engine.submit(request("after", prompt, None)))

    failed, after = run_with(engine, body)
    assert len(generated(failed)) == 1  # the prefill's token was delivered before the failing decode step
    assert failed[-1].finish_reason == "error" and "device fell over" in (failed[-1].error or "")
    assert generated(after) == peft_reference.tokens(None, prompt)
    assert engine.stats().running == 0
