"""The Litestar app: ``create_app(settings)``.

The lifespan loads the pack, the base model, the router and the engine once, puts them on
``app.state.service`` and starts the engine, the adapter watcher and a warm-up; ``/health`` answers as soon
as the server runs, ``/ready`` once the warm-up generation has gone through. Handlers are thin: they
decode the body, call ``service/answering.py`` and encode the result.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from litestar import Litestar, Request, Response, get, post
from litestar.datastructures import State
from litestar.response import Stream
from persona_router.adapters.engine_api import GenerationRequest
from persona_router.adapters.generation import SamplingConfig, decode_answer
from persona_router.core.errors import PersonaRouterError, public_message, redact_paths
from persona_router.service.answering import Answerer, Running
from persona_router.service.http_errors import EXCEPTION_HANDLERS, MAX_BODY_BYTES, error_body, read_body
from persona_router.service.metrics import ServiceMetrics
from persona_router.service.openapi import openapi_config
from persona_router.service.protection import host_guard, json_body_guard
from persona_router.service.schemas import AdapterRef, AnswerRequest, AnswerResponse, decode_body, sse
from persona_router.service.settings import ServiceSettings
from persona_router.service.state import ServiceState, service

log = logging.getLogger(__name__)

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


# -- loading ------------------------------------------------------------------------------------------------
def load_service(settings: ServiceSettings) -> ServiceState:
    """Everything heavy, once: pack, base model, router, engine, residency (blocking; run in a thread)."""
    from persona_router.adapters.base_model import BaseModelConfig, configure_threads, load_base, load_base_meta
    from persona_router.adapters.registry import AdapterRegistry
    from persona_router.adapters.residency import AdapterResidency
    from persona_router.service.ab_split import check_splits
    from persona_router.service.catalog import CatalogBuilder, CatalogHolder, CatalogReloader

    started = time.perf_counter()
    builder = CatalogBuilder(settings.pack, settings.router, settings.router_backend)
    catalog = builder.build()
    pack, router_info = catalog.pack, catalog.router_info
    registry = AdapterRegistry(settings.adapters_dir)
    check_splits(settings.ab_splits, pack, registry)
    base_config = BaseModelConfig(base=settings.base, device=settings.device, quantization=settings.quantization)
    metrics = ServiceMetrics()
    if settings.engine == "vllm":
        base = load_base_meta(base_config)  # the upstreams hold the weights; we need the tokenizer and configs
        engine, kind, max_len = _build_engine(settings, base)
    elif settings.devices:
        configure_threads()
        engine, kind, max_len, base = _build_device_pool(settings, base_config)
    else:
        # One core stays with the event loop: on a quiet 2-core Xeon the bf16 load test (200 requests, 16 at a
        # time) ran 52.7 completion tokens/s at p95 14.8 s with two torch threads, 60.6-69.6 at p95 9.2-9.8 s
        # with one (README, benchmarks/results/load_test_cpu.json).
        configure_threads(reserve=1)
        base = load_base(base_config, serving=True)
        engine, kind, max_len = _build_engine(settings, base)
    residency = AdapterResidency(
        engine, registry, base_fingerprint=base.fingerprint, personas=pack.names,
        max_resident=settings.max_resident_adapters,
        on_event=lambda event, persona, version: metrics.adapter_events.inc(
            event=event, persona=persona, adapter_version=str(version)),
    )
    model_config = base.model.config if base.model is not None else base.extra.get("config")
    positions = getattr(model_config, "max_position_embeddings", None)
    limits = [n for n in (positions, max_len) if n]
    holder = CatalogHolder(catalog)
    answerer = Answerer(settings=settings, catalog=holder, engine=engine, residency=residency,
                        tokenizer=base.tokenizer, metrics=metrics, max_positions=min(limits) if limits else None)
    state = ServiceState(settings=settings, catalog=holder, reloader=CatalogReloader(holder, builder, residency),
                         base=base, engine=engine, engine_kind=kind, residency=residency, answerer=answerer,
                         metrics=metrics)
    _register_gauges(state)
    log.info("service loaded in %.1f s: base %s (%s, %s), engine %s, router %s", time.perf_counter() - started,
             base.name, base.device, base.precision, kind, router_info.get("mode"))
    return state


def _build_engine(settings: ServiceSettings, base: Any) -> tuple[Any, str, int | None]:
    """The engine named by the settings; ``auto`` prefers the fast engine and falls back to the reference."""
    kind = settings.engine
    if kind == "vllm":
        from persona_router.adapters.generation import eos_token_ids
        from persona_router.adapters.upstream_pool import PoolConfig, UpstreamPool
        from persona_router.adapters.vllm_upstream import VllmUpstream

        # What ``generate`` and the in-process engines stop on, sent with every request.
        stops = tuple(sorted(eos_token_ids(base.tokenizer, base.extra.get("generation_config"))))
        members = [VllmUpstream(url, read_timeout_s=settings.request_timeout_s, stop_token_ids=stops)
                   for url in settings.upstreams]
        pool_config = PoolConfig(max_in_flight=settings.upstream_max_in_flight, replicas=settings.upstream_replicas,
                                 max_queue=settings.max_queue)
        pool = UpstreamPool(members, pool_config, decode=functools.partial(decode_answer, base.tokenizer))
        return pool, "vllm", None
    if kind in ("auto", "fast"):
        try:
            from persona_router.adapters.engine import EngineConfig, build_engine
        except ImportError as exc:
            if kind == "fast":
                raise
            log.warning("the fast engine is unavailable (%s); using the reference engine", exc)
        else:
            # Two spare slots: an evicted adapter's slot stays busy until a cancelled request still using it
            # leaves the batch, and the residency bound must not turn that moment into a refused load.
            config = EngineConfig(max_batch=settings.max_batch, max_queue=settings.max_queue,
                                  max_adapters=settings.max_resident_adapters + 2)
            log.info("%d adapters resident at most (--max-resident-adapters); the engine has %d slots, 2 spare for "
                     "adapters whose last requests are still finishing", settings.max_resident_adapters,
                     config.max_adapters)
            try:
                return build_engine(base, config), "fast", config.max_len
            except (PersonaRouterError, ValueError, NotImplementedError) as exc:
                if kind == "fast":
                    raise
                log.warning("the fast engine cannot run this model (%s); using the reference engine", exc)
    from persona_router.adapters.engine_reference import ReferenceEngine, ReferenceEngineConfig

    config_ref = ReferenceEngineConfig(max_queue=settings.max_queue, max_batch=settings.max_batch)
    return ReferenceEngine(base, config_ref), "reference", None


def _build_device_pool(settings: ServiceSettings, base_config: Any) -> tuple[Any, str, int | None, Any]:
    """``--devices``: the base loaded on every device, one engine each, pooled with adapter affinity."""
    from dataclasses import replace

    from persona_router.adapters.base_model import load_base
    from persona_router.adapters.engine_member import EngineMember
    from persona_router.adapters.upstream_member import PoolConfig
    from persona_router.adapters.upstream_pool import UpstreamPool

    members, kinds, limits, bases = [], set(), [], []
    for index, device in enumerate(settings.devices):
        base = load_base(replace(base_config, device=device))
        engine, kind, max_len = _build_engine(settings, base)
        name = device if settings.devices.count(device) == 1 else f"{device}#{index}"
        members.append(EngineMember(name, engine))
        kinds.add(kind)
        limits.append(max_len)
        bases.append(base)
    if len({b.fingerprint for b in bases}) != 1:
        raise PersonaRouterError("the base differs between devices")
    config = PoolConfig(max_in_flight=settings.max_batch, replicas=settings.upstream_replicas,
                        max_queue=settings.max_queue)
    known = [n for n in limits if n]
    kind = f"{'+'.join(sorted(kinds))} x{len(members)}"
    pool = UpstreamPool(members, config, decode=functools.partial(decode_answer, bases[0].tokenizer))
    return pool, kind, min(known) if known else None, bases[0]



def _register_gauges(state: ServiceState) -> None:
    metrics = state.metrics
    metrics.add_gauge("persona_router_queue_depth", "Requests waiting for the engine.", (),
                      lambda: [({}, float(state.engine.stats().queued))])
    metrics.add_gauge("persona_router_in_flight", "Requests being answered.", (),
                      lambda: [({}, float(state.answerer.in_flight))])
    metrics.add_gauge("persona_router_resident_adapters", "Adapters resident in the engine.",
                      ("persona", "adapter_version"),
                      lambda: [({"persona": key.persona, "adapter_version": str(key.version)}, 1.0)
                               for key in state.residency.resident()])
    metrics.add_gauge("persona_router_live_adapter_version", "The adapter version serving each persona "
                      "(0: prompt-only).", ("persona",),
                      lambda: [({"persona": p}, float(state.residency.live(p) or 0)) for p in state.pack.names])
    describe = getattr(state.engine, "describe", None)
    if describe is None:
        return
    for key, name, help_text in (
            ("up", "persona_router_upstream_up", "1 while the upstream passes its health checks."),
            ("in_flight", "persona_router_upstream_in_flight", "Requests on the upstream now."),
            ("requests", "persona_router_upstream_requests", "Requests placed on the upstream since start."),
            ("failures", "persona_router_upstream_failures", "Failures seen (probe or request) since start."),
            ("retries", "persona_router_upstream_retries", "Requests that failed there before their first token "
             "and were retried on another upstream."),
            ("adapter_loads", "persona_router_upstream_adapter_loads", "Adapter loads into the upstream."),
            ("adapters", "persona_router_upstream_adapters", "Adapters resident on the upstream.")):
        metrics.add_gauge(name, help_text, ("upstream",), _upstream_reader(describe, key))


def _upstream_reader(describe: Any, key: str) -> Any:
    def read() -> list[tuple[dict[str, str], float]]:
        rows = []
        for member in describe():
            value = member[key]
            rows.append(({"upstream": member["name"]}, float(len(value) if isinstance(value, list) else value)))
        return rows

    return read


async def _warm_up(state: ServiceState) -> None:
    """One short generation through the engine, so the first real request does not pay for it."""
    try:
        wait_up = getattr(state.engine, "wait_up", None)
        if wait_up is not None:  # upstreams may still be starting: wait for one of them
            up = await wait_up(state.settings.upstream_wait_s)
            if not up:
                raise TimeoutError(f"no upstream became healthy within {state.settings.upstream_wait_s:g} s")
        ids = state.base.tokenizer("warm up", add_special_tokens=False)["input_ids"] or [0]
        request = GenerationRequest(request_id="warmup", prompt_ids=tuple(ids), adapter=None,
                                    sampling=SamplingConfig(max_new_tokens=2))
        async for event in state.engine.submit(request):
            if event.finish_reason == "error":
                raise RuntimeError(f"the warm-up generation failed: {event.error}")
        state.ready = True
        log.info("service ready: http://%s:%d/", state.settings.host, state.settings.port)
    except Exception as exc:  # a failed warm-up leaves the service alive but not ready
        state.warmup_error = f"{type(exc).__name__}: {public_message(exc)}"  # /ready shows it to anyone
        log.exception("warm-up failed")


@contextlib.asynccontextmanager
async def lifespan(app: Litestar) -> AsyncIterator[None]:
    settings: ServiceSettings = app.state.settings
    state = await asyncio.to_thread(load_service, settings)
    loop = asyncio.get_running_loop()
    state.engine.start(loop)
    if hasattr(state.engine, "on_quarantine"):  # the fast engine's watchdog reports poisoned adapters
        state.engine.on_quarantine = lambda name, reason: loop.call_soon_threadsafe(
            state.residency.quarantine, name, reason)
    try:
        await state.residency.reload()
        if settings.watch_interval_s > 0:
            state.tasks.append(asyncio.create_task(state.residency.watch(settings.watch_interval_s)))
            state.tasks.append(asyncio.create_task(state.reloader.watch(settings.watch_interval_s)))
        if settings.warmup:
            state.tasks.append(asyncio.create_task(_warm_up(state)))
        else:
            state.ready = True
        app.state.service = state
        yield
    finally:
        for task in state.tasks:
            task.cancel()
        await asyncio.gather(*state.tasks, return_exceptions=True)
        await state.residency.close()
        await asyncio.to_thread(state.engine.stop)


# -- handlers -----------------------------------------------------------------------------------------------
def _index_html() -> str:
    return (resources.files("persona_router.service") / "static" / "index.html").read_text(encoding="utf-8")


@get("/", include_in_schema=False)
async def index() -> Response[str]:
    return Response(_index_html(), media_type="text/html")  # Litestar appends "; charset=utf-8"


@get("/health")
async def health(request: Request[Any, Any, Any]) -> dict[str, Any]:
    loaded = getattr(request.app.state, "service", None) is not None
    return {"status": "alive", "loaded": loaded}


@get("/ready")
async def ready(request: Request[Any, Any, Any]) -> Response[dict[str, Any]]:
    state = getattr(request.app.state, "service", None)
    if state is None or not state.ready:
        body: dict[str, Any] = {"status": "loading" if state is None else "warming up"}
        if state is not None and state.warmup_error:
            body = {"status": "failed", "error": state.warmup_error}
        return Response(body, status_code=503, headers={"Retry-After": "1"})
    return Response({"status": "ready", "base": redact_paths(state.base.name), "device": state.base.device,
                     "precision": state.base.precision, "engine": state.engine_kind,
                     "router": state.router_info.get("mode"),
                     "router_backend": state.router_info.get("embedder", {}).get("backend"),
                     "uptime_s": round(time.time() - state.started_at, 1), **_upstreams(state)})


def _upstreams(state: ServiceState) -> dict[str, Any]:
    describe = getattr(state.engine, "describe", None)
    if describe is None:
        return {}
    return {"upstreams": [{k: member[k] for k in ("name", "up", "in_flight", "adapters", "last_error")}
                          for member in describe()]}


@post("/v1/answer", status_code=200, guards=[json_body_guard])
async def answer(request: Request[Any, Any, Any]) -> Response[Any]:
    state = service(request)
    body = decode_body(await read_body(request), AnswerRequest)
    running = await state.answerer.start(body, endpoint="answer")
    if body.stream:
        return Stream(_answer_events(running), media_type="text/event-stream", headers=SSE_HEADERS)
    try:
        await running.collect_or_cancel(request.receive)
    finally:
        running.close(cancel=True)  # a no-op unless collecting was interrupted
    return Response(_answer_response(running))


def _answer_response(running: Running) -> AnswerResponse:
    finished = running.finished
    assert finished is not None
    adapter = running.adapter
    return AnswerResponse(
        id=running.request_id, answer=finished.answer, decision=running.decision.to_json(),
        adapter=AdapterRef(**adapter) if adapter else None,
        usage=finished.usage,
        timings=finished.timings, finish_reason=finished.finish_reason,
        ab=running.assignment.to_json() if running.assignment else None)


async def _answer_events(running: Running) -> AsyncIterator[bytes]:
    """``decision`` first, one ``token`` event per text piece, then ``done`` (or ``error``)."""
    yield sse({"id": running.request_id, "decision": running.decision.to_json(), "adapter": running.adapter,
               "ab": running.assignment.to_json() if running.assignment else None}, event="decision")
    try:
        async for piece in running.tokens():
            yield sse({"text": piece}, event="token")
    except (TimeoutError, PersonaRouterError) as exc:  # the status line is sent: report in-band
        yield sse({"error": error_body(exc)}, event="error")
        return
    yield sse(_answer_response(running), event="done")


@get("/v1/personas")
async def personas(request: Request[Any, Any, Any]) -> dict[str, Any]:
    state = service(request)
    catalog = state.catalog.current  # one snapshot: the pack and router of the same generation
    listed = []
    for persona in catalog.pack.personas:
        entry = state.residency.describe_persona(persona.name)
        entry.update(description=persona.description, fallback=persona.fallback)
        split = state.answerer.splits.get(persona.name)
        if split is not None:
            entry["ab"] = split.to_json()
        listed.append(entry)
    return {"pack": catalog.pack.name, "router": catalog.router_info.get("mode"),
            "pack_generation": catalog.generation, "personas": listed}


@get("/metrics", media_type="text/plain")  # documents it; the handler sets the exposition version
async def metrics(request: Request[Any, Any, Any]) -> Response[bytes]:
    body, content_type = service(request).metrics.render(request.headers.get("accept", ""))
    return Response(body, media_type=_without_charset(content_type))


def _without_charset(media_type: str) -> str:
    """Litestar appends the response charset to text types itself; a second one would be a duplicate."""
    return "; ".join(p for p in (part.strip() for part in media_type.split(";")) if not p.startswith("charset="))


# -- the app ------------------------------------------------------------------------------------------------
def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("persona-router")
    except PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def create_app(settings: ServiceSettings) -> Litestar:
    from persona_router.service.admin import admin_router
    from persona_router.service.compare import JudgeHolder, compare
    from persona_router.service.openai_compat import chat_completions, list_models, retrieve_model

    return Litestar(
        route_handlers=[index, health, ready, answer, personas, metrics, compare, chat_completions, list_models,
                        retrieve_model, admin_router(settings)],
        lifespan=[lifespan],
        exception_handlers=EXCEPTION_HANDLERS,
        state=State({"settings": settings, "judge": JudgeHolder()}),
        guards=[host_guard(settings)],
        openapi_config=openapi_config(_version()),
        logging_config=None,  # keep the CLI's logging set-up
        request_max_body_size=MAX_BODY_BYTES,
    )


__all__ = ["Answerer", "create_app", "load_service"]
