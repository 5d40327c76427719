"""Latency of one routing decision (embed + classify + calibrate) per encoder backend, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/route_latency.py

For each backend (torch, onnx, onnx-int8 by default) it loads the demo router fitted on that backend (fitting
it first into ``$PERSONA_ROUTER_HOME/router-bench/<backend>`` if missing), scores the held-out split, warms
up, then times single decisions with the backends interleaved question by question (so load from other
processes hits them alike), and batched routing. One thread everywhere: torch's and ONNX Runtime's.
Writes ``benchmarks/results/route_latency.json`` with p50/p95 per backend, their ratios to torch, held-out
macro-F1 per backend and the machine (CPU model, bf16/VNNI flags, load average before and after).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from machine import cpu_model  # benchmarks/ is on sys.path when a benchmark runs as a script

RESULTS = Path(__file__).resolve().parent / "results" / "route_latency.json"
FLAGS = ("avx512_bf16", "amx_bf16", "amx_int8", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", default="demo")
    parser.add_argument("--backends", default="torch,onnx,onnx-int8")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the questions (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from persona_router.core.atomic import atomic_write_json
    from persona_router.core.home import home_dir
    from persona_router.core.pack import load_pack
    from persona_router.core.rows import demo_routing
    from persona_router.router.fitting import ensure_router, evaluate

    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    pack = load_pack(args.pack)
    routers, load_s, quality = {}, {}, {}
    for backend in backends:
        started = time.perf_counter()
        routers[backend] = ensure_router(pack, path=home_dir() / "router-bench" / backend, backend=backend)
        load_s[backend] = round(time.perf_counter() - started, 2)
        report = evaluate(routers[backend], demo_routing("test"), title="held-out")
        quality[backend] = {"macro_f1": report.macro_f1, "accuracy": report.accuracy, "coverage": report.coverage,
                            "argmax_macro_f1": report.argmax_macro_f1}
    # Only the questions' text is used, as realistic inputs; nothing is fitted on them.
    questions = [r.question for r in demo_routing("test")]
    load_before = os.getloadavg()
    for question in questions[: args.warmup]:
        for router in routers.values():
            router.decide(question)
    wall: dict[str, list[float]] = {b: [] for b in backends}
    cpu: dict[str, list[float]] = {b: [] for b in backends}
    for _ in range(args.repeats):
        for question in questions:
            for backend, router in routers.items():
                t0, c0 = time.perf_counter(), time.process_time()
                router.decide(question)
                wall[backend].append((time.perf_counter() - t0) * 1000)
                cpu[backend].append((time.process_time() - c0) * 1000)
    batch = {}
    for backend, router in routers.items():
        t0 = time.perf_counter()
        router.decide_batch(questions)
        seconds = time.perf_counter() - t0
        batch[backend] = {"questions": len(questions), "seconds": round(seconds, 3),
                          "questions_per_s": round(len(questions) / seconds, 1)}
    single = {b: {"p50": round(_percentile(v, 50), 3), "p95": round(_percentile(v, 95), 3),
                  "mean": round(statistics.fmean(v), 3), "n": len(v)} for b, v in wall.items()}
    result: dict[str, Any] = {
        "single_decision_ms": single,
        # CPU time of this process per decision: less sensitive than wall time to other processes' load.
        "single_decision_cpu_ms": {b: {"p50": round(_percentile(v, 50), 3), "p95": round(_percentile(v, 95), 3)}
                                   for b, v in cpu.items()},
        "speedup_vs_torch": {b: {q: round(single["torch"][q] / single[b][q], 2) for q in ("p50", "p95")}
                             for b in backends if "torch" in single},
        "held_out": quality,
        "batch": batch,
        "router_load_s": load_s,
        "router": {b: {"classifier": r.info.get("classifier"), "embedder": r.encoder.model_id,
                       "encoder_fingerprint": r.encoder.fingerprint} for b, r in routers.items()},
        "machine": _machine(torch, load_before),
    }
    atomic_write_json(args.out, result)
    for backend in backends:
        sys.stdout.write(f"{backend}: p50 {single[backend]['p50']:.2f} ms, p95 {single[backend]['p95']:.2f} ms over "
                         f"{single[backend]['n']} decisions; held-out macro-F1 {quality[backend]['macro_f1']}; "
                         f"batch {batch[backend]['questions_per_s']} q/s\n")
    sys.stdout.write(f"speed-up vs torch: {result.get('speedup_vs_torch')}; wrote {args.out}\n")
    return 0


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _machine(torch: Any, load_before: tuple[float, float, float]) -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "cpu_flags": {flag: flag in _cpu_flags() for flag in FLAGS},
        "torch_threads": torch.get_num_threads(),
        "onnxruntime_threads": 1,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()



if __name__ == "__main__":
    sys.exit(main())
