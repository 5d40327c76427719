"""Which precision the base loads in on CPU: float32, except batched serving on a CPU with native bf16."""

from __future__ import annotations

import pytest
from persona_router.adapters import base_model
from persona_router.adapters.base_model import cpu_bf16_support, pick_precision


@pytest.mark.parametrize(("flags", "native"), [
    ({"avx512f", "amx_bf16", "amx_tile"}, True),
    ({"avx512f", "avx512_bf16"}, True),
    ({"avx2", "avx512f", "avx512_vnni"}, False),  # VNNI is int8 only: bf16 would be emulated
    (set(), False),
])
def test_native_bf16_is_read_from_the_cpu_flags(monkeypatch: pytest.MonkeyPatch, flags: set[str],
                                                native: bool) -> None:
    monkeypatch.setattr(base_model, "_cpu_flags", lambda: flags)
    support = cpu_bf16_support()
    assert support["native"] is native
    assert support["amx_bf16"] == ("amx_bf16" in flags) and support["avx512_bf16"] == ("avx512_bf16" in flags)
    # Only the batched service switches; everything else keeps float32 (exact, and faster at batch 1).
    assert pick_precision("auto", "cpu", serving=True) == ("bf16" if native else "fp32")
    assert pick_precision("auto", "cpu") == "fp32"
    assert pick_precision("fp32", "cpu", serving=True) == "fp32"
    assert pick_precision("bf16", "cpu") == "bf16"
    assert pick_precision("auto", "cuda", serving=True) == "nf4"


def test_without_cpuinfo_torch_is_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(base_model, "_cpu_flags", lambda: None)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    assert cpu_bf16_support() == {"amx_bf16": False, "avx512_bf16": True, "native": True}


def test_the_real_cpu_flags_parse() -> None:
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    lines = [line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")] if cpuinfo.is_file() else []
    if not lines:
        assert base_model._cpu_flags() is None
        return
    assert base_model._cpu_flags() == set(lines[0].partition(":")[2].split())
