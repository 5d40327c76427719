"""The engine's Triton kernels timed on one GPU against cuBLAS, bitsandbytes and the bandwidth floor.

Phi-3-mini's projection shapes with random weights quantised by bitsandbytes (NF4, double quantisation).
For each shape and row count (1 = batch-1 decode, 8 and 64 = decode of that many streams, 128 = a prefill),
every candidate launch shape of the fused NF4 product is checked against the plain-torch reference and timed,
beside cuBLAS on a dense bf16 weight, bitsandbytes' own 4-bit product (``matmul_4bit``: its GEMV kernel for one
row) and bitsandbytes' dequantisation into a reused bf16 scratch followed by cuBLAS. Also the LoRA shrink
(gather by slot for few rows, one tensor-core product over the resident slots for many) with the expand, and
decode attention over live lengths against SDPA over the masked bucket. The K-major GEMV's sections (``kmajor``,
``kmajor_wide``, ``--write-shapes``) are in ``kernels_gpu_kmajor.py``, the many-row K-major product's (``mma``)
in ``kernels_gpu_mma.py``, the timing helpers in
``kernels_gpu_timing.py``.

Timing: each launch is captured in a CUDA graph, one launch per weight copy, with enough copies (over 240 MB)
that the 60 MB L2 cache cannot serve them; the median replay time over the copies is one launch's time
including the in-graph launch gap, as the engine's decode graph runs it.

    python3 benchmarks/kernels_gpu.py --out /tmp/kernels.json      # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after the installed package: the repo root holds a bare persona_router folder

from benchmarks.kernels_gpu_cuda import cuda_cases, cuda_summary, dense_cases  # noqa: E402
from benchmarks.kernels_gpu_kmajor import kmajor_cases, write_shapes  # noqa: E402
from benchmarks.kernels_gpu_mma import ROWS as MMA_ROWS  # noqa: E402
from benchmarks.kernels_gpu_mma import mma_cases  # noqa: E402
from benchmarks.kernels_gpu_mma import summary as mma_summary  # noqa: E402
from benchmarks.kernels_gpu_timing import (  # noqa: E402
    ROTATE_BYTES,
    SHAPES,
    best_config,
    graph_ms,
    quantized_copies,
    rel,
    time_config,
)

log = logging.getLogger("kernels_gpu")


def candidates() -> dict[int, list[Any]]:
    from persona_router.adapters.engine.nf4_kernels import Tiles

    return {
        1: [Tiles("gemv", 1, 8, 128, 4), Tiles("gemv", 1, 16, 128, 4), Tiles("gemv", 1, 4, 128, 4),
            Tiles("gemv", 1, 8, 128, 4, xvec=True), Tiles("gemv", 1, 16, 128, 4, xvec=True),
            Tiles("gemv", 1, 16, 64, 4, split_k=2, xvec=True),
            Tiles("gemv", 1, 8, 64, 2), Tiles("gemv", 1, 16, 256, 8), Tiles("gemv", 1, 8, 128, 4, split_k=2),
            Tiles("gemv", 1, 8, 128, 4, split_k=4), Tiles("gemv", 1, 16, 128, 4, split_k=4),
            Tiles("gemv", 1, 32, 64, 4), Tiles("gemv", 1, 16, 64, 4, split_k=2), Tiles("gemv", 1, 16, 32, 4, split_k=4),
            Tiles("dot", 16, 32, 2, 4, 3), Tiles("dot", 16, 64, 2, 4, 3, 2)],
        8: [Tiles("dot", 16, 32, 2, 4, 3), Tiles("dot", 16, 32, 2, 4, 3, 2), Tiles("dot", 16, 32, 2, 4, 3, 4),
            Tiles("dot", 16, 64, 2, 4, 3), Tiles("dot", 16, 64, 1, 4, 4, 2), Tiles("dot", 16, 128, 2, 8, 3)],
        64: [Tiles("dot", 64, 64, 2, 4, 3), Tiles("dot", 64, 128, 1, 8, 3, 2), Tiles("dot", 64, 32, 2, 4, 3, 2),
             Tiles("dot", 64, 64, 2, 4, 3, 4), Tiles("dot", 64, 64, 4, 4, 3, 2)],
        128: [Tiles("dot", 128, 128, 1, 8, 3), Tiles("dot", 64, 128, 1, 4, 3, 4), Tiles("dot", 128, 64, 2, 8, 3, 2),
              Tiles("dot", 128, 128, 1, 8, 3, 4)],
    }


def nf4_cases(bandwidth: float) -> list[dict[str, Any]]:
    import bitsandbytes
    import bitsandbytes.functional as bnbf
    import torch
    import torch.nn.functional as F
    from persona_router.adapters.engine import nf4_kernels

    rows = []
    for name, (n, k) in SHAPES.items():
        nf4_bytes = n * k // 2 + n * k // 64
        copies = quantized_copies(n, k, max(4, int(ROTATE_BYTES // nf4_bytes) + 1))
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                 for _ in range(max(3, int(ROTATE_BYTES // (2 * n * k)) + 1))]
        scratch = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
        weight0 = copies[0][2]
        for m, tiles_list in candidates().items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = nf4_kernels.reference_matmul(x, weight0)
            row: dict[str, Any] = {"shape": name, "n": n, "k": k, "m": m, "nf4_bytes": weight0.nbytes,
                                   "floor_ms": weight0.nbytes / bandwidth * 1e3, "baselines": {}, "configs": {}}
            row["baselines"]["cublas_bf16_ms"] = graph_ms([lambda d=d, x=x: F.linear(x, d) for d in dense])

            def dequant_cublas(packed: Any, state: Any, x: Any = x, scratch: Any = scratch) -> Any:
                bnbf.dequantize_4bit(packed, state, out=scratch)
                return F.linear(x, scratch)

            def bnb_matmul(packed: Any, state: Any, x: Any = x) -> Any:
                return bitsandbytes.matmul_4bit(x, packed.t(), quant_state=state)

            for label, fn in (("bnb_matmul_4bit", bnb_matmul), ("bnb_dequant_cublas", dequant_cublas)):
                try:
                    err = rel(fn(copies[0][0], copies[0][1]), want)
                    row["baselines"][label] = {"ms": graph_ms([lambda p=p, s=s, f=fn: f(p, s) for p, s, _ in copies]),
                                               "rel_err": err}
                except Exception as exc:  # a library path that fails is recorded, the rest still runs
                    log.exception("%s failed", label)
                    row["baselines"][label] = {"error": f"{type(exc).__name__}: {exc}"}
            for tiles in [None, *tiles_list]:
                key = "default" if tiles is None else str(tuple(vars(tiles).values()))
                try:
                    err = rel(nf4_kernels.nf4_matmul(x, weight0, tiles=tiles), want)
                    ms = graph_ms([lambda w=w, t=tiles, x=x: nf4_kernels.nf4_matmul(x, w, tiles=t)
                                   for _, _, w in copies])
                except Exception as exc:  # a shape that fails to compile is recorded, the others still run
                    log.exception("tiles %s failed", key)
                    row["configs"][key] = {"error": f"{type(exc).__name__}: {exc}"}
                    continue
                row["configs"][key] = {"ms": ms, "rel_err": err, "tb_s": weight0.nbytes / ms / 1e9}
                if tiles is None:
                    row["configs"][key]["tiles"] = str(nf4_kernels.default_tiles(m, n, k))
            timed_ok = {c: v for c, v in row["configs"].items() if "ms" in v}
            if timed_ok:
                best = min(timed_ok, key=lambda c: timed_ok[c]["ms"])
                row["best"] = {"config": best, **timed_ok[best]}
            rows.append(row)
            log.info("%s m=%d: %s | best %s", name, m, row["baselines"], row.get("best"))
        del copies, dense
        torch.cuda.empty_cache()
    return rows


def lut_cases(bandwidth: float) -> list[dict[str, Any]]:
    """One row: the register-lookup NF4 GEMV (``nf4_lut``, decoded absmax) over launch shapes, against
    bitsandbytes' GEMV (``Gemv4bit``, the same decoded absmax) and cuBLAS on a dense bf16 copy."""
    import torch
    import torch.nn.functional as F
    from persona_router.adapters.engine import nf4_kernels
    from persona_router.adapters.engine.nf4_lut import ptx
    from persona_router.adapters.engine.weights import Gemv4bit

    from tests.support.nf4 import FakeLinear4bit

    rows = []
    for name, (n, k) in SHAPES.items():
        nf4_bytes = n * k // 2 + n * k // 64 * 4
        copies = quantized_copies(n, k, max(4, int(ROTATE_BYTES // nf4_bytes) + 1))
        views = [nf4_kernels.decoded(w) for _, _, w in copies]
        gemvs = [Gemv4bit.of(FakeLinear4bit(packed, state)) for packed, state, _ in copies]
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                 for _ in range(max(3, int(ROTATE_BYTES // (2 * n * k)) + 1))]
        asm = ptx(views[0].code.tolist())
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        want = nf4_kernels.reference_matmul(x, copies[0][2])
        row: dict[str, Any] = {"shape": name, "n": n, "k": k, "bytes": nf4_bytes,
                               "floor_ms": nf4_bytes / bandwidth * 1e3,
                               "cublas_bf16_ms": graph_ms([lambda d=d, x=x: F.linear(x, d) for d in dense]),
                               "bnb_gemv_ms": graph_ms([lambda g=g, x=x: g(x) for g in gemvs]),
                               "bnb_gemv_rel_err": rel(gemvs[0](x), want), "configs": {}}
        default = nf4_kernels.lut_tiles(n, k)
        shapes = [default] + [nf4_kernels.Tiles("gemv", 1, bn, inner, warps, 1, split, xvec=True)
                              for bn, inner, warps, split in ((4, 128, 4, 1), (16, 64, 4, 1), (16, 128, 8, 1),
                                                              (8, 64, 2, 1), (32, 32, 4, 1), (8, 128, 4, 2),
                                                              (16, 64, 4, 2), (8, 32, 4, 4), (4, 64, 2, 2))]
        for tiles in shapes:
            key = "default" if tiles is default else str(tuple(vars(tiles).values()))
            row["configs"][key] = time_config(
                lambda w, t=tiles, x=x, a=asm: nf4_kernels.nf4_matmul(x, w, tiles=t, lut=a), views, want, nf4_bytes)
        fastest = best_config(row["configs"])
        if fastest is not None:
            row["best"] = fastest
        rows.append(row)
        log.info("lut %s: cublas %.4f bnb %.4f default %s best %s", name, row["cublas_bf16_ms"], row["bnb_gemv_ms"],
                 row["configs"].get("default"), row.get("best"))
        del copies, views, gemvs, dense
        torch.cuda.empty_cache()
    return rows


def lora_cases() -> list[dict[str, Any]]:
    import torch
    from persona_router.adapters.engine import lora_kernels

    rows = []
    k, n, capacity, rank = 3072, 9216, 8, 16
    a = torch.randn(capacity, rank, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    bt = torch.randn(capacity, rank, n, device="cuda", dtype=torch.bfloat16) * 0.02
    scaling = torch.full((capacity + 1,), 2.0, device="cuda", dtype=torch.bfloat16)
    for m in (1, 8, 16, 64, 128):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        slots = (torch.arange(m, device="cuda") % 4) + 1
        out = torch.zeros(m, n, device="cuda", dtype=torch.bfloat16)
        want = lora_kernels.reference(x, a, bt, slots, scaling)
        got = lora_kernels.expand_(out.clone(), lora_kernels.shrink(x, a, bt, slots, scaling, m=4))
        rows.append({"m": m, "rel_err": rel(got, want),
                     "shrink_ms": graph_ms([lambda x=x, s=slots: lora_kernels.shrink(x, a, bt, s, scaling, m=4)] * 20),
                     "shrink_expand_ms": graph_ms([lambda x=x, s=slots, o=out: lora_kernels.expand_(
                         o, lora_kernels.shrink(x, a, bt, s, scaling, m=4))] * 20)})
        if m <= lora_kernels.GATHER_ROWS:  # the few-row expand alone, per column block
            shrunk = lora_kernels.shrink(x, a, bt, slots, scaling, m=4)
            rows[-1]["expand_ms_by_block_n"] = {
                bn: graph_ms([partial(lora_kernels.expand_, out, shrunk, None, bn)] * 20) for bn in (32, 64, 128, 256)}
        else:  # the many-row expand alone (the dense slot columns and cuBLAS's addmm_)
            shrunk = lora_kernels.shrink(x, a, bt, slots, scaling, m=4)
            rows[-1]["expand_ms"] = graph_ms([partial(lora_kernels._expand_dense, out, shrunk, None)] * 20)
    return rows


TILINGS = ((64, 8), (16, 16), (16, 32), (16, 64), (32, 32), (64, 32))  # (64, 8): the first many-row rule


def prologue_cases() -> list[dict[str, Any]]:
    """The LoRA shrink that also computes its input (RMSNorm, gated SiLU), against the plain shrink; for the
    norm also with the sum of squares in 64-column steps (the first version's loop: one dependent load each).
    Past ``GATHER_ROWS`` rows also each (rows per program, K chunks) of ``TILINGS`` with the prologue."""
    import torch
    from persona_router.adapters.engine import lora_kernels
    from persona_router.adapters.engine.kernels import gated, rms_norm

    rows = []
    capacity, rank = 8, 16
    for k, kind in ((3072, "norm"), (8192, "silu_mul")):
        a = torch.randn(capacity, rank, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
        bt = torch.randn(capacity, rank, 64, device="cuda", dtype=torch.bfloat16)
        scaling = torch.full((capacity + 1,), 2.0, device="cuda", dtype=torch.bfloat16)
        weight = torch.rand(k, device="cuda", dtype=torch.bfloat16) + 0.5
        for m in (1, 8, 16, 64, 128):
            slots = (torch.arange(m, device="cuda") % 4) + 1
            x = torch.randn(m, 2 * k if kind == "silu_mul" else k, device="cuda", dtype=torch.bfloat16)
            prologue = lora_kernels.Prologue(kind, weight if kind == "norm" else None, 1e-5)
            want = rms_norm(x, weight, 1e-5) if kind == "norm" else gated(torch.nn.functional.silu)(x)
            plain_x = want.contiguous()
            row: dict[str, Any] = {"k": k, "kind": kind, "m": m,
                                   "h_rel_err": rel(lora_kernels.shrink(x, a, bt, slots, scaling, m=4,
                                                                        prologue=prologue).h, want)}
            row["plain_shrink_ms"] = graph_ms([partial(lora_kernels.shrink, plain_x, a, bt, slots, scaling, 4)] * 20)
            row["prologue_shrink_ms"] = graph_ms([partial(lora_kernels.shrink, x, a, bt, slots, scaling, 4,
                                                          prologue)] * 20)
            if kind == "norm":
                row["prologue_shrink_norm_block_64_ms"] = graph_ms([partial(
                    lora_kernels.shrink, x, a, bt, slots, scaling, 4, prologue, 64)] * 20)
            if m > lora_kernels.GATHER_ROWS:
                row["default_tiling"] = list(lora_kernels.tiling_for(m))
                row["prologue_shrink_ms_by_tiling"] = {
                    f"{bm}x{splits}": graph_ms([partial(lora_kernels.shrink, x, a, bt, slots, scaling, 4, prologue,
                                                        None, (bm, splits))] * 20) for bm, splits in TILINGS}
            rows.append(row)
    return rows


def attention_cases(bandwidth: float) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F
    from persona_router.adapters.engine import attention_kernels

    rows = []
    heads, dim, cache_len, pos = 32, 96, 256, 160
    for n in (1, 8, 32, 64):
        k_cache = torch.randn(n, heads, cache_len, dim, device="cuda", dtype=torch.bfloat16)
        v_cache = torch.randn_like(k_cache)
        q, k_new, v_new = (torch.randn(n, heads, dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        positions = torch.full((n,), pos, device="cuda")
        want = attention_kernels.reference(q, k_new, v_new, k_cache, v_cache, positions)[0]
        got = attention_kernels.decode_attention(q, k_new, v_new, k_cache, v_cache, positions, cache_len)
        mask = torch.zeros(n, 1, 1, cache_len, device="cuda", dtype=torch.bfloat16)
        mask[..., pos + 1:] = float("-inf")
        live_bytes = 2 * n * heads * (pos + 1) * dim * 2
        rows.append({"n": n, "rel_err": rel(got, want), "live_bytes": live_bytes,
                     "floor_ms": live_bytes / bandwidth * 1e3,
                     "default_launch": str(attention_kernels.launch_for(n)),
                     "kernel_ms": graph_ms([partial(attention_kernels.decode_attention, q, k_new, v_new, k_cache,
                                                    v_cache, positions, cache_len)] * 20),
                     "sdpa_masked_ms": graph_ms([partial(F.scaled_dot_product_attention, q.unsqueeze(2), k_cache,
                                                         v_cache, attn_mask=mask)] * 20)})
        launches = {}
        for block in (16, 32, 64):
            for warps in (1, 2, 4, 8):
                for guard, split in ((True, False), (False, False), (True, True)):
                    shape = attention_kernels.Launch(block, warps, guard, split)
                    label = f"{block}/{warps}/{'split' if split else 'guard' if guard else 'masked'}"
                    try:
                        err = rel(attention_kernels.decode_attention(q, k_new, v_new, k_cache, v_cache, positions,
                                                                     cache_len, launch=shape), want)
                        ms = graph_ms([partial(attention_kernels.decode_attention, q, k_new, v_new, k_cache, v_cache,
                                               positions, cache_len, launch=shape)] * 20)
                        launches[label] = {"ms": ms, "rel_err": err}
                    except Exception as exc:  # noqa: BLE001 - a shape the compiler refuses: recorded, the rest go on
                        launches[label] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        rows[-1]["launches"] = launches
        timed = {k: v["ms"] for k, v in launches.items() if "ms" in v and v["rel_err"] < 2e-2}
        rows[-1]["best_launch"] = min(timed, key=timed.__getitem__) if timed else None
    return rows


def main() -> int:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--only", default="kmajor,attention,lora,prologue,lut,nf4", help="comma-separated sections")
    parser.add_argument("--write-shapes", type=Path,
                        help="merge the kmajor section's fastest launch shape per weight shape, for this GPU, into "
                             "this JSON file (the engine's adapters/engine/gemv_shapes.json)")
    parser.add_argument("--mma-rows", default=",".join(str(r) for r in MMA_ROWS),
                        help="row counts of the mma section")
    args = parser.parse_args()
    from benchmarks.serve_gpu import copy_bandwidth

    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "bandwidth": copy_bandwidth()}
    bandwidth = report["bandwidth"]["tb_s"] * 1e12
    mma_rows = tuple(int(r) for r in args.mma_rows.split(","))
    sections = {"attention": lambda: attention_cases(bandwidth), "lora": lora_cases, "prologue": prologue_cases,
                "nf4": lambda: nf4_cases(bandwidth), "lut": lambda: lut_cases(bandwidth),
                "kmajor": lambda: kmajor_cases(bandwidth), "kmajor_wide": lambda: kmajor_cases(bandwidth, "wide"),
                "kmajor_staged": lambda: kmajor_cases(bandwidth, "staged"), "cuda": lambda: cuda_cases(bandwidth),
                "dense": lambda: dense_cases(bandwidth),
                "mma": lambda: mma_cases(bandwidth, mma_rows),
                "mma_pipe": lambda: mma_cases(bandwidth, mma_rows, pipe_only=True)}
    for key in args.only.split(","):
        try:
            report[key] = sections[key]()
        except Exception as exc:  # keep the other sections
            log.exception("%s failed", key)
            report[key] = {"error": f"{type(exc).__name__}: {exc}"}
        args.out.write_text(json.dumps(report, indent=1))
    gemv_sweeps = [row for key in ("kmajor", "kmajor_wide", "kmajor_staged") if isinstance(report.get(key), list)
                   for row in report[key]]
    if args.write_shapes and gemv_sweeps:
        write_shapes(args.write_shapes, report["device"], gemv_sweeps)
    print(f"{report['device']}: copy {report['bandwidth']['tb_s']:.2f} TB/s")
    for key in ("mma", "mma_pipe"):
        for line in mma_summary(report[key]) if isinstance(report.get(key), list) else []:
            print(line)
    for row in report.get("nf4", []) if isinstance(report.get("nf4"), list) else []:
        best = row.get("best", {})
        base = row["baselines"]
        bnb = base.get("bnb_matmul_4bit", {}).get("ms", float("nan"))
        deq = base.get("bnb_dequant_cublas", {}).get("ms", float("nan"))
        default = row["configs"].get("default", {})
        print(f"nf4 {row['shape']:8s} m={row['m']:4d} floor {row['floor_ms']:.4f} | cublas-bf16 "
              f"{base['cublas_bf16_ms']:.4f} bnb {bnb:.4f} deq+cublas {deq:.4f} | default "
              f"{default.get('ms', float('nan')):.4f} | best {best.get('config')} "
              f"{best.get('ms', float('nan')):.4f} ms "
              f"{best.get('tb_s', 0):.2f} TB/s err {best.get('rel_err', float('nan')):.1e}")
    for row in report.get("lut", []) if isinstance(report.get("lut"), list) else []:
        print(f"lut {row['shape']:8s} floor {row['floor_ms'] * 1e3:.1f} us | cublas-bf16 "
              f"{row['cublas_bf16_ms'] * 1e3:.1f} bnb {row['bnb_gemv_ms'] * 1e3:.1f} | default "
              f"{row['configs'].get('default')} | best {row.get('best')}")
    for row in gemv_sweeps:
        best = row.get("best", {})
        print(f"kmajor {row['shape']:8s} floor {row['floor_ms'] * 1e3:.1f} us | cublas-bf16 "
              f"{row['cublas_bf16_ms'] * 1e3:.1f} bnb {row['bnb_gemv_ms'] * 1e3:.1f} "
              f"({row['bytes'] / row['bnb_gemv_ms'] / 1e9:.2f} TB/s) | best "
              f"{best.get('config')} {best.get('ms', float('nan')) * 1e3:.1f} us {best.get('tb_s', 0):.2f} TB/s err "
              f"{best.get('rel_err', float('nan')):.1e} | epilogue {json.dumps(row.get('epilogue'))}")
    if isinstance(report.get("kmajor"), dict):
        print("kmajor", report["kmajor"])
    if isinstance(report.get("lut"), dict):
        print("lut", report["lut"])
    for line in cuda_summary(report):
        print(line)
    for section in ("lora", "prologue", "attention"):
        print(section, json.dumps(report.get(section)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
