"""A fake vLLM OpenAI server behind ``httpx.MockTransport``: the endpoints the upstream pool uses, with
switches for the failures the pool must survive (down, a failure before or after the first token, a restart
that forgets the adapters) and a gate that holds streams open to saturate it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
from persona_router.adapters.vllm_upstream import VllmUpstream

BASE = "fake-base"
EOS = 2


class FakeVllm:
    def __init__(self, name: str, *, tokens: int = 4) -> None:
        self.name = name
        self.tokens = tokens
        self.adapters: dict[str, str] = {}
        self.up = True
        self.fail_completions = 0  # the next N completions answer 503 before any token
        self.break_after: int | None = None  # drop the stream after this many tokens
        self.hold_text_from: int | None = None  # tokens from this index on carry no text (held back, as a stop
        # string's possible start is)
        self.first_token = 100  # the i-th token of a stream is first_token + i (EOS ends a finished one)
        self.text_of: Callable[[int, int], str] | None = None  # (token, index in the stream) -> its text
        self.refuse_adapters = False  # loads answer 500, as vLLM does for an unloadable adapter
        self.fail_unloads = 0  # the next N unloads answer 503
        self.gate: asyncio.Event | None = None  # when set to an unset Event, streams wait on it
        self.completions: list[dict[str, Any]] = []  # request bodies received
        self.loads: list[str] = []
        self.unloads: list[str] = []
        self.closed_streams = 0  # streams whose consumer went away before the end

    def restart(self) -> None:
        """Forget every runtime-loaded adapter, like a restarted server."""
        self.adapters.clear()

    def member(self) -> VllmUpstream:
        transport = httpx.MockTransport(self.handle)
        return VllmUpstream(f"http://{self.name}", name=self.name, transport=transport, sync_transport=transport,
                            read_timeout_s=10.0)

    # -- the server ------------------------------------------------------------------------------------
    def handle(self, request: httpx.Request) -> httpx.Response:
        if not self.up:
            raise httpx.ConnectError("connection refused", request=request)
        path = request.url.path
        body = json.loads(request.content) if request.content else {}
        if path == "/v1/models":
            data = [{"id": BASE, "parent": None}] + [{"id": n, "parent": BASE} for n in self.adapters]
            return httpx.Response(200, json={"object": "list", "data": data})
        if path == "/v1/load_lora_adapter":
            name = body["lora_name"]
            if name in self.adapters:
                return _error(400, f"The lora adapter '{name}' has already been loaded.")
            if self.refuse_adapters:
                return _error(500, "modules_to_save is not supported")
            self.adapters[name] = body["lora_path"]
            self.loads.append(name)
            return httpx.Response(200, text=f"Success: LoRA adapter '{name}' added successfully.")
        if path == "/v1/unload_lora_adapter":
            name = body["lora_name"]
            if self.fail_unloads > 0:
                self.fail_unloads -= 1
                return _error(503, "busy")
            if self.adapters.pop(name, None) is None:
                return _error(404, f"The lora adapter '{name}' cannot be found.")
            self.unloads.append(name)
            return httpx.Response(200, text="ok")
        if path == "/v1/completions":
            return self.complete(body)
        return _error(404, "no such route")

    def complete(self, body: dict[str, Any]) -> httpx.Response:
        model = body["model"]
        if model != BASE and model not in self.adapters:
            return _error(404, f"The model `{model}` does not exist.")
        if body["max_tokens"] > 1000:
            return _error(400, "max_tokens is too large")
        if self.fail_completions:
            self.fail_completions -= 1
            return _error(503, "engine overloaded")
        self.completions.append(body)
        return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=self.chunks(body))

    async def chunks(self, body: dict[str, Any]) -> AsyncIterator[bytes]:
        finished = False
        try:
            if self.gate is not None:
                await self.gate.wait()
            count = min(self.tokens, body["max_tokens"])
            for i in range(count):
                if self.break_after is not None and i >= self.break_after:
                    raise httpx.ReadError("connection reset by peer")
                await asyncio.sleep(0)
                last = i == count - 1
                reason = ("length" if count == body["max_tokens"] else "stop") if last else None
                token = EOS if last and reason == "stop" else self.first_token + i
                held = self.hold_text_from is not None and i >= self.hold_text_from
                text = "" if token == EOS or held else f"[{self.name}|{body['model']}|{i}]"
                if self.text_of is not None and token != EOS:
                    text = self.text_of(token, i)
                chunk = {"choices": [{"index": 0, "text": text, "token_ids": [token], "finish_reason": reason}]}
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            usage = {"prompt_tokens": len(body["prompt"]), "completion_tokens": count}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                self.closed_streams += 1


def _error(status: int, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"message": message, "type": "Error", "code": status}})
