"""The vLLM gateway's small parts: settings validation, the upstream command and environment, error statuses,
the member's request body, and the rendezvous ranking's stability."""

from __future__ import annotations

from pathlib import Path

import pytest
from persona_router.adapters.engine_api import GenerationRequest
from persona_router.adapters.generation import SamplingConfig
from persona_router.adapters.upstream_member import PoolConfig, rendezvous_order
from persona_router.adapters.vllm_upstream import VllmUpstream
from persona_router.cli.main import main
from persona_router.cli.vllm_serve import live_adapters, vllm_command, vllm_env
from persona_router.core.errors import ConfigError, UpstreamFailedError, UpstreamUnavailableError
from persona_router.service.http_errors import error_response, status_of
from persona_router.service.settings import ServiceSettings


def test_settings_need_upstreams_for_vllm_and_only_for_vllm() -> None:
    with pytest.raises(ConfigError, match="needs at least one --upstream"):
        ServiceSettings(engine="vllm")
    with pytest.raises(ConfigError, match="only used with --engine vllm"):
        ServiceSettings(engine="fast", upstreams=("http://127.0.0.1:8100",))
    with pytest.raises(ConfigError, match="not an http"):
        ServiceSettings(engine="vllm", upstreams=("127.0.0.1:8100",))
    with pytest.raises(ConfigError, match="twice"):
        ServiceSettings(engine="vllm", upstreams=("http://a:1", "http://a:1"))
    ok = ServiceSettings(engine="vllm", upstreams=("http://a:1", "http://b:1"), upstream_max_in_flight=4)
    assert ok.upstreams == ("http://a:1", "http://b:1")


def test_pool_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="max_in_flight"):
        PoolConfig(max_in_flight=0)
    with pytest.raises(ConfigError, match="replicas"):
        PoolConfig(replicas=0)


def test_rendezvous_ranking_is_stable_and_moves_little_when_a_member_goes() -> None:
    names = [f"http://10.0.0.{i}:8100" for i in range(4)]
    keys = [f"persona{i}@1" for i in range(200)]
    first = {k: rendezvous_order(k, names)[0] for k in keys}
    assert first == {k: rendezvous_order(k, list(reversed(names)))[0] for k in keys}  # order of listing is irrelevant
    assert len(set(first.values())) == 4
    fewer = names[:3]
    moved = [k for k in keys if first[k] != rendezvous_order(k, fewer)[0]]
    assert all(first[k] == names[3] for k in moved)  # only the removed member's keys move


def test_upstream_errors_have_their_statuses() -> None:
    assert status_of(UpstreamUnavailableError("none up")) == 503
    assert status_of(UpstreamFailedError("broke")) == 502
    assert error_response(UpstreamUnavailableError("none up", retry_after_s=3)).headers["Retry-After"] == "3"


def test_the_completion_body_carries_ids_sampling_and_stops() -> None:
    member = VllmUpstream("http://127.0.0.1:8100/")
    request = GenerationRequest(request_id="r", prompt_ids=(5, 6), adapter="student@3",
                                sampling=SamplingConfig(max_new_tokens=7, temperature=0.5, top_p=0.9, seed=11),
                                stop_token_ids=(2,))
    body = member.body(request)
    assert body["model"] == "student@3" and body["prompt"] == [5, 6] and body["max_tokens"] == 7
    assert body["temperature"] == 0.5 and body["top_p"] == 0.9 and body["seed"] == 11
    assert body["stop_token_ids"] == [2] and body["stream"] and body["return_token_ids"]
    assert member.url == "http://127.0.0.1:8100"
    with pytest.raises(ConfigError):
        VllmUpstream("127.0.0.1:8100")


def test_vllm_command_and_environment(tmp_path: Path) -> None:
    command = vllm_command("/venv/bin/python", tmp_path / "base", host="127.0.0.1", port=8101, served_name="base",
                           adapters={"student@2": tmp_path / "s2"}, extra=["--max-num-seqs", "16"])
    assert command[:3] == ["/venv/bin/python", "-m", "vllm.entrypoints.openai.api_server"]
    assert "--enable-lora" in command and command[command.index("--port") + 1] == "8101"
    assert f"student@2={tmp_path / 's2'}" in command and command[-2:] == ["--max-num-seqs", "16"]
    env = vllm_env("127.0.0.1", {"VLLM_CPU_KVCACHE_SPACE": "4"})
    assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True" and env["VLLM_HOST_IP"] == "127.0.0.1"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"  # the caller's value wins
    assert "VLLM_HOST_IP" not in vllm_env("0.0.0.0", {})


def test_live_adapters_names_each_personas_latest(tmp_path: Path) -> None:
    for persona, versions in (("student", (1, 2)), ("clinician", (1,))):
        for version in versions:
            folder = tmp_path / persona / str(version)
            folder.mkdir(parents=True)
            for name in ("adapter_config.json", "adapter_model.safetensors", "manifest.json"):
                (folder / name).write_text("{}")
        (tmp_path / persona / "LATEST").write_text(str(versions[-1]))
    (tmp_path / "educator").mkdir()
    (tmp_path / "educator" / "LATEST").write_text("4")  # points at nothing: skipped with a warning
    found = live_adapters(tmp_path, ("student", "clinician", "engineer", "educator"))
    assert found == {"student@2": tmp_path / "student" / "2", "clinician@1": tmp_path / "clinician" / "1"}


def test_vllm_serve_prints_its_command(tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERSONA_ROUTER_VLLM_PYTHON", "/opt/vllm/bin/python")
    code = main(["vllm-serve", "--base", str(tiny_model_dir), "--adapters", str(tmp_path), "--port", "8111",
                 "--print-command", "--", "--max-num-seqs", "4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in out and "/opt/vllm/bin/python -m vllm.entrypoints" in out
    assert f"--model {tiny_model_dir}" in out and "--port 8111" in out and out.rstrip().endswith("--max-num-seqs 4")


def test_vllm_serve_sizes_its_lora_rank_and_checks_its_python(
        tmp_path: Path, tiny_model_dir: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank-32 adapter in the folder: vLLM would refuse to start at the old fixed --max-lora-rank 16."""
    import json

    from persona_router.adapters.registry import AdapterRegistry
    from persona_router.cli.vllm_serve import max_lora_rank

    from tests.unit.test_training_registry import stage

    registry = AdapterRegistry(tmp_path)
    staged = stage(registry)
    (staged / "adapter_config.json").write_text(json.dumps({"r": 24}), encoding="utf-8")
    registry.publish("student", staged)
    assert max_lora_rank(tmp_path, ("student", "clinician")) == 32  # rounded up to a rank vLLM accepts
    assert max_lora_rank(tmp_path, ("clinician",)) == 16  # never below the old default
    monkeypatch.setenv("PERSONA_ROUTER_VLLM_PYTHON", "/opt/vllm/bin/python")
    args = ["vllm-serve", "--base", str(tiny_model_dir), "--adapters", str(tmp_path)]
    assert main([*args, "--print-command"]) == 0
    assert "--max-lora-rank 32" in capsys.readouterr().out
    assert main(args) == 2  # /opt/vllm/bin/python does not exist: a clean error, not exec's traceback
    err = capsys.readouterr().err
    assert "field '--python'" in err and "make vllm" in err


def test_an_error_event_carrying_a_domain_failure_raises_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The service answers a pool's refused request with the failure's status (400, 503, 422), and an
    error without one as a generation failure (500)."""
    from persona_router.adapters.engine_api import TokenEvent
    from persona_router.core.errors import InvalidRequestError
    from persona_router.service.answering import GenerationFailedError, Running

    monkeypatch.setattr(Running, "close", lambda self, cancel=True: None)
    running = Running.__new__(Running)  # only the event bookkeeping is exercised
    running.token_ids, running.pieces, running.completion_tokens, running.first_token_at = [], [], 0, None
    refused = InvalidRequestError("upstream u refused the request: too long")
    with pytest.raises(InvalidRequestError) as raised:
        running._take(TokenEvent("r", None, "", finish_reason="error", error=str(refused), failure=refused))
    assert raised.value is refused and status_of(raised.value) == 400
    with pytest.raises(GenerationFailedError):
        running._take(TokenEvent("r", None, "", finish_reason="error", error="the engine failed"))
