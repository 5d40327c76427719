"""Measurements recorded in the manifest: training tokens and time, peak memory, library versions."""

from __future__ import annotations

import platform
import resource
import time
from importlib import metadata
from typing import Any

LIBRARIES = ("torch", "transformers", "peft", "trl", "accelerate", "datasets", "bitsandbytes", "safetensors")


class TokenClock:
    """Times the optimisation loop (not loading or evaluation) and reads the tokens it consumed."""

    def __init__(self) -> None:
        self.start = 0.0
        self.seconds = 0.0
        self.start_step = 0

    def callback(self) -> Any:
        """A ``TrainerCallback`` feeding this clock (transformers imported here: it pulls in bitsandbytes)."""
        from transformers import TrainerCallback

        clock = self

        class _Clock(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.start = time.perf_counter()
                clock.start_step = int(state.global_step)

            def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                clock.seconds = round(time.perf_counter() - clock.start, 2)

        return _Clock()

    @staticmethod
    def tokens(trainer: Any) -> int:
        # SFTTrainer counts real tokens per batch (attention-mask sum, or the flattened length when padding-free);
        # the generic Trainer counter would miss real tokens equal to the pad id (often the end-of-turn token).
        counted = getattr(trainer, "_total_train_tokens", None)
        return int(counted) if counted else int(trainer.state.num_input_tokens_seen)

    def tokens_per_s(self, trainer: Any) -> float:
        return round(self.tokens(trainer) / self.seconds, 2) if self.seconds else 0.0


class PeakMemory:
    """Peak CUDA allocation since :meth:`reset`, or the process's peak resident set size on CPU."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device == "cuda" else "process_max_rss"

    def reset(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak_mb(self) -> float:
        if self.device == "cuda":
            import torch

            return round(torch.cuda.max_memory_allocated() / 2**20, 1)
        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux reports KiB


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
