"""How many torch threads each command uses: all cores, or all but the ones left to the service's event loop."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch: pytest.MonkeyPatch) -> object:
    import torch

    before = torch.get_num_threads()
    monkeypatch.delenv("PERSONA_ROUTER_THREADS", raising=False)
    yield None
    torch.set_num_threads(before)


@pytest.mark.parametrize(("cores", "reserve", "expected"), [(2, 0, 2), (2, 1, 1), (1, 1, 1), (8, 1, 7)])
def test_threads_leave_reserved_cores_but_never_fewer_than_one(monkeypatch: pytest.MonkeyPatch, cores: int,
                                                              reserve: int, expected: int) -> None:
    import torch
    from persona_router.adapters import base_model

    monkeypatch.setattr(base_model, "usable_cores", lambda: cores)
    assert base_model.configure_threads(reserve=reserve) == expected
    assert torch.get_num_threads() == expected


def test_the_environment_overrides_the_reserve(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from persona_router.adapters import base_model

    monkeypatch.setattr(base_model, "usable_cores", lambda: 2)
    monkeypatch.setenv("PERSONA_ROUTER_THREADS", "2")
    assert base_model.configure_threads(reserve=1) == 2
    assert torch.get_num_threads() == 2


def test_usable_cores_follow_the_affinity_not_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    from persona_router.adapters import base_model

    monkeypatch.setattr(base_model.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(base_model.os, "sched_getaffinity", lambda pid: {3, 7}, raising=False)
    assert base_model.usable_cores() == 2  # pinned to two of 64 cores (taskset, a container's cpuset)


@pytest.mark.parametrize("raw", ["two", "0", "-1", ""])
def test_a_malformed_thread_count_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    from persona_router.adapters import base_model
    from persona_router.core.errors import ConfigError

    monkeypatch.setenv("PERSONA_ROUTER_THREADS", raw)
    with pytest.raises(ConfigError, match="whole number of threads") as info:
        base_model.configure_threads()
    assert info.value.field == "PERSONA_ROUTER_THREADS"
