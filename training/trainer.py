"""Train one persona's LoRA adapter with TRL's ``SFTTrainer`` and publish it to the registry.

Order of events for one persona (all under the persona's registry lock):

1. resolve the base and the device, fill the config's device defaults, hash everything that defines the run;
2. load the base, format train and eval rows (context cut to fit, answer kept), evaluate the untouched base;
3. train, checkpointing into ``<adapters>/<persona>/.checkpoints`` for ``--resume``;
4. evaluate, save the adapter and its manifest into a ``.tmp-stage-*`` folder, check it, and let the registry
   rename it to the next version and move ``LATEST``.

Anything that fails before step 4 completes leaves the published versions and ``LATEST`` untouched; the
staging folder is removed (or, after a hard kill, swept by the next run under the lock).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from persona_router.adapters.base_model import BaseModelConfig, load_base, pick_device, resolve_base
from persona_router.adapters.manifest import (
    AdapterManifest,
    DatasetInfo,
    TrainMetrics,
    write_manifest,
)
from persona_router.adapters.peft_folder import CONFIG_FILE, WEIGHTS_FILE, check_adapter_folder
from persona_router.adapters.registry import AdapterRegistry
from persona_router.core.errors import AdapterError, DataError, PersonaRouterError, TrainingDivergedError
from persona_router.training import distributed
from persona_router.training.answer_loss import answer_loss_trainer_class
from persona_router.training.checkpoints import (
    CHECKPOINTS_DIR,
    already_published,
    checkpoint_file_error,
    prepare_workdir,
    publish_error,
)
from persona_router.training.config import TrainConfig
from persona_router.training.cuda_kernels import prepare_model
from persona_router.training.formatting import FormatResult, build_examples, records_sha256
from persona_router.training.jobs import PersonaJob
from persona_router.training.lean_trainer import trainer_class
from persona_router.training.run_metrics import PeakMemory, TokenClock, library_versions
from persona_router.training.sft_setup import lora_config, require_trl, sft_config

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TrainResult:
    persona: str
    version: int | None
    path: Path | None
    manifest: AdapterManifest | None
    skipped: str | None = None  # why nothing was trained (already trained with the same run)


def train_persona(job: PersonaJob, config: TrainConfig, base_config: BaseModelConfig, registry: AdapterRegistry,
                  *, resume: bool = False, callbacks: Sequence[Any] = ()) -> TrainResult:
    """Train and publish one adapter; see the module docstring. Raises PersonaRouterError subclasses.

    Under a distributed launch (``training/distributed.py``) every rank calls this: rank 0 holds the lock,
    decides (fresh start, resume, or already published) and publishes; the other ranks train alongside it.
    """
    name = job.persona.name
    if not job.train_records:
        raise DataError(f"no training rows for persona {name!r} in {job.data_source}", field="persona")
    resolved = resolve_base(base_config.base)
    device = pick_device(base_config.device)
    current = distributed.world()
    distributed.init_process_group(device)
    config = config.resolved(device, bf16_supported=_bf16_supported(device), world_size=current.size)
    run_hash = _run_hash(job, config, resolved.fingerprint, base_config, current.size)
    work = registry.persona_dir(name) / CHECKPOINTS_DIR
    if not current.is_main:
        return _follow(distributed.share_decision(None), job, config, base_config, registry, work, run_hash,
                       callbacks)
    with registry.lock(name):
        try:
            checkpoint = prepare_workdir(work, run_hash, resume=resume)
            # Checkpoints can outlive their publish (a kill between publishing and removing them, or between
            # renaming the version into place and moving LATEST): the published version wins, or a resume
            # would publish the same run again.
            done = already_published(registry, name, run_hash) if resume else None
        except PersonaRouterError as exc:
            distributed.share_decision({"error": str(exc)})  # the other ranks must not wait for a start
            raise
        if done is not None:
            shutil.rmtree(work, ignore_errors=True)
            log.info("%s: version %d already holds this exact run; nothing to resume", name, done.version)
            skipped = "already trained with these settings and data"
            distributed.share_decision({"skipped": skipped, "version": done.version})
            return TrainResult(name, done.version, registry.path(name, done.version), done, skipped=skipped)
        distributed.share_decision({"checkpoint": checkpoint})
        result = _train_and_publish(job, config, base_config, registry, work, checkpoint, run_hash, callbacks)
        shutil.rmtree(work, ignore_errors=True)
        return result


def _follow(decision: dict[str, Any], job: PersonaJob, config: TrainConfig, base_config: BaseModelConfig,
            registry: AdapterRegistry, work: Path, run_hash: str, callbacks: Sequence[Any]) -> TrainResult:
    """A rank other than 0: train as rank 0 decided, publish nothing."""
    name, current = job.persona.name, distributed.world()
    if "error" in decision:
        raise AdapterError(f"rank 0 did not start training {name!r}: {decision['error']}", path=work)
    if "skipped" in decision:
        return TrainResult(name, int(decision["version"]), None, None, skipped=str(decision["skipped"]))
    _train_and_publish(job, config, base_config, registry, work, decision.get("checkpoint"), run_hash, callbacks,
                       publish=False)
    return TrainResult(name, None, None, None, skipped=f"rank {current.rank} of {current.size}: rank 0 publishes")


def _train_and_publish(job: PersonaJob, config: TrainConfig, base_config: BaseModelConfig,
                       registry: AdapterRegistry, work: Path, checkpoint: str | None, run_hash: str,
                       callbacks: Sequence[Any], *, publish: bool = True) -> TrainResult:
    name = job.persona.name
    started = time.perf_counter()
    base = load_base(base_config, for_training=True)
    assert config.max_length is not None  # resolved
    train_fmt = build_examples(job.train_records, system_prompt=job.persona.system_prompt,
                               tokenizer=base.tokenizer, max_length=config.max_length,
                               prompt_free_fraction=config.prompt_free_fraction or 0.0)
    eval_records = job.eval_records[: config.eval_max_rows] if config.eval_max_rows else job.eval_records
    eval_fmt = build_examples(eval_records, system_prompt=job.persona.system_prompt, tokenizer=base.tokenizer,
                              max_length=config.max_length)
    if not train_fmt.examples:
        raise DataError(f"every training row of persona {name!r} is longer than max_length={config.max_length} "
                        "even without context; raise max_length", field="max_length")
    trainer, clock, memory = build_trainer(base, config, train_fmt, eval_fmt, work, callbacks)
    # Under DDP an evaluation before training would leave the model marked as prepared by accelerate, which
    # then skips the DDP wrapper (no gradient all-reduce). The base's loss is the trained model's loss with
    # the adapter disabled, so distributed runs measure it after training instead.
    distributed_run = distributed.world().distributed
    loss_before = _evaluate(trainer) if eval_fmt.examples and not distributed_run else None
    log.info("%s: %d train rows (%d tokens), %d eval rows; eval loss of the base %s", name, len(train_fmt.examples),
             train_fmt.tokens, len(eval_fmt.examples), _fmt(loss_before))
    memory.reset()
    try:
        output = trainer.train(resume_from_checkpoint=checkpoint)
    except OSError as exc:
        raise checkpoint_file_error(name, exc, work, checkpoint) from exc
    loss_after = _evaluate(trainer) if eval_fmt.examples else None
    if distributed_run and eval_fmt.examples:
        with trainer.model.disable_adapter():
            loss_before = _evaluate(trainer)
    train_loss = _whole_run_train_loss(trainer, float(output.training_loss), clock.start_step)
    refuse_diverged(trainer.model, name, train_loss=train_loss, eval_loss=loss_after)
    if not publish:
        del trainer, base
        _free_memory()
        return TrainResult(name, None, None, None, skipped="not the publishing rank")
    metrics = TrainMetrics(
        train_loss=train_loss, eval_loss=loss_after, eval_loss_before=loss_before,
        steps=int(trainer.state.global_step), epochs=float(trainer.state.epoch or 0.0),
        tokens_seen=clock.tokens(trainer), wall_time_s=0.0,
        # A resumed run with no step left to take measured no speed (its few milliseconds would divide the
        # restored token count into nonsense).
        tokens_per_s=clock.tokens_per_s(trainer) if trainer.state.global_step > clock.start_step else 0.0,
        peak_memory_mb=memory.peak_mb(), peak_memory_kind=memory.kind, train_time_s=clock.seconds,
        resumed_from_step=clock.start_step,
    )
    dataset = DatasetInfo(
        source=job.data_source, sha256=records_sha256(job.train_records), rows_train=len(train_fmt.examples),
        rows_eval=len(eval_fmt.examples), eval_source=job.eval_source, rows_skipped=train_fmt.skipped,
        contexts_truncated=train_fmt.truncated)
    manifest = AdapterManifest(
        persona=name, version=registry.next_version(name), base_model=base.resolved.name,
        base_fingerprint=base.fingerprint, dataset=dataset, hyperparameters=config.to_json(), metrics=metrics,
        device=base.device, precision=base.precision, library_versions=library_versions(),
        extra={"run_hash": run_hash, "system_prompt": job.persona.system_prompt,
               "compute_precision": compute_precision(config, base.precision),
               "base_folder": str(base.resolved.folder), "world_size": distributed.world().size,
               "torch_threads": _torch_threads(),
               "global_batch_rows": (config.batch_size or 1) * (config.grad_accum or 1) * distributed.world().size})
    version, folder, manifest = _publish(trainer.model, manifest, registry, started, base_name_or_path(base))
    log.info("%s: published version %d at %s (eval loss %s -> %s, %.0f s)", name, version, folder,
             _fmt(loss_before), _fmt(loss_after), manifest.metrics.wall_time_s)
    del trainer, base
    _free_memory()
    return TrainResult(name, version, folder, manifest)


def build_trainer(base: Any, config: TrainConfig, train_fmt: FormatResult, eval_fmt: FormatResult, work: Path,
                  callbacks: Sequence[Any] = ()) -> tuple[Any, TokenClock, PeakMemory]:
    """An ``SFTTrainer`` for a loaded base and formatted rows; ``config`` must be resolved for the device."""
    trl = require_trl()
    try:
        import datasets
    except ImportError as exc:
        raise DataError("training needs the datasets package: pip install datasets") from exc
    datasets.disable_progress_bars()
    train_ds = datasets.Dataset.from_list([e.to_row() for e in train_fmt.examples])
    eval_ds = datasets.Dataset.from_list([e.to_row() for e in eval_fmt.examples]) if eval_fmt.examples else None
    args = sft_config(config, output_dir=work, device=base.device, eval_rows=len(eval_fmt.examples))
    base.model.config.use_cache = False  # a KV cache would also disable the packed-sequence attention mask
    prepare_model(base.model, config, base.device)
    clock = TokenClock()
    memory = PeakMemory(base.device)
    if base.device == "cpu":
        # On CPU TRL's fused LM head runs as slow torch ops over every position; answer_loss.py scores answers only
        # (its per-micro-batch metric reads cost nothing there: no device to wait for).
        trainer_cls = answer_loss_trainer_class(trl.SFTTrainer)
    else:
        trainer_cls = trainer_class(trl, config)  # deferred_metrics: no host-device sync per micro-batch
    trainer = trainer_cls(model=base.model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=base.tokenizer, peft_config=lora_config(config),
                          callbacks=[clock.callback(), *callbacks])
    return trainer, clock, memory


def _whole_run_train_loss(trainer: Any, this_process: float, start_step: int) -> float | None:
    """The run's mean training loss. transformers averages over the steps this process took, which after a
    resume leaves out the restored ones, and is 0.0 when the checkpoint was already at the last step; a
    resumed run therefore averages every logged loss, restored ones included (None if none was logged)."""
    if start_step == 0:
        return this_process
    logged = [float(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry]
    return sum(logged) / len(logged) if logged else None


def refuse_diverged(model: Any, persona: str, *, train_loss: float | None, eval_loss: float | None) -> None:
    """Raise :class:`TrainingDivergedError` if the run's losses or any trainable tensor are not finite.

    A diverged run (lr too high, fp16 overflow, corrupt data) would otherwise publish an adapter that makes the
    service emit garbage or NaN logits; nothing is published and ``LATEST`` stays where it was.
    """
    import math

    import torch

    where = f"training {persona!r} diverged"
    if train_loss is not None and not math.isfinite(train_loss):
        raise TrainingDivergedError(f"{where}: train loss is {train_loss}; nothing was published (lower the "
                                    "learning rate or check the data)", field="train_loss")
    if eval_loss is not None and not math.isfinite(eval_loss):
        raise TrainingDivergedError(f"{where}: eval loss is {eval_loss}; nothing was published", field="eval_loss")
    bad = [name for name, param in model.named_parameters()
           if param.requires_grad and not bool(torch.isfinite(param.detach()).all())]
    if bad:
        raise TrainingDivergedError(f"{where}: {len(bad)} adapter tensors hold NaN or Inf (first: {bad[0]}); nothing "
                                    "was published (lower the learning rate or check the data)", field="weights")


def _publish(model: Any, manifest: AdapterManifest, registry: AdapterRegistry, started: float,
             base_path: str) -> tuple[int, Path, AdapterManifest]:
    name = manifest.persona
    staged = registry.staging_dir(name)
    try:
        save_adapter(model, staged, base_path)
        wall = time.perf_counter() - started
        manifest = replace(manifest, metrics=replace(manifest.metrics, wall_time_s=round(wall, 2)))
        write_manifest(staged, manifest)
        version = registry.publish(name, staged)
    except OSError as exc:
        raise publish_error(registry, manifest, staged, exc) from exc
    finally:
        if staged.exists():
            shutil.rmtree(staged, ignore_errors=True)
    final = registry.read_manifest(name, version)
    return version, registry.path(name, version), final


def save_adapter(model: Any, folder: Path, base_path: str) -> None:
    """Save standard PEFT files and check they are what vLLM and ``PeftModel.from_pretrained`` accept."""
    peft_config = model.peft_config["default"]
    peft_config.base_model_name_or_path = base_path
    if not isinstance(peft_config.target_modules, str):
        # PEFT expands "all-linear" into every full module path; the short names match the same modules
        # (PEFT matches by suffix) and are what vLLM and people expect to read.
        peft_config.target_modules = sorted({name.split(".")[-1] for name in peft_config.target_modules})
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "README.md").unlink(missing_ok=True)  # PEFT's boilerplate model card
    check_trained_adapter(folder)


def check_trained_adapter(folder: Path) -> dict[str, Any]:
    """The shared folder check (``adapters/peft_folder.py``) plus what a training run promises on top: the base
    is named (vLLM and ``PeftModel.from_pretrained`` read it) and every tensor is finite (a diverged run)."""
    config = check_adapter_folder(folder)
    if not config.get("base_model_name_or_path"):
        raise AdapterError("base_model_name_or_path is not set", path=folder / CONFIG_FILE)
    import torch
    from safetensors import safe_open

    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as handle:
        non_finite = [k for k in handle.keys() if not bool(torch.isfinite(handle.get_tensor(k)).all())]  # noqa: SIM118
    if non_finite:
        raise TrainingDivergedError(f"{len(non_finite)} adapter tensors hold NaN or Inf (first: {non_finite[0]}); "
                                    "nothing was published", path=folder)
    return config


def base_name_or_path(base: Any) -> str:
    """What ``base_model_name_or_path`` should say: the hub id as given, else the local folder."""
    name = str(base.resolved.name)
    if "/" in name and not Path(name).expanduser().exists():
        return name
    return str(base.resolved.folder)


def _run_hash(job: PersonaJob, config: TrainConfig, fingerprint: str, base_config: BaseModelConfig,
              world_size: int = 1) -> str:
    payload = {
        "persona": job.persona.name, "system_prompt": job.persona.system_prompt, "config": config.to_json(),
        "train": records_sha256(job.train_records), "eval": records_sha256(job.eval_records),
        "base": fingerprint, "quantization": base_config.quantization, "double_quant": base_config.double_quant,
    }
    if world_size > 1:  # a checkpoint of N ranks resumes with N ranks only (data order, per-rank RNG states)
        payload["world_size"] = world_size
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _torch_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def _evaluate(trainer: Any) -> float | None:
    value = trainer.evaluate().get("eval_loss")
    return None if value is None else round(float(value), 5)


def compute_precision(config: TrainConfig, weights: str) -> str:
    """What the training matmuls ran in, for the manifest: e.g. ``"bf16 autocast, fp32 weights"``."""
    mixed = config.mixed_precision
    return f"{mixed} autocast, {weights} weights" if mixed in ("bf16", "fp16") else weights


def _bf16_supported(device: str) -> bool:
    if device == "cpu":
        from persona_router.training.cpu_precision import cpu_bf16_native

        return cpu_bf16_native()
    import torch

    return bool(torch.cuda.is_bf16_supported())


def _free_memory() -> None:
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
