"""The 16-entry 4-bit code lookup as register byte permutes, for the one-row NF4 product (``nf4_gemv``).

The first one-row kernel looked each 4-bit code up in a 16-entry table in memory: one gathered load per
weight, and those loads, not the weight bytes, bounded it (0.4-0.55 TB/s of 4-bit bytes on an H200, where
bitsandbytes' GEMV reaches about 0.8). Here the table lives in eight 32-bit immediates (the low and the high
byte of each entry's float16 value) and ``prmt`` (byte permute) picks four entries' bytes at once, so one
32-bit word of eight codes becomes eight float32 values in about 35 register instructions and no load:

- ``prmt`` selects with 3 bits per target byte, from 8 source bytes: two permutes give entries 0-7 and 8-15
  of four codes; a third, in its sign-replicating mode, turns each code's top bit into a byte mask, and
  ``lop3`` merges the two halves by that mask (once for the low bytes, once for the high bytes);
- two more permutes interleave low and high bytes into float16 pairs, ``cvt`` widens them to float32.

The table entries are rounded to float16 (bitsandbytes' own GEMV rounds them to the activations' dtype):
relative error at most 2^-11 per entry, against 2^-8 for the bfloat16 weights of the ``dequantize`` mode.

``PROGRAM`` is the instruction list; ``ptx`` prints it as the inline assembly the kernel runs and ``emulate``
executes the same list in Python, so the bit manipulation is tested on any machine (``tests/unit``) and the
assembly's syntax on the GPU.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

# Output order: element e of a word sits at bit 8 * (e // 2) + 4 * (1 - e % 2) (bitsandbytes packs the even
# element in a byte's high nibble), so nibble 0 (bits 0-3) is element 1, nibble 1 is element 0, and so on.
NIBBLE_TO_ELEMENT = (1, 0, 3, 2, 5, 4, 7, 6)

# (op, destination, sources...): sources are register names, table names (L0-L3, H0-H3) or integers.
# ``$in`` is the input word; ``out<nibble>`` the float32 outputs.
_HALF = [
    ("and", "s", "{v}", 0x7777),  # 3-bit entry index per nibble (prmt reads the low 16 bits)
    ("shl", "t", "{v}", 4),
    ("prmt", "m", "t", "{v}", 0xD9C8),  # byte i = 0xFF when nibble i's top bit is set (sign-replicate mode)
    ("prmt", "la", "L0", "L1", "s"),  # low bytes of entries 0-7
    ("prmt", "lb", "L2", "L3", "s"),  # low bytes of entries 8-15
    ("lop3", "lo", "la", "lb", "m", 0xD8),  # (la & ~m) | (lb & m)
    ("prmt", "ha", "H0", "H1", "s"),
    ("prmt", "hb", "H2", "H3", "s"),
    ("lop3", "hi", "ha", "hb", "m", 0xD8),
    ("prmt", "p", "lo", "hi", 0x5140),  # float16 of nibbles 0 (low half) and 1 (high half)
    ("prmt", "q", "lo", "hi", 0x7362),  # nibbles 2 and 3
    ("cvt2", "out{n0}", "out{n1}", "p"),
    ("cvt2", "out{n2}", "out{n3}", "q"),
]


def _program() -> list[tuple[object, ...]]:
    program: list[tuple[object, ...]] = []
    for half in (0, 1):
        if half:
            program.append(("shr", "v", "$in", 16))
        names = {"v": "$in" if half == 0 else "v", "n0": 4 * half, "n1": 4 * half + 1, "n2": 4 * half + 2,
                 "n3": 4 * half + 3}
        for op in _HALF:
            program.append(tuple(x.format(**names) if isinstance(x, str) else x for x in op))
    return program


PROGRAM = _program()
TABLES = ("L0", "L1", "L2", "L3", "H0", "H1", "H2", "H3")


def table_words(code: Sequence[float]) -> dict[str, int]:
    """The eight 32-bit words holding the low (L) and high (H) bytes of the 16 entries' float16 values."""
    if len(code) != 16:
        raise ValueError(f"a 4-bit code has 16 entries, got {len(code)}")
    return byte_table_words([struct.unpack("<H", struct.pack("<e", float(value)))[0] for value in code])


def byte_table_words(halves: Sequence[int]) -> dict[str, int]:
    """Sixteen 16-bit entries as eight 32-bit words: L0-L3 hold their low bytes, H0-H3 their high bytes, four
    entries per word in order (the layout both decode programs' ``prmt`` lookups read)."""
    words = {}
    for i in range(4):
        entries = halves[4 * i:4 * i + 4]
        words[f"L{i}"] = sum((h & 0xFF) << (8 * j) for j, h in enumerate(entries))
        words[f"H{i}"] = sum((h >> 8) << (8 * j) for j, h in enumerate(entries))
    return words


def ptx(code: Sequence[float]) -> str:
    """Inline PTX: outputs ``$0..$7`` (float32, element order), input ``$8`` (the word of eight codes)."""
    words = table_words(code)
    regs = sorted({str(op[1]) for op in PROGRAM if op[0] != "cvt2"} - {"$in"})
    lines = ["{", ".reg .b32 " + ", ".join(f"%lut_{r}" for r in regs + [t.lower() for t in TABLES]) + ";",
             ".reg .b16 %lut_f0, %lut_f1;", ".reg .f32 %lut_x;"]
    lines += [f"mov.b32 %lut_{t.lower()}, {words[t]:#010x};" for t in TABLES]

    def operand(x: object) -> str:
        if isinstance(x, int):
            return f"{x:#x}"
        name = str(x)
        if name == "$in":
            return "$8"
        return f"%lut_{name.lower()}"

    for op in PROGRAM:
        kind = op[0]
        if kind == "cvt2":
            first, second, src = (str(x) for x in op[1:])
            lines.append(f"mov.b32 {{%lut_f0, %lut_f1}}, {operand(src)};")
            for half, name in (("%lut_f0", first), ("%lut_f1", second)):  # via a .f32 register: typed cvt
                lines.append(f"cvt.f32.f16 %lut_x, {half};")
                lines.append(f"mov.b32 ${NIBBLE_TO_ELEMENT[int(name[3:])]}, %lut_x;")
        else:
            suffix = ".u32" if kind == "shr" else ".b32"
            lines.append(f"{kind}{suffix} {operand(op[1])}, " + ", ".join(operand(x) for x in op[2:]) + ";")
    lines.append("}")
    return "\n".join(lines)


def prmt(a: int, b: int, c: int) -> int:
    """PTX ``prmt.b32``: four bytes picked from ``b:a`` by the nibbles of ``c`` (a nibble with bit 3 set gives
    the picked byte's sign bit replicated, the mode ``nf4_lut`` uses for its masks)."""
    source = [(a >> (8 * i)) & 0xFF for i in range(4)] + [(b >> (8 * i)) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = source[sel & 7]
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def lop3(a: int, b: int, c: int, lut: int) -> int:
    """PTX ``lop3.b32``: any three-input bitwise function, given as its 8-entry truth table ``lut``."""
    out = 0
    for bit in range(32):
        index = (((a >> bit) & 1) << 2) | (((b >> bit) & 1) << 1) | ((c >> bit) & 1)
        out |= ((lut >> index) & 1) << bit
    return out


def integer_op(kind: str, args: Sequence[int]) -> int | None:
    """The 32-bit integer instructions of the decode programs (this one and ``nf4_dot_asm``'s) in Python; None
    for any other kind."""
    if kind == "and":
        return args[0] & args[1]
    if kind == "shl":
        return (args[0] << args[1]) & 0xFFFFFFFF
    if kind == "shr":
        return args[0] >> args[1]
    if kind == "prmt":
        return prmt(args[0], args[1], args[2])
    if kind == "lop3":
        return lop3(args[0], args[1], args[2], args[3])
    return None


def emulate(word: int, code: Sequence[float]) -> list[float]:
    """Run ``PROGRAM`` on one 32-bit word in Python: the eight values in element order."""
    regs: dict[str, int] = {"$in": word & 0xFFFFFFFF, **table_words(code)}
    out: dict[int, float] = {}

    def value(x: object) -> int:
        return x if isinstance(x, int) else regs[str(x)]

    for op in PROGRAM:
        kind, dst = op[0], str(op[1])
        args = [value(x) for x in op[2:]] if kind != "cvt2" else []
        result = integer_op(str(kind), args)
        if result is not None:
            regs[dst] = result
        else:  # cvt2: the two float16 halves of a register, widened
            pair = regs[str(op[3])]
            low, high = struct.unpack("<ee", struct.pack("<I", pair))
            out[NIBBLE_TO_ELEMENT[int(dst[3:])]] = low
            out[NIBBLE_TO_ELEMENT[int(str(op[2])[3:])]] = high
    return [out[e] for e in range(8)]
