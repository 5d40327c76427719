"""The service's small parts without a server: settings validation, body decoding, error mapping, the
Prometheus renderer, OpenAI request mapping, admin path checks and the reference engine's batching key."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from persona_router.core.errors import (
    AdapterError,
    AdapterIncompatibleError,
    ConfigError,
    InvalidRequestError,
    QueueFullError,
    UnknownPersonaError,
)
from persona_router.service.metrics import ServiceMetrics
from persona_router.service.schemas import AnswerRequest, ChatCompletionRequest, ErrorResponse, decode_body, sse
from persona_router.service.settings import ServiceSettings


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"port": 70000}, "port"), ({"engine": "turbo"}, "engine"), ({"router": "magic"}, "router"),
    ({"max_queue": 0}, "max_queue"), ({"admin_token": "short"}, "PERSONA_ROUTER_ADMIN_TOKEN"),
    ({"request_timeout_s": 0}, "request_timeout_s"), ({"host": "a b"}, "host"),
    ({"default_max_new_tokens": 600}, "default_max_new_tokens"),
])
def test_settings_name_the_bad_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServiceSettings(**kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_settings_take_the_admin_token_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONA_ROUTER_ADMIN_TOKEN", "a-long-enough-token")
    assert ServiceSettings.from_env().admin_token == "a-long-enough-token"
    monkeypatch.delenv("PERSONA_ROUTER_ADMIN_TOKEN")
    assert ServiceSettings.from_env().admin_token is None


@pytest.mark.parametrize(("body", "field"), [
    (b'{"question": 1}', "question"), (b'{"question": "q", "extra": 1}', "extra"), (b"{}", "question"),
    (b'{"question": "q"', "body"), (b"", "body"), (b'{"question": "q", "max_new_tokens": 1.5}', "max_new_tokens"),
])
def test_decode_body_names_the_field(body: bytes, field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_body(body, AnswerRequest)
    assert info.value.field == field


def test_decode_chat_request_names_nested_fields() -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_body(b'{"model": "persona:auto", "messages": [{"role": 3}]}', ChatCompletionRequest)
    assert info.value.field == "messages[0].role"
    ok = decode_body(b'{"model": "m", "messages": [], "frequency_penalty": 0.5}', ChatCompletionRequest)
    assert ok.model == "m"  # OpenAI fields we do not use are accepted


def test_error_mapping() -> None:
    from persona_router.service.http_errors import error_body, error_response, status_of

    assert status_of(UnknownPersonaError("x", ["a"])) == 404
    assert status_of(InvalidRequestError("bad", field="q")) == 400
    assert status_of(ConfigError("bad", field="q")) == 400
    assert status_of(QueueFullError("full", retry_after_s=3)) == 429
    assert status_of(TimeoutError()) == 504
    assert status_of(AdapterIncompatibleError("other base")) == 409
    assert status_of(AdapterError("corrupt")) == 422
    assert error_body(UnknownPersonaError("x", ["b", "a"])).valid == ["a", "b"]
    assert error_response(QueueFullError("full", retry_after_s=3)).headers["Retry-After"] == "3"
    # OpenAI's error object always has "param" and "code" (null where they do not apply); a 429 has its code.
    for exc, code in ((TimeoutError(), None), (QueueFullError("full", retry_after_s=3), "rate_limit_exceeded"),
                      (InvalidRequestError("bad", field="q"), None)):
        body = json.loads(msgspec.json.encode(ErrorResponse(error=error_body(exc))))["error"]
        assert "param" in body and body["code"] == code


def test_prometheus_rendering_parses_and_counts() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    metrics = ServiceMetrics()
    metrics.requests.inc(endpoint="answer", persona='a"b\\c', adapter_version="1", status="200")
    metrics.requests.inc(2, endpoint="answer", persona='a"b\\c', adapter_version="1", status="200")
    for value in (0.05, 0.5, 5.0):
        metrics.latency.observe(value, endpoint="answer", persona="x", adapter_version="none")
    metrics.add_gauge("persona_router_queue_depth", "Requests waiting.", (), lambda: [({}, 4.0)])
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain") and content_type.count("charset") == 1
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    key = (("adapter_version", "1"), ("endpoint", "answer"), ("persona", 'a"b\\c'), ("status", "200"))
    assert samples[("persona_router_requests_total", key)] == 3
    bucket = (("adapter_version", "none"), ("endpoint", "answer"), ("le", "{}"), ("persona", "x"))
    assert [samples[("persona_router_request_latency_seconds_bucket",
                     tuple(sorted({**dict(bucket), "le": le}.items())))] for le in ("0.05", "1.0", "+Inf")] == [1, 2, 3]
    assert samples[("persona_router_queue_depth", ())] == 4
    assert any(name == "process_cpu_seconds_total" for name, _ in samples)
    assert metrics.latency.count(endpoint="answer", persona="x", adapter_version="none") == 3
    with pytest.raises(ValueError, match="labels"):
        metrics.requests.inc(other="x")


def test_prometheus_serves_openmetrics_when_asked() -> None:
    body, content_type = ServiceMetrics().render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


def test_openai_request_mapping() -> None:
    from persona_router.service.http_errors import ModelNotFoundError, status_of
    from persona_router.service.openai_compat import last_user_text, parse_model, to_input
    from persona_router.service.schemas import ChatMessage, ContentPart

    personas = ["clinician", "student"]
    assert parse_model("persona:auto", personas) is None and parse_model("persona:student", personas) == "student"
    for bad in ("gpt-4o", "persona:", "student", "persona:pirate"):
        with pytest.raises(ModelNotFoundError) as info:
            parse_model(bad, personas)
        assert info.value.field == "model" and status_of(info.value) == 404
    parts = [ChatMessage("user", "first"), ChatMessage("assistant", "a"),
             ChatMessage("user", [ContentPart("text", "hello"), ContentPart("image_url")])]
    assert last_user_text(parts) == "hello"
    request = ChatCompletionRequest(model="persona:clinician", messages=parts, max_tokens=5)
    mapped = to_input(request, personas)
    assert (mapped.question, mapped.persona, mapped.max_new_tokens, mapped.temperature) == (
        "hello", "clinician", 5, 0.0)
    with pytest.raises(InvalidRequestError, match="n=1"):
        to_input(ChatCompletionRequest(model="persona:auto", messages=parts, n=2), personas)


def test_openai_values_in_its_own_ranges_are_taken() -> None:
    """What OpenAI's schema allows must not be a 400 here: a null stream, a negative seed, top_p 0."""
    from persona_router.adapters.generation import SamplingConfig
    from persona_router.service.openai_compat import to_input

    body = b'{"model": "persona:auto", "messages": [{"role": "user", "content": "hi"}], "stream": null, ' \
           b'"seed": -1, "top_p": 0, "temperature": 0.7}'
    request = decode_body(body, ChatCompletionRequest)
    assert not request.stream
    mapped = to_input(request, ["student"])
    assert mapped.seed == 2**63 - 1  # folded into the engines' range, still deterministic per seed
    assert (mapped.temperature, mapped.top_p) == (0.0, 1.0)  # the smallest nucleus is the top token: greedy
    SamplingConfig(temperature=mapped.temperature, top_p=mapped.top_p, seed=mapped.seed)  # the engines accept it
    beyond = decode_body(body.replace(b'"top_p": 0', b'"top_p": 1.5'), ChatCompletionRequest)
    with pytest.raises(InvalidRequestError, match=r"must be in \[0, 1\]") as caught:  # the range it takes
        to_input(beyond, ["student"])
    assert caught.value.field == "top_p"


@pytest.mark.parametrize(("persona", "version", "field"), [
    ("..", "1", "persona"), ("/etc", "1", "persona"), ("Student", "1", "persona"), ("student", "../1", "version"),
    ("student", "0", "version"), ("student", "-1", "version"),
])
def test_admin_targets_cannot_leave_the_folder(persona: str, version: str, field: str) -> None:
    from persona_router.service.admin import _parse_target

    with pytest.raises(InvalidRequestError) as info:
        _parse_target(persona, version)
    assert info.value.field == field
    assert _parse_target("general-reader", "12") == ("general-reader", 12)


def test_sse_encoding() -> None:
    assert sse({"a": 1}, event="token") == b'event: token\ndata: {"a":1}\n\n'
    assert sse("[DONE]") == b"data: [DONE]\n\n"


def test_reference_engine_batches_only_compatible_sampling() -> None:
    from persona_router.adapters.engine_api import GenerationRequest
    from persona_router.adapters.engine_reference import _batch_key
    from persona_router.adapters.generation import SamplingConfig

    def key(**sampling: object) -> object:
        return _batch_key(GenerationRequest("r", (1,), None, SamplingConfig(**sampling)))  # type: ignore[arg-type]

    assert key() == key(max_new_tokens=5)  # greedy rows share a batch whatever their length
    assert key(temperature=0.7) == key(temperature=0.7) != key(temperature=0.8)
    assert key(temperature=0.7, seed=1) is None  # a seeded row runs alone so its seed reproduces


@pytest.mark.parametrize("raw, expected", [(None, "live"), ("live", "live"), ("none", "none"), ("3", 3), (3, 3)])
def test_adapter_choice(raw: str | int | None, expected: object) -> None:
    from persona_router.service.answering import adapter_choice

    assert adapter_choice(raw) == expected


@pytest.mark.parametrize("raw", ["0", "v2", "٢", "²", "-1", "", "latest", 0, -2, True])
def test_adapter_choice_refuses_anything_else(raw: str | int) -> None:
    from persona_router.service.answering import adapter_choice

    with pytest.raises(InvalidRequestError, match="adapter choice") as caught:
        adapter_choice(raw)
    assert caught.value.field == "adapter"


def test_a_seeded_request_leaves_the_random_state_of_other_requests_alone(tiny_model_dir: Any) -> None:
    """The reference engine samples through ``generate`` and the global generators: a seeded request must not
    reseed them for everyone else, and its seed must still decide its tokens."""
    import asyncio

    import torch
    from persona_router.adapters.base_model import BaseModelConfig, load_base
    from persona_router.adapters.engine_api import GenerationRequest
    from persona_router.adapters.engine_reference import ReferenceEngine
    from persona_router.adapters.generation import SamplingConfig

    engine = ReferenceEngine(load_base(BaseModelConfig(base=str(tiny_model_dir), device="cpu")))

    def sampled(rid: str) -> GenerationRequest:
        return GenerationRequest(rid, (1, 2, 3), None, SamplingConfig(max_new_tokens=6, temperature=1.0, seed=7))

    async def main() -> tuple[list[int | None], list[int | None]]:
        engine.start(asyncio.get_running_loop())
        try:
            torch.manual_seed(123)
            before = torch.get_rng_state()
            first = [event.token_id async for event in engine.submit(sampled("a"))]
            for _ in range(100):  # the last event can arrive before the worker has left the seeded block
                if torch.equal(torch.get_rng_state(), before):
                    break
                await asyncio.sleep(0.01)
            assert torch.equal(torch.get_rng_state(), before)
            second = [event.token_id async for event in engine.submit(sampled("b"))]
            return first, second
        finally:
            engine.stop()

    first, second = asyncio.run(main())
    assert first == second and len([t for t in first if t is not None]) > 0


def test_background_training_resumes_and_keeps_the_servers_device(tmp_path: Any) -> None:
    """``serve --train-missing``: each child continues from the checkpoints a stopped server left, trains on
    the device and precision the server was given, and extra --train-arg values come last (they win)."""
    from persona_router.cli.serve import BackgroundTrainer
    from persona_router.service.settings import ServiceSettings

    settings = ServiceSettings(adapters_dir=tmp_path, device="cpu", quantization="fp32")
    command = BackgroundTrainer(settings, ("student",), extra=["--max-steps=1"]).command("student")
    assert "--resume" in command and command[-1] == "--max-steps=1"
    assert command[command.index("--device") + 1] == "cpu" and command[command.index("--quantization") + 1] == "fp32"


def test_loopback_is_parsed_not_prefix_matched() -> None:
    from persona_router.service.settings import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("127.example.com", "0.0.0.0", "10.0.0.1", "::", "localhost.evil"))


def test_upstream_names_carry_no_credentials() -> None:
    from persona_router.adapters.vllm_upstream import without_credentials

    assert without_credentials("http://u:secret@10.0.0.5:8001") == "http://10.0.0.5:8001"
    assert without_credentials("http://tok@[::1]:8001/v1") == "http://[::1]:8001/v1"
    assert without_credentials("http://127.0.0.1:8001") == "http://127.0.0.1:8001"


def test_a_body_that_does_not_arrive_is_a_408(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from persona_router.service import http_errors

    class Trickle:
        async def body(self) -> bytes:
            await asyncio.sleep(10)
            return b""

    monkeypatch.setattr(http_errors, "BODY_TIMEOUT_S", 0.05)
    with pytest.raises(http_errors.BodyTimeoutError) as info:
        asyncio.run(http_errors.read_body(Trickle()))  # type: ignore[arg-type]
    assert http_errors.status_of(info.value) == 408 and "did not arrive" in str(info.value)
