"""One 32-bit word of eight 4-bit codes times eight activations, as inline PTX for the one-row GEMV (``nf4_gemv``).

The code table's 16 entries, rounded to the activations' 16-bit type, live in eight 32-bit immediates: the low
bytes of the entries (L0-L3) and their high bytes (H0-H3). ``prmt`` (byte permute) picks four bytes out of two
registers with 3 bits per target byte, so one permute looks up four codes in entries 0-7 and another in 8-15;
a third permute, whose selector is built from each code's top bit, keeps the right one of the two (done for the
low and the high bytes). Two more permutes interleave low and high bytes into two 16-bit pairs, which meet the
activations (16-bit pairs too, as they lie in memory) in packed ``fma.rn.{bf16x2,f16x2}``: four packed
multiply-adds per word, chained in 16-bit, then the two halves are added in float32. 28 PTX instructions per
word of eight weights and no memory access (the compiled loop, loads and addressing included, has 33 SASS
instructions per eight weights: ``nf4_gemv``); bitsandbytes' GEMV reads its table from shared memory once per
weight.

The word layout is bitsandbytes' own (``bnb``: byte ``b`` of a word holds elements ``2b`` in its high and
``2b + 1`` in its low nibble), which the K-major copy keeps; it fixes the two interleaving selectors.

``PROGRAM`` is the instruction list; ``ptx`` prints it and ``emulate`` runs it in Python (16-bit rounding
included), so the bit manipulation is tested on any machine and the assembly's syntax on the GPU.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence

from persona_router.adapters.engine.nf4_lut import byte_table_words, integer_op

LAYOUTS = ("bnb",)
DTYPES = ("bf16", "f16")
# Interleaving selectors (low pair, high pair) per layout: byte i of the result takes byte sel[i] of (lo, hi).
_INTERLEAVE = {"bnb": (0x4051, 0x6273)}
# (op, destination, sources...): register names, table names (L0-L3, H0-H3), "$w" (the word), "$x0".."$x3"
# (the activation pairs), integers (immediates). The last instruction writes "$out" (float32).


def decode_program(layout: str) -> list[tuple[object, ...]]:
    """The lookup alone: the word ``$w`` to four 16-bit pairs ``p0..p3`` (pair ``j``: element ``2j`` in the low
    half, ``2j + 1`` in the high half, as the activations lie in memory). The GEMV multiplies them in place
    (``program``); the many-row kernel (``nf4_mma``) takes them out as its tensor-core tile (``unpack_ptx``)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    first, second = _INTERLEAVE[layout]
    prog: list[tuple[object, ...]] = [
        ("and", "s", "$w", 0x77777777),  # 3-bit entry index per nibble (prmt reads selector nibbles' low bits)
        ("shr", "t", "$w", 1),
        ("lop3", "sel", "t", 0x44444444, 0x32103210, 0xEA),  # (t & 0x4444..) | 0x3210..: byte i, or i + 4 if bit 3
        ("shr", "sh", "s", 16),
        ("shr", "selh", "sel", 16),
    ]
    for half, (s, sel) in enumerate((("s", "sel"), ("sh", "selh"))):
        prog += [
            ("prmt", "a", "L0", "L1", s), ("prmt", "b", "L2", "L3", s), ("prmt", "lo", "a", "b", sel),
            ("prmt", "c", "H0", "H1", s), ("prmt", "d", "H2", "H3", s), ("prmt", "hi", "c", "d", sel),
            ("prmt", f"p{2 * half}", "lo", "hi", first), ("prmt", f"p{2 * half + 1}", "lo", "hi", second),
        ]
    return prog


def program(layout: str, dtype: str = "bf16") -> list[tuple[object, ...]]:
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    prog = decode_program(layout)
    prog += [
        ("fma0", "acc", "p0", "$x0"),  # acc = p0 * x0 (a packed fma with +0)
        ("fma", "acc", "p1", "$x1", "acc"),
        ("fma", "acc", "p2", "$x2", "acc"),
        ("fma", "acc", "p3", "$x3", "acc"),
    ]
    if dtype == "bf16":  # a bfloat16 is the top half of its float32
        prog += [("shl", "t", "acc", 16), ("and", "s", "acc", 0xFFFF0000)]
    else:
        prog += [("cvtlo", "t", "acc"), ("cvthi", "s", "acc")]
    prog.append(("addf", "$out", "t", "s"))
    return prog


def _bits16(value: float, dtype: str) -> int:
    if dtype == "f16":
        return int(struct.unpack("<H", struct.pack("<e", value))[0])
    return _bf16_bits(value)


def _bf16_bits(value: float) -> int:
    """Round-to-nearest-even of a float to bfloat16 bits (through its exact float32 value when it has one)."""
    if value == 0.0:
        return 0x8000 if math.copysign(1.0, value) < 0 else 0
    bits = struct.unpack("<I", struct.pack("<f", value))[0]
    if struct.unpack("<f", struct.pack("<I", bits))[0] == value:  # exact in float32: round the bits
        return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) & 0xFFFF
    mantissa, exponent = math.frexp(value)  # value = mantissa * 2**exponent, 0.5 <= |mantissa| < 1
    rounded = round(mantissa * 256) * 2.0 ** (exponent - 8)  # 8 significant bits, ties to even
    return _bf16_bits(rounded)


def _from16(bits: int, dtype: str) -> float:
    if dtype == "f16":
        return float(struct.unpack("<e", struct.pack("<H", bits & 0xFFFF))[0])
    return float(struct.unpack("<f", struct.pack("<I", (bits & 0xFFFF) << 16))[0])


def _round16(value: float, dtype: str) -> float:
    return _from16(_bits16(value, dtype), dtype)


def table_words(code: Sequence[float], dtype: str = "bf16") -> dict[str, int]:
    """The eight 32-bit words holding the low (L) and high (H) bytes of the entries' 16-bit values."""
    if len(code) != 16:
        raise ValueError(f"a 4-bit code has 16 entries, got {len(code)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return byte_table_words([_bits16(float(value), dtype) for value in code])


def ptx(code: Sequence[float], dtype: str = "bf16", layout: str = "bnb") -> str:
    """Inline PTX: output ``$0`` (float32), inputs ``$1`` (the word), ``$2..$5`` (activation pairs 0-3), ``$6..$9``
    (table words L0, L2, H0, H2: ``register_words``)."""
    names = {"$w": "$1", "$x0": "$2", "$x1": "$3", "$x2": "$4", "$x3": "$5", "$out": "$0",
             "L0": "$6", "L2": "$7", "H0": "$8", "H2": "$9"}
    return _render(program(layout, dtype), names, table_words(code, dtype), dtype)


def unpack_ptx(code: Sequence[float], dtype: str = "bf16", layout: str = "bnb") -> str:
    """Inline PTX of ``decode_program``: outputs ``$0..$3`` (the 16-bit pairs p0-p3), inputs ``$4`` (the word),
    ``$5..$8`` (table words L0, L2, H0, H2: ``register_words``)."""
    names = {"p0": "$0", "p1": "$1", "p2": "$2", "p3": "$3", "$w": "$4",
             "L0": "$5", "L2": "$6", "H0": "$7", "H2": "$8"}
    return _render(decode_program(layout), names, table_words(code, dtype), dtype)


def _render(prog: list[tuple[object, ...]], names: dict[str, str], words: dict[str, int], dtype: str) -> str:
    # The first table operand of each lookup comes in a register (loaded once by the kernel, so the assembler
    # keeps them instead of re-making them per word), the second as an immediate.
    regs = sorted({str(op[1]) for op in prog if not str(op[1]).startswith("$") and str(op[1]) not in names})
    lines = ["{", ".reg .b32 " + ", ".join(f"%q_{r}" for r in [*regs, "zero"]) + ";",
             ".reg .f32 %q_f0, %q_f1;", ".reg .b16 %q_e0, %q_e1;", "mov.b32 %q_zero, 0;"]

    def operand(x: object) -> str:
        if isinstance(x, int):
            return f"{x:#x}"
        if str(x) in ("L1", "L3", "H1", "H3"):
            return f"{words[str(x)]:#010x}"
        return names.get(str(x), f"%q_{str(x).lower()}")

    fma = f"fma.rn.{'bf16x2' if dtype == 'bf16' else 'f16x2'}"
    for op in prog:
        kind, args = op[0], [operand(x) for x in op[1:]]
        if kind == "fma0":
            lines.append(f"{fma} {args[0]}, {args[1]}, {args[2]}, %q_zero;")
        elif kind == "fma":
            lines.append(f"{fma} {args[0]}, {args[1]}, {args[2]}, {args[3]};")
        elif kind in ("cvtlo", "cvthi"):  # typed cvt through .b16 and .f32 registers
            lines.append(f"mov.b32 {{%q_e0, %q_e1}}, {args[1]};")
            lines.append(f"cvt.f32.f16 %q_f0, {'%q_e0' if kind == 'cvtlo' else '%q_e1'};")
            lines.append(f"mov.b32 {args[0]}, %q_f0;")
        elif kind == "addf":
            lines.append(f"mov.b32 %q_f0, {args[1]};")
            lines.append(f"mov.b32 %q_f1, {args[2]};")
            lines.append("add.f32 %q_f0, %q_f0, %q_f1;")
            lines.append(f"mov.b32 {args[0]}, %q_f0;")
        else:
            suffix = ".u32" if kind == "shr" else ".b32"
            lines.append(f"{kind}{suffix} " + ", ".join(args) + ";")
    lines.append("}")
    return "\n".join(lines)


REGISTER_TABLES = ("L0", "L2", "H0", "H2")


def register_words(code: Sequence[float], dtype: str = "bf16") -> list[int]:
    """The table words the PTX takes as inputs ``$6..$9``, as signed 32-bit integers (an int32 tensor's values)."""
    words = table_words(code, dtype)
    return [w - (1 << 32) if w >= 1 << 31 else w for w in (words[t] for t in REGISTER_TABLES)]


def _fma2(a: int, b: int, c: int, dtype: str) -> int:
    """Packed 16-bit fma: each half ``round16(a * b + c)``, one rounding (the product of two 16-bit values and
    their sum are exact in a Python float for the magnitudes the tests use)."""
    out = 0
    for half in range(2):
        value = (_from16(a >> (16 * half), dtype) * _from16(b >> (16 * half), dtype)
                 + _from16(c >> (16 * half), dtype))
        out |= _bits16(value, dtype) << (16 * half)
    return out


def _f32(bits: int) -> float:
    return float(struct.unpack("<f", struct.pack("<I", bits & 0xFFFFFFFF))[0])


def emulate(word: int, pairs: Sequence[int], code: Sequence[float], dtype: str = "bf16", layout: str = "bnb") -> float:
    """Run the program on one word and four activation pairs (32-bit words of two 16-bit values) in Python."""
    regs: dict[str, int] = {"$w": word & 0xFFFFFFFF, **table_words(code, dtype)}
    regs.update({f"$x{i}": p & 0xFFFFFFFF for i, p in enumerate(pairs)})

    def value(x: object) -> int:
        return x if isinstance(x, int) else regs[str(x)]

    out = math.nan
    for op in program(layout, dtype):
        kind, dst = op[0], str(op[1])
        args = [value(x) for x in op[2:]]
        result = integer_op(str(kind), args)
        if result is not None:
            regs[dst] = result
        elif kind == "fma0":
            regs[dst] = _fma2(args[0], args[1], 0, dtype)
        elif kind == "fma":
            regs[dst] = _fma2(args[0], args[1], args[2], dtype)
        elif kind in ("cvtlo", "cvthi"):
            half = _from16(args[0] >> (0 if kind == "cvtlo" else 16), dtype)
            regs[dst] = struct.unpack("<I", struct.pack("<f", half))[0]
        elif kind == "addf":  # float32 add of two float32 bit patterns, rounded to float32
            out = _f32(struct.unpack("<I", struct.pack("<f", _f32(args[0]) + _f32(args[1])))[0])
        else:
            raise ValueError(f"unknown op {kind}")
    return out


def emulate_unpack(word: int, code: Sequence[float], dtype: str = "bf16", layout: str = "bnb") -> list[float]:
    """Run ``decode_program`` on one word in Python: the eight 16-bit values in element order."""
    regs: dict[str, int] = {"$w": word & 0xFFFFFFFF, **table_words(code, dtype)}
    for op in decode_program(layout):
        result = integer_op(str(op[0]), [x if isinstance(x, int) else regs[str(x)] for x in op[2:]])
        if result is None:
            raise ValueError(f"unknown op {op[0]}")
        regs[str(op[1])] = result
    return [_from16(regs[f"p{e // 2}"] >> (16 * (e % 2)), dtype) for e in range(8)]


def element_codes(word: int, layout: str) -> list[tuple[int, int]]:
    """(pair, half) -> nibble position: for each of the eight (pair ``p``, half ``h``) slots the word feeds, the
    4-bit code it holds: pair ``p`` is byte ``p``, the even element in the high nibble."""
    codes = []
    for pair in range(4):
        for half in range(2):
            nibble = 2 * pair + (1 - half)
            codes.append((pair * 2 + half, (word >> (4 * nibble)) & 15))
    return codes


def reference(word: int, pairs: Sequence[int], code: Sequence[float], dtype: str = "bf16", layout: str = "bnb"
              ) -> float:
    """What ``emulate`` must give, written from the layouts' definitions: the same 16-bit chain of products."""
    values = {slot: _round16(float(code[c]), dtype) for slot, c in element_codes(word, layout)}
    halves = []
    for half in range(2):
        acc = 0.0
        for pair in range(4):
            x = _from16(pairs[pair] >> (16 * half), dtype)
            acc = _round16(values[2 * pair + half] * x + acc, dtype)
        halves.append(acc)
    return _f32(struct.unpack("<I", struct.pack("<f", halves[0] + halves[1]))[0])
