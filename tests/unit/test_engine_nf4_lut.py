"""The register-lookup decode of 4-bit codes (``nf4_lut``): the instruction list the GPU kernel runs as inline
PTX, executed in Python on every nibble position and value, must give each code's table entry in float16."""

from __future__ import annotations

import random
import struct

import pytest
from persona_router.adapters.engine import nf4_lut

NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176727, 0.7229568362236023, 1.0)


def _f16(value: float) -> float:
    return float(struct.unpack("<e", struct.pack("<e", value))[0])


def _want(word: int, code: tuple[float, ...]) -> list[float]:
    """bitsandbytes' packing: element ``e`` of a little-endian word at bit ``8 * (e // 2) + 4 * (1 - e % 2)``."""
    return [_f16(code[(word >> (8 * (e // 2) + 4 * (1 - e % 2))) & 15]) for e in range(8)]


@pytest.mark.parametrize("code", [NF4, tuple(random.Random(3).uniform(-6.0, 6.0) for _ in range(16))],
                         ids=["nf4", "random-table"])
def test_every_code_at_every_position(code: tuple[float, ...]) -> None:
    for position in range(8):
        for value in range(16):
            word = (value << (4 * position)) | (((value + 7) % 16) << (4 * ((position + 3) % 8)))
            assert nf4_lut.emulate(word, code) == _want(word, code), (position, value)


def test_random_words() -> None:
    gen = random.Random(0)
    for word in [gen.getrandbits(32) for _ in range(2000)] + [0, 0xFFFFFFFF, 0x88888888, 0x77777777]:
        assert nf4_lut.emulate(word, NF4) == _want(word, NF4), hex(word)


def test_table_words_hold_float16_bytes() -> None:
    words = nf4_lut.table_words(NF4)
    for entry, value in enumerate(NF4):
        half = struct.unpack("<H", struct.pack("<e", value))[0]
        low = (words[f"L{entry // 4}"] >> (8 * (entry % 4))) & 0xFF
        high = (words[f"H{entry // 4}"] >> (8 * (entry % 4))) & 0xFF
        assert low | (high << 8) == half


def test_ptx_names_every_output_once() -> None:
    text = nf4_lut.ptx(NF4)
    for output in range(8):
        assert text.count(f"mov.b32 ${output}, %lut_x;") == 1
    assert "$8" in text and "$9" not in text


def test_wrong_table_size_is_refused() -> None:
    with pytest.raises(ValueError, match="16 entries"):
        nf4_lut.table_words(NF4[:8])


def test_engine_config_names_the_gemv_choices() -> None:
    from persona_router.adapters.engine.config import EngineConfig
    from persona_router.core.errors import ConfigError

    assert EngineConfig(gemv="triton").gemv == "triton"
    with pytest.raises(ConfigError, match="bitsandbytes") as info:
        EngineConfig(gemv="cublas")
    assert info.value.field == "gemv"
