"""Concurrency and limits in the running service: concurrent mixed-persona greedy requests equal the same
requests sent alone (for both engines, and equal to plain PEFT ``generate``), a full queue answers 429
with Retry-After, the per-request timeout answers 504, and a client that disconnects stops its generation."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path
from typing import Any

import httpx
import pytest
from persona_router.service.settings import ServiceSettings

from tests.integration.service_support import AdapterFactory, RunningServer, answer, metric_samples, serve, wait_until

# (question, persona, max_new_tokens): adapter personas, prompt-only personas, the router's fallback.
REQUESTS = [
    ("why is the sky blue?", "student", 14),
    ("the heart pumps blood. why?", "clinician", 9),
    ("code runs fast", "engineer", 16),
    ("a teacher answers a question", "educator", 11),
    ("why is the sky blue?", "clinician", 12),
    ("explain simply", None, 10),
    ("the quick brown fox", "student", 7),
    ("clinical dose lesson objective", "engineer", 13),
    ("light scatters in air", "general-reader", 15),
    ("what is a lesson objective?", "student", 12),
]


@pytest.fixture(scope="module")
def adapters_root(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters-concurrency")
    factory = AdapterFactory(tiny_model_dir, root)
    for seed, persona in enumerate(("student", "clinician", "engineer"), start=1):
        factory.publish(persona, seed=seed)
    return root


def settings_for(tiny_model_dir: Path, root: Path, **overrides: Any) -> ServiceSettings:
    # float32: these tests compare answers token for token (the service picks bf16 on CPUs that have it).
    return ServiceSettings(base=str(tiny_model_dir), adapters_dir=root, router="fallback", watch_interval_s=0,
                           quantization="fp32", **overrides)


def ask(server: RunningServer, request: tuple[str, str | None, int]) -> dict[str, Any]:
    question, persona, max_new = request
    fields: dict[str, Any] = {"max_new_tokens": max_new}
    if persona:
        fields["persona"] = persona
    with server.client() as client:
        return answer(client, question, **fields)


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_concurrent_mixed_personas_equal_answers_sent_alone(tiny_model_dir: Path, adapters_root: Path,
                                                            engine: str) -> None:
    with serve(settings_for(tiny_model_dir, adapters_root, engine=engine, max_batch=8)) as server:
        alone = [ask(server, r) for r in REQUESTS]
        steps_before = server.state.engine.stats().steps
        with concurrent.futures.ThreadPoolExecutor(len(REQUESTS)) as pool:
            together = list(pool.map(lambda r: ask(server, r), REQUESTS))
        steps = server.state.engine.stats().steps - steps_before
    # Rows of different adapters shared forward passes: fewer decode steps than generated tokens.
    assert 0 < steps < sum(a["usage"]["completion_tokens"] for a in together)
    for request, one, many in zip(REQUESTS, alone, together, strict=True):
        assert many["answer"] == one["answer"], request
        assert many["adapter"] == one["adapter"] and many["usage"] == one["usage"], request
    assert {a["adapter"]["persona"] if a["adapter"] else None for a in alone} == {
        "student", "clinician", "engineer", None}


def test_service_equals_plain_peft_generate(tiny_model_dir: Path, adapters_root: Path) -> None:
    """The service's greedy answers equal ``generate_one`` on the base model and on a PeftModel."""
    from peft import PeftModel
    from persona_router.adapters.base_model import BaseModelConfig, load_base
    from persona_router.adapters.generation import SamplingConfig, generate_one
    from persona_router.adapters.prompts import build_messages
    from persona_router.adapters.registry import AdapterRegistry
    from persona_router.core.pack import load_pack

    pack = load_pack("demo")
    base = load_base(BaseModelConfig(base=str(tiny_model_dir)))
    cases = [r for r in REQUESTS if r[1] in ("student", "general-reader")]
    expected = {}
    for question, persona, max_new in cases:
        assert persona is not None
        messages = build_messages(question, system_prompt=pack.get(persona).system_prompt)
        if persona == "general-reader":  # before PEFT wraps the model: the bare base
            expected[question] = generate_one(base.model, base.tokenizer, messages, SamplingConfig(max_new))
    model = PeftModel.from_pretrained(base.model, str(AdapterRegistry(adapters_root).path("student", 1)),
                                      adapter_name="student@1")
    for question, persona, max_new in cases:
        if persona == "student":
            messages = build_messages(question, system_prompt=pack.get("student").system_prompt)
            expected[question] = generate_one(model, base.tokenizer, messages, SamplingConfig(max_new),
                                              adapter_name="student@1")
    with serve(settings_for(tiny_model_dir, adapters_root)) as server:
        for request in cases:
            got = ask(server, request)
            assert got["answer"] == expected[request[0]].text, request
            assert got["usage"]["completion_tokens"] == expected[request[0]].completion_tokens


def test_full_queue_answers_429_with_retry_after(tiny_model_dir: Path, adapters_root: Path) -> None:
    settings = settings_for(tiny_model_dir, adapters_root, max_queue=1, max_batch=1)
    with serve(settings) as server:
        def fire(i: int) -> httpx.Response:
            with server.client() as client:
                return client.post("/v1/answer", json={"question": f"question {i}", "max_new_tokens": 200})

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            responses = list(pool.map(fire, range(8)))
        statuses = sorted(r.status_code for r in responses)
        assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
        rejected = next(r for r in responses if r.status_code == 429)
        assert int(rejected.headers["retry-after"]) >= 1
        assert rejected.json()["error"]["type"] == "rate_limit_error"


def test_timeout_answers_504(tiny_model_dir: Path, adapters_root: Path) -> None:
    settings = settings_for(tiny_model_dir, adapters_root, request_timeout_s=0.2, max_new_tokens_limit=1024)
    with serve(settings) as server, server.client() as client:
        response = client.post("/v1/answer", json={"question": "go on", "max_new_tokens": 1000})
        assert response.status_code == 504, response.text
        assert response.json()["error"]["type"] == "timeout_error"
        streamed = client.post("/v1/answer", json={"question": "go on", "max_new_tokens": 1000, "stream": True})
        assert streamed.status_code == 200 and "event: error" in streamed.text
        assert "timeout_error" in streamed.text
        wait_until(lambda: server.state.answerer.in_flight == 0, timeout_s=10)


def completion_tokens(metrics: str) -> float:
    return sum(metric_samples(metrics, "persona_router_tokens_total", kind="completion"))


def test_client_disconnect_stops_generation(tiny_model_dir: Path, adapters_root: Path) -> None:
    settings = settings_for(tiny_model_dir, adapters_root, max_new_tokens_limit=2000)
    with serve(settings) as server, server.client() as client:
        before = completion_tokens(client.get("/metrics").text)
        with client.stream("POST", "/v1/answer", json={"question": "go on", "max_new_tokens": 1800,
                                                       "stream": True}) as response:
            tokens = 0
            for line in response.iter_lines():
                tokens += line.startswith("event: token")
                if tokens >= 3:
                    break
        wait_until(lambda: bool(metric_samples(client.get("/metrics").text, "persona_router_requests_total",
                                               status="499")), timeout_s=20)
        generated = completion_tokens(client.get("/metrics").text) - before
        assert 3 <= generated < 1800
        assert server.state.answerer.in_flight == 0
        assert server.state.residency.describe_persona("general-reader")["status"] == "prompt-only"


def test_client_disconnect_stops_both_compare_arms(tiny_model_dir: Path, adapters_root: Path) -> None:
    settings = settings_for(tiny_model_dir, adapters_root, max_new_tokens_limit=2000)
    with serve(settings) as server, server.client() as client:
        before = completion_tokens(client.get("/metrics").text)
        body = {"question": "go on", "arms": [{"persona": "student"}, {"persona": "engineer"}], "max_new_tokens": 1800}
        with pytest.raises(httpx.ReadTimeout):
            client.post("/v1/compare", json=body, timeout=1.0)  # the client gives up and closes the connection
        wait_until(lambda: bool(metric_samples(client.get("/metrics").text, "persona_router_requests_total",
                                               status="499")), timeout_s=20)
        wait_until(lambda: server.state.answerer.in_flight == 0, timeout_s=20)
        generated = completion_tokens(client.get("/metrics").text) - before
        assert 0 < generated < 2 * 1800  # both arms stopped early
