"""OpenAI compatibility through the official ``openai`` client, and abandoned requests (issue 12).

``stop`` strings (plain and streamed), ``models.retrieve``, OpenAI parameter names in errors, one 404
``model_not_found`` for unknown models and personas, clear 400s for what the server cannot honour, and a
non-streaming request whose client gives up is cancelled in the engine at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from persona_router.service.settings import ServiceSettings

from tests.integration.service_support import AdapterFactory, RunningServer, answer, serve, wait_until

QUESTION = "why is the sky blue?"
USER = [{"role": "user", "content": QUESTION}]


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("adapters-openai")
    AdapterFactory(tiny_model_dir, root).publish("student", seed=1)
    settings = ServiceSettings(base=str(tiny_model_dir), adapters_dir=root, router="fallback", watch_interval_s=0,
                               engine="fast", max_new_tokens_limit=512, default_max_new_tokens=16)
    with serve(settings) as running:
        yield running


@pytest.fixture(scope="module")
def openai_client(server: RunningServer) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def stop_inside(text: str) -> tuple[str, int]:
    """A 3-character piece of ``text`` whose first occurrence is well inside it."""
    for start in range(6, len(text) - 3):
        piece = text[start:start + 3]
        if piece.strip() == piece and text.find(piece) == start:
            return piece, start
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings_end_the_answer(openai_client: Any, client: httpx.Client) -> None:
    full = openai_client.chat.completions.create(model="persona:student", messages=USER, max_tokens=48)
    text = full.choices[0].message.content
    stop, index = stop_inside(text)
    expected = text[:index].strip()
    cut = openai_client.chat.completions.create(model="persona:student", messages=USER, max_tokens=48, stop=stop)
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < full.usage.completion_tokens  # the engine stopped generating there
    as_list = openai_client.chat.completions.create(model="persona:student", messages=USER, max_tokens=48,
                                                    stop=["never-appears", stop])
    assert as_list.choices[0].message.content == expected
    streamed = openai_client.chat.completions.create(model="persona:student", messages=USER, max_tokens=48,
                                                     stop=stop, stream=True)
    chunks = list(streamed)
    pieces = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert stop not in pieces and pieces == expected  # no part of the stop string was streamed
    assert chunks[-1].choices[0].finish_reason == "stop"
    native = answer(client, QUESTION, persona="student", max_new_tokens=48, stop=[stop])
    assert native["answer"] == expected and native["finish_reason"] == "stop"


def test_reference_engine_applies_stop_strings(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``--engine reference`` (generate + PEFT) ends at stop strings the same way, streamed or not."""
    settings = ServiceSettings(base=str(tiny_model_dir), adapters_dir=tmp_path / "none", router="fallback",
                               watch_interval_s=0, engine="reference", warmup=False)
    with serve(settings) as running, running.client() as client:
        text = answer(client, QUESTION, persona="educator", max_new_tokens=40)["answer"]
        stop, index = stop_inside(text)
        cut = answer(client, QUESTION, persona="educator", max_new_tokens=40, stop=[stop])
        assert cut["answer"] == text[:index].strip() and cut["finish_reason"] == "stop"
        with client.stream("POST", "/v1/answer", json={"question": QUESTION, "persona": "educator",
                                                       "max_new_tokens": 40, "stop": [stop], "stream": True}) as r:
            body = "".join(r.iter_text())
        pieces = "".join(json.loads(line[6:]).get("text", "") for line in body.splitlines()
                         if line.startswith("data: ") and '"text"' in line)
        assert stop not in pieces and pieces == cut["answer"]


def test_stop_string_limits(openai_client: Any) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model="persona:auto", messages=USER, stop=["a", "b", "c", "d", "e"])
    assert info.value.body["param"] == "stop"
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model="persona:auto", messages=USER, stop=[""])
    assert info.value.body["param"] == "stop"


def test_models_retrieve(openai_client: Any) -> None:
    import openai

    model = openai_client.models.retrieve("persona:student")
    assert model.id == "persona:student" and model.object == "model"
    assert openai_client.models.retrieve("persona:auto").id == "persona:auto"
    listed = [m.id for m in openai_client.models.list()]
    assert all(openai_client.models.retrieve(m).id == m for m in listed)
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.models.retrieve("persona:pirate")
    assert info.value.body["code"] == "model_not_found"


def test_unknown_model_and_persona_are_the_same_404(openai_client: Any) -> None:
    import openai

    for model in ("gpt-4o", "persona:pirate", "persona:", "student"):
        with pytest.raises(openai.NotFoundError) as info:
            openai_client.chat.completions.create(model=model, messages=USER)
        assert info.value.status_code == 404
        assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model", model


@pytest.mark.parametrize(("fields", "param"), [
    ({"max_tokens": 100000}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "   "}]}, "messages"),
    ({"messages": [{"role": "system", "content": "no user"}]}, "messages"),
    ({"temperature": 7}, "temperature"),
    ({"top_p": 1.5}, "top_p"),  # 0 is in OpenAI's range (greedy); above 1 is not
])
def test_errors_name_openai_params(openai_client: Any, fields: dict[str, Any], param: str) -> None:
    import openai

    request: dict[str, Any] = {"model": "persona:auto", "messages": USER, **fields}
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(**request)
    assert info.value.body["param"] == param, info.value.body


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"logprobs": True}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 2}, "logprobs"),
    ({"n": 2}, "n"),
])
def test_unsupported_fields_are_refused(openai_client: Any, fields: dict[str, Any], param: str) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model="persona:auto", messages=USER, **fields)
    assert info.value.body["param"] == param and "not supported" in info.value.body["message"]


def test_harmless_defaults_are_accepted(openai_client: Any) -> None:
    done = openai_client.chat.completions.create(model="persona:auto", messages=USER, max_tokens=2, n=1,
                                                 logprobs=False, response_format={"type": "text"})
    assert done.choices[0].finish_reason in ("stop", "length")


# -- 2. a client that gives up -------------------------------------------------------------------------------
@pytest.fixture
def slow_engine(server: RunningServer) -> Iterator[Any]:
    """Every decode step takes 0.1 s longer, so a long answer takes far longer than the client waits."""
    scheduler = server.state.engine.scheduler
    decoder = scheduler.decoder

    def slow(*args: Any) -> Any:
        time.sleep(0.1)
        return decoder(*args)

    scheduler.decoder = slow
    try:
        yield server.state.engine
    finally:
        scheduler.decoder = decoder


def test_abandoned_request_is_cancelled(server: RunningServer, client: httpx.Client, slow_engine: Any) -> None:
    answerer = server.state.answerer
    before = slow_engine.stats().generated_tokens
    with server.client(timeout=1.0) as impatient, pytest.raises(httpx.ReadTimeout):
        impatient.post("/v1/answer", json={"question": QUESTION, "persona": "student", "max_new_tokens": 400})
    gave_up = time.monotonic()
    wait_until(lambda: slow_engine.stats().running == 0 and answerer.in_flight == 0, timeout_s=5)
    assert time.monotonic() - gave_up < 5  # not the 40 s the answer would take, nor the 120 s timeout
    assert slow_engine.stats().generated_tokens - before < 100


def test_abandoned_openai_request_is_cancelled(server: RunningServer, slow_engine: Any) -> None:
    import openai

    impatient = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=1.0)
    with pytest.raises(openai.APITimeoutError):
        impatient.chat.completions.create(model="persona:student", messages=USER, max_tokens=400)
    wait_until(lambda: slow_engine.stats().running == 0 and server.state.answerer.in_flight == 0, timeout_s=5)
    text = httpx.get(f"{server.url}/metrics").text
    assert 'status="499"' in text
