"""Stand-ins for bitsandbytes 4-bit modules, for tests and kernel benchmarks of the fused NF4 path."""

from __future__ import annotations

from typing import Any


class FakeLinear4bit:
    """What ``nf4_kernels.nf4_weight`` reads off a ``Linear4bit``: ``weight.data`` and ``weight.quant_state``."""

    def __init__(self, packed: Any, state: Any) -> None:
        self.weight = type("Weight", (), {})()
        self.weight.data = packed
        self.weight.quant_state = state
