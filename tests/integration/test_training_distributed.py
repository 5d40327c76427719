"""Several processes on CPU: DDP over gloo for one persona, and ``--all`` spread over worker processes.

The DDP test trains the tiny random Phi-3 once in this process and once as two ranks
(``torch.distributed.run``, gloo), with the same global batch (the CPU default micro-batch x accumulation in one
process; over 2 ranks the default accumulation is halved), LoRA dropout off (each process draws its own masks),
float32 (bf16 autocast's rounding differs with the summation order and flips the sign of Adam's first update
wherever a gradient is near zero: 1.7e-3 apart after two steps, seen).
The adapters must agree to ``ATOL``: both runs see the same rows in the same optimizer steps and differ only in
how float32 sums are ordered (DDP averages two half-batch gradients), about 1e-7 relative per step; Adam's first
steps divide by the gradient's own magnitude, which can amplify that for the smallest gradients, hence 1e-4
(the weights came out bit-identical when this was written). Two steps inside the first epoch: its last, partial step is
evened out by DDP repeating rows on one rank, which one process does not do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from persona_router.adapters.base_model import BaseModelConfig
from persona_router.adapters.registry import AdapterRegistry
from persona_router.core.pack import load_pack
from persona_router.training.config import CPU_DEFAULTS, TrainConfig
from persona_router.training.jobs import PersonaJob

from tests.integration.test_training_train import records

ATOL = 1e-4
pytestmark = pytest.mark.slow


def _tensors(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _launch(args: list[str], home: Path, *, ranks: int) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PERSONA_ROUTER_HOME": str(home), "PERSONA_ROUTER_THREADS": "1", "OMP_NUM_THREADS": "1",
           "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "persona_router", "-q", "train", *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, check=False)


def test_two_gloo_ranks_train_the_same_adapter_as_one_process_and_publish_once(
        tiny_model_dir: Path, tmp_path: Path, isolated_home: Path) -> None:
    import torch
    from persona_router.training.trainer import train_persona

    data = tmp_path / "rows.jsonl"
    rows = records(64)  # enough packed rows that both steps fall inside the first epoch
    data.write_text("".join(json.dumps(r.to_json()) + "\n" for r in rows), encoding="utf-8")
    common = ["--persona", "student", "--data", str(data), "--base", str(tiny_model_dir), "--device", "cpu",
              "--max-steps", "2", "--max-length", "512", "--set", "save_steps=100", "--set", "eval_max_rows=2",
              "--set", "lora_dropout=0",  # dropout masks come from each process's own random stream
              "--set", "mixed_precision=no"]  # float32: bf16 rounding noise flips the sign of Adam's tiny first steps

    two = tmp_path / "two"
    done = _launch([*common, "--adapters", str(two), "--json"], isolated_home, ranks=2)
    assert done.returncode == 0, done.stderr[-4000:]
    registry = AdapterRegistry(two)
    assert registry.latest("student") == 1
    assert sorted(p.name for p in (two / "student").iterdir() if not p.name.startswith(".")) == ["1", "LATEST"]
    manifest = registry.read_manifest("student", 1)
    assert manifest.extra["world_size"] == 2
    assert manifest.metrics.eval_loss_before is not None and manifest.metrics.eval_loss is not None
    batch, accum = CPU_DEFAULTS["batch_size"], CPU_DEFAULTS["grad_accum"]
    assert manifest.extra["global_batch_rows"] == batch * accum
    assert (manifest.hyperparameters["batch_size"], manifest.hyperparameters["grad_accum"]) == (batch, accum // 2)

    # The same rows, split and held out exactly as the CLI does, in one process with the same global batch.
    from persona_router.training.jobs import plan_jobs

    (job,) = plan_jobs(load_pack(), ["student"], data=str(data), eval_fraction=TrainConfig().eval_fraction)
    one = AdapterRegistry(tmp_path / "one")
    config = TrainConfig(max_steps=2, max_length=512, save_steps=100, eval_max_rows=2, lora_dropout=0.0,
                         mixed_precision="no")
    result = train_persona(job, config, BaseModelConfig(base=str(tiny_model_dir), device="cpu"), one)
    assert result.manifest is not None and result.manifest.extra["world_size"] == 1
    hyper = result.manifest.hyperparameters
    assert (hyper["batch_size"], hyper["grad_accum"]) == (batch, accum)
    assert result.manifest.metrics.steps == manifest.metrics.steps == 2

    a, b = _tensors(one.path("student", 1)), _tensors(registry.path("student", 1))
    assert a.keys() == b.keys()
    moved = max(float(t.abs().max()) for k, t in a.items() if "lora_B" in k)
    assert moved > 0  # lora_B starts at zero: training changed it, so the comparison means something
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= ATOL, f"largest difference {worst:.3g} between the 1-process and 2-rank adapters"
    assert torch.isfinite(torch.tensor(worst))

    # --resume after a finished run: rank 0 finds the published version and both ranks skip it.
    again = _launch([*common, "--adapters", str(two), "--resume", "--json"], isolated_home, ranks=2)
    assert again.returncode == 0, again.stderr[-4000:]
    (row,) = json.loads(again.stdout)
    assert row["version"] == 1 and row["skipped"] == "already trained with these settings and data"
    assert registry.latest("student") == 1 and not (two / "student" / "2").exists()


def test_all_spread_over_two_workers_publishes_every_persona_once(tiny_model_dir: Path, tmp_path: Path,
                                                                  isolated_home: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from persona_router.training.parallel import train_spread

    monkeypatch.setenv("PERSONA_ROUTER_THREADS", "1")
    pack = load_pack()
    names = ["student", "clinician", "educator"]
    jobs = [PersonaJob(pack.get(name), [_as(r, name) for r in records(8)],
                       [_as(r, name) for r in records(2, offset=99)], "test rows", "test eval rows") for name in names]
    root = tmp_path / "adapters"
    config = TrainConfig(max_steps=1, max_length=512, save_steps=100, batch_size=2, grad_accum=1)
    outcomes = train_spread(jobs, config, BaseModelConfig(base=str(tiny_model_dir), device="cpu"), root,
                            devices=["", ""])
    assert [o.error for o in outcomes] == [None] * 3
    assert [o.result.persona for o in outcomes] == names  # in the order asked, whatever order they finished in
    registry = AdapterRegistry(root)
    for name in names:
        assert registry.latest(name) == 1
        assert sorted(p.name for p in (root / name).iterdir() if not p.name.startswith(".")) == ["1", "LATEST"]


def test_cli_all_on_cpu_spreads_personas_over_one_worker_per_core(tiny_model_dir: Path, tmp_path: Path,
                                                                  isolated_home: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capfd: pytest.CaptureFixture[str]) -> None:
    from persona_router.cli.main import main

    monkeypatch.setenv("PERSONA_ROUTER_THREADS", "2")  # two cores' worth: two workers of one thread each
    data = tmp_path / "rows.jsonl"
    rows = [_as(r, name) for name in ("student", "clinician", "educator") for r in records(6)]
    data.write_text("".join(json.dumps(r.to_json()) + "\n" for r in rows), encoding="utf-8")
    adapters = tmp_path / "adapters"
    common = ["-q", "train", "--all", "--skip-missing", "--data", str(data), "--base", str(tiny_model_dir),
              "--max-steps", "1", "--max-length", "512", "--device", "cpu", "--json"]
    assert main([*common, "--adapters", str(adapters)]) == 0
    summary = json.loads(capfd.readouterr().out)
    assert [row["persona"] for row in summary] == ["student", "clinician", "educator"]
    registry = AdapterRegistry(adapters)
    names = ("student", "clinician", "educator")
    assert {name: registry.read_manifest(name, 1).extra["torch_threads"] for name in names} == dict.fromkeys(names, 1)

    # --workers 1: one persona after another in this process, with every thread
    assert main([*common, "--adapters", str(tmp_path / "serial"), "--workers", "1"]) == 0
    capfd.readouterr()
    assert AdapterRegistry(tmp_path / "serial").read_manifest("student", 1).extra["torch_threads"] == 2


def test_one_persona_failing_does_not_stop_the_others(tiny_model_dir: Path, tmp_path: Path, isolated_home: Path,
                                                      capfd: pytest.CaptureFixture[str]) -> None:
    """``train --all`` one persona after another: a persona that cannot train (here another process holds its
    lock) is reported after the others trained and published, and the exit status says it failed."""
    from persona_router.cli.main import main

    data = tmp_path / "rows.jsonl"
    rows = [_as(r, name) for name in ("student", "clinician", "educator") for r in records(6)]
    data.write_text("".join(json.dumps(r.to_json()) + "\n" for r in rows), encoding="utf-8")
    adapters = tmp_path / "adapters"
    registry = AdapterRegistry(adapters)
    with registry.lock("clinician"):
        code = main(["-q", "train", "--all", "--skip-missing", "--data", str(data), "--base", str(tiny_model_dir),
                     "--max-steps", "1", "--max-length", "512", "--device", "cpu", "--workers", "1", "--json",
                     "--adapters", str(adapters)])
    captured = capfd.readouterr()
    err = " ".join(captured.err.split())  # the error line may be wrapped
    assert code == 2 and "1 of 3 personas did not train" in err and "training persona 'clinician'" in err
    summary = {row["persona"]: row for row in json.loads(captured.out)}
    assert summary["student"]["version"] == summary["educator"]["version"] == 1
    assert "another process is training" in summary["clinician"]["error"]
    assert registry.latest("educator") == 1 and registry.latest("clinician") is None


def test_cpu_worker_count() -> None:
    from persona_router.training.parallel import cpu_workers

    assert cpu_workers(5, 2) == 2 and cpu_workers(1, 2) == 1 and cpu_workers(5, 1) == 1 and cpu_workers(2, 8) == 2


def _as(record: Any, persona: str) -> Any:
    from dataclasses import replace

    return replace(record, persona=persona)
