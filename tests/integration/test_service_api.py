"""The service's HTTP API against a real uvicorn server on a loopback port (tiny random model).

Covers every read endpoint, /v1/answer (plain and SSE), bad input, the OpenAI-compatible API through the
official ``openai`` client, and /metrics.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from persona_router.service.settings import ServiceSettings

from tests.integration.service_support import AdapterFactory, RunningServer, answer, metric_samples, serve, sse_events

QUESTION = "why is the sky blue?"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("adapters-api")
    AdapterFactory(tiny_model_dir, root).publish("student", seed=1)
    settings = ServiceSettings(base=str(tiny_model_dir), adapters_dir=root, router="fallback", watch_interval_s=0,
                               max_new_tokens_limit=256, default_max_new_tokens=16)
    with serve(settings) as running:
        yield running


def test_health_ready_and_page(client: httpx.Client) -> None:
    assert client.get("/health").json() == {"status": "alive", "loaded": True}
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["router"] == "fallback" and ready["engine"] in ("fast", "reference")
    from persona_router.adapters.base_model import pick_precision

    # The service says which precision it picked: bf16 on a CPU with native bf16, else float32.
    assert ready["precision"] == pick_precision("auto", "cpu", serving=True)
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="question"' in page.text and "/v1/answer" in page.text and 'id="persona"' in page.text


def test_personas_show_adapter_and_prompt_only(client: httpx.Client) -> None:
    listed = {p["name"]: p for p in client.get("/v1/personas").json()["personas"]}
    assert set(listed) == {"student", "clinician", "educator", "engineer", "general-reader"}
    assert listed["student"]["status"] == "adapter" and listed["student"]["live_version"] == 1
    assert listed["student"]["versions"] == [{"version": 1, "state": "resident", "live": True, "in_flight": 0}]
    assert listed["clinician"]["status"] == "prompt-only" and listed["clinician"]["versions"] == []
    assert listed["general-reader"]["fallback"] is True


def test_answer_with_adapter_reports_decision_usage_timings(client: httpx.Client) -> None:
    body = answer(client, QUESTION, persona="student", max_new_tokens=8)
    assert body["decision"]["persona"] == "student" and body["decision"]["source"] == "explicit"
    assert body["adapter"] == {"persona": "student", "version": 1}
    assert body["usage"]["completion_tokens"] <= 8
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert body["timings"]["total_ms"] > 0 and body["finish_reason"] in ("stop", "length")
    assert body["id"].startswith("ans-")


def test_prompt_only_persona_and_auto_fallback(client: httpx.Client) -> None:
    explicit = answer(client, QUESTION, persona="clinician", max_new_tokens=8)
    assert explicit["adapter"] is None
    auto = answer(client, QUESTION, max_new_tokens=8)
    assert auto["decision"]["source"] == "fallback" and auto["decision"]["persona"] == "general-reader"
    assert "classifier" in auto["decision"]["reason"]


def test_greedy_answers_repeat(client: httpx.Client) -> None:
    first = answer(client, QUESTION, persona="student", max_new_tokens=12)
    assert answer(client, QUESTION, persona="student", max_new_tokens=12)["answer"] == first["answer"]
    assert answer(client, QUESTION, persona="student", max_new_tokens=12, user="u1")["answer"] == first["answer"]


def test_stream_sends_decision_tokens_then_done(client: httpx.Client) -> None:
    plain = answer(client, QUESTION, persona="student", max_new_tokens=10)
    response = client.post("/v1/answer", json={"question": QUESTION, "persona": "student", "max_new_tokens": 10,
                                               "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    names = [name for name, _ in events]
    assert names[0] == "decision" and names[-1] == "done" and set(names[1:-1]) == {"token"}
    assert events[0][1]["decision"]["persona"] == "student" and events[0][1]["adapter"]["version"] == 1
    streamed = "".join(data["text"] for name, data in events if name == "token")
    done = events[-1][1]
    assert streamed == done["answer"] == plain["answer"]  # the stream adds up to the stripped answer
    assert done["usage"] == plain["usage"]


@pytest.mark.parametrize(("payload", "field"), [
    ({"question": ""}, "question"),
    ({"question": "   \n"}, "question"),
    ({"question": "x" * 5000}, "question"),
    ({"question": "hi", "context": "c" * 20000}, "context"),
    ({"question": "hi", "temperature": 3.0}, "temperature"),
    ({"question": "hi", "top_p": 0}, "top_p"),
    ({"question": "hi", "max_new_tokens": 0}, "max_new_tokens"),
    ({"question": "hi", "max_new_tokens": 100000}, "max_new_tokens"),
    ({"question": "hi", "seed": -1}, "seed"),
    ({"question": 42}, "question"),
    ({"question": "hi", "stream": "yes"}, "stream"),
    ({"question": "hi", "persona_name": "student"}, "persona_name"),
    ({"persona": "student"}, "question"),
])
def test_bad_input_is_400_naming_the_field(client: httpx.Client, payload: dict[str, Any], field: str) -> None:
    response = client.post("/v1/answer", json=payload)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["field"] == field and error["type"] == "invalid_request_error"
    assert field in error["message"]


@pytest.mark.parametrize("raw", [b'{"question": "hi",', b"not json", b"", b"[1, 2]"])
def test_malformed_json_is_400(client: httpx.Client, raw: bytes) -> None:
    response = client.post("/v1/answer", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] in ("body", "$")


def test_prompt_longer_than_the_window_is_400_on_context(client: httpx.Client) -> None:
    context = " ".join(f"w{i}x" for i in range(3000))[:15000]  # many rare tokens for the tiny tokenizer
    response = client.post("/v1/answer", json={"question": "hi", "context": context, "max_new_tokens": 8})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == "context" and "window" in response.json()["error"]["message"]


def test_unknown_persona_is_404_listing_valid_ones(client: httpx.Client) -> None:
    response = client.post("/v1/answer", json={"question": "hi", "persona": "pirate"})
    assert response.status_code == 404
    error = response.json()["error"]
    assert error["valid"] == ["clinician", "educator", "engineer", "general-reader", "student"]
    assert "pirate" in error["message"] and "student" in error["message"]


def test_unknown_route_and_method_are_json_errors(client: httpx.Client) -> None:
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = client.get("/v1/answer")
    assert wrong.status_code == 405 and "error" in wrong.json()


# -- OpenAI compatibility ---------------------------------------------------------------------------------
@pytest.fixture
def openai_client(server: RunningServer) -> Any:
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_openai_models_list(openai_client: Any) -> None:
    ids = [model.id for model in openai_client.models.list()]
    assert ids[0] == "persona:auto" and "persona:student" in ids and len(ids) == 6


def test_openai_chat_completion_matches_answer(client: httpx.Client, openai_client: Any) -> None:
    expected = answer(client, QUESTION, persona="student", max_new_tokens=10)
    completion = openai_client.chat.completions.create(
        model="persona:student", messages=[{"role": "system", "content": "ignored"},
                                           {"role": "user", "content": QUESTION}], max_tokens=10)
    assert completion.choices[0].message.content == expected["answer"]
    assert completion.usage.completion_tokens == expected["usage"]["completion_tokens"]
    routing = completion.model_extra["persona_routing"]
    assert routing["decision"]["source"] == "explicit" and routing["adapter"] == {"persona": "student", "version": 1}


def test_openai_streaming_matches(client: httpx.Client, openai_client: Any) -> None:
    expected = answer(client, QUESTION, max_new_tokens=10)
    stream = openai_client.chat.completions.create(
        model="persona:auto", messages=[{"role": "user", "content": QUESTION}], max_tokens=10, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == expected["answer"]
    assert chunks[0].model_extra["persona_routing"]["decision"]["persona"] == "general-reader"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason in ("stop", "length")
    assert chunks[-1].usage.completion_tokens == expected["usage"]["completion_tokens"]


def test_openai_errors(openai_client: Any) -> None:
    import openai

    with pytest.raises(openai.NotFoundError, match="persona:auto"):
        openai_client.chat.completions.create(model="persona:pirate", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.NotFoundError, match="persona:auto"):
        openai_client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="messages"):
        openai_client.chat.completions.create(model="persona:auto", messages=[{"role": "system", "content": "x"}])


def test_openai_raw_sse_format(client: httpx.Client) -> None:
    response = client.post("/v1/chat/completions", json={
        "model": "persona:student", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": 4,
        "stream": True})
    events = sse_events(response.text)
    assert events[-1] == ("message", "[DONE]")
    first = events[0][1]
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"] == {"role": "assistant",
                                                                                          "content": ""}
    assert "persona_routing" in first


def test_metrics_label_persona_and_adapter_version(client: httpx.Client) -> None:
    answer(client, QUESTION, persona="student", max_new_tokens=4)
    client.post("/v1/answer", json={"question": ""})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    assert response.headers["content-type"].count("charset") == 1
    text = response.text
    answer_labels = {"endpoint": "answer", "persona": "student", "adapter_version": "1"}
    (requests,) = metric_samples(text, "persona_router_requests_total", **answer_labels, status="200")
    assert requests >= 1  # earlier tests of this module's server answered as the student too
    assert metric_samples(text, "persona_router_request_latency_seconds_bucket", **answer_labels,
                          le="+Inf") == [requests]
    assert metric_samples(text, "persona_router_routing_decisions_total", source="explicit", persona="student")
    assert metric_samples(text, "persona_router_tokens_total", kind="completion", persona="student",
                          adapter_version="1")
    assert metric_samples(text, "persona_router_errors_total", endpoint="/v1/answer", type="invalid_request_error")
    assert metric_samples(text, "persona_router_resident_adapters", persona="student", adapter_version="1") == [1]
    assert metric_samples(text, "persona_router_queue_depth") == [0]
