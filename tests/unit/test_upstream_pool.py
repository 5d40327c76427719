"""The upstream pool over fake vLLM servers (``httpx.MockTransport``): affinity, spill-over, retry before the
first token (never after), down and back up with re-sync, restarts, cancellation, and the vLLM member's
protocol handling."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from persona_router.adapters.engine_api import GenerationRequest, TokenEvent
from persona_router.adapters.generation import SamplingConfig
from persona_router.adapters.stop_strings import truncate_at_stop
from persona_router.adapters.upstream_member import MemberState, PoolConfig, rendezvous_order
from persona_router.adapters.upstream_pool import UpstreamPool
from persona_router.core.errors import AdapterError, QueueFullError, UpstreamUnavailableError

from tests.support.fake_vllm import BASE, EOS, FakeVllm

ADAPTERS = [f"persona{i}@1" for i in range(12)]


def request(rid: str, adapter: str | None, max_tokens: int = 16) -> GenerationRequest:
    return GenerationRequest(request_id=rid, prompt_ids=(1, 2, 3), adapter=adapter,
                             sampling=SamplingConfig(max_new_tokens=max_tokens), stop_token_ids=(EOS,))


async def collect(pool: UpstreamPool, req: GenerationRequest) -> list[TokenEvent]:
    return [event async for event in pool.submit(req)]


def text(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)


Scenario = Callable[[UpstreamPool, dict[str, FakeVllm]], Awaitable[None]]


def run(tmp_path: Path, scenario: Scenario, *, health_interval_s: float = 0.05) -> None:
    """Three fake upstreams, twelve registered adapters, health probes every 50 ms; then ``scenario``."""
    async def main() -> None:
        fakes = {name: FakeVllm(name) for name in ("up-a", "up-b", "up-c")}
        pool = UpstreamPool([f.member() for f in fakes.values()],
                            PoolConfig(max_in_flight=2, max_queue=4, health_interval_s=health_interval_s))
        pool.start(asyncio.get_running_loop())
        try:
            assert await pool.wait_up(5) == 3
            for name in ADAPTERS:
                (tmp_path / name).mkdir()
                await asyncio.to_thread(pool.add_adapter, name, tmp_path / name)
            await scenario(pool, fakes)
        finally:
            await asyncio.to_thread(pool.stop)

    asyncio.run(main())


def test_adapters_load_on_their_rendezvous_home_only(tmp_path: Path) -> None:
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        for name in ADAPTERS:
            home = rendezvous_order(name, list(fakes))[0]
            assert [f.name for f in fakes.values() if name in f.adapters] == [home]
        # Twelve adapters over three upstreams: every upstream is somebody's home (the ranking spreads them).
        assert all(f.adapters for f in fakes.values())

    run(tmp_path, scenario)


def test_requests_follow_their_adapter_and_the_text_is_the_upstreams(tmp_path: Path) -> None:
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        for i, adapter in enumerate(ADAPTERS[:6]):  # one at a time: each goes to its home
            events = await collect(upstreams, request(f"one{i}", adapter))
            home = rendezvous_order(adapter, list(fakes))[0]
            assert events[-1].finish_reason == "stop"
            assert text(events) == "".join(f"[{home}|{adapter}|{k}]" for k in range(3))
            assert [e.token_id for e in events] == [100, 101, 102, EOS]
        # Concurrently (some homes saturate and spill): every answer is its own adapter's, from one upstream.
        results = await asyncio.gather(*(collect(upstreams, request(f"r{i}", ADAPTERS[i % 6])) for i in range(12)))
        for i, events in enumerate(results):
            adapter = ADAPTERS[i % 6]
            served = text(events)[1:].split("|")[0]
            assert served in rendezvous_order(adapter, list(fakes))
            assert text(events) == "".join(f"[{served}|{adapter}|{k}]" for k in range(3))  # no cross-talk
        assert sum(len(f.completions) for f in fakes.values()) == 18  # nothing retried or duplicated

    run(tmp_path, scenario)


def test_a_saturated_home_spills_over_to_the_next_upstream_in_the_ranking(tmp_path: Path) -> None:
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        adapter = ADAPTERS[0]
        first, second = rendezvous_order(adapter, list(fakes))[:2]
        gate = asyncio.Event()
        for fake in fakes.values():
            fake.gate = gate
        tasks = [asyncio.create_task(collect(upstreams, request(f"s{i}", adapter))) for i in range(3)]
        for _ in range(200):
            await asyncio.sleep(0.01)
            if sum(len(f.completions) for f in fakes.values()) == 3:
                break
        assert len(fakes[first].completions) == 2  # max_in_flight
        assert len(fakes[second].completions) == 1  # the spill-over
        assert adapter in fakes[second].adapters  # loaded there on demand
        described = {m["name"]: m for m in upstreams.describe()}
        assert described[first]["in_flight"] == 2 and described[second]["in_flight"] == 1
        gate.set()
        results = await asyncio.gather(*tasks)
        assert all(r[-1].finish_reason == "stop" for r in results)
        assert {m["name"]: m["in_flight"] for m in upstreams.describe()} == {n: 0 for n in fakes}

    run(tmp_path, scenario)


def test_beyond_the_queue_bound_submit_is_refused(tmp_path: Path) -> None:
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        gate = asyncio.Event()
        for fake in fakes.values():
            fake.gate = gate
        # 3 upstreams x 2 in flight, then 4 more may wait (max_queue): the 11th is refused.
        tasks = [asyncio.create_task(collect(upstreams, request(f"q{i}", ADAPTERS[0]))) for i in range(10)]
        for _ in range(200):
            await asyncio.sleep(0.01)
            if sum(m["in_flight"] for m in upstreams.describe()) == 10:
                break
        with pytest.raises(QueueFullError):
            upstreams.submit(request("q-over", ADAPTERS[0]))
        gate.set()
        assert all(r[-1].finish_reason == "stop" for r in await asyncio.gather(*tasks))

    run(tmp_path, scenario)


def test_failure_before_the_first_token_is_retried_elsewhere_once(tmp_path: Path) -> None:
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        adapter = ADAPTERS[1]
        home, second = rendezvous_order(adapter, list(fakes))[:2]
        fakes[home].fail_completions = 1  # 503 before any token
        events = await collect(upstreams, request("retry", adapter))
        assert events[-1].finish_reason == "stop"
        assert text(events) == "".join(f"[{second}|{adapter}|{k}]" for k in range(3))
        assert len(fakes[home].completions) == 0 and len(fakes[second].completions) == 1
        described = {m["name"]: m for m in upstreams.describe()}
        assert described[home]["retries"] == 1 and described[home]["failures"] == 1
        # The home answered its health probe again, so it is back in rotation for the next request.
        for _ in range(100):
            if {m["name"]: m for m in upstreams.describe()}[home]["up"]:
                break
            await asyncio.sleep(0.02)
        again = await collect(upstreams, request("after", adapter))
        assert text(again).startswith(f"[{home}|")

    run(tmp_path, scenario)


def test_an_unreachable_upstream_is_skipped_until_it_answers_and_is_then_resynced(tmp_path: Path) -> None:
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        adapter = ADAPTERS[2]
        home, second = rendezvous_order(adapter, list(fakes))[:2]
        fakes[home].up = False
        events = await collect(upstreams, request("down", adapter))
        assert text(events).startswith(f"[{second}|") and events[-1].finish_reason == "stop"
        assert not {m["name"]: m for m in upstreams.describe()}[home]["up"]
        # While it is down, an adapter whose home it is gets removed.
        homed = [n for n in ADAPTERS if rendezvous_order(n, list(fakes))[0] == home and n != adapter]
        await asyncio.to_thread(upstreams.remove_adapter, homed[0])
        assert homed[0] in fakes[home].adapters  # it could not be told
        fakes[home].up = True
        for _ in range(100):
            if {m["name"]: m for m in upstreams.describe()}[home]["up"]:
                break
            await asyncio.sleep(0.02)
        assert {m["name"]: m for m in upstreams.describe()}[home]["up"]
        # Back: the adapter removed meanwhile is unloaded from it, its other adapters stay.
        assert set(fakes[home].adapters) == {adapter, *homed[1:]} and homed[0] in fakes[home].unloads
        # A restart between probes (it answers, but empty): the next probe re-syncs its home adapters.
        fakes[home].restart()
        for _ in range(100):
            if set(fakes[home].adapters) == {adapter, *homed[1:]}:
                break
            await asyncio.sleep(0.02)
        assert set(fakes[home].adapters) == {adapter, *homed[1:]}
        again = await collect(upstreams, request("back", adapter))
        assert text(again).startswith(f"[{home}|")

    run(tmp_path, scenario)


def test_an_upstream_that_restarted_between_probes_gets_the_adapter_again(tmp_path: Path) -> None:
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        await asyncio.sleep(0.1)  # the health loop's first round is over; the next is an hour away
        adapter = ADAPTERS[3]
        home = rendezvous_order(adapter, list(fakes))[0]
        fakes[home].restart()
        events = await collect(upstreams, request("restarted", adapter))
        assert text(events).startswith(f"[{home}|{adapter}|") and events[-1].finish_reason == "stop"
        assert fakes[home].loads.count(adapter) == 2  # loaded at registration and again after the 404

    run(tmp_path, scenario, health_interval_s=3600)  # the request path must notice on its own


def test_a_failure_mid_answer_continues_on_another_upstream_without_repeating_a_token(tmp_path: Path) -> None:
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        adapter = ADAPTERS[4]
        home, second = rendezvous_order(adapter, list(fakes))[:2]
        fakes[home].break_after = 1  # one token, then the connection drops
        events = await collect(upstreams, request("mid", adapter, max_tokens=16))
        assert events[-1].finish_reason == "stop"
        # The first token came from the home; the rest from the next upstream, which was asked to continue.
        assert text(events) == f"[{home}|{adapter}|0]" + "".join(f"[{second}|{adapter}|{k}]" for k in range(3))
        assert [e.token_id for e in events] == [100, 100, 101, 102, EOS]
        continuation = fakes[second].completions[-1]
        assert continuation["prompt"] == [1, 2, 3, 100] and continuation["max_tokens"] == 15
        assert len(fakes[home].completions) == 1 and len(fakes[second].completions) == 1
        assert {m["name"]: m for m in upstreams.describe()}[home]["retries"] == 1

    run(tmp_path, scenario)


def test_tokens_whose_text_was_held_back_are_generated_again_after_a_failure(tmp_path: Path) -> None:
    """The home sends one token with text, then one whose text it holds back, then drops: the held token was
    never shown, so the next member continues from the first token and sends both texts."""
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        adapter = ADAPTERS[5]
        home, second = rendezvous_order(adapter, list(fakes))[:2]
        fakes[home].break_after, fakes[home].hold_text_from = 2, 1
        events = await collect(upstreams, request("held", adapter, max_tokens=16))
        assert events[-1].finish_reason == "stop"
        assert [e.token_id for e in events] == [100, 100, 101, 102, EOS]  # each token delivered once
        assert text(events) == f"[{home}|{adapter}|0]" + "".join(f"[{second}|{adapter}|{k}]" for k in range(3))
        assert fakes[second].completions[-1]["prompt"] == [1, 2, 3, 100]  # not the held-back 101

    run(tmp_path, scenario)


# Token texts as the base's tokenizer decodes them; the members' own streams differ from this at the seams.
WORDS = {100: "Hello", 101: " wor", 102: "ld E", 200: "ND", 201: " more", 202: " world", 203: "!"}


def decode(ids: Sequence[int]) -> str:
    return "".join(WORDS.get(i, "") for i in ids)


def run_decoding(tmp_path: Path, scenario: Scenario) -> None:
    """Two fake upstreams and a pool that decodes continuations itself (as the service builds it)."""
    async def main() -> None:
        fakes = {name: FakeVllm(name) for name in ("up-a", "up-b")}
        pool = UpstreamPool([f.member() for f in fakes.values()], PoolConfig(max_in_flight=2, max_queue=4),
                            decode=decode)
        pool.start(asyncio.get_running_loop())
        try:
            assert await pool.wait_up(5) == 2
            (tmp_path / ADAPTERS[0]).mkdir()
            await asyncio.to_thread(pool.add_adapter, ADAPTERS[0], tmp_path / ADAPTERS[0])
            await scenario(pool, fakes)
        finally:
            await asyncio.to_thread(pool.stop)

    asyncio.run(main())


def test_a_stop_string_split_across_two_upstreams_ends_the_continued_answer(tmp_path: Path) -> None:
    """The home streams "Hello wor", holds back "ld E" (" E" may start the stop string "END"), then drops; the
    next upstream generates "ND", which alone is no stop string to it. The pool's own decode sees "END"."""
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        home, second = rendezvous_order(ADAPTERS[0], list(fakes))
        fakes[home].text_of = lambda token, i: {100: "Hello", 101: " wor", 102: "ld"}[token]  # " E" held back
        fakes[home].break_after = 3
        fakes[second].first_token, fakes[second].tokens = 200, 4
        fakes[second].text_of = lambda token, i: WORDS[token]
        events = await collect(upstreams, replace(request("split", ADAPTERS[0]), stop=("END",)))
        assert [e.token_id for e in events] == [100, 101, 102, 200]
        # Exactly the answer the tokens decode to, cut at the stop string (the service strips the space).
        assert text(events) == "Hello world " == truncate_at_stop(decode([100, 101, 102, 200]), ("END",))
        assert events[-1].finish_reason == "stop"
        assert fakes[second].closed_streams == 1  # the upstream was stopped there, not left to run on

    run_decoding(tmp_path, scenario)


def test_a_continuation_keeps_the_space_the_next_upstreams_decoder_drops(tmp_path: Path) -> None:
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        home, second = rendezvous_order(ADAPTERS[0], list(fakes))
        fakes[home].text_of = lambda token, i: WORDS[token]
        fakes[home].break_after = 1
        fakes[second].first_token, fakes[second].tokens = 202, 3
        # A SentencePiece decoder starting at this token drops its leading space.
        fakes[second].text_of = lambda token, i: WORDS[token].lstrip() if i == 0 else WORDS[token]
        events = await collect(upstreams, request("space", ADAPTERS[0]))
        assert [e.token_id for e in events] == [100, 202, 203, EOS]
        assert text(events) == "Hello world!" == decode([e.token_id or 0 for e in events])

    run_decoding(tmp_path, scenario)


def test_a_continuation_keeps_the_token_budget(tmp_path: Path) -> None:
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        adapter = ADAPTERS[4]
        home, second = rendezvous_order(adapter, list(fakes))[:2]
        fakes[home].break_after = 2
        events = await collect(upstreams, request("budget", adapter, max_tokens=3))
        assert [e.token_id for e in events] == [100, 101, 100] and events[-1].finish_reason == "length"
        assert fakes[second].completions[-1]["max_tokens"] == 1

    run(tmp_path, scenario)


def test_cancel_closes_the_upstream_stream(tmp_path: Path) -> None:
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        adapter = ADAPTERS[5]
        home = rendezvous_order(adapter, list(fakes))[0]
        fakes[home].gate = asyncio.Event()
        handle = upstreams.submit(request("cancel", adapter))
        events = aiter(handle)
        pending = asyncio.ensure_future(anext(events))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if fakes[home].completions:
                break
        handle.cancel()
        last = await asyncio.wait_for(pending, 5)
        assert last.finish_reason == "cancelled"
        for _ in range(100):
            if fakes[home].closed_streams:
                break
            await asyncio.sleep(0.01)
        assert fakes[home].closed_streams == 1
        assert {m["name"]: m["in_flight"] for m in upstreams.describe()}[home] == 0

    run(tmp_path, scenario)


def test_every_upstream_down_is_unavailable(tmp_path: Path) -> None:
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        for fake in fakes.values():
            fake.up = False
        events = await collect(upstreams, request("none", ADAPTERS[0]))
        assert events[-1].finish_reason == "error" and "no generation upstream is up" in (events[-1].error or "")
        with pytest.raises(UpstreamUnavailableError):
            upstreams.submit(request("none-2", ADAPTERS[0]))

    run(tmp_path, scenario)


def test_request_errors_pass_through_without_retry(tmp_path: Path) -> None:
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        events = await collect(upstreams, request("bad", ADAPTERS[0], max_tokens=2000))
        assert events[-1].finish_reason == "error" and "max_tokens is too large" in (events[-1].error or "")
        assert all(m["up"] and m["retries"] == 0 for m in upstreams.describe())

    run(tmp_path, scenario)


def test_base_requests_and_length_finish(tmp_path: Path) -> None:
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        events = await collect(upstreams, request("base", None, max_tokens=2))
        assert events[-1].finish_reason == "length" and [e.token_id for e in events] == [100, 101]
        assert any(c["model"] == BASE for f in fakes.values() for c in f.completions)

    run(tmp_path, scenario)


def test_refused_adapter_is_an_adapter_error_and_the_upstream_stays_up(tmp_path: Path) -> None:
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        for fake in fakes.values():
            fake.refuse_adapters = True
        (tmp_path / "broken@1").mkdir()
        with pytest.raises(AdapterError, match="modules_to_save"):
            await asyncio.to_thread(upstreams.add_adapter, "broken@1", tmp_path / "broken@1")
        assert all(m["up"] for m in upstreams.describe())

    run(tmp_path, scenario)


def test_remove_unloads_from_every_upstream_holding_it(tmp_path: Path) -> None:
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        adapter = ADAPTERS[6]
        gate = asyncio.Event()
        for fake in fakes.values():
            fake.gate = gate
        tasks = [asyncio.create_task(collect(upstreams, request(f"x{i}", adapter))) for i in range(3)]
        for _ in range(200):
            await asyncio.sleep(0.01)
            if sum(len(f.completions) for f in fakes.values()) == 3:
                break
        gate.set()
        await asyncio.gather(*tasks)
        holders = [f for f in fakes.values() if adapter in f.adapters]
        assert len(holders) == 2  # home + spill-over
        await asyncio.to_thread(upstreams.remove_adapter, adapter)
        assert not any(adapter in f.adapters for f in fakes.values())
        assert adapter not in upstreams.adapter_names()

    run(tmp_path, scenario)


def test_an_unload_that_failed_is_retried_by_the_health_check(tmp_path: Path) -> None:
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        adapter = ADAPTERS[7]
        home = fakes[rendezvous_order(adapter, list(fakes))[0]]
        others = set(home.adapters) - {adapter}
        home.fail_unloads = 1
        await asyncio.to_thread(upstreams.remove_adapter, adapter)
        assert adapter in home.adapters and adapter not in upstreams.adapter_names()  # not told yet
        for _ in range(100):
            if adapter not in home.adapters:
                break
            await asyncio.sleep(0.02)
        assert set(home.adapters) == others and home.unloads == [adapter]  # the others stay loaded
        assert all(m["up"] for m in upstreams.describe())

    run(tmp_path, scenario)


def test_an_adapter_removed_while_its_upstream_resyncs_is_unloaded_there(tmp_path: Path) -> None:
    """The removal lands after the re-sync loaded the adapter but before the member counts as up again."""
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        adapter = ADAPTERS[8]
        home = fakes[rendezvous_order(adapter, list(fakes))[0]]
        state = upstreams.members[home.name]
        real_resync = upstreams._resync
        removed = threading.Event()

        def resync_then_remove(member: MemberState, reported: list[str]) -> None:
            real_resync(member, reported)
            if member is state and not removed.is_set():
                removed.set()
                upstreams.remove_adapter(adapter)  # the member is still down here

        upstreams._resync = resync_then_remove  # type: ignore[method-assign]
        home.restart()  # the next probe finds its adapters gone and re-syncs it
        upstreams.mark_down(state, "test: made to re-sync")
        for _ in range(200):
            if removed.is_set() and adapter not in home.adapters:
                break
            await asyncio.sleep(0.02)
        assert removed.is_set() and adapter not in home.adapters
        assert {m["name"]: m for m in upstreams.describe()}[home.name]["up"]

    run(tmp_path, scenario)


def test_a_request_the_upstream_refuses_is_the_clients_error_and_the_upstream_stays_up(tmp_path: Path) -> None:
    """vLLM answers 400 to a request it will not run (here: too many tokens): the event carries an
    InvalidRequestError (the service answers 400, not 500), and the member is not probed or marked down."""
    from persona_router.core.errors import InvalidRequestError

    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        before = {m["name"]: m["failures"] for m in upstreams.describe()}
        events = await collect(upstreams, request("long", ADAPTERS[1], max_tokens=2000))
        assert isinstance(events[-1].failure, InvalidRequestError)
        assert "max_tokens is too large" in str(events[-1].failure)
        assert {m["name"]: m["failures"] for m in upstreams.describe()} == before
        assert all(m["up"] for m in upstreams.describe())

    run(tmp_path, scenario, health_interval_s=3600)


def test_no_upstream_left_for_a_request_is_unavailable_not_a_server_error(tmp_path: Path) -> None:
    async def scenario(upstreams: UpstreamPool, fakes: dict[str, FakeVllm]) -> None:
        for fake in fakes.values():
            fake.up = False
        events = await collect(upstreams, request("none", ADAPTERS[0]))
        assert isinstance(events[-1].failure, UpstreamUnavailableError)

    run(tmp_path, scenario, health_interval_s=3600)
