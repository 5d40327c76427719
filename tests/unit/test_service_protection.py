"""Request guards and the OpenAPI document without loading a model: the app answers 503 (still loading)
once a request gets past its guards, so every other status here comes from a guard."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from persona_router.service.settings import ServiceSettings


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    from litestar.testing import TestClient
    from persona_router.service.app import create_app

    app = create_app(ServiceSettings(base="unused", router="fallback"))
    yield TestClient(app, base_url="http://127.0.0.1:8000")  # not entered: no lifespan, nothing loads


@pytest.mark.parametrize(("headers", "status"), [
    ({"content-type": "text/plain"}, 415),
    ({"content-type": "application/x-www-form-urlencoded"}, 415),
    ({"content-type": "application/json", "origin": "http://evil.example"}, 403),
    ({"content-type": "application/json", "origin": "null"}, 403),
    ({"content-type": "application/json", "sec-fetch-site": "cross-site"}, 403),
    ({"content-type": "application/json", "host": "evil.example"}, 400),
    ({"content-type": "application/json", "origin": "http://127.0.0.1:8000", "sec-fetch-site": "same-origin"}, 503),
    ({"content-type": "application/json; charset=utf-8"}, 503),
])
def test_admin_guards(client: Any, headers: dict[str, str], status: int) -> None:
    for method, path in (("POST", "/v1/admin/adapters/reload"), ("DELETE", "/v1/admin/adapters/student/1")):
        response = client.request(method, path, content=b"{}", headers=headers)
        assert response.status_code == status, (method, headers, response.text)
        assert "error" in response.json()


def test_answer_endpoints_need_json(client: Any) -> None:
    for path in ("/v1/answer", "/v1/chat/completions"):
        plain = client.post(path, content=b'{"question": "x"}', headers={"content-type": "text/plain"})
        assert plain.status_code == 415
        assert client.post(path, json={"question": "x"}).status_code == 503


def test_openapi_document_is_served(client: Any) -> None:
    doc = client.get("/schema/openapi.json").json()
    assert doc["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"}
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert metrics == {"text/plain": {"schema": {"type": "string"}}}
    assert client.get("/schema/openapi.json", headers={"host": "evil.example"}).status_code == 400
