"""Adapters in the running service: hot reload by folder watching and by the admin API, hot swap with a
request in flight, refusal of incompatible and corrupt adapters, the residency bound, and admin auth."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from persona_router.core.names import AdapterKey
from persona_router.service.settings import ServiceSettings

from tests.integration.service_support import (
    OTHER_FINGERPRINT,
    AdapterFactory,
    RunningServer,
    answer,
    metric_samples,
    serve,
    sse_events,
    wait_until,
)

QUESTION = "why is the sky blue?"
TOKEN = "s3cret-admin-token"


@pytest.fixture(scope="module")
def factory(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterFactory:
    return AdapterFactory(tiny_model_dir, tmp_path_factory.mktemp("adapters-hot"))


@pytest.fixture(scope="module")
def server(factory: AdapterFactory, tiny_model_dir: Path) -> Iterator[RunningServer]:
    factory.publish("student", seed=1)
    settings = ServiceSettings(base=str(tiny_model_dir), adapters_dir=factory.registry.root, router="fallback",
                               watch_interval_s=0.3, admin_token=TOKEN, max_new_tokens_limit=512)
    with serve(settings) as running:
        yield running


def admin(client: httpx.Client, method: str, path: str, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Content-Type": "application/json"}  # admin calls must declare JSON (no cross-site forms)
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return client.request(method, f"/v1/admin{path}", headers=headers)


def reader_done(thread: threading.Thread) -> bool:
    return not thread.is_alive()


def persona_state(client: httpx.Client, name: str) -> dict[str, Any]:
    return next(p for p in client.get("/v1/personas").json()["personas"] if p["name"] == name)


def test_watcher_hot_loads_a_new_adapter(client: httpx.Client, factory: AdapterFactory) -> None:
    before = answer(client, QUESTION, persona="educator", max_new_tokens=12)
    assert before["adapter"] is None and persona_state(client, "educator")["status"] == "prompt-only"
    factory.publish("educator", seed=7)
    wait_until(lambda: persona_state(client, "educator")["status"] == "adapter", timeout_s=30)
    after = answer(client, QUESTION, persona="educator", max_new_tokens=12)
    assert after["adapter"] == {"persona": "educator", "version": 1}
    assert after["answer"] != before["answer"]  # the random LoRA changes the greedy answer


def test_hot_swap_keeps_the_request_in_flight(client: httpx.Client, server: RunningServer,
                                              factory: AdapterFactory) -> None:
    factory.publish("engineer", seed=11)
    admin(client, "POST", "/adapters/reload").raise_for_status()
    expected = answer(client, QUESTION, persona="engineer", max_new_tokens=400)
    assert expected["adapter"]["version"] == 1 and expected["usage"]["completion_tokens"] == 400
    body: list[str] = []
    first_token = threading.Event()

    def stream() -> None:
        with server.client() as own, own.stream("POST", "/v1/answer", json={
                "question": QUESTION, "persona": "engineer", "max_new_tokens": 400, "stream": True}) as response:
            for line in response.iter_lines():
                body.append(line)
                if line.startswith("event: token"):
                    first_token.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first_token.wait(60)
    version = factory.publish("engineer", seed=12)
    report = admin(client, "POST", "/adapters/reload").json()
    assert report["live"]["engineer"] == version == 2
    old = persona_state(client, "engineer")["versions"][0]
    assert old["version"] == 1 and old["in_flight"] == 1 and not reader_done(reader)
    reader.join(120)
    events = sse_events("\n".join(body) + "\n\n")
    assert events[0][1]["adapter"]["version"] == 1
    done = events[-1]
    assert done[0] == "done" and done[1]["answer"] == expected["answer"]
    assert done[1]["usage"]["completion_tokens"] == expected["usage"]["completion_tokens"]
    assert answer(client, QUESTION, persona="engineer", max_new_tokens=8)["adapter"]["version"] == 2


def test_admin_needs_the_bearer_token(client: httpx.Client) -> None:
    for token in (None, "wrong-token-123"):
        response = admin(client, "POST", "/adapters/reload", token=token)
        assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        assert response.json()["error"]["type"] == "authentication_error"
    assert admin(client, "DELETE", "/adapters/student/1", token=None).status_code == 401
    assert admin(client, "POST", "/adapters/reload").status_code == 200


@pytest.mark.parametrize(("path", "status", "field"), [
    ("/adapters/student/999", 404, "version"),
    ("/adapters/pirate/1", 404, "persona"),
    ("/adapters/Student_X/1", 400, "persona"),
    ("/adapters/student/abc", 400, "version"),
    ("/adapters/student/0", 400, "version"),
    ("/adapters/%2E%2E/1", 400, "persona"),
    ("/adapters/..%2F..%2Fetc/1", None, None),
])
def test_admin_rejects_bad_targets(client: httpx.Client, path: str, status: int | None, field: str | None) -> None:
    response = admin(client, "POST", path)
    if status is None:  # a slash inside the name changes the route: never reaches the file system
        assert response.status_code in (400, 404, 405)
        return
    assert response.status_code == status, response.text
    assert response.json()["error"]["field"] == field


def test_admin_unload_and_load(client: httpx.Client) -> None:
    assert persona_state(client, "student")["live_version"] == 1
    state = admin(client, "DELETE", "/adapters/student/1").json()
    assert state["status"] == "prompt-only" and state["versions"][0]["state"] == "disabled"
    assert answer(client, QUESTION, persona="student", max_new_tokens=4)["adapter"] is None
    state = admin(client, "POST", "/adapters/student/1").json()
    assert state["status"] == "adapter" and state["versions"][0]["state"] == "resident"
    assert answer(client, QUESTION, persona="student", max_new_tokens=4)["adapter"]["version"] == 1


def test_incompatible_adapter_is_refused_and_others_keep_serving(client: httpx.Client,
                                                                 factory: AdapterFactory) -> None:
    factory.publish("clinician", seed=3, fingerprint=OTHER_FINGERPRINT)
    admin(client, "POST", "/adapters/reload").raise_for_status()
    state = persona_state(client, "clinician")
    assert state["status"] == "prompt-only"
    assert state["versions"][0]["state"] == "incompatible" and "fingerprint" in state["versions"][0]["error"]
    assert answer(client, QUESTION, persona="clinician", max_new_tokens=4)["adapter"] is None
    refused = admin(client, "POST", "/adapters/clinician/1")
    assert refused.status_code == 409 and "fingerprint" in refused.json()["error"]["message"]
    assert answer(client, QUESTION, persona="student", max_new_tokens=4)["adapter"]["version"] == 1


def test_corrupt_new_version_falls_back_to_the_previous(client: httpx.Client, factory: AdapterFactory) -> None:
    first = factory.publish("general-reader", seed=21)
    admin(client, "POST", "/adapters/reload").raise_for_status()
    good = answer(client, QUESTION, persona="general-reader", max_new_tokens=8)
    assert good["adapter"]["version"] == first
    second = factory.publish("general-reader", seed=22)
    factory.corrupt("general-reader", second)
    report = admin(client, "POST", "/adapters/reload").json()
    assert report["live"]["general-reader"] == first
    assert any(r["version"] == second and r["kind"] == "broken" for r in report["refused"])
    again = answer(client, QUESTION, persona="general-reader", max_new_tokens=8)
    assert again["adapter"]["version"] == first and again["answer"] == good["answer"]
    refused = admin(client, "POST", f"/adapters/general-reader/{second}")
    assert refused.status_code == 422 and "safetensors" in refused.json()["error"]["message"]


def test_residency_bound_evicts_least_recently_used(tiny_model_dir: Path,
                                                    tmp_path_factory: pytest.TempPathFactory) -> None:
    factory = AdapterFactory(tiny_model_dir, tmp_path_factory.mktemp("adapters-lru"))
    for seed, persona in enumerate(("student", "clinician", "educator"), start=31):
        factory.publish(persona, seed=seed)
    factory.publish("student", seed=40)  # student: v1 (old) and v2 (live)
    settings = ServiceSettings(base=str(tiny_model_dir), adapters_dir=factory.registry.root, router="fallback",
                               watch_interval_s=0, max_resident_adapters=2)
    with serve(settings) as running, running.client() as client:
        residency = running.state.residency
        assert len(residency.resident()) == 2  # a reload never evicts live versions to load more
        expected = {p: answer(client, QUESTION, persona=p, max_new_tokens=8)["answer"]
                    for p in ("student", "clinician", "educator")}
        assert len(residency.resident()) == 2 and residency.resident()[-1] == AdapterKey("educator", 1)
        admin(client, "POST", "/adapters/student/1").raise_for_status()  # an old version: not live
        assert AdapterKey("student", 1) in residency.resident()
        assert answer(client, QUESTION, persona="clinician", max_new_tokens=8)["answer"] == expected["clinician"]
        assert AdapterKey("student", 1) not in residency.resident()  # the non-live version goes first
        for persona in ("educator", "student", "clinician", "educator"):
            assert answer(client, QUESTION, persona=persona, max_new_tokens=8)["answer"] == expected[persona]
            assert len(residency.resident()) <= 2


def test_live_ab_split_is_sticky_per_user(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    from persona_router.service.ab_split import SplitConfig

    factory = AdapterFactory(tiny_model_dir, tmp_path_factory.mktemp("adapters-ab"))
    factory.publish("student", seed=51)
    factory.publish("student", seed=52)
    factory.publish("educator", seed=53)
    factory.publish("educator", seed=54)
    factory.corrupt("educator", 1)  # a candidate that exists but cannot load
    split = SplitConfig(persona="student", control="latest", candidate="1", share=0.5, salt="test")
    broken = SplitConfig(persona="educator", control="latest", candidate="1", share=1.0)
    settings = ServiceSettings(base=str(tiny_model_dir), adapters_dir=factory.registry.root, router="fallback",
                               watch_interval_s=0, ab_splits=(split, broken))
    with serve(settings) as running, running.client() as client:
        arms = {}
        for user in (f"user-{i}" for i in range(12)):
            first = answer(client, QUESTION, persona="student", user=user, max_new_tokens=2)
            again = answer(client, QUESTION, persona="student", user=user, max_new_tokens=2)
            assert first["ab"]["arm"] == again["ab"]["arm"]
            expected_version = 1 if first["ab"]["arm"] == "candidate" else 2
            assert first["adapter"]["version"] == again["adapter"]["version"] == expected_version
            arms[user] = first["ab"]["arm"]
        assert set(arms.values()) == {"control", "candidate"}
        anonymous = answer(client, QUESTION, persona="student", max_new_tokens=2)
        assert anonymous["ab"]["arm"] == "unassigned" and "no user" in anonymous["ab"]["reason"]
        assert anonymous["adapter"]["version"] == 2  # the control version
        assert answer(client, QUESTION, persona="clinician", user="user-1", max_new_tokens=2)["ab"] is None
        unusable = answer(client, QUESTION, persona="educator", user="user-1", max_new_tokens=2)
        # The user stays in the candidate arm (intention to treat), answered by the live version.
        assert unusable["adapter"]["version"] == 2 and unusable["ab"]["arm"] == "candidate"
        assert unusable["ab"]["served"] == "2" and "unusable" in unusable["ab"]["reason"]
        assert persona_state(client, "student")["ab"]["candidate"] == "1"
        metrics = client.get("/metrics").text
        assert metric_samples(metrics, "persona_router_ab_assignments_total", persona="student", arm="candidate",
                              adapter_version="1")
