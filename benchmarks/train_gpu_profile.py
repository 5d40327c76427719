"""Take one optimizer step of a TRL ``SFTTrainer`` apart (used by ``benchmarks/train_gpu.py``).

Two steps after the timed ones are instrumented, so the throughput numbers stay free of it:

- phase step: wall time of data (fetching and collating the step's micro-batches), forward (``compute_loss``:
  the model, the fused LM head, TRL's metrics), backward (``accelerator.backward``, recomputation included),
  the optimizer (``optimizer.step``) and the rest (gradient clipping, scheduler, zero_grad, callbacks), with a
  device synchronisation at every phase edge. The recompute share of the backward is the device time between
  CUDA events recorded before and after each decoder layer runs again inside the backward (checkpoint early
  stopping is switched off for that step, so every recomputed layer runs to its end);
- kernel step: ``torch.profiler`` device time per kernel, summed into categories (matrix products, 4-bit
  dequantisation, attention, Triton kernels, optimizer, copies, other element-wise work) and the top kernels,
  against the step's wall time (their ratio is how busy the GPU was).
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

CATEGORIES = (  # first match wins; names as CUDA reports them
    ("4-bit dequantize", ("dequantize", "kdequant")),
    ("optimizer (8-bit AdamW)", ("koptimizer", "percentile_clipping")),
    ("attention", ("flash", "fmha", "sdpa", "efficient_attention", "attention")),
    ("matrix products", ("gemm", "nvjet", "xmma", "cutlass", "cublas", "splitkreduce")),
    ("copies (host <-> device, device)", ("memcpy", "memset")),
    ("concatenation", ("catarray",)),
    ("dropout", ("dropout", "masked_scale")),
    ("dtype casts and copies", ("direct_copy",)),
    ("element-wise and reductions (PyTorch)", ("at::native",)),
)


def categorise(name: str) -> str:
    low = name.lower()
    for category, needles in CATEGORIES:
        if any(n in low for n in needles):
            return category
    # Triton kernels (Liger's RMSNorm/SwiGLU, TRL's fused LM head) carry their Python function's name
    if "::" not in name and not name.startswith("void ") and name.endswith("_kernel"):
        return "Triton (Liger norms/SwiGLU, fused LM head)"
    return "other"


class StepProfiler:
    """Installs wrappers on a trainer; ``phase_step`` and ``kernel_step`` are 0-based optimizer-step indices."""

    def __init__(self, phase_step: int, kernel_step: int) -> None:
        self.phase_step = phase_step
        self.kernel_step = kernel_step
        self.trainer: Any = None
        self.phases: dict[str, float] = defaultdict(float)
        self.micro_batches = 0
        self.step_wall = 0.0
        self.step_started = 0.0
        self.in_backward = False
        self.recompute_events: list[tuple[Any, Any]] = []
        self.kernels: dict[str, Any] = {}
        self._profiler: Any = None
        self._early_stop: Any = None

    # -- wiring -----------------------------------------------------------------------------------------------
    def install(self, trainer: Any) -> None:
        self.trainer = trainer
        self._wrap(trainer, "get_batch_samples", "data")
        self._wrap(trainer, "compute_loss", "forward")
        self._wrap(trainer.accelerator, "backward", "backward", backward=True)
        layers = _decoder_layers(trainer.model)
        for layer in layers:
            layer.register_forward_pre_hook(self._layer_pre)
            layer.register_forward_hook(self._layer_post)

    def _step(self) -> int:
        return int(self.trainer.state.global_step)

    def _wrap(self, owner: Any, name: str, phase: str, *, backward: bool = False) -> None:
        original = getattr(owner, name)
        profiler = self

        def wrapped(*args: Any, **kwargs: Any) -> Any:
            if profiler._step() != profiler.phase_step:
                return original(*args, **kwargs)
            _sync()
            started = time.perf_counter()
            if backward:
                profiler.in_backward = True
                profiler.micro_batches += 1
            try:
                return original(*args, **kwargs)
            finally:
                _sync()
                profiler.in_backward = False
                profiler.phases[phase] += time.perf_counter() - started

        setattr(owner, name, wrapped)

    def _layer_pre(self, module: Any, args: Any) -> None:
        import torch

        if self.in_backward and torch.cuda.is_available():
            start = torch.cuda.Event(enable_timing=True)
            start.record()
            self.recompute_events.append((start, None))

    def _layer_post(self, module: Any, args: Any, output: Any) -> None:
        if self.in_backward and self.recompute_events and self.recompute_events[-1][1] is None:
            import torch

            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.recompute_events[-1] = (self.recompute_events[-1][0], end)

    def callback(self) -> Any:
        from transformers import TrainerCallback

        profiler = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                profiler.on_step_begin(state.global_step)

            def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step == profiler.phase_step:
                    _sync()
                    profiler.phases["_optimizer_start"] = time.perf_counter()

            def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step == profiler.phase_step:
                    _sync()
                    profiler.phases["optimizer"] += time.perf_counter() - profiler.phases.pop("_optimizer_start")

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                profiler.on_step_end(state.global_step - 1)

        return _Callback()

    # -- step edges ---------------------------------------------------------------------------------------------
    def on_step_begin(self, step: int) -> None:
        import torch

        if step == self.phase_step:
            from torch.utils.checkpoint import set_checkpoint_early_stop

            self._early_stop = set_checkpoint_early_stop(False)
            self._early_stop.__enter__()
            # The data of this step was fetched before on_step_begin; its time is already in phases["data"].
            _sync()
            self.step_started = time.perf_counter() - self.phases.get("data", 0.0)
        if step == self.kernel_step:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._profiler = torch.profiler.profile(activities=activities)
            _sync()
            self._profiler.__enter__()
            self.kernels["_started"] = time.perf_counter()

    def on_step_end(self, step: int) -> None:
        if step == self.phase_step:
            _sync()
            self.step_wall = time.perf_counter() - self.step_started
            if self._early_stop is not None:
                self._early_stop.__exit__(None, None, None)
        if step == self.kernel_step and self._profiler is not None:
            _sync()
            wall = time.perf_counter() - self.kernels.pop("_started")
            self._profiler.__exit__(None, None, None)
            self.kernels = kernel_table(self._profiler, wall)
            self._profiler = None

    # -- result -----------------------------------------------------------------------------------------------
    def result(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.step_wall:
            recompute = sum(s.elapsed_time(e) for s, e in self.recompute_events if e is not None) / 1000
            phases = {k: round(v, 4) for k, v in self.phases.items() if not k.startswith("_")}
            phases["backward_recompute_part"] = round(recompute, 4)
            counted = sum(v for k, v in self.phases.items() if not k.startswith("_"))
            phases["other (clip, scheduler, zero_grad, callbacks)"] = round(self.step_wall - counted, 4)
            out["phase_step"] = {"optimizer_step_index": self.phase_step, "wall_s": round(self.step_wall, 4),
                                 "micro_batches": self.micro_batches,
                                 "recomputed_layer_runs": sum(1 for _, e in self.recompute_events if e is not None),
                                 "seconds": phases,
                                 "note": "device synchronised at every phase edge; recompute is part of backward"}
        if self.kernels:
            out["kernel_step"] = {"optimizer_step_index": self.kernel_step, **self.kernels}
        return out


def kernel_table(prof: Any, wall_s: float) -> dict[str, Any]:
    """Device time per kernel from a finished torch.profiler run, summed into categories."""
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    events = list(prof.events())
    for event in events:  # kineto lists each device activity (kernel, copy, memset) as its own event
        # GPU-side ranges of user annotations (e.g. "Optimizer.step#AdamW.step") would count their kernels twice
        if str(getattr(event, "device_type", "")).endswith("CUDA") and not getattr(event, "is_user_annotation", False):
            entry = per_kernel[event.name]
            entry[0] += (event.time_range.end - event.time_range.start) / 1e6  # microseconds
            entry[1] += 1
    if not per_kernel:  # otherwise they hang off the CPU events that launched them
        for event in events:
            for kernel in getattr(event, "kernels", []) or []:
                entry = per_kernel[kernel.name]
                entry[0] += kernel.duration / 1e6
                entry[1] += 1
    categories: dict[str, float] = defaultdict(float)
    for name, (seconds, _count) in per_kernel.items():
        categories[categorise(name)] += seconds
    busy = sum(categories.values())
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:30]
    return {
        "wall_s": round(wall_s, 4),
        "kernel_time_s": round(busy, 4),
        "gpu_busy_fraction": round(busy / wall_s, 3) if wall_s else None,
        "by_category_s": {k: round(v, 4) for k, v in sorted(categories.items(), key=lambda kv: -kv[1])},
        "top_kernels": [{"name": n[:160], "s": round(s, 4), "calls": int(c), "category": categorise(n)}
                        for n, (s, c) in top],
        "note": "torch.profiler adds host overhead to this step; use the category shares, not its wall time",
    }


def _decoder_layers(model: Any) -> list[Any]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
