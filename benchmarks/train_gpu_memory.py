"""What is live on the GPU at the peak of one optimizer step (used by ``benchmarks/train_gpu.py``).

One step after the timed ones runs under ``torch.cuda.memory._record_memory_history`` (Python stacks of every
allocation, no C++ symbolisation). The allocator's trace of that step is then replayed: the running total of
allocated bytes gives the step's peak, and the allocations still live at that moment are grouped by

- phase: ``forward``, ``recompute`` (a checkpointed layer run again inside the backward; with reentrant
  checkpointing that layer's backward too, which runs inside the same call), ``backward``
  (anything else allocated under ``backward()``: gradients of activations, LoRA gradients), or ``optimizer``;
- what allocated them: the innermost frame of a known library (bitsandbytes' 4-bit matmul, PEFT's LoRA branch,
  Liger's kernels, TRL's fused LM head, the attention function, Phi-3's decoder layer, compiled code, ...).

Two checks of what outlives its work: the allocations of the step still live when it ends, by phase, and the
bytes a ``gc.collect()`` frees right after it (tensors held only by a reference cycle).

What was allocated before the step (weights, LoRA parameters, optimizer state) is not in the trace; it is
itemised from the model and optimizer objects instead, and the remainder is reported as such. The paged 8-bit
optimizer keeps its state in CUDA managed memory, outside PyTorch's allocator, so it is listed but is not part
of the allocator's peak (nor of any configuration's reported peak).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

RULES = (  # (path fragment, label); the innermost frame that matches names the allocation
    ("bitsandbytes/optim", "optimizer (bitsandbytes 8-bit AdamW)"),
    ("bitsandbytes/", "4-bit matmul: dequantised weight, product (bitsandbytes)"),
    ("peft/tuners/lora", "LoRA branch: dropout copy, A/B products, scaling, clone (PEFT)"),
    ("liger_kernel/", "Liger RMSNorm/SwiGLU"),
    ("trl/trainer/utils.py", "fused LM head and loss (TRL)"),
    ("trl/models/activation_offloading", "activation offloading (TRL)"),
    ("training/cuda_kernels.py", "attention (varlen)"),
    ("torch/nn/attention", "attention (varlen)"),
    ("sdpa_attention.py", "attention (SDPA)"),
    ("masking_utils.py", "attention mask"),
    ("modeling_phi3.py", "decoder layer: norms, RoPE, MLP activation, residual adds (Phi-3)"),
    ("torchinductor", "compiled layer buffers (inductor's generated code)"),
    ("torch/_inductor", "compiled layer buffers (inductor)"),
    ("torch/_functorch", "compiled layer buffers (AOTAutograd)"),
    ("torch/_dynamo", "compiled layer buffers (dynamo)"),
    ("torch/optim", "optimizer / gradient clipping (torch)"),
    ("torch/nn/utils/clip_grad", "optimizer / gradient clipping (torch)"),
    ("modeling_utils.py", "model wrapper (transformers)"),
    ("transformers/trainer.py", "trainer (transformers)"),
)


class MemoryRecorder:
    """Records one optimizer step (0-based index ``step``) and analyses it when it ends."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.trainer: Any = None
        self.baseline = 0
        self.result: dict[str, Any] = {}

    def callback(self) -> Any:
        from transformers import TrainerCallback

        recorder = self

        class _Callback(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step == recorder.step:
                    recorder.start()

            def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if state.global_step - 1 == recorder.step:
                    recorder.stop()

        return _Callback()

    def start(self) -> None:
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.baseline = int(torch.cuda.memory_allocated())
        torch.cuda.memory._record_memory_history(enabled="all", context="alloc", stacks="python",
                                                 max_entries=2_000_000)

    def stop(self) -> None:
        import gc

        import torch

        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        stats = torch.cuda.memory_stats()
        # Memory that only Python's cycle collector would free (a reference cycle holding tensors) shows here.
        before_gc = int(torch.cuda.memory_allocated())
        gc.collect()
        freed_by_gc = before_gc - int(torch.cuda.memory_allocated())
        traces = snapshot.get("device_traces") or [[]]
        trace = traces[torch.cuda.current_device()] if len(traces) > torch.cuda.current_device() else traces[0]
        self.result = {
            "optimizer_step_index": self.step,
            "allocator_peak_gib": _gib(int(torch.cuda.max_memory_allocated())),
            "reserved_peak_gib": _gib(int(stats.get("reserved_bytes.all.peak", 0))),
            "allocation_retries": int(stats.get("num_alloc_retries", 0)),
            "before_the_step": static_breakdown(self.trainer, self.baseline),
            **peak_breakdown(trace, self.baseline),
            "live_at_step_end": live_at_end(trace),
            "freed_by_gc_collect_at_step_end_gib": _gib(freed_by_gc),
        }


def static_breakdown(trainer: Any, baseline: int) -> dict[str, Any]:
    """Bytes held before the step starts: weights, quantisation state, LoRA parameters, optimizer state."""
    import torch

    model = trainer.model
    items: dict[str, int] = defaultdict(int)
    seen: set[int] = set()
    for param in model.parameters():
        if not param.is_cuda or param.data_ptr() in seen:
            continue
        seen.add(param.data_ptr())
        size = param.numel() * param.element_size()
        if type(param).__name__ == "Params4bit":
            items["4-bit projection weights (NF4, packed)"] += size
            state = getattr(param, "quant_state", None)
            items["4-bit quantisation state (absmax, codes)"] += _quant_state_bytes(state)
        elif param.requires_grad:
            items[f"LoRA parameters ({str(param.dtype).removeprefix('torch.')})"] += size
        else:
            dtype = str(param.dtype).removeprefix("torch.")
            items[f"other frozen weights: embeddings, LM head, norms ({dtype})"] += size
    managed = 0
    optimizer = getattr(trainer, "optimizer", None)
    for state in (getattr(optimizer, "state", {}) or {}).values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.is_cuda:
                size = value.numel() * value.element_size()
                if getattr(value, "is_paged", False):
                    managed += size
                else:
                    items["optimizer state (allocator)"] += size
    counted = sum(items.values())
    out = {k: _gib(v) for k, v in sorted(items.items(), key=lambda kv: -kv[1])}
    out["rest (buffers, RoPE tables, cached blocks of earlier steps)"] = _gib(baseline - counted)
    out["total allocated at step start"] = _gib(baseline)
    out["optimizer state in managed memory (paged; outside the allocator's numbers)"] = _gib(managed)
    return out


def peak_breakdown(trace: list[dict[str, Any]], baseline: int) -> dict[str, Any]:
    """Replay the allocator trace: the step's peak, and what was live at it, grouped."""
    running, peak, peak_at = baseline, baseline, -1
    sizes: dict[int, int] = {}
    for index, event in enumerate(trace):
        action = event.get("action")
        if action == "alloc":
            sizes[event["addr"]] = event["size"]
            running += event["size"]
        elif action == "free_requested":
            running -= sizes.pop(event["addr"], event["size"])
        if running > peak:
            peak, peak_at = running, index
    live: dict[int, dict[str, Any]] = {}
    freed_before_step = 0
    for event in trace[: peak_at + 1]:
        action = event.get("action")
        if action == "alloc":
            live[event["addr"]] = event
        elif action == "free_requested" and live.pop(event["addr"], None) is None:
            freed_before_step += event["size"]
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    sites: dict[tuple[str, str, str], list[int]] = defaultdict(list)
    for event in live.values():
        frames = event.get("frames") or []
        phase, label, site = classify(frames)
        groups[(phase, label)].append(event["size"])
        sites[(phase, label, site)].append(event["size"])
    at_peak = trace[peak_at] if peak_at >= 0 else {}
    return {
        "step_peak_gib": _gib(peak),
        "peak_set_by": " / ".join(classify(at_peak.get("frames") or [])) if at_peak else "before the step",
        "held_from_before_the_step_gib": _gib(baseline - freed_before_step),
        "allocated_in_the_step_and_live_at_peak": [
            {"phase": phase, "what": label, "gib": _gib(sum(s)), "tensors": len(s),
             "largest_mib": round(max(s) / 2**20, 1)}
            for (phase, label), s in sorted(groups.items(), key=lambda kv: -sum(kv[1]))],
        "top_sites": [
            {"phase": phase, "what": label, "site": site, "gib": _gib(sum(s)), "tensors": len(s)}
            for (phase, label, site), s in sorted(sites.items(), key=lambda kv: -sum(kv[1]))[:15]],
        "trace_events": len(trace),
    }


def live_at_end(trace: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Allocations of the step still live when it ends (after the optimizer), by phase: what outlives its step."""
    live: dict[int, dict[str, Any]] = {}
    for event in trace:
        if event.get("action") == "alloc":
            live[event["addr"]] = event
        elif event.get("action") == "free_requested":
            live.pop(event["addr"], None)
    groups: dict[tuple[str, str], list[int]] = defaultdict(list)
    for event in live.values():
        phase, label, _ = classify(event.get("frames") or [])
        groups[(phase, label)].append(event["size"])
    return [{"phase": phase, "what": label, "gib": _gib(sum(s)), "tensors": len(s)}
            for (phase, label), s in sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:8]]


def classify(frames: list[dict[str, Any]]) -> tuple[str, str, str]:
    """(phase, what, innermost site) of an allocation from its Python frames (innermost first)."""
    files = [(str(f.get("filename", "")).replace("\\", "/"), str(f.get("name", "")), f.get("line")) for f in frames]
    phase = "forward"
    # Non-reentrant checkpointing recomputes inside its unpack hook; reentrant inside CheckpointFunction.backward
    # (which then runs that layer's backward too).
    if any(name in ("recompute_fn", "unpack_hook", "backward") and path.endswith("torch/utils/checkpoint.py")
           for path, name, _ in files):
        phase = "recompute"
    elif any(name == "backward" and ("accelerate/" in path or "torch/autograd" in path or "torch/_tensor" in path)
             for path, name, _ in files):
        phase = "backward"
    elif any(name == "step" and ("optim" in path) for path, name, _ in files) or any(
            "clip_grad" in path for path, _, _ in files):
        phase = "optimizer"
    for path, name, line in files:
        for fragment, label in RULES:
            if fragment in path:
                return phase, label, f"{_short(path)}:{line} {name}"
    if files:
        path, name, line = files[0]
        return phase, "other", f"{_short(path)}:{line} {name}"
    return phase, "no Python frame (C++ autograd)", "-"


def _short(path: str) -> str:
    for marker in ("site-packages/", "persona_router/", "/tmp/site/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return "/".join(path.split("/")[-2:])


def _quant_state_bytes(state: Any) -> int:
    import torch

    total = 0
    while state is not None:
        for name in ("absmax", "code", "offset"):
            value = getattr(state, name, None)
            if isinstance(value, torch.Tensor) and value.is_cuda:
                total += value.numel() * value.element_size()
        state = getattr(state, "state2", None)
    return total


def _gib(value: int) -> float:
    return round(value / 2**30, 4)
