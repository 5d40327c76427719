"""A persona added to a running server, end to end: ``persona add`` edits the served pack; the server reloads the
pack and refits its router by itself; the persona is routable by name and by inference and served prompt-only at
once, then with a freshly trained adapter once it is published; ``persona remove`` makes it a clear 404 while a
request already running on it finishes. Requests of other personas keep succeeding the whole time."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from persona_router.core.pack import demo_pack_path
from persona_router.core.pack_edit import add_persona, read_examples, remove_persona
from persona_router.service.settings import ServiceSettings

from tests.integration.service_support import RunningServer, answer, serve, sse_events, wait_until

EXAMPLES = Path(__file__).resolve().parents[2] / "benchmarks" / "cochrane_patient" / "examples.txt"
PATIENT = {"name": "patient", "description": "Patients who want to know in plain words what research found.",
           "system_prompt": "You answer a patient in plain everyday words.", "examples": read_examples(EXAMPLES)}
PATIENT_QUESTION = "is acupuncture worth trying for my back pain, or is it a waste of money?"


@pytest.fixture(scope="module")
def pack_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("packs") / "team.toml"
    path.write_text(demo_pack_path().read_text(encoding="utf-8").replace('name = "demo"', 'name = "team"', 1),
                    encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, pack_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PERSONA_ROUTER_HOME", str(tmp_path_factory.mktemp("home")))  # the router folder lives here
        settings = ServiceSettings(base=str(tiny_model_dir), adapters_dir=tmp_path_factory.mktemp("adapters"),
                                   pack=str(pack_file), router="fitted", watch_interval_s=0.3)
        with serve(settings, ready_timeout_s=600) as running:
            yield running


class Background:
    """Keeps asking other personas (named and inferred) while the pack changes; records every failure."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.done = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while not self.stop.is_set():
                for body in ({"question": "why is the sky blue?", "persona": "student", "max_new_tokens": 3},
                             {"question": "what's the time complexity of a hash map lookup?", "max_new_tokens": 3}):
                    response = client.post("/v1/answer", json=body)
                    if response.status_code != 200:
                        self.failures.append(f"{response.status_code}: {response.text[:200]}")
                    self.done += 1

    def __enter__(self) -> Background:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(timeout=120)


def listed(client: httpx.Client) -> dict[str, Any]:
    return {p["name"]: p for p in client.get("/v1/personas").json()["personas"]}


def train_tiny_adapter(tiny_model_dir: Path, adapters: Path, pack_file: Path) -> int:
    """A real (tiny) training run through the same trainer as ``persona-router train``: two optimizer steps."""
    from persona_router.adapters.base_model import BaseModelConfig
    from persona_router.adapters.registry import AdapterRegistry
    from persona_router.core.pack import load_pack
    from persona_router.core.records import QARecord
    from persona_router.training.config import TrainConfig
    from persona_router.training.jobs import PersonaJob
    from persona_router.training.trainer import train_persona

    rows = [QARecord(persona="patient", question="What does this review find, in plain words?",
                     context=f"Trial {i}: the drug reduced symptoms (RR 0.{i + 1}; 95% CI 0.5 to 0.9).",
                     answer=f"In plain words: the medicine helped some people a little, study {i}.") for i in range(6)]
    job = PersonaJob(load_pack(pack_file).get("patient"), rows[:4], rows[4:], "test rows", "test eval rows")
    config = TrainConfig(max_steps=2, batch_size=2, grad_accum=1, max_length=256, save_steps=100, logging_steps=1)
    result = train_persona(job, config, BaseModelConfig(base=str(tiny_model_dir)), AdapterRegistry(adapters))
    assert result.version is not None
    return int(result.version)


def test_add_route_serve_train_remove_while_running(server: RunningServer, client: httpx.Client, pack_file: Path,
                                                    tiny_model_dir: Path) -> None:
    assert "patient" not in listed(client)
    missing = client.post("/v1/answer", json={"question": PATIENT_QUESTION, "persona": "patient"})
    assert missing.status_code == 404 and "patient" not in missing.json()["error"]["valid"]
    generation = client.get("/v1/personas").json()["pack_generation"]

    with Background(server.url) as background:
        # 1. Add: the server reloads the pack and refits its router by itself.
        add_persona(dict(PATIENT), pack=pack_file)
        wait_until(lambda: "patient" in listed(client), timeout_s=300, interval_s=0.5)
        state = listed(client)["patient"]
        assert state["status"] == "prompt-only" and state["live_version"] is None
        assert client.get("/v1/personas").json()["pack_generation"] > generation
        assert "persona:patient" in {m["id"] for m in client.get("/v1/models").json()["data"]}

        # 2. Routable by name and by inference, served prompt-only.
        named = answer(client, PATIENT_QUESTION, persona="patient", max_new_tokens=4)
        assert named["decision"]["persona"] == "patient" and named["decision"]["source"] == "explicit"
        assert named["adapter"] is None
        inferred = answer(client, PATIENT_QUESTION, max_new_tokens=4)
        assert inferred["decision"]["persona"] == "patient", inferred["decision"]
        assert inferred["decision"]["source"] == "inferred"

        # 3. A freshly trained adapter, published into the served folder, is hot-loaded.
        version = train_tiny_adapter(tiny_model_dir, server.settings.adapters_dir, pack_file)
        wait_until(lambda: listed(client)["patient"]["status"] == "adapter", timeout_s=60)
        adapted = answer(client, PATIENT_QUESTION, persona="patient", max_new_tokens=4)
        assert adapted["adapter"] == {"persona": "patient", "version": version}
        assert answer(client, PATIENT_QUESTION, max_new_tokens=4)["adapter"] == {"persona": "patient",
                                                                                  "version": version}

        # 4. Remove it while a streamed request on it is running: that request finishes on its adapter.
        result: dict[str, Any] = {}

        def stream() -> None:
            with httpx.Client(base_url=server.url, timeout=120) as streaming:
                response = streaming.post("/v1/answer", json={"question": PATIENT_QUESTION, "persona": "patient",
                                                              "max_new_tokens": 256, "stream": True})
                result["status"] = response.status_code
                result["events"] = sse_events(response.text)

        reader = threading.Thread(target=stream)
        reader.start()
        remove_persona("patient", pack=pack_file)
        wait_until(lambda: "patient" not in listed(client), timeout_s=300, interval_s=0.5)
        reader.join(timeout=120)
        assert result["status"] == 200
        names = [name for name, _ in result["events"]]
        assert names[0] == "decision" and names[-1] == "done", names
        assert result["events"][-1][1]["adapter"] == {"persona": "patient", "version": version}

        gone = client.post("/v1/answer", json={"question": PATIENT_QUESTION, "persona": "patient"})
        assert gone.status_code == 404 and "patient" not in gone.json()["error"]["valid"]
        assert answer(client, PATIENT_QUESTION, max_new_tokens=3)["decision"]["persona"] != "patient"
        wait_until(lambda: f"patient@{version}" not in server.state.residency.resident(), timeout_s=30)
        wait_until(lambda: background.done >= 4, timeout_s=120)
    assert background.failures == []


def test_invalid_pack_keeps_the_old_one_serving(server: RunningServer, client: httpx.Client, pack_file: Path) -> None:
    good = pack_file.read_text(encoding="utf-8")
    before = listed(client)
    try:
        pack_file.write_text(good.replace('name = "student"', 'name = "Student!"', 1), encoding="utf-8")
        reply = client.post("/v1/admin/reload", headers={"Content-Type": "application/json"}).json()
        assert reply["pack"]["changed"] is False and "Student!" in reply["pack"]["error"]
        assert listed(client).keys() == before.keys()
        assert answer(client, "why is the sky blue?", persona="student", max_new_tokens=3)["decision"]["persona"] == \
            "student"
    finally:
        pack_file.write_text(good, encoding="utf-8")
    reply = client.post("/v1/admin/reload", headers={"Content-Type": "application/json"}).json()
    assert reply["pack"]["changed"] is True and "error" not in reply["pack"]
