"""Helpers for the service's integration tests: a real uvicorn server on a free loopback port (in a thread
of the test process, so torch and transformers are imported once), and tiny published LoRA adapters."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from persona_router.adapters.manifest import AdapterManifest, DatasetInfo, TrainMetrics, write_manifest
from persona_router.adapters.registry import AdapterRegistry
from persona_router.core.fingerprint import fingerprint_folder
from persona_router.service.settings import ServiceSettings

OTHER_FINGERPRINT = "sha256:" + "0" * 64


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningServer:
    url: str
    settings: ServiceSettings
    server: Any
    thread: threading.Thread

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 120.0), **kwargs)

    @property
    def state(self) -> Any:
        """The app's loaded ``ServiceState`` (same process), for white-box checks."""
        return self.server.config.app.state.service


@contextlib.contextmanager
def serve(settings: ServiceSettings, *, ready_timeout_s: float = 180.0) -> Iterator[RunningServer]:
    """Start ``create_app(settings)`` under uvicorn in a thread and wait until ``/ready`` says so."""
    import uvicorn
    from persona_router.service.app import create_app

    settings = settings.with_overrides(host="127.0.0.1", port=free_port())
    config = uvicorn.Config(create_app(settings), host=settings.host, port=settings.port, log_config=None,
                            log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn-{settings.port}", daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{settings.port}"
    running = RunningServer(url=url, settings=settings, server=server, thread=thread)
    try:
        wait_ready(url, thread, ready_timeout_s)
        yield running
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def wait_ready(url: str, thread: threading.Thread | None, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if thread is not None and not thread.is_alive():
            raise RuntimeError(f"the server thread died during start-up ({last})")
        try:
            response = httpx.get(f"{url}/ready", timeout=5)
            if response.status_code == 200:
                return
            last = response.text
        except httpx.TransportError as exc:
            last = repr(exc)
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s} s ({last})")


# -- adapters ---------------------------------------------------------------------------------------------
class AdapterFactory:
    """Publishes random (but fixed-seed) LoRA adapters for a base folder into a registry."""

    def __init__(self, base_dir: Path, root: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.base_dir = Path(base_dir)
        self.registry = AdapterRegistry(root)
        self.fingerprint = fingerprint_folder(self.base_dir)
        self.model: Any = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=torch.float32)

    def publish(self, persona: str, *, seed: int, fingerprint: str | None = None, rank: int = 4) -> int:
        """Train nothing: initialise A and B randomly (so the adapter changes outputs) and publish."""
        import torch
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
        peft_model = get_peft_model(self.model, config)
        with self.registry.lock(persona):
            staged = self.registry.staging_dir(persona)
            peft_model.save_pretrained(str(staged))
            write_manifest(staged, self.manifest(persona, fingerprint or self.fingerprint))
            version = self.registry.publish(persona, staged)
        self.model = peft_model.unload()
        return version

    def manifest(self, persona: str, fingerprint: str) -> AdapterManifest:
        return AdapterManifest(
            persona=persona, version=1, base_model=str(self.base_dir), base_fingerprint=fingerprint,
            dataset=DatasetInfo(source="test", sha256="0" * 64, rows_train=1, rows_eval=1, eval_source="test"),
            hyperparameters={"r": 4}, device="cpu", precision="fp32", library_versions={},
            metrics=TrainMetrics(train_loss=None, eval_loss=None, eval_loss_before=None, steps=0, epochs=0.0,
                                 tokens_seen=0, wall_time_s=0.0, tokens_per_s=0.0, peak_memory_mb=0.0,
                                 peak_memory_kind="process_max_rss"),
        )

    def corrupt(self, persona: str, version: int) -> None:
        """Overwrite the weights with bytes that are not a safetensors file."""
        (self.registry.path(persona, version) / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 16)


def answer(client: httpx.Client, question: str, **fields: Any) -> dict[str, Any]:
    response = client.post("/v1/answer", json={"question": question, **fields})
    assert response.status_code == 200, response.text
    return dict(response.json())


def sse_events(text: str) -> list[tuple[str, Any]]:
    """Parse an SSE body into (event, data) pairs; data is JSON unless it is OpenAI's ``[DONE]``."""
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name = "message"
        data = []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data.append(line[len("data: "):])
        payload = "\n".join(data)
        events.append((name, payload if payload == "[DONE]" else json.loads(payload)))
    return events


def wait_until(predicate: Any, timeout_s: float = 30.0, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"condition not met within {timeout_s} s")


def metric_samples(text: str, name: str, **labels: str) -> list[float]:
    """Values of the samples called ``name`` whose labels include ``labels``, read with prometheus_client's
    own parser (label order in the exposition is the library's business)."""
    from prometheus_client.parser import text_string_to_metric_families

    return [sample.value for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())]
