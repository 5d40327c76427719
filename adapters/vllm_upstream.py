"""One vLLM server as a pool member (``adapters/upstream_pool.py``), over its OpenAI-compatible HTTP API.

Generation is ``POST /v1/completions`` with the prompt as token ids (the service builds the prompt with the
base's chat template, exactly as for the in-process engines), ``stream: true`` and ``return_token_ids`` so
that every ``TokenEvent`` carries the id the service decodes the final answer from. ``model`` is the adapter's
name (``persona@version``) or the served base. Cancelling a handle closes the HTTP stream, which makes vLLM
abort the request. Adapters are loaded and unloaded with ``POST /v1/load_lora_adapter`` /
``/v1/unload_lora_adapter`` (the server needs ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``); the folder path is
sent as the service sees it, so an upstream on another machine must see the adapters folder at the same path.

Errors: a transport failure, a stall longer than ``read_timeout_s``, a 5xx or 429, or an aborted stream
raise ``UpstreamFailedError`` (the pool retries elsewhere if no token went out); a 404 for the adapter
raises it with ``adapter_missing`` (the server restarted and lost it: the pool reloads it); any other 4xx
is the request's own fault and ends the stream with an ``error`` event carrying vLLM's message.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from persona_router.adapters.engine_api import EngineStats, GenerationRequest, TokenEvent
from persona_router.core.errors import AdapterError, ConfigError, InvalidRequestError, UpstreamFailedError

log = logging.getLogger(__name__)

try:
    import httpx
except ImportError as exc:  # pragma: no cover - litestar depends on httpx
    raise ImportError("the vLLM upstream needs httpx: pip install httpx") from exc

FINISH_REASONS = {"stop": "stop", "length": "length"}


class VllmUpstream:
    """A ``PoolMember`` for one vLLM OpenAI-compatible server at ``url`` (``http://host:port``).

    ``stop_token_ids`` are sent with every request (the base's end-of-sequence ids, what the in-process engines
    stop on) besides the request's own."""

    def __init__(self, url: str, *, name: str | None = None, connect_timeout_s: float = 5.0,
                 read_timeout_s: float = 300.0, probe_timeout_s: float = 5.0, admin_timeout_s: float = 120.0,
                 stop_token_ids: tuple[int, ...] = (),
                 transport: httpx.AsyncBaseTransport | None = None,
                 sync_transport: httpx.BaseTransport | None = None) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{url!r} is not an http(s):// URL", field="upstream")
        self.url = url.rstrip("/")
        self.name = name or without_credentials(self.url)  # shown in /ready, metrics labels and logs
        self.timeout = httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s, write=30.0, pool=None)
        self.probe_timeout_s = probe_timeout_s
        self.stop_token_ids = stop_token_ids
        self._transport = transport
        self._sync = httpx.Client(base_url=self.url, timeout=httpx.Timeout(admin_timeout_s, connect=connect_timeout_s),
                                  transport=sync_transport)
        self._client: httpx.AsyncClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.base_model: str | None = None
        self.running = 0

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            # Streams are long-lived: no pool limit beyond what vLLM accepts (the pool bounds in-flight requests).
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
            self._client = httpx.AsyncClient(base_url=self.url, timeout=self.timeout, limits=limits,
                                             transport=self._transport)
        return self._client

    def stop(self) -> None:
        self._sync.close()
        client, loop = self._client, self._loop
        if client is not None and loop is not None and loop.is_running():
            asyncio.run_coroutine_threadsafe(client.aclose(), loop)

    # -- health ----------------------------------------------------------------------------------------
    async def probe(self) -> list[str] | None:
        """``GET /v1/models``: the served base (remembered) and the LoRA adapters it holds; None if unreachable."""
        try:
            response = await self.client().get("/v1/models", timeout=self.probe_timeout_s)
        except httpx.HTTPError as exc:
            log.debug("probe of %s failed: %r", self.name, exc)
            return None
        if response.status_code != 200:
            return None
        try:
            models = response.json()["data"]
        except (ValueError, KeyError, TypeError):
            return None
        adapters = []
        for model in models:
            if model.get("parent"):
                adapters.append(str(model["id"]))
            elif self.base_model is None or self.base_model != model.get("id"):
                self.base_model = str(model["id"])
        return adapters

    # -- adapters (blocking; called from worker threads) -----------------------------------------------
    def add_adapter(self, name: str, folder: Path) -> None:
        response = self._admin("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})
        if response.status_code == 200:
            return
        message = _error_message(response)
        if "already" in message.lower() and "loaded" in message.lower():
            return  # versions are immutable: the same name is the same weights
        if response.status_code in (502, 503, 504):
            raise UpstreamFailedError(f"upstream {self.name} could not load {name}: HTTP {response.status_code} "
                                      f"{message}")
        # vLLM answers 500 when the engine cannot load the weights (e.g. modules_to_save): the server is fine.
        raise AdapterError(f"upstream {self.name} refused the adapter (HTTP {response.status_code}): {message}",
                           path=folder)

    def remove_adapter(self, name: str) -> None:
        response = self._admin("/v1/unload_lora_adapter", {"lora_name": name})
        if response.status_code == 200 or 400 <= response.status_code < 500:
            return  # 4xx: it does not hold it (restarted, or never loaded)
        raise UpstreamFailedError(f"upstream {self.name} could not unload {name}: HTTP {response.status_code} "
                                  f"{_error_message(response)}")

    def _admin(self, path: str, body: dict[str, Any]) -> httpx.Response:
        try:
            return self._sync.post(path, json=body)
        except httpx.HTTPError as exc:
            raise UpstreamFailedError(f"upstream {self.name} unreachable ({type(exc).__name__}: {exc})") from exc

    # -- generation ------------------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> VllmHandle:
        return VllmHandle(self, request)

    def stats(self) -> EngineStats:
        return EngineStats(running=self.running)

    def body(self, request: GenerationRequest) -> dict[str, Any]:
        sampling = request.sampling
        body: dict[str, Any] = {
            "model": request.adapter or self.base_model, "prompt": list(request.prompt_ids),
            "max_tokens": sampling.max_new_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p,
            "stream": True, "return_token_ids": True,
            "stop_token_ids": sorted({*self.stop_token_ids, *request.stop_token_ids}), "skip_special_tokens": True,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if request.stop:
            body["stop"] = list(request.stop)  # vLLM applies stop strings itself and leaves them out of the text
        return body

    async def stream(self, request: GenerationRequest, emit: Callable[[TokenEvent], None]) -> None:
        """Stream one completion into ``emit``; the last event has ``finish_reason``."""
        if self.base_model is None and request.adapter is None and await self.probe() is None:
            raise UpstreamFailedError(f"upstream {self.name} is unreachable")
        rid = request.request_id
        self.running += 1
        try:
            async with self.client().stream("POST", "/v1/completions", json=self.body(request)) as response:
                if response.status_code != 200:
                    await response.aread()
                    self._raise_status(response, request)
                    message = f"upstream {self.name} refused the request: {_error_message(response)}"
                    # 400/413/422: vLLM refused this request (e.g. longer than its --max-model-len), the
                    # client's error and answered as one; anything else stays a server error.
                    refused = InvalidRequestError(message) if response.status_code in (400, 413, 422) else None
                    emit(TokenEvent(rid, None, "", finish_reason="error", error=message, failure=refused))
                    return
                async for payload in _sse_payloads(response.aiter_lines()):
                    if _handle_chunk(rid, payload, emit, self.name):
                        return
            raise UpstreamFailedError(f"upstream {self.name} ended the stream without a finish reason")
        except httpx.HTTPError as exc:
            raise UpstreamFailedError(f"upstream {self.name} failed ({type(exc).__name__}: {exc})") from exc
        finally:
            self.running -= 1

    def _raise_status(self, response: httpx.Response, request: GenerationRequest) -> None:
        status = response.status_code
        message = _error_message(response)
        if status == 404 and request.adapter is not None:
            raise UpstreamFailedError(f"upstream {self.name} does not hold {request.adapter}: {message}",
                                      adapter_missing=True)
        if status == 429 or status >= 500:
            raise UpstreamFailedError(f"upstream {self.name} answered HTTP {status}: {message}")


def _handle_chunk(rid: str, payload: dict[str, Any], emit: Callable[[TokenEvent], None], name: str) -> bool:
    """Turn one streamed chunk into events; True once the finishing event was emitted."""
    if "error" in payload:
        raise UpstreamFailedError(f"upstream {name} reported: {payload['error']}")
    for choice in payload.get("choices") or []:
        ids = list(choice.get("token_ids") or [])
        text = choice.get("text") or ""
        reason = choice.get("finish_reason")
        if reason is not None and reason not in FINISH_REASONS:
            raise UpstreamFailedError(f"upstream {name} ended the request with {reason!r}")
        finish = FINISH_REASONS.get(reason) if reason else None
        if not ids:
            if text or finish:
                emit(TokenEvent(rid, None, text, finish_reason=finish))
            if finish:
                return True
            continue
        for i, token in enumerate(ids):
            last = i == len(ids) - 1
            emit(TokenEvent(rid, int(token), text if i == 0 else "", finish_reason=finish if last else None))
        if finish:
            return True
    return False


async def _sse_payloads(lines: AsyncIterator[str]) -> AsyncIterator[dict[str, Any]]:
    async for line in lines:
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        try:
            payload = json.loads(data)
        except ValueError as exc:
            raise UpstreamFailedError(f"unreadable stream chunk ({exc}): {data[:200]}") from exc
        if isinstance(payload, dict):
            yield payload


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:500]
    if isinstance(body, dict):
        error = body.get("error", body)
        if isinstance(error, dict):
            return str(error.get("message") or error)
        return str(error)
    return str(body)[:500]


class VllmHandle:
    """One request's stream. A task pumps the HTTP stream into a queue; ``cancel`` cancels that task, which
    closes the connection (vLLM aborts the request) and ends the stream with a ``cancelled`` event."""

    def __init__(self, upstream: VllmUpstream, request: GenerationRequest) -> None:
        self.request_id = request.request_id
        self._upstream = upstream
        self._request = request
        self._queue: asyncio.Queue[TokenEvent | UpstreamFailedError] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._done = False

    def __aiter__(self) -> AsyncIterator[TokenEvent]:
        if self._task is None and not self._done:
            self._task = asyncio.get_running_loop().create_task(self._pump())
        return self._events()

    async def _events(self) -> AsyncIterator[TokenEvent]:
        while True:
            item = await self._queue.get()
            if isinstance(item, UpstreamFailedError):
                raise item
            yield item
            if item.finish_reason is not None:
                return

    def _emit(self, event: TokenEvent) -> None:
        if not self._done:
            self._done = event.finish_reason is not None
            self._queue.put_nowait(event)

    async def _pump(self) -> None:
        try:
            await self._upstream.stream(self._request, self._emit)
        except asyncio.CancelledError:
            self._emit(TokenEvent(self.request_id, None, "", finish_reason="cancelled"))
        except UpstreamFailedError as exc:
            if not self._done:
                self._done = True
                self._queue.put_nowait(exc)

    def cancel(self) -> None:
        if self._done:
            return
        if self._task is not None:
            self._task.cancel()
        else:
            self._emit(TokenEvent(self.request_id, None, "", finish_reason="cancelled"))


def without_credentials(url: str) -> str:
    """``http://user:secret@host:8001`` -> ``http://host:8001``: a member's name is shown to anyone."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
