"""``persona-router serve`` as a real process on the offline default base with the fitted router."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.service_support import free_port, wait_ready

pytestmark = pytest.mark.slow

QUESTIONS = [
    ("Why is the sky blue?", "student"),
    ("renal dose adjustment for apixaban in a patient with CrCl 25 mL/min?", None),
    ("what's the time complexity of inserting into a hash map?", "engineer"),
    ("why do leaves change colour in autumn?", "general-reader"),
]


@pytest.fixture(scope="module")
def service_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    adapters = tmp_path_factory.mktemp("adapters-cli")
    log_path = adapters.parent / "serve.log"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "persona_router", "serve", "--port", str(port), "--adapters", str(adapters),
             "--watch-interval", "0", "--quantization", "fp32"], stdout=log, stderr=subprocess.STDOUT, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, None, timeout_s=900)
            yield url
        except TimeoutError:
            process.kill()
            raise AssertionError(Path(log_path).read_text(errors="replace")[-3000:]) from None
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                # uvicorn shuts down gracefully, then re-raises the signal so the exit status reports it.
                assert process.wait(timeout=60) in (0, -signal.SIGTERM)
                assert "Application shutdown complete" in Path(log_path).read_text(errors="replace")


def post(url: str, question: str, persona: str | None, **fields: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"question": question, "max_new_tokens": 24, **fields}
    if persona:
        payload["persona"] = persona
    response = httpx.post(f"{url}/v1/answer", json=payload, timeout=300)
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_real_base_answers_like_generate_one(service_url: str) -> None:
    from persona_router.adapters.base_model import BaseModelConfig, load_base
    from persona_router.adapters.generation import SamplingConfig, generate_one
    from persona_router.adapters.prompts import build_messages
    from persona_router.core.pack import load_pack

    personas = httpx.get(f"{service_url}/v1/personas", timeout=30).json()["personas"]
    assert {p["status"] for p in personas} == {"prompt-only"}
    got = post(service_url, QUESTIONS[0][0], "student")
    base = load_base(BaseModelConfig())
    messages = build_messages(QUESTIONS[0][0], system_prompt=load_pack("demo").get("student").system_prompt)
    expected = generate_one(base.model, base.tokenizer, messages, SamplingConfig(max_new_tokens=24))
    assert got["answer"] == expected.text and got["usage"]["completion_tokens"] == expected.completion_tokens


def test_auto_routing_infers_the_persona(service_url: str) -> None:
    got = post(service_url, QUESTIONS[1][0], None, max_new_tokens=4)
    assert got["decision"]["source"] == "inferred" and got["decision"]["persona"] == "clinician"
    assert got["decision"]["runner_up"] and 0 < got["decision"]["confidence"] <= 1


def test_concurrent_requests_equal_sequential(service_url: str) -> None:
    alone = [post(service_url, q, p) for q, p in QUESTIONS]
    with concurrent.futures.ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(lambda qp: post(service_url, *qp), QUESTIONS))
    assert [a["answer"] for a in together] == [a["answer"] for a in alone]


def test_openai_client_on_the_real_server(service_url: str) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{service_url}/v1", api_key="unused", max_retries=0, timeout=300)
    completion = client.chat.completions.create(
        model="persona:auto", messages=[{"role": "user", "content": QUESTIONS[2][0]}], max_tokens=16)
    assert completion.choices[0].message.content
    assert completion.model_extra["persona_routing"]["decision"]["persona"] == "engineer"


MINI_PACK = """
name = "mini"

[[personas]]
name = "student"
description = "Learners who want simple explanations."
system_prompt = "You are a friendly tutor answering a student. Explain simply."
examples = ["can someone explain photosynthesis like i'm 12"]

[[personas]]
name = "general-reader"
description = "Curious adults who want a plain answer."
system_prompt = "You are a clear, friendly writer answering a curious adult."
fallback = true
examples = ["why do leaves change colour in autumn?"]
"""


def test_train_missing_serves_at_once_and_hot_loads_each_adapter(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Demo mode: prompt-only answers right away; each adapter is served as soon as training publishes it."""
    pack = tmp_path / "pack.toml"
    pack.write_text(MINI_PACK, encoding="utf-8")
    adapters = tmp_path / "adapters"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "persona_router", "serve", "--port", str(port), "--base", str(tiny_model_dir),
               "--pack", str(pack), "--adapters", str(adapters), "--router", "fallback", "--watch-interval", "0.5",
               "--train-missing", "--train-arg=--max-steps=1"]
    with open(tmp_path / "serve.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_ready(url, None, timeout_s=300)
            first = httpx.post(f"{url}/v1/answer", json={"question": "hi", "persona": "student", "max_new_tokens": 2},
                               timeout=60).json()
            assert first["adapter"] is None  # served before any adapter exists
            seen: set[str] = set()
            deadline = time.monotonic() + 600
            while len(seen) < 2 and time.monotonic() < deadline:
                personas = httpx.get(f"{url}/v1/personas", timeout=30).json()["personas"]
                seen = {p["name"] for p in personas if p["status"] == "adapter"}
                time.sleep(1)
            assert seen == {"student", "general-reader"}, (tmp_path / "serve.log").read_text(errors="replace")[-3000:]
            after = httpx.post(f"{url}/v1/answer", json={"question": "hi", "persona": "student", "max_new_tokens": 2},
                               timeout=60).json()
            assert after["adapter"] == {"persona": "student", "version": 1}
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)
