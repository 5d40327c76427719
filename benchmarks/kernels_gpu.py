"""The engine's Triton kernels timed on one GPU against cuBLAS / SDPA and the bandwidth floor.

Phi-3-mini's projection shapes with random weights quantised by bitsandbytes (NF4, double quantisation).
For each shape and row count, every candidate tile configuration of the fused NF4 product is checked
against the plain-torch reference and timed (median of CUDA-event timings, rotating over enough weight
copies that the L2 cache cannot hold them); cuBLAS on the dequantised bf16 weight is the comparison. Also
the LoRA shrink + expand pair and decode attention at batch 1 and 64.

    python3 benchmarks/kernels_gpu.py --out /tmp/kernels.json      # on the GPU machine
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))  # after the installed package: the repo root holds a bare persona_router folder

log = logging.getLogger("kernels_gpu")
SHAPES = {"qkv": (9216, 3072), "o": (3072, 3072), "gate_up": (16384, 3072), "down": (3072, 8192)}
CANDIDATES = {
    1: [(16, 16, 256, 4, 3), (16, 32, 256, 4, 3), (16, 16, 512, 4, 3), (16, 32, 128, 4, 4), (16, 64, 256, 4, 3),
        (16, 16, 256, 2, 4)],
    16: [(16, 16, 256, 4, 3), (16, 32, 256, 4, 3), (16, 64, 128, 4, 3)],
    64: [(64, 32, 256, 4, 3), (32, 32, 256, 4, 3), (64, 64, 128, 4, 3), (16, 32, 256, 4, 3)],
    128: [(64, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 64, 128, 4, 3), (128, 128, 64, 8, 3)],
    2048: [(64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 128, 8, 3)],
}
COPIES = 6  # weight copies cycled through while timing (NF4 gate_up is 25 MB; six exceed the 60 MB L2)


def rel(got: Any, want: Any) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


def cycling(fns: list[Any]) -> Any:
    turn = itertools.cycle(fns)
    return lambda: next(turn)()


def nf4_cases(bandwidth: float) -> list[dict[str, Any]]:
    import bitsandbytes.functional as bnbf
    import torch
    import torch.nn.functional as F
    from persona_router.adapters.engine import nf4_kernels

    from benchmarks.serve_gpu import timed
    from tests.support.nf4 import FakeLinear4bit

    rows = []
    for name, (n, k) in SHAPES.items():
        weights, dense = [], []
        for _ in range(COPIES):
            w = (torch.randn(n, k, device="cuda") * 0.02).to(torch.bfloat16)
            packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            weight = nf4_kernels.nf4_weight([FakeLinear4bit(packed, state)])
            assert weight is not None
            weights.append(weight)
            dense.append(nf4_kernels.dequantize(weight, torch.bfloat16))
        for m, configs in CANDIDATES.items():
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = nf4_kernels.reference_matmul(x, weights[0])
            cublas = timed(cycling([lambda d=d, x=x: F.linear(x, d) for d in dense]))
            row: dict[str, Any] = {"shape": name, "n": n, "k": k, "m": m, "cublas_bf16_ms": cublas,
                                   "nf4_bytes": weights[0].nbytes, "floor_ms": weights[0].nbytes / bandwidth * 1e3,
                                   "configs": {}}
            for config in configs:
                try:
                    err = rel(nf4_kernels.nf4_matmul(x, weights[0], config=config), want)
                    ms = timed(cycling([lambda w=w, c=config, x=x: nf4_kernels.nf4_matmul(x, w, config=c)
                                        for w in weights]))
                except Exception as exc:  # a config that fails to compile is recorded, the others still run
                    log.exception("config %s failed", config)
                    row["configs"][str(config)] = {"error": f"{type(exc).__name__}: {exc}"}
                    continue
                row["configs"][str(config)] = {"ms": ms, "rel_err": err, "tflops": 2 * m * n * k / ms / 1e9,
                                               "gb_s": weights[0].nbytes / ms / 1e6}
            timed_ok = {c: v for c, v in row["configs"].items() if "ms" in v}
            if timed_ok:
                best = min(timed_ok, key=lambda c: timed_ok[c]["ms"])
                row["best"] = {"config": best, **timed_ok[best], "default": str(nf4_kernels._config(m, n, k))}
            rows.append(row)
            log.info("%s m=%d: cublas %.4f ms, best %s", name, m, cublas, row.get("best"))
    return rows


def lora_cases() -> list[dict[str, Any]]:
    import torch
    from persona_router.adapters.engine import lora_kernels

    from benchmarks.serve_gpu import timed

    rows = []
    k, n, capacity, rank = 3072, 9216, 8, 16
    a = torch.randn(capacity, rank, k, device="cuda", dtype=torch.bfloat16) / k ** 0.5
    bt = torch.randn(capacity, rank, n, device="cuda", dtype=torch.bfloat16) * 0.02
    scaling = torch.full((capacity + 1,), 2.0, device="cuda", dtype=torch.bfloat16)
    for m in (1, 64, 2048):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        slots = (torch.arange(m, device="cuda") % 4) + 1
        out = torch.zeros(m, n, device="cuda", dtype=torch.bfloat16)
        want = lora_kernels.reference(x, a, bt, slots, scaling)
        got = lora_kernels.expand_(out.clone(), lora_kernels.shrink(x, a, bt, slots, scaling))
        rows.append({"m": m, "rel_err": rel(got, want),
                     "shrink_ms": timed(lambda x=x, s=slots: lora_kernels.shrink(x, a, bt, s, scaling)),
                     "shrink_expand_ms": timed(lambda x=x, s=slots, o=out: lora_kernels.expand_(
                         o, lora_kernels.shrink(x, a, bt, s, scaling)))})
    return rows


def attention_cases(bandwidth: float) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F
    from persona_router.adapters.engine import attention_kernels

    from benchmarks.serve_gpu import timed

    rows = []
    heads, dim, cache_len, pos = 32, 96, 256, 160
    for n in (1, 64):
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
                     "kernel_ms": timed(lambda q=q, kn=k_new, vn=v_new, kc=k_cache, vc=v_cache, p=positions:
                                        attention_kernels.decode_attention(q, kn, vn, kc, vc, p, cache_len)),
                     "sdpa_masked_ms": timed(lambda q=q, kc=k_cache, vc=v_cache, mk=mask:
                                             F.scaled_dot_product_attention(q.unsqueeze(2), kc, vc, attn_mask=mk))})
    return rows


def main() -> int:
    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from benchmarks.serve_gpu import copy_bandwidth

    report: dict[str, Any] = {"device": torch.cuda.get_device_name(), "bandwidth": copy_bandwidth()}
    bandwidth = report["bandwidth"]["tb_s"] * 1e12
    for key, action in (("attention", lambda: attention_cases(bandwidth)), ("lora", lora_cases),
                        ("nf4", lambda: nf4_cases(bandwidth))):
        try:
            report[key] = action()
        except Exception as exc:  # keep the other sections
            log.exception("%s failed", key)
            report[key] = {"error": f"{type(exc).__name__}: {exc}"}
        args.out.write_text(json.dumps(report, indent=1))
    print(f"{report['device']}: copy {report['bandwidth']['tb_s']:.2f} TB/s")
    for row in report.get("nf4", []) if isinstance(report.get("nf4"), list) else []:
        best = row.get("best", {})
        print(f"nf4 {row['shape']:8s} m={row['m']:5d} cublas {row['cublas_bf16_ms']:.4f} ms | "
              f"best {best.get('config')} "
              f"{best.get('ms', float('nan')):.4f} ms err {best.get('rel_err', float('nan')):.1e} "
              f"{best.get('gb_s', 0):.0f} GB/s {best.get('tflops', 0):.0f} TF/s | floor {row['floor_ms']:.4f} | "
              f"default {best.get('default')}")
    for section in ("lora", "attention"):
        print(section, json.dumps(report.get(section)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
