"""Distributed-launch helpers: the launcher environment, the global batch over ranks, --gpus, GPU listing."""

from __future__ import annotations

import logging
import subprocess
import sys
from typing import Any

import pytest
from persona_router.adapters import base_model
from persona_router.core.errors import ConfigError
from persona_router.training import config as config_module
from persona_router.training import distributed, parallel
from persona_router.training.config import CPU_DEFAULTS, CUDA_DEFAULTS, TrainConfig


def test_world_reads_the_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in distributed.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert distributed.world() == distributed.World(1, 0, 0)
    assert distributed.world().is_main and not distributed.world().distributed
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.world() == distributed.World(4, 3, 1)
    assert not distributed.world().is_main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ConfigError, match="rank 4 is not within world size 4"):
        distributed.world()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ConfigError, match="integers"):
        distributed.world()


def test_one_process_decisions_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.share_decision({"checkpoint": None}) == {"checkpoint": None}
    distributed.barrier()  # no process group: nothing to wait for


def test_default_accumulation_splits_over_ranks_and_explicit_values_stay() -> None:
    accum = CUDA_DEFAULTS["grad_accum"]
    one = TrainConfig().resolved("cuda")
    assert one.grad_accum == accum
    two = TrainConfig().resolved("cuda", world_size=2)
    assert two.batch_size == one.batch_size and (two.grad_accum or 0) * 2 == accum  # same global batch
    assert TrainConfig().resolved("cuda", world_size=accum).grad_accum == 1
    assert TrainConfig(grad_accum=4).resolved("cuda", world_size=2).grad_accum == 4  # explicit: per rank
    assert (TrainConfig().resolved("cpu", world_size=2).grad_accum or 0) * 2 == CPU_DEFAULTS["grad_accum"]


@pytest.mark.parametrize(("ranks", "per_rank", "global_rows"), [(1, 4, 8), (2, 2, 8), (3, 1, 6), (4, 1, 8), (5, 1, 10),
                                                                 (6, 1, 12), (8, 1, 16)])
def test_an_accumulation_the_ranks_do_not_divide_gives_the_nearest_global_batch(
        ranks: int, per_rank: int, global_rows: int, caplog: pytest.LogCaptureFixture) -> None:
    """Kept at 4 per rank, 3 or 8 GPUs trained with a global batch 3x or 8x that of one process."""
    assert (CUDA_DEFAULTS["batch_size"], CUDA_DEFAULTS["grad_accum"]) == (2, 4)  # one process: 8 rows
    with caplog.at_level(logging.INFO, logger=config_module.__name__):
        resolved = TrainConfig().resolved("cuda", world_size=ranks)
    assert resolved.grad_accum == per_rank == config_module.split_accumulation(4, ranks)
    assert (resolved.batch_size or 0) * (resolved.grad_accum or 0) * ranks == global_rows
    if ranks > 1:
        assert f"global batch: {global_rows} rows" in caplog.text


def test_gpus_flag_relaunches_the_same_command_under_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    from persona_router.cli.main import main

    for name in distributed.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    seen: list[list[str]] = []

    def fake_run(command: list[str], check: bool = False, **kwargs: Any) -> Any:
        seen.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(base_model, "pick_device", lambda device: "cuda")  # as on a machine with two GPUs
    monkeypatch.setattr(parallel, "visible_gpus", lambda: ["0", "1"])
    argv = ["train", "--persona", "student", "--gpus", "2", "--max-steps", "3"]
    monkeypatch.setattr(sys, "argv", ["persona-router", *argv])
    assert main(argv) == 0
    (command,) = seen
    assert command[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert command[5:] == ["-m", "persona_router", "train", "--persona", "student", "--max-steps", "3"]


def test_gpus_flag_checks_before_any_rank_starts_and_a_failed_rank_is_status_2(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from persona_router.cli.main import main

    for name in distributed.LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    codes: list[int] = []

    def fake_run(command: list[str], check: bool = False, **kwargs: Any) -> Any:
        return subprocess.CompletedProcess(command, codes.pop(0))

    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(base_model, "pick_device", lambda device: "cuda")
    monkeypatch.setattr(parallel, "visible_gpus", lambda: ["0", "1"])
    # An unknown persona: one clean error here, no ranks started (fake_run would fail on the empty list).
    assert main(["train", "--persona", "nosuch", "--gpus", "2"]) == 2
    assert "unknown persona 'nosuch'" in capsys.readouterr().err
    codes.append(1)  # torch.distributed.run's status when a rank failed
    monkeypatch.setattr(sys, "argv", ["persona-router", "train", "--persona", "student", "--gpus", "2"])
    assert main(["train", "--persona", "student", "--gpus", "2"]) == 2


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 5")
    assert parallel.visible_gpus() == ["2", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert parallel.visible_gpus() == []


def test_gpus_beyond_those_visible_or_on_cpu_are_refused(monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from persona_router.cli.main import main

    monkeypatch.setattr(parallel, "visible_gpus", lambda: ["0", "1"])
    monkeypatch.setattr(base_model, "pick_device", lambda device: "cuda")
    assert main(["train", "--persona", "student", "--gpus", "4"]) == 2
    assert "field '--gpus': 4 GPUs asked for, 2 visible (CUDA_VISIBLE_DEVICES: 0,1)" in capsys.readouterr().err
    monkeypatch.setattr(base_model, "pick_device", lambda device: "cpu")
    assert main(["train", "--persona", "student", "--gpus", "2", "--device", "cpu"]) == 2
    assert "this run is on cpu" in capsys.readouterr().err


def test_train_all_one_at_a_time_goes_on_after_any_failure(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Out of memory on one persona (a RuntimeError, not a domain error) must not stop the others: the summary
    names it and the status is 2, as with parallel workers."""
    from persona_router.cli.main import main
    from persona_router.core.errors import AdapterError
    from persona_router.training import trainer

    tried: list[str] = []

    def failing(job: Any, *args: Any, **kwargs: Any) -> Any:
        tried.append(job.persona.name)
        if len(tried) == 1:
            raise RuntimeError("CUDA out of memory")
        raise AdapterError("diverged")

    monkeypatch.setattr(trainer, "train_persona", failing)
    assert main(["train", "--all", "--workers", "1", "--device", "cpu", "--max-steps", "1"]) == 2
    assert len(tried) == 5  # every persona of the demo pack was tried
    captured = capsys.readouterr()
    assert "RuntimeError: CUDA out of memory" in captured.out + captured.err
