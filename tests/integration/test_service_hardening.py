"""The service under an operator's abuse (issue 12): poisoned adapters, cross-site and rebinding requests,
durable admin state, malformed admin paths, leaked paths, content types and the body limit."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from persona_router.core.errors import ConfigError
from persona_router.service.settings import ServiceSettings

from tests.integration.service_support import (
    OTHER_FINGERPRINT,
    AdapterFactory,
    RunningServer,
    answer,
    serve,
)

QUESTION = "why is the sky blue?"
JSON = {"Content-Type": "application/json"}


def rewrite_weights(factory: AdapterFactory, persona: str, version: int, change: Any) -> None:
    """Pass every tensor of a published version through ``change(key, tensor)`` (a diverged run's output)."""
    from safetensors.torch import load_file, save_file

    path = factory.registry.path(persona, version) / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({key: change(key, t).contiguous() for key, t in tensors.items()}, str(path))


def with_nan(key: str, tensor: Any) -> Any:
    if "lora_B" in key:
        tensor = tensor.clone()
        tensor.view(-1)[0] = float("nan")
    return tensor


def overflowing(key: str, tensor: Any) -> Any:
    """Finite (so it passes every load check) but so large that float32 products overflow to inf."""
    import torch

    return torch.full_like(tensor, 3e38) if "lora_A" in key else tensor


@pytest.fixture(scope="module")
def factory(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> AdapterFactory:
    factory = AdapterFactory(tiny_model_dir, tmp_path_factory.mktemp("adapters-hardening"))
    factory.publish("student", seed=1)
    factory.publish("educator", seed=2)
    return factory


@pytest.fixture(scope="module")
def server(factory: AdapterFactory, tiny_model_dir: Path) -> Iterator[RunningServer]:
    settings = ServiceSettings(base=str(tiny_model_dir), adapters_dir=factory.registry.root, router="fallback",
                               watch_interval_s=0, max_new_tokens_limit=256, default_max_new_tokens=16)
    with serve(settings) as running:
        yield running


def admin(client: httpx.Client, method: str, path: str, **headers: str) -> httpx.Response:
    return client.request(method, f"/v1/admin{path}", headers={**JSON, **headers})


def persona_state(client: httpx.Client, name: str) -> dict[str, Any]:
    return next(p for p in client.get("/v1/personas").json()["personas"] if p["name"] == name)


def no_paths(text: str, *roots: Path) -> None:
    for root in roots:
        assert str(root) not in text
    assert "/tmp/" not in text and "/home/" not in text, text


# -- 1. poisoned adapters ------------------------------------------------------------------------------------
def test_non_finite_version_is_refused_and_named(client: httpx.Client, factory: AdapterFactory) -> None:
    version = factory.publish("student", seed=3)
    rewrite_weights(factory, "student", version, with_nan)
    report = admin(client, "POST", "/adapters/reload").json()
    assert report["live"]["student"] == version - 1
    state = persona_state(client, "student")
    entry = next(v for v in state["versions"] if v["version"] == version)
    assert entry["state"] == "broken" and "non-finite" in entry["error"], entry
    assert answer(client, QUESTION, persona="student", max_new_tokens=4)["adapter"]["version"] == version - 1
    refused = admin(client, "POST", f"/adapters/student/{version}")
    assert refused.status_code == 422 and "non-finite" in refused.json()["error"]["message"]


def test_overflowing_adapter_fails_alone_and_is_quarantined(client: httpx.Client, server: RunningServer,
                                                            factory: AdapterFactory) -> None:
    healthy = [("educator", "why is the sky blue?"), ("general-reader", "the heart pumps blood"),
               ("educator", "explain code simply"), ("general-reader", "why is the sky blue?")]
    expected = [answer(client, q, persona=p, max_new_tokens=24)["answer"] for p, q in healthy]
    version = factory.publish("clinician", seed=4)
    rewrite_weights(factory, "clinician", version, overflowing)
    admin(client, "POST", "/adapters/reload").raise_for_status()
    assert persona_state(client, "clinician")["live_version"] == version  # finite: it loads

    results: dict[int, httpx.Response] = {}

    def ask(index: int, persona: str, question: str) -> None:
        with server.client() as own:
            results[index] = own.post("/v1/answer", json={"question": question, "persona": persona,
                                                          "max_new_tokens": 24})

    jobs = [("clinician", QUESTION), *healthy[:2], ("clinician", "explain code simply"), *healthy[2:]]
    threads = [threading.Thread(target=ask, args=(i, p, q)) for i, (p, q) in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    got = [results[i] for i, (p, _) in enumerate(jobs) if p != "clinician"]
    assert [r.json()["answer"] for r in got] == expected  # healthy rows: token for token the same
    # A poisoned request fails; one that arrives after the quarantine is answered by the base.
    poisoned = [results[i] for i, (p, _) in enumerate(jobs) if p == "clinician"]
    failed = [r for r in poisoned if r.status_code != 200]
    assert failed, [r.text for r in poisoned]
    for response in failed:
        assert response.status_code == 500 and "non-finite" in response.json()["error"]["message"], response.text
    assert all(r.json()["adapter"] is None for r in poisoned if r.status_code == 200)
    state = persona_state(client, "clinician")
    entry = next(v for v in state["versions"] if v["version"] == version)
    assert entry["state"] == "quarantined" and "non-finite" in entry["error"]
    assert state["status"] == "prompt-only" and state["live_version"] is None
    assert f"clinician@{version}" not in server.state.residency.resident()
    assert client.get("/ready").status_code == 200
    # Unloaded: every persona answers exactly as before, the quarantined one from the base.
    assert [answer(client, q, persona=p, max_new_tokens=24)["answer"] for p, q in healthy] == expected
    assert answer(client, QUESTION, persona="clinician", max_new_tokens=8)["adapter"] is None


# -- 3. cross-site admin, DNS rebinding, JSON-only bodies -----------------------------------------------------
def test_admin_refuses_cross_site_requests(client: httpx.Client, server: RunningServer) -> None:
    plain = client.post("/v1/admin/adapters/reload", content=b"{}", headers={"Content-Type": "text/plain"})
    assert plain.status_code == 415 and plain.json()["error"]["field"] == "content-type"
    bare = client.post("/v1/admin/adapters/reload")
    assert bare.status_code == 415
    form = client.request("DELETE", "/v1/admin/adapters/student/1",
                          headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415
    foreign = admin(client, "POST", "/adapters/reload", Origin="http://evil.example")
    assert foreign.status_code == 403 and foreign.json()["error"]["type"] == "permission_error"
    assert admin(client, "POST", "/adapters/reload", Origin="null").status_code == 403
    assert admin(client, "POST", "/adapters/reload", **{"Sec-Fetch-Site": "cross-site"}).status_code == 403
    assert admin(client, "POST", "/adapters/reload", **{"Sec-Fetch-Site": "same-site"}).status_code == 403
    own_origin = server.url
    assert admin(client, "POST", "/adapters/reload", Origin=own_origin,
                 **{"Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert admin(client, "POST", "/adapters/reload").status_code == 200  # curl, scripts: no browser headers
    assert persona_state(client, "student")["live_version"] is not None  # nothing was disabled


def test_foreign_host_header_is_refused(client: httpx.Client) -> None:
    for path in ("/v1/personas", "/ready", "/metrics"):
        response = client.get(path, headers={"Host": "evil.example"})
        assert response.status_code == 400 and response.json()["error"]["field"] == "host", path
    rebinding = admin(client, "POST", "/adapters/reload", Host="attacker.example:8000")
    assert rebinding.status_code == 400
    for host in ("localhost", "127.0.0.1:1234", "LOCALHOST."):
        assert client.get("/health", headers={"Host": host}).status_code == 200, host


def test_answer_endpoints_take_json_only(client: httpx.Client) -> None:
    body = b'{"question": "why is the sky blue?", "max_new_tokens": 2}'
    for path in ("/v1/answer", "/v1/chat/completions", "/v1/compare"):
        for media in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            response = client.post(path, content=body, headers={"Content-Type": media})
            assert response.status_code == 415, (path, media)
            assert "application/json" in response.json()["error"]["message"]
    ok = client.post("/v1/answer", content=body, headers={"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def test_open_bind_without_token_refuses_to_start(tiny_model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="PERSONA_ROUTER_ADMIN_TOKEN") as info:
        ServiceSettings(base=str(tiny_model_dir), host="0.0.0.0")
    assert info.value.field == "host"
    assert ServiceSettings(base=str(tiny_model_dir), host="0.0.0.0", admin_token="long-enough-token").host
    assert ServiceSettings(base=str(tiny_model_dir), host="0.0.0.0", allow_open_admin=True).allow_open_admin
    assert ServiceSettings(base=str(tiny_model_dir), host="127.0.0.2").host  # loopback needs no token


def test_allowed_hosts_follow_the_bind_address() -> None:
    from persona_router.service.protection import allowed_hosts, host_name

    assert allowed_hosts(ServiceSettings(host="127.0.0.1")) == {"127.0.0.1", "localhost", "::1"}
    assert allowed_hosts(ServiceSettings(host="10.1.2.3", admin_token="long-enough-token")) == {"10.1.2.3"}
    assert allowed_hosts(ServiceSettings(host="0.0.0.0", admin_token="long-enough-token")) is None
    assert allowed_hosts(ServiceSettings(host="0.0.0.0", admin_token="long-enough-token",
                                         allowed_hosts=("api.example",))) == {"api.example"}
    assert [host_name(h) for h in ("[::1]:80", "Example.COM.", "a:1", "::1")] == ["::1", "example.com", "a", "::1"]


# -- 5. admin paths -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("version", ["%C2%B2", "%D9%A1", "%EF%BC%91", "1%0A", "+1", "1.0", "1e3", "9" * 40, "01"])
def test_admin_versions_are_ascii_digits(client: httpx.Client, version: str) -> None:
    for method in ("POST", "DELETE"):
        response = admin(client, method, f"/adapters/student/{version}")
        assert response.status_code == 400, (method, version, response.text)
        assert response.json()["error"]["field"] == "version"


@pytest.mark.parametrize("persona", ["student%0A", "%C5%BFtudent", "STUDENT", "a" * 80, "st%C3%BCdent"])
def test_admin_personas_are_checked(client: httpx.Client, persona: str) -> None:
    response = admin(client, "POST", f"/adapters/{persona}/1")
    assert response.status_code == 400 and response.json()["error"]["field"] == "persona", response.text


# -- 6. no internal paths ------------------------------------------------------------------------------------
def test_public_responses_carry_no_paths(client: httpx.Client, factory: AdapterFactory, tiny_model_dir: Path) -> None:
    factory.publish("engineer", seed=5, fingerprint=OTHER_FINGERPRINT)
    broken = factory.publish("general-reader", seed=6)
    factory.corrupt("general-reader", broken)
    admin(client, "POST", "/adapters/reload").raise_for_status()
    root = factory.registry.root
    listing = client.get("/v1/personas")
    assert "incompatible" in listing.text and "broken" in listing.text
    no_paths(listing.text, root, tiny_model_dir)
    no_paths(client.get("/ready").text, root, tiny_model_dir)
    for path in ("/adapters/engineer/1", f"/adapters/general-reader/{broken}", "/adapters/general-reader/77"):
        response = admin(client, "POST", path)
        assert response.status_code in (404, 409, 422), response.text
        no_paths(response.text, root, tiny_model_dir)
    assert "engineer" in admin(client, "POST", "/adapters/engineer/1").json()["error"]["message"]


# -- 9. content types and the body limit ---------------------------------------------------------------------
def test_content_types_have_one_charset(client: httpx.Client) -> None:
    assert client.get("/metrics").headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert client.get("/").headers["content-type"] == "text/html; charset=utf-8"


def test_too_large_body_states_the_limit(client: httpx.Client) -> None:
    big = b'{"question": "' + b"a" * (2 * 1024 * 1024) + b'"}'
    response = client.post("/v1/answer", content=big, headers=JSON)
    assert response.status_code == 413
    assert "1048576 bytes" in response.json()["error"]["message"]


# -- 4. disabled versions survive restarts -------------------------------------------------------------------
def test_disabled_version_survives_restart(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    factory = AdapterFactory(tiny_model_dir, tmp_path_factory.mktemp("adapters-durable"))
    factory.publish("student", seed=7)
    settings = ServiceSettings(base=str(tiny_model_dir), adapters_dir=factory.registry.root, router="fallback",
                               watch_interval_s=0, warmup=False)
    marker = factory.registry.persona_dir("student") / "DISABLED.json"
    with serve(settings) as running, running.client() as client:
        assert persona_state(client, "student")["live_version"] == 1
        admin(client, "DELETE", "/adapters/student/1").raise_for_status()
    with serve(settings) as running, running.client() as client:
        state = persona_state(client, "student")
        assert state["status"] == "prompt-only" and state["versions"][0]["state"] == "disabled"
        assert running.state.residency.report()["disabled"] == [{"persona": "student", "version": 1}]
        assert marker.is_file()
        assert answer(client, QUESTION, persona="student", max_new_tokens=2)["adapter"] is None
        admin(client, "POST", "/adapters/student/1").raise_for_status()
        assert not marker.exists()
    with serve(settings) as running, running.client() as client:
        assert persona_state(client, "student")["live_version"] == 1
