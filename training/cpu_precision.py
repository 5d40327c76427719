"""CPU-only training choices, kept apart from the CUDA path: whether this CPU computes bf16 natively.

On CPUs with AVX512-BF16 or AMX-BF16, ``torch.autocast("cpu", dtype=torch.bfloat16)`` runs the matrix
products of a LoRA training step in bf16 (fp32 master weights and optimizer state stay as they are): on an
Intel Xeon with AMX a 2048x576x1536 product ran 5.7x faster than fp32 and a whole training step about 1.5x
(benchmarks/results/train_cpu_throughput.json). Without those instructions bf16 is emulated and slower than
fp32, so other CPUs (e.g. AMD EPYC without AVX512-BF16) keep float32. Detected from torch's own CPU probe,
never assumed from the vendor.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def cpu_bf16_native() -> bool:
    """True when this CPU has native bf16 matrix instructions (AVX512-BF16 or AMX-BF16) that torch uses."""
    import torch

    cpu = getattr(torch, "cpu", None)
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    found = {name: bool(getattr(cpu, name)()) for name in probes if cpu is not None and hasattr(cpu, name)}
    if not found:
        log.info("this torch build cannot report the CPU's bf16 support; training in float32")
        return False
    return any(found.values())


def cpu_flags_summary() -> dict[str, bool]:
    """The probes behind :func:`cpu_bf16_native`, for manifests and benchmark reports."""
    import torch

    cpu = getattr(torch, "cpu", None)
    names = ("_is_avx512_bf16_supported", "_is_amx_tile_supported", "_is_avx512_supported", "_is_vnni_supported")
    return {name.removeprefix("_is_").removesuffix("_supported"): bool(getattr(cpu, name)())
            for name in names if cpu is not None and hasattr(cpu, name)}
