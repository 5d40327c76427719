"""End to end on the tiny random Phi-3: train, publish, load with PEFT; crashes, full disks and resumes."""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any

import pytest
from persona_router.adapters.base_model import BaseModelConfig
from persona_router.adapters.registry import LATEST_FILE, AdapterRegistry
from persona_router.cli.main import main
from persona_router.core.errors import AdapterError, AdapterIncompatibleError
from persona_router.core.pack import load_pack
from persona_router.core.records import QARecord
from persona_router.training.config import CPU_DEFAULTS, TrainConfig
from persona_router.training.jobs import PersonaJob

WORDS = ["the heart pumps blood.", "code runs fast.", "light scatters in air.", "a teacher answers it."]


def records(count: int, *, offset: int = 0) -> list[QARecord]:
    return [QARecord(persona="student", question=f"why {WORDS[i % 4]} {i + offset}?",
                     answer=f"{WORDS[(i + 1) % 4]} {WORDS[(i + 2) % 4]} explain simply {i + offset}.",
                     context=WORDS[i % 4] * 3 if i % 3 == 0 else None)
            for i in range(count)]


def job(count: int = 12) -> PersonaJob:
    return PersonaJob(load_pack().get("student"), records(count), records(4, offset=1000), "test rows",
                      "test eval rows")


def config(**overrides: Any) -> TrainConfig:
    settings: dict[str, Any] = {"max_steps": 3, "batch_size": 2, "grad_accum": 1, "max_length": 512,
                                "save_steps": 100, "logging_steps": 1}
    settings.update(overrides)
    return TrainConfig(**settings)


def crash_at(step: int) -> Any:
    """Raise at the end of optimizer step ``step``, before that step's checkpoint is written."""
    from transformers import TrainerCallback

    class Crash(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == step:
                raise RuntimeError(f"simulated crash at step {step}")

    return Crash()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".tmp-"))


@pytest.fixture
def registry(tmp_path: Path, isolated_home: Path) -> AdapterRegistry:
    return AdapterRegistry(tmp_path / "adapters")


def test_trained_adapter_loads_with_peft_and_has_a_full_manifest(tiny_model_dir: Path,
                                                                 registry: AdapterRegistry) -> None:
    import torch
    from peft import PeftModel
    from persona_router.training.trainer import train_persona
    from transformers import AutoModelForCausalLM

    result = train_persona(job(), config(), BaseModelConfig(base=str(tiny_model_dir)), registry)
    assert result.version == 1 and registry.latest("student") == 1
    folder = registry.path("student", 1)
    assert sorted(p.name for p in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors",
                                                       "manifest.json"]
    adapter_config = json.loads((folder / "adapter_config.json").read_text())
    assert adapter_config["modules_to_save"] is None
    assert adapter_config["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["lora_dropout"]) == (
        16, 32, CPU_DEFAULTS["lora_dropout"])
    assert set(adapter_config["target_modules"]) == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, str(folder))
        after = model(input_ids=ids).logits
    assert not torch.allclose(before, after)  # the trained adapter changes the model

    manifest = registry.verify_compatible("student", 1, result.manifest.base_fingerprint)  # type: ignore[union-attr]
    assert manifest == result.manifest
    assert manifest.dataset.rows_train == 12 and manifest.dataset.rows_eval == 4
    assert manifest.metrics.steps == 3 and manifest.metrics.tokens_seen > 0 and manifest.metrics.tokens_per_s > 0
    assert manifest.metrics.eval_loss is not None and manifest.metrics.eval_loss_before is not None
    assert manifest.hyperparameters["lora_r"] == 16 and manifest.hyperparameters["optim"] == "adamw_torch"
    assert manifest.library_versions["trl"] and manifest.extra["system_prompt"] == load_pack().get(
        "student").system_prompt
    with pytest.raises(AdapterIncompatibleError):
        registry.verify_compatible("student", 1, "sha256:" + "0" * 64)
    assert leftovers(registry.persona_dir("student")) == []


def test_crash_mid_training_publishes_nothing_and_resume_finishes(tiny_model_dir: Path,
                                                                  registry: AdapterRegistry) -> None:
    from persona_router.training.trainer import CHECKPOINTS_DIR, train_persona

    base = BaseModelConfig(base=str(tiny_model_dir))
    train_persona(job(), config(max_steps=1), base, registry)  # version 1 exists and is LATEST
    pointer = registry.persona_dir("student") / LATEST_FILE
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_persona(job(), config(max_steps=4, save_steps=2), base, registry, callbacks=[crash_at(3)])
    assert registry.versions("student") == [1] and pointer.read_text() == "1\n"
    assert leftovers(registry.persona_dir("student")) == []
    checkpoints = registry.persona_dir("student") / CHECKPOINTS_DIR
    assert sorted(p.name for p in checkpoints.glob("checkpoint-*")) == ["checkpoint-2"]

    resumed = train_persona(job(), config(max_steps=4, save_steps=2), base, registry, resume=True)
    assert resumed.version == 2 and pointer.read_text() == "2\n"
    assert resumed.manifest is not None
    assert resumed.manifest.metrics.resumed_from_step == 2 and resumed.manifest.metrics.steps == 4
    assert not checkpoints.exists()
    again = train_persona(job(), config(max_steps=4, save_steps=2), base, registry, resume=True)
    assert again.skipped and again.version == 2  # that run is already published; nothing retrained


def test_a_run_that_failed_after_its_last_step_resumes_with_true_metrics(tiny_model_dir: Path,
                                                                         registry: AdapterRegistry) -> None:
    """The last checkpoint was written, then the run failed (here at the end of training, as a kill during
    the final evaluation would): the resume takes no step, and the manifest must not claim a train loss of 0
    or a speed from a few milliseconds."""
    from persona_router.training.trainer import train_persona
    from transformers import TrainerCallback

    class FailAtEnd(TrainerCallback):
        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            raise RuntimeError("simulated failure after the last step")

    base = BaseModelConfig(base=str(tiny_model_dir))
    with pytest.raises(RuntimeError, match="after the last step"):
        train_persona(job(), config(max_steps=4, save_steps=2), base, registry, callbacks=[FailAtEnd()])
    assert registry.versions("student") == []
    resumed = train_persona(job(), config(max_steps=4, save_steps=2), base, registry, resume=True)
    assert resumed.manifest is not None
    metrics = resumed.manifest.metrics
    assert metrics.resumed_from_step == 4 and metrics.steps == 4
    assert metrics.train_loss is not None and metrics.train_loss > 1.0  # the four logged losses, not 0.0
    assert metrics.tokens_per_s == 0.0


def test_checkpoints_left_after_a_publish_do_not_publish_the_run_again(
        tiny_model_dir: Path, registry: AdapterRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between publishing and removing its checkpoints: the resume finds the run published."""
    import persona_router.training.trainer as trainer
    from persona_router.training.trainer import CHECKPOINTS_DIR, train_persona

    real_rmtree = trainer.shutil.rmtree

    def killed(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).name == CHECKPOINTS_DIR and registry.versions("student"):  # the clean-up after publishing
            raise KeyboardInterrupt("killed after publishing")
        real_rmtree(path, *args, **kwargs)

    base = BaseModelConfig(base=str(tiny_model_dir))
    monkeypatch.setattr(trainer.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        train_persona(job(), config(max_steps=2, save_steps=2), base, registry)
    monkeypatch.setattr(trainer.shutil, "rmtree", real_rmtree)
    checkpoints = registry.persona_dir("student") / CHECKPOINTS_DIR
    assert registry.versions("student") == [1] and checkpoints.exists()
    again = train_persona(job(), config(max_steps=2, save_steps=2), base, registry, resume=True)
    assert again.skipped and again.version == 1 and registry.versions("student") == [1]
    assert not checkpoints.exists()


def test_a_checkpoint_cut_off_mid_save_is_passed_over_on_resume(tiny_model_dir: Path,
                                                                registry: AdapterRegistry) -> None:
    """Killed while saving checkpoint-4: its trainer state is missing and checkpoint-2 is not yet deleted. The
    resume continues from checkpoint-2 instead of failing on checkpoint-4 on every retry."""
    import shutil

    from persona_router.training.checkpoints import CHECKPOINTS_DIR, TRAINER_STATE_FILE
    from persona_router.training.trainer import train_persona

    base = BaseModelConfig(base=str(tiny_model_dir))
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_persona(job(), config(max_steps=4, save_steps=2), base, registry, callbacks=[crash_at(3)])
    checkpoints = registry.persona_dir("student") / CHECKPOINTS_DIR
    shutil.copytree(checkpoints / "checkpoint-2", checkpoints / "checkpoint-4")
    (checkpoints / "checkpoint-4" / TRAINER_STATE_FILE).unlink()
    resumed = train_persona(job(), config(max_steps=4, save_steps=2), base, registry, resume=True)
    assert resumed.version == 1 and resumed.manifest is not None
    assert resumed.manifest.metrics.resumed_from_step == 2 and resumed.manifest.metrics.steps == 4


def test_killed_between_the_rename_and_latest_the_resume_publishes_no_second_copy(
        tiny_model_dir: Path, registry: AdapterRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    from persona_router.training.trainer import train_persona

    def killed(persona: str, version: int) -> None:
        raise KeyboardInterrupt("killed after the rename")

    base = BaseModelConfig(base=str(tiny_model_dir))
    monkeypatch.setattr(registry, "set_latest", killed)
    with pytest.raises(KeyboardInterrupt):
        train_persona(job(), config(max_steps=2, save_steps=2), base, registry)
    monkeypatch.undo()
    assert registry.versions("student") == [1] and registry.latest("student") is None
    again = train_persona(job(), config(max_steps=2, save_steps=2), base, registry, resume=True)
    assert again.skipped and again.version == 1
    assert registry.versions("student") == [1] and registry.latest("student") == 1


def test_resume_with_other_settings_is_refused(tiny_model_dir: Path, registry: AdapterRegistry) -> None:
    from persona_router.training.trainer import train_persona

    base = BaseModelConfig(base=str(tiny_model_dir))
    with pytest.raises(RuntimeError):
        train_persona(job(), config(max_steps=3, save_steps=1), base, registry, callbacks=[crash_at(2)])
    with pytest.raises(AdapterError, match="other settings"):
        train_persona(job(), config(max_steps=3, save_steps=1, learning_rate=5e-4), base, registry, resume=True)
    assert registry.latest("student") is None


def test_full_disk_while_saving_is_a_clear_error(tiny_model_dir: Path, registry: AdapterRegistry,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import persona_router.training.trainer as trainer_module

    def no_space(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer_module, "save_adapter", no_space)
    with pytest.raises(AdapterError, match=r"No space left on device.*nothing was published"):
        trainer_module.train_persona(job(), config(max_steps=1), BaseModelConfig(base=str(tiny_model_dir)),
                                     registry)
    assert registry.versions("student") == [] and registry.latest("student") is None
    assert leftovers(registry.persona_dir("student")) == []


def test_cli_trains_from_a_file_and_reports_bad_input(tiny_model_dir: Path, tmp_path: Path, isolated_home: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r.to_json()) + "\n" for r in records(20)), encoding="utf-8")
    adapters = tmp_path / "adapters"
    common = ["--data", str(data), "--base", str(tiny_model_dir), "--adapters", str(adapters), "--max-steps", "2",
              "--max-length", "512"]
    assert main(["-q", "train", "--persona", "student", *common, "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["persona"] == "student" and row["version"] == 1 and row["steps"] == 2
    assert AdapterRegistry(adapters).latest("student") == 1

    assert main(["-q", "train", "--persona", "astronaut", *common]) == 2
    assert "unknown persona 'astronaut'" in capsys.readouterr().err
    assert main(["-q", "train", "--all", *common]) == 2
    assert "no training rows for persona(s) clinician" in capsys.readouterr().err
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"persona": "student", "question": "why?"}) + "\n", encoding="utf-8")
    assert main(["-q", "train", "--persona", "student", *common[2:], "--data", str(broken)]) == 2
    assert "field 'answer': is missing" in capsys.readouterr().err


def poison_at(step: int) -> Any:
    """Fault injection: after optimizer step ``step``, write NaN into one LoRA tensor (a diverged run)."""
    from transformers import TrainerCallback

    class Poison(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
            if state.global_step == step:
                import torch

                param = next(p for n, p in model.named_parameters() if "lora_B" in n)
                with torch.no_grad():
                    param.fill_(float("nan"))

    return Poison()


def test_diverged_run_is_refused_and_nothing_is_published(tiny_model_dir: Path, registry: AdapterRegistry) -> None:
    from persona_router.core.errors import TrainingDivergedError
    from persona_router.training.trainer import train_persona

    base = BaseModelConfig(base=str(tiny_model_dir))
    train_persona(job(), config(max_steps=1), base, registry)  # version 1 is LATEST
    pointer = registry.persona_dir("student") / LATEST_FILE
    with pytest.raises(TrainingDivergedError, match=r"diverged: .*nothing was published"):
        train_persona(job(), config(max_steps=3), base, registry, callbacks=[poison_at(1)])
    assert registry.versions("student") == [1] and pointer.read_text() == "1\n"
    assert leftovers(registry.persona_dir("student")) == []


def test_refuse_diverged_checks_losses_and_every_trainable_tensor() -> None:
    import torch
    from persona_router.core.errors import TrainingDivergedError
    from persona_router.training.trainer import refuse_diverged

    model = torch.nn.Linear(3, 2)
    refuse_diverged(model, "student", train_loss=1.5, eval_loss=2.0)
    refuse_diverged(model, "student", train_loss=1.5, eval_loss=None)
    with pytest.raises(TrainingDivergedError, match="train loss is nan"):
        refuse_diverged(model, "student", train_loss=float("nan"), eval_loss=2.0)
    with pytest.raises(TrainingDivergedError, match="eval loss is inf"):
        refuse_diverged(model, "student", train_loss=1.0, eval_loss=float("inf"))
    with torch.no_grad():
        model.bias[1] = float("inf")
    with pytest.raises(TrainingDivergedError, match=r"1 adapter tensors hold NaN or Inf \(first: bias"):
        refuse_diverged(model, "student", train_loss=1.0, eval_loss=1.0)
    model.bias.requires_grad_(False)  # frozen base weights are not the adapter's business
    refuse_diverged(model, "student", train_loss=1.0, eval_loss=1.0)


def test_saved_adapter_with_non_finite_tensors_is_refused(tmp_path: Path) -> None:
    import torch
    from persona_router.core.errors import TrainingDivergedError
    from persona_router.training.trainer import check_trained_adapter
    from safetensors.torch import save_file

    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x", "r": 2}))
    weight = torch.zeros(2, 4)
    save_file({"m.lora_A.weight": weight.contiguous()}, str(tmp_path / "adapter_model.safetensors"))
    check_trained_adapter(tmp_path)
    weight[0, 1] = float("nan")
    save_file({"m.lora_A.weight": weight.contiguous()}, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(TrainingDivergedError, match="hold NaN or Inf"):
        check_trained_adapter(tmp_path)
