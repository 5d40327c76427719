"""``POST /v1/compare`` and the ``adapter`` choice on ``/v1/answer``: arms are served as chosen, each with its
decision, speed and the style judge's verdict; bad choices are clear 4xx."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from persona_router.service.settings import ServiceSettings

from tests.integration.service_support import AdapterFactory, RunningServer, answer, serve

QUESTION = "why is the sky blue?"
DEMO_PERSONAS = {"clinician", "educator", "engineer", "general-reader", "student"}


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("adapters-compare")
    factory = AdapterFactory(tiny_model_dir, root)
    factory.publish("student", seed=1)
    factory.publish("student", seed=2)
    settings = ServiceSettings(base=str(tiny_model_dir), adapters_dir=root, router="fallback", watch_interval_s=0,
                               default_max_new_tokens=8)
    with serve(settings) as running:
        yield running


def compare(client: httpx.Client, arms: list[dict[str, str]], **extra: object) -> httpx.Response:
    return client.post("/v1/compare", json={"question": QUESTION, "arms": arms, "max_new_tokens": 8, **extra},
                       timeout=300)


def test_adapter_against_prompt_matches_single_answers(client: httpx.Client) -> None:
    response = compare(client, [{"persona": "student"}, {"persona": "student", "adapter": "none"}])
    assert response.status_code == 200, response.text
    body = response.json()
    adapter_arm, prompt_arm = body["arms"]
    assert adapter_arm["adapter"] == {"persona": "student", "version": 2} and prompt_arm["adapter"] is None
    # Greedy: each arm says exactly what /v1/answer says for the same choice.
    assert adapter_arm["answer"] == answer(client, QUESTION, persona="student", max_new_tokens=8)["answer"]
    assert prompt_arm["answer"] == answer(client, QUESTION, persona="student", max_new_tokens=8,
                                          adapter="none")["answer"]
    for arm in body["arms"]:
        assert arm["decision"]["persona"] == "student" and arm["decision"]["source"] == "explicit"
        assert arm["completion_tokens"] >= 1 and arm["tokens_per_s"] > 0 and arm["total_ms"] > 0
        verdict = arm["judge"]
        assert set(verdict["scores"]) == DEMO_PERSONAS and verdict["top"] in DEMO_PERSONAS
        assert abs(sum(verdict["scores"].values()) - 1) < 1e-3
        assert verdict["adherence"] == verdict["scores"]["student"]
    assert set(body["judge"]["classes"]) == DEMO_PERSONAS and body["judge"]["train_size"] >= 100


def test_two_versions_and_two_personas(client: httpx.Client) -> None:
    versions = compare(client, [{"persona": "student", "adapter": "1"}, {"persona": "student", "adapter": "2"}])
    assert [arm["adapter"]["version"] for arm in versions.json()["arms"]] == [1, 2]
    personas = compare(client, [{"persona": "student"}, {}]).json()["arms"]
    assert personas[0]["decision"]["persona"] == "student"
    assert personas[1]["decision"]["source"] == "fallback" and personas[1]["adapter"] is None


@pytest.mark.parametrize("arms, status, field", [
    ([{"persona": "student", "adapter": "v2"}, {}], 400, "adapter"),
    ([{"persona": "student", "adapter": "٢"}, {}], 400, "adapter"),
    ([{"persona": "student"}], 400, "arms"),
    ([{"persona": "student", "adapter": "9"}, {}], 404, None),
    ([{"persona": "student", "colour": "red"}, {}], 400, None),
])
def test_bad_arms_are_clear_errors(client: httpx.Client, arms: list[dict[str, str]], status: int,
                                   field: str | None) -> None:
    response = compare(client, arms)
    assert response.status_code == status, response.text
    if field is not None:
        assert field in response.text


def test_answer_takes_the_adapter_choice(client: httpx.Client) -> None:
    assert answer(client, QUESTION, persona="student", max_new_tokens=2, adapter="none")["adapter"] is None
    assert answer(client, QUESTION, persona="student", max_new_tokens=2, adapter="1")["adapter"]["version"] == 1
    assert answer(client, QUESTION, persona="student", max_new_tokens=2)["adapter"]["version"] == 2
    missing = client.post("/v1/answer", json={"question": QUESTION, "persona": "student", "adapter": "9"})
    assert missing.status_code == 404 and missing.json()["error"]["field"] == "adapter"  # the request's name
