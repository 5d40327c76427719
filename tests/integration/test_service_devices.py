"""``serve --devices``: the service with one in-process engine per device (two CPU engines on the tiny model):
answers equal the single-engine service's, hot-published adapters load on their home device, and /ready and
/metrics report per device."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from persona_router.service.settings import ServiceSettings

from tests.integration.service_support import AdapterFactory, RunningServer, answer, serve, wait_until

QUESTIONS = [("student", "Why is the sky blue?"), ("clinician", "What is a fever?"), ("student", "What is 2+2?")]


@pytest.fixture(scope="module")
def factory(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterFactory:
    made = AdapterFactory(tiny_model_dir, tmp_path_factory.mktemp("adapters-devices"))
    made.publish("student", seed=1)
    made.publish("clinician", seed=2)
    return made


def settings(factory: AdapterFactory, tiny_model_dir: Path, **overrides: object) -> ServiceSettings:
    return ServiceSettings(base=str(tiny_model_dir), adapters_dir=factory.registry.root, router="fallback",
                           **overrides)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(factory: AdapterFactory, tiny_model_dir: Path) -> Iterator[RunningServer]:
    with serve(settings(factory, tiny_model_dir, devices=("cpu", "cpu"), watch_interval_s=0.3)) as running:
        yield running


def test_answers_equal_the_single_engine_service(server: RunningServer, client: httpx.Client,
                                                 factory: AdapterFactory, tiny_model_dir: Path) -> None:
    pooled = [answer(client, q, persona=p, max_new_tokens=12) for p, q in QUESTIONS]
    with serve(settings(factory, tiny_model_dir, watch_interval_s=0)) as single, single.client() as other:
        alone = [answer(other, q, persona=p, max_new_tokens=12) for p, q in QUESTIONS]
    for got, want in zip(pooled, alone, strict=True):
        assert got["answer"] == want["answer"] and got["usage"] == want["usage"]
        assert got["adapter"] == want["adapter"] is not None


def test_ready_and_metrics_report_each_device(server: RunningServer, client: httpx.Client) -> None:
    ready = client.get("/ready").json()
    assert ready["engine"].endswith("x2")
    assert [u["name"] for u in ready["upstreams"]] == ["cpu#0", "cpu#1"] and all(u["up"] for u in ready["upstreams"])
    text = client.get("/metrics").text
    assert 'persona_router_upstream_up{upstream="cpu#0"} 1' in text
    assert 'persona_router_upstream_up{upstream="cpu#1"} 1' in text


def test_a_published_adapter_loads_on_its_home_device(server: RunningServer, client: httpx.Client,
                                                      factory: AdapterFactory) -> None:
    version = factory.publish("engineer", seed=3)
    name = f"engineer@{version}"
    pool = server.state.engine

    def loaded() -> bool:
        return any(name in m["adapters"] for m in pool.describe())

    wait_until(loaded, timeout_s=30)
    holders = [m["name"] for m in pool.describe() if name in m["adapters"]]
    assert holders == [pool.ranking(name)[0]]  # one device, its first choice
    got = answer(client, "How do hash maps work?", persona="engineer", max_new_tokens=8)
    assert got["adapter"] == {"persona": "engineer", "version": version}
