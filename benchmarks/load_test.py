"""Bounded loopback load test of the HTTP service: N mixed requests at a fixed concurrency.

By default it starts ``persona-router serve`` on a free loopback port (offline default base, fitted
router, the given adapters folder), waits for ``/ready``, sends the requests and stops the server; with
``--url`` it targets a server that is already running. The mix: every demo persona named explicitly and
``auto`` routing, ``/v1/answer`` plain and streamed, and ``/v1/chat/completions``; all greedy.

It records every request's status and latency and writes p50/p95/p99 latency, throughput (requests/s and
completion tokens/s), time to first token of the streamed requests, and failures (any non-200, any
transport error, any request that got no complete answer) to a JSON file. It exits 1 if anything failed.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/load_test.py            # 200 requests, concurrency 16
    .venv/bin/python benchmarks/load_test.py --url http://127.0.0.1:8000 --requests 50
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from machine import cpu_model  # benchmarks/ is on sys.path when a benchmark runs as a script

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "load_test_cpu.json"
PERSONAS = (None, "student", "clinician", "educator", "engineer", "general-reader")
KINDS = ("answer", "answer-stream", "chat")


@dataclass
class Outcome:
    index: int
    kind: str
    persona: str | None
    status: int
    latency_s: float
    first_token_s: float | None
    completion_tokens: int
    error: str | None = None


def questions() -> list[str]:
    lines = (ROOT / "core" / "demo_data" / "parallel_questions.txt").read_text(encoding="utf-8").splitlines()
    routed = [json.loads(line)["question"] for line in
              (ROOT / "core" / "demo_data" / "routing_test.jsonl").read_text(encoding="utf-8").splitlines()
              if line.strip()]
    return [q.strip() for q in lines + routed if q.strip()]


def plan(n: int) -> list[tuple[int, str, str | None, str]]:
    """A deterministic mix: kinds and personas cycle at coprime periods so every pairing occurs."""
    pool = questions()
    return [(i, KINDS[i % len(KINDS)], PERSONAS[i % len(PERSONAS)], pool[(i * 7) % len(pool)]) for i in range(n)]


async def one(client: httpx.AsyncClient, item: tuple[int, str, str | None, str], max_tokens: int) -> Outcome:
    index, kind, persona, question = item
    started = time.perf_counter()
    try:
        if kind == "chat":
            model = f"persona:{persona or 'auto'}"
            response = await client.post("/v1/chat/completions", json={
                "model": model, "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens})
            body = response.json()
            tokens = body["usage"]["completion_tokens"] if response.status_code == 200 else 0
            return Outcome(index, kind, persona, response.status_code, time.perf_counter() - started, None, tokens,
                           None if response.status_code == 200 else body.get("error", {}).get("message"))
        payload: dict[str, Any] = {"question": question, "max_new_tokens": max_tokens}
        if persona:
            payload["persona"] = persona
        if kind == "answer":
            response = await client.post("/v1/answer", json=payload)
            body = response.json()
            tokens = body["usage"]["completion_tokens"] if response.status_code == 200 else 0
            return Outcome(index, kind, persona, response.status_code, time.perf_counter() - started, None, tokens,
                           None if response.status_code == 200 else body.get("error", {}).get("message"))
        return await _stream(client, index, persona, {**payload, "stream": True}, started)
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        return Outcome(index, kind, persona, 0, time.perf_counter() - started, None, 0, f"{type(exc).__name__}: {exc}")


async def _stream(client: httpx.AsyncClient, index: int, persona: str | None, payload: dict[str, Any],
                  started: float) -> Outcome:
    first: float | None = None
    done: dict[str, Any] | None = None
    error = None
    async with client.stream("POST", "/v1/answer", json=payload) as response:
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                if event == "token" and first is None:
                    first = time.perf_counter() - started
                elif event == "done":
                    done = json.loads(line[6:])
                elif event == "error":
                    error = json.loads(line[6:])["error"]["message"]
        status = response.status_code
    if done is None and error is None:
        error = "the stream ended without a done event"
    tokens = done["usage"]["completion_tokens"] if done else 0
    return Outcome(index, "answer-stream", persona, status if error is None else 599, time.perf_counter() - started,
                   first, tokens, error)


async def run(url: str, n: int, concurrency: int, max_tokens: int) -> tuple[list[Outcome], float]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    semaphore = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def bounded(item: tuple[int, str, str | None, str]) -> Outcome:
            async with semaphore:
                return await one(client, item, max_tokens)

        started = time.perf_counter()
        outcomes = await asyncio.gather(*(bounded(item) for item in plan(n)))
        return list(outcomes), time.perf_counter() - started


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summarise(outcomes: list[Outcome], wall_s: float, n: int) -> dict[str, Any]:
    ok = [o for o in outcomes if o.status == 200 and o.error is None]
    latencies = [o.latency_s for o in ok]
    firsts = [o.first_token_s for o in ok if o.first_token_s is not None]
    tokens = sum(o.completion_tokens for o in ok)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 1)

    return {
        "requests": n, "completed": len(ok), "failed": len(outcomes) - len(ok), "lost": n - len(outcomes),
        "failures": [asdict(o) for o in outcomes if o not in ok][:20],
        "wall_s": round(wall_s, 2),
        "throughput_rps": round(len(ok) / wall_s, 3), "completion_tokens": tokens,
        "completion_tokens_per_s": round(tokens / wall_s, 2),
        "latency_ms": {"p50": ms(percentile(latencies, 0.5)), "p95": ms(percentile(latencies, 0.95)),
                       "p99": ms(percentile(latencies, 0.99)), "max": ms(max(latencies, default=None)),
                       "mean": ms(statistics.fmean(latencies) if latencies else None)},
        "stream_first_token_ms": {"p50": ms(percentile(firsts, 0.5)), "p95": ms(percentile(firsts, 0.95))},
        "by_kind": {kind: sum(1 for o in ok if o.kind == kind) for kind in KINDS},
    }



def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, "-m", "persona_router", "-q", "serve", "--port", str(port), "--base", args.base,
               "--engine", args.engine, "--max-batch", str(args.max_batch), "--watch-interval", "0"]
    if args.adapters:
        command += ["--adapters", str(args.adapters)]
    command += args.serve_arg
    process = subprocess.Popen(command, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode} during start-up")
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not become ready within 900 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="target a running server instead of starting one")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32, help="max_new_tokens per request (default: 32)")
    parser.add_argument("--base", default="smollm2-135m-instruct")
    parser.add_argument("--engine", default="auto", choices=("auto", "fast", "reference"))
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--serve-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for the started server (repeatable), e.g. --serve-arg=--quantization=fp32")
    parser.add_argument("--adapters", type=Path, default=None, help="adapters folder for the started server")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--note", default="", help="free text stored with the result (e.g. machine load)")
    args = parser.parse_args()
    if not 1 <= args.requests <= 10_000 or not 1 <= args.concurrency <= 256:
        parser.error("--requests must be in 1..10000 and --concurrency in 1..256")
    process = None
    url = args.url
    load_at_start = list(os.getloadavg())
    if url is None:
        process, url = start_server(args)
    try:
        ready = httpx.get(f"{url}/ready", timeout=30).json()
        personas = httpx.get(f"{url}/v1/personas", timeout=30).json()["personas"]
        outcomes, wall_s = asyncio.run(run(url, args.requests, args.concurrency, args.max_tokens))
        metrics_text = httpx.get(f"{url}/metrics", timeout=30).text
    finally:
        if process is not None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)
    result = {
        "benchmark": "load_test", "created": datetime.now(UTC).isoformat(timespec="seconds"), "note": args.note,
        "load_average_at_start": load_at_start, "load_average_at_end": list(os.getloadavg()),
        "config": {"requests": args.requests, "concurrency": args.concurrency, "max_new_tokens": args.max_tokens,
                   "serve_args": args.serve_arg,
                   "greedy": True, "mix": {"kinds": list(KINDS), "personas": [p or "auto" for p in PERSONAS]}},
        "server": {"url": url, **ready, "adapters": {p["name"]: p["live_version"] for p in personas}},
        "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(),
                    "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                    "persona_router_threads": os.environ.get("PERSONA_ROUTER_THREADS")},
        **summarise(outcomes, wall_s, args.requests),
        "server_errors_metric": [line for line in metrics_text.splitlines()
                                 if line.startswith("persona_router_errors_total")],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    tmp.replace(args.out)
    print(json.dumps({k: result[k] for k in ("completed", "failed", "lost", "wall_s", "throughput_rps",
                                             "completion_tokens_per_s", "latency_ms")}, indent=2))
    return 0 if result["failed"] == 0 and result["lost"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
