"""Latency of one routing decision (embed + classify + calibrate), after warm-up, model load excluded.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/route_latency.py

Writes ``benchmarks/results/route_latency.json`` with p50/p95 of single decisions, batched throughput and
the machine it ran on (including the load average, since other processes on the machine skew timings).
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

RESULTS = Path(__file__).resolve().parent / "results" / "route_latency.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pack", default="demo")
    parser.add_argument("--router", default=None, help="router folder (default: the pack's, fitted if missing)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="passes over the questions (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from persona_router.core.atomic import atomic_write_json
    from persona_router.core.pack import load_pack
    from persona_router.core.rows import demo_routing
    from persona_router.router.fitting import ensure_router
    from persona_router.router.persona_router import PersonaRouter

    load_before = os.getloadavg()
    started = time.perf_counter()
    pack = load_pack(args.pack)
    router = PersonaRouter.load(args.router, pack=pack) if args.router else ensure_router(pack)
    load_s = time.perf_counter() - started
    # Only the questions' text is used, as realistic inputs; nothing is fitted on them.
    questions = [r.question for r in demo_routing("test")]
    for question in questions[: args.warmup]:
        router.decide(question)
    single_ms, cpu_ms = [], []
    for _ in range(args.repeats):
        for question in questions:
            t0, c0 = time.perf_counter(), time.process_time()
            router.decide(question)
            single_ms.append((time.perf_counter() - t0) * 1000)
            cpu_ms.append((time.process_time() - c0) * 1000)
    t0 = time.perf_counter()
    router.decide_batch(questions)
    batch_s = time.perf_counter() - t0
    result: dict[str, Any] = {
        "single_decision_ms": {"p50": round(_percentile(single_ms, 50), 3), "p95": round(_percentile(single_ms, 95), 3),
                               "mean": round(statistics.fmean(single_ms), 3), "n": len(single_ms)},
        # CPU time of this process per decision: less sensitive than wall time to other processes' load.
        "single_decision_cpu_ms": {"p50": round(_percentile(cpu_ms, 50), 3), "p95": round(_percentile(cpu_ms, 95), 3)},
        "batch": {"questions": len(questions), "seconds": round(batch_s, 3),
                  "questions_per_s": round(len(questions) / batch_s, 1)},
        "router_load_s": round(load_s, 2),
        "router": {"classifier": router.info.get("classifier"), "embedder": router.encoder.model_id},
        "machine": _machine(torch, load_before),
    }
    atomic_write_json(args.out, result)
    single = result["single_decision_ms"]
    sys.stdout.write(f"p50 {single['p50']:.2f} ms, p95 {single['p95']:.2f} ms over {single['n']} decisions "
                     f"(CPU time p50 {result['single_decision_cpu_ms']['p50']:.2f} ms); "
                     f"batch {result['batch']['questions_per_s']} q/s; wrote {args.out}\n")
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
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "loadavg_before": [round(v, 2) for v in load_before],
        "loadavg_after": [round(v, 2) for v in os.getloadavg()],
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
