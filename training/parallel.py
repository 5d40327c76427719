"""``train --all`` over several GPUs or CPU cores: one worker process per GPU or core, each training whole personas.

On a CPU, one worker per core with one torch thread each trains faster in total than one process whose torch
pool spans the cores: the 135M demo model's matrices are too small for two threads to share well. Measured on a
2-core Xeon with AMX (``benchmarks/train_cpu_workers.py``): one process with 2 threads 244.7 tokens/s, two
1-thread processes at once 185.4 + 140.1 = 325.5 (1.33x; an earlier run of the same comparison gave 1.66x,
195.7 against 156.0 + 167.7).

Workers are started with the ``spawn`` method and see one GPU each (``CUDA_VISIBLE_DEVICES`` is set before
torch is imported in the worker). They take personas from a shared queue, so a GPU that finishes early takes the
next one, and publish exactly as a single process does: each persona under its own registry lock, a version
renamed into place and ``LATEST`` moved, in whatever order the personas finish. A persona that fails is reported
with its error after the others have finished; the ones already published stay published.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sys
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from persona_router.core.errors import AdapterError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """One persona's result from a worker: the trainer's result, or the error that stopped it."""

    index: int
    worker: str
    result: Any = None  # TrainResult
    error: str | None = None


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as values for ``CUDA_VISIBLE_DEVICES`` (one per worker)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [item.strip() for item in listed.split(",") if item.strip() and item.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def cpu_workers(jobs: int, threads: int) -> int:
    """How many CPU worker processes ``train --all`` starts for ``jobs`` personas over ``threads`` torch threads."""
    return max(1, min(jobs, threads))


def train_spread(jobs: Sequence[Any], config: Any, base_config: Any, registry_root: Path, *,
                 devices: Sequence[str], resume: bool = False, threads: int | None = None) -> list[Outcome]:
    """Train ``jobs`` on one worker per entry of ``devices`` (``CUDA_VISIBLE_DEVICES`` values; "" hides the
    GPUs: a CPU worker); returns one outcome per job, in the order of ``jobs``: its result or the error that
    stopped it (a failed persona does not hide the others). ``threads``: torch threads per worker (default:
    torch's own choice)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    tasks: Any = context.Queue()
    results: Any = context.Queue()
    for index, job in enumerate(jobs):
        tasks.put((index, job))
    for _ in devices:
        tasks.put(None)  # one stop mark per worker, after every job
    level = logging.getLogger().getEffectiveLevel()
    workers = [context.Process(target=_worker, name=_name(device, n),
                               args=(_name(device, n), device, tasks, results, config, base_config,
                                     str(registry_root), resume, level, threads))
               for n, device in enumerate(devices)]
    for worker in workers:
        worker.start()
    log.info("training %d personas on %d workers (%s)", len(jobs), len(workers),
             ", ".join(f"CUDA_VISIBLE_DEVICES={d!r}" for d in devices))
    outcomes: dict[int, Outcome] = {}
    while len(outcomes) < len(jobs):
        try:
            outcome = results.get(timeout=5)
        except queue.Empty:
            if not any(worker.is_alive() for worker in workers):
                break
            continue
        outcomes[outcome.index] = outcome
    for worker in workers:
        worker.join()
    return [outcomes.get(i) or Outcome(i, "", error="its worker exited without a result") for i in range(len(jobs))]


def raise_for_failures(jobs: Sequence[Any], outcomes: Sequence[Outcome]) -> None:
    """One error naming every persona that did not train, once the others are published."""
    problems = [f"{job.persona.name}: {o.error}" for job, o in zip(jobs, outcomes, strict=True) if o.error]
    if problems:
        raise AdapterError(f"{len(problems)} of {len(jobs)} personas did not train ({'; '.join(problems)}); the "
                           "others are published; rerun with --resume to train the rest")


def _name(device: str, n: int) -> str:
    return f"train-gpu-{device}" if device else f"train-cpu-{n}"


def _worker(name: str, device: str, tasks: Any, results: Any, config: Any, base_config: Any, registry_root: str,
            resume: bool, level: int, threads: int | None) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = device  # before anything initialises CUDA in this fresh process
    logging.basicConfig(level=level, format=f"%(asctime)s [{name}] %(name)s %(message)s")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    from persona_router.adapters.registry import AdapterRegistry
    from persona_router.training.trainer import train_persona

    registry = AdapterRegistry(Path(registry_root))
    # The trainer prints its per-step loss lines to stdout, which this process shares with the parent's: keep
    # that for the parent's results (--json), as the parent does for its own trainer.
    with contextlib.redirect_stdout(sys.stderr):
        while (task := tasks.get()) is not None:
            index, job = task
            try:
                result = train_persona(job, config, base_config, registry, resume=resume)
            except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it with the persona's name
                log.error("%s failed: %s", job.persona.name, traceback.format_exc())
                results.put(Outcome(index, device, error=f"{type(exc).__name__}: {exc}"))
                continue
            results.put(Outcome(index, device, result=result))
