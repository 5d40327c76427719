"""The in-process engine vs the gateway over one vLLM upstream vs over two: same workload, one run.

Each configuration is a fresh ``persona-router serve`` process on loopback (``--router fallback``, every
request names its persona) over the same adapters folder; the vLLM configurations start their upstreams
with the same command as ``persona-router vllm-serve`` (fp32, from ``.venv-vllm``), one upstream on all
cores or two upstreams pinned to one core each (the CPU analogue of one upstream per GPU: the total compute
is the same). The workload: ``--requests`` greedy ``/v1/answer`` requests at ``--concurrency``, personas and
questions cycling, ``--max-new-tokens`` each, after one untimed warm-up request per persona. It writes wall
time, requests/s, completion tokens/s and p50/p95 latency per configuration, the ratios to the in-process
engine, the CPU model and the load average before and after each configuration.

    PERSONA_ROUTER_HOME=... .venv/bin/python benchmarks/vllm_gateway.py --out benchmarks/results/vllm_gateway_cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "vllm_gateway_cpu.json"
PERSONAS = (("student", 21), ("clinician", 22), ("engineer", 23))


def questions() -> list[str]:
    text = (ROOT / "core" / "demo_data" / "parallel_questions.txt").read_text(encoding="utf-8")
    return [q.strip() for q in text.splitlines() if q.strip()]


def free_port() -> int:
    from tests.integration.service_support import free_port as pick

    return pick()


def wait_http(url: str, process: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited ({process.returncode}): {log.read_text(errors='replace')[-2000:]}")
        try:
            if httpx.get(url, timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s: {log.read_text(errors='replace')[-2000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)


def start_upstreams(count: int, base_dir: Path, python: str, logs: Path) -> list[tuple[str, subprocess.Popen[bytes]]]:
    from persona_router.cli.vllm_serve import vllm_command, vllm_env

    cores = os.cpu_count() or 1
    binds = [f"0-{cores - 1}"] if count == 1 else [str(i % cores) for i in range(count)]
    started = []
    for bind in binds:
        port = free_port()
        command = vllm_command(python, base_dir, host="127.0.0.1", port=port, served_name="base", adapters={},
                               extra=["--max-num-seqs", "8"])
        env = vllm_env("127.0.0.1", {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": bind})
        log = logs / f"vllm-{port}.log"
        with open(log, "wb") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        started.append((f"http://127.0.0.1:{port}", process))
    for url, process in started:
        wait_http(f"{url}/v1/models", process, 900, logs / f"vllm-{url.rsplit(':', 1)[1]}.log")
    return started


def start_service(adapters: Path, logs: Path, engine: str, upstreams: list[str],
                  max_in_flight: int) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    command = [sys.executable, "-m", "persona_router", "-q", "serve", "--port", str(port), "--adapters", str(adapters),
               "--router", "fallback", "--engine", engine, "--watch-interval", "0", "--max-batch", "8",
               "--timeout", "900"]
    for url in upstreams:
        command += ["--upstream", url]
    if upstreams:
        command += ["--upstream-max-inflight", str(max_in_flight)]
    log = logs / f"serve-{engine}-{len(upstreams)}.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_http(f"{url}/ready", process, 900, log)
    return url, process


async def workload(url: str, n: int, concurrency: int, max_tokens: int) -> dict[str, Any]:
    pool = questions()
    plan = [(PERSONAS[i % len(PERSONAS)][0], pool[(i * 7) % len(pool)]) for i in range(n)]
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    tokens = 0
    failures: list[str] = []

    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        for persona, _ in PERSONAS:  # warm-up, untimed: one request per adapter
            (await client.post("/v1/answer", json={"question": "hello", "persona": persona,
                                                   "max_new_tokens": 4})).raise_for_status()

        async def one(persona: str, question: str) -> None:
            nonlocal tokens
            async with gate:
                started = time.perf_counter()
                response = await client.post("/v1/answer", json={"question": question, "persona": persona,
                                                                  "max_new_tokens": max_tokens})
                if response.status_code != 200:
                    failures.append(f"{response.status_code}: {response.text[:200]}")
                    return
                latencies.append(time.perf_counter() - started)
                tokens += response.json()["usage"]["completion_tokens"]

        started = time.perf_counter()
        await asyncio.gather(*(one(p, q) for p, q in plan))
        wall = time.perf_counter() - started
    ordered = sorted(latencies)

    def pct(q: float) -> float | None:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3) if ordered else None

    return {"requests": n, "ok": len(latencies), "failures": failures, "wall_s": round(wall, 2),
            "requests_per_s": round(len(latencies) / wall, 3), "completion_tokens": tokens,
            "completion_tokens_per_s": round(tokens / wall, 2), "latency_p50_s": pct(0.5), "latency_p95_s": pct(0.95),
            "latency_mean_s": round(statistics.fmean(ordered), 3) if ordered else None}


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()
    return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    parser.add_argument("--configs", default="in-process,vllm-1,vllm-2")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    from persona_router.adapters.offline_default import ensure_offline_default

    from tests.integration.service_support import AdapterFactory

    base_dir = ensure_offline_default()
    work = Path(tempfile.mkdtemp(prefix="vllm-gateway-bench-"))
    factory = AdapterFactory(base_dir, work / "adapters")
    for persona, seed in PERSONAS:
        factory.publish(persona, seed=seed)
    del factory
    results: dict[str, Any] = {}
    for config in args.configs.split(","):
        load_before = [round(x, 2) for x in os.getloadavg()]
        upstreams: list[tuple[str, subprocess.Popen[bytes]]] = []
        service = None
        try:
            if config == "in-process":
                url, service = start_service(work / "adapters", work, "fast", [], 8)
            else:
                count = int(config.split("-")[1])
                upstreams = start_upstreams(count, base_dir, args.vllm_python, work)
                url, service = start_service(work / "adapters", work, "vllm", [u for u, _ in upstreams],
                                             8 if count == 1 else max(1, 8 // count))
            print(f"{config}: running {args.requests} requests", flush=True)
            result = asyncio.run(workload(url, args.requests, args.concurrency, args.max_new_tokens))
        finally:
            if service is not None:
                stop(service)
            for _, process in upstreams:
                stop(process)
        result["load_average_before"] = load_before
        result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        results[config] = result
        print(config, json.dumps(result), flush=True)
    base = results.get("in-process")
    if base:
        for result in results.values():
            result["throughput_vs_in_process"] = round(result["completion_tokens_per_s"]
                                                       / base["completion_tokens_per_s"], 3)
            if result["latency_p50_s"] and base["latency_p50_s"]:
                result["p50_vs_in_process"] = round(result["latency_p50_s"] / base["latency_p50_s"], 3)
    report = {
        "benchmark": "vllm_gateway", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
        "workload": {"requests": args.requests, "concurrency": args.concurrency,
                     "max_new_tokens": args.max_new_tokens, "personas": [p for p, _ in PERSONAS],
                     "adapters": "random rank-4 LoRA on every linear layer (as the tests use), fp32",
                     "base": "smollm2-135m-instruct (offline default, Phi-3 layout)", "decoding": "greedy"},
        "configs": {"in-process": "persona-router serve --engine fast (max batch 8, 2 threads)",
                    "vllm-1": "serve --engine vllm over 1 vllm-cpu 0.32.0 upstream on cores 0-1 (fp32, max-num-seqs 8)",
                    "vllm-2": "serve --engine vllm over 2 vllm-cpu upstreams, one core each (fp32, max-num-seqs 8 "
                              "each), --upstream-max-inflight 4"},
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 0 if all(not r["failures"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
