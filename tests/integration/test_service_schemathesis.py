"""The published OpenAPI document is true: schemathesis generates requests for every operation from it
and checks each response against it, on a running server with the tiny model (bounded in examples and
time). Checks: ``not_a_server_error`` and ``response_schema_conformance``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from persona_router.service.settings import ServiceSettings

from tests.integration.service_support import AdapterFactory, RunningServer, serve

pytest.importorskip("schemathesis", reason="schemathesis is a dev dependency: pip install -e '.[dev]'")

MAX_EXAMPLES = 25
MAX_TIME_S = 120


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    root = tmp_path_factory.mktemp("adapters-schemathesis")
    AdapterFactory(tiny_model_dir, root).publish("student", seed=1)
    # Short answers: the fuzzer sends hundreds of requests; what it tests is the contract, not the model.
    settings = ServiceSettings(base=str(tiny_model_dir), adapters_dir=root, router="fallback", watch_interval_s=0,
                               max_new_tokens_limit=8, default_max_new_tokens=4, request_timeout_s=30)
    with serve(settings) as running:
        yield running


def test_openapi_document_is_published(client: httpx.Client) -> None:
    doc = client.get("/schema/openapi.json").json()
    paths = doc["paths"]
    for path in ("/v1/answer", "/v1/chat/completions", "/v1/models", "/v1/models/{model_id}", "/v1/personas",
                 "/v1/admin/adapters/reload", "/v1/admin/adapters/{persona}/{version}", "/health", "/ready"):
        assert path in paths, path
    answer = paths["/v1/answer"]["post"]
    assert answer["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/AnswerRequest"}
    assert "question" in doc["components"]["schemas"]["AnswerRequest"]["required"]
    for item in paths.values():
        for operation in item.values():
            assert operation["responses"]["default"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/ErrorResponse"}


@pytest.mark.slow
def test_schemathesis_finds_no_failures(server: RunningServer, tmp_path: Path) -> None:
    started = time.monotonic()
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/schema/openapi.json",
               "--checks", "not_a_server_error,response_schema_conformance",
               "--max-examples", str(MAX_EXAMPLES), "--max-time", str(MAX_TIME_S), "--seed", "12",
               "--request-timeout", "60", "--workers", "1"]
    # In a temp folder: schemathesis keeps a cache (.schemathesis/) in its working directory.
    result = subprocess.run(command, capture_output=True, text=True, timeout=MAX_TIME_S + 120, check=False,
                            cwd=tmp_path)
    wall = time.monotonic() - started
    print(f"schemathesis: {wall:.1f} s wall\n{result.stdout[-4000:]}")
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert "No issues found" in result.stdout or " passed" in result.stdout, result.stdout[-2000:]
