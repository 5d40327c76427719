"""Training on several processes: data parallelism for one persona, and personas spread over GPUs.

Two ways to use several GPUs, both on the standard stack (``torch.distributed``, accelerate), no scheduler of
our own:

- one persona on N GPUs (``persona-router train --gpus N``, which starts ``torch.distributed.run`` with one
  process per GPU; ``accelerate launch --num_processes N -m persona_router train ...`` is the same). Every rank
  loads the 4-bit base on its own GPU and trains the same LoRA; the Trainer wraps it in DDP, so the LoRA
  gradients are all-reduced. Rank 0 alone takes the persona's registry lock, prepares the checkpoint folder
  and publishes; the others follow its decisions (:func:`share_decision`).
- ``--all`` with several GPUs visible: one worker process per GPU (``CUDA_VISIBLE_DEVICES`` set to its GPU),
  each taking whole personas from a shared queue and publishing them as a single process would
  (``training/parallel.py``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from persona_router.core.errors import ConfigError

log = logging.getLogger(__name__)

LAUNCHER_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK")


@dataclass(frozen=True)
class World:
    """This process's place in a distributed launch (1 process, rank 0, when not launched that way)."""

    size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world() -> World:
    """Read torchrun's / accelerate's environment; a malformed launch is an error, not a silent 1-process run."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as exc:
        raise ConfigError(f"WORLD_SIZE/RANK/LOCAL_RANK must be integers ({exc})", field="launcher") from exc
    if size < 1 or not 0 <= rank < size:
        raise ConfigError(f"rank {rank} is not within world size {size}", field="launcher")
    return World(size=size, rank=rank, local_rank=local_rank)


def init_process_group(device: str) -> None:
    """Join the launch's process group now (gloo on CPU, NCCL on CUDA), before the Trainer would.

    The trainer needs collectives before it builds the Trainer (rank 0's decisions); accelerate then finds the
    group initialised and uses it.
    """
    current = world()
    if not current.distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        return
    if device == "cuda":
        import torch

        torch.cuda.set_device(current.local_rank)
    dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    log.info("rank %d of %d joined the process group (%s)", current.rank, current.size, dist.get_backend())


def share_decision(decision: dict[str, Any] | None) -> dict[str, Any]:
    """Rank 0's ``decision`` on every rank (the argument is ignored elsewhere); identity in a 1-process run."""
    if not world().distributed:
        assert decision is not None
        return decision
    import torch.distributed as dist

    box: list[Any] = [decision if world().is_main else None]
    dist.broadcast_object_list(box, src=0)
    return dict(box[0])


def barrier() -> None:
    if world().distributed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()


def leave_process_group() -> None:
    """Leave the launch's process group once every rank has arrived (a no-op outside a distributed launch).

    A rank that simply exits leaves its gloo or NCCL state to the interpreter's shutdown while another rank may
    still be inside a collective: one clean-clone test run saw rank 0 abort that way ("terminate called without
    an active exception") after the --resume skip, which returns right after one broadcast.
    """
    if not world().distributed:
        return
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
