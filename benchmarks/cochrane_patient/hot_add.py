"""Hot-add the `patient` persona to a running `persona-router serve` on the offline base, and record what it answers.

Steps (each response is written to the JSON log): start `serve --pack user` without `patient`; `persona add
patient` (the server reloads the pack and refits its router by itself); ask by name and without a persona
(prompt-only); publish a trained adapter folder into the served adapters folder the way `train` publishes
(staged copy, rename, then LATEST); ask again (now with the adapter); `persona remove patient` (404).

    python benchmarks/cochrane_patient/hot_add.py --adapter /path/to/adapters/patient/1 --test test.jsonl \
        --out benchmarks/results/cochrane_patient/hot_add.json

The server binds 127.0.0.1 on a free port and is stopped at the end. Uses $PERSONA_ROUTER_HOME.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
DESCRIPTION = ("Patients and their families who want to know, in plain everyday words, what the research on a "
               "treatment found and what it means for them.")
SYSTEM_PROMPT = ("You are a health writer answering a patient or a family member. Explain what the research found "
                 "in plain, everyday words: short sentences, no statistics or jargon (say what any medical term "
                 "means), how sure the evidence is, and what it means for people like them.")
ROUTED = "my doctor wants me to try a new blood pressure pill, what did the studies find?"


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "persona_router", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"persona-router {' '.join(args)} failed: {done.stderr}")
    return done.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait(predicate: Any, timeout_s: float, what: str) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.5)
    raise SystemExit(f"timed out after {timeout_s} s waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--adapter", type=Path, required=True, help="a trained patient adapter version folder")
    parser.add_argument("--test", type=Path, required=True, help="test.jsonl from prepare.py (one row is asked)")
    parser.add_argument("--served-adapters", type=Path, default=None,
                        help="adapters folder the server reads (default: a fresh one under $PERSONA_ROUTER_HOME)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    from persona_router.adapters.registry import AdapterRegistry
    from persona_router.core.home import home_dir

    served = args.served_adapters or home_dir() / "hot-add-adapters"
    shutil.rmtree(served, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    add = ("persona", "add", "patient", "--description", DESCRIPTION, "--system-prompt", SYSTEM_PROMPT,
           "--examples", str(HERE / "examples.txt"))
    cli(*add, "--replace")  # makes sure the user pack exists (created from the demo pack when missing) ...
    cli("persona", "remove", "patient")  # ... and the server starts without the persona
    row = json.loads(args.test.read_text(encoding="utf-8").splitlines()[0])
    log: dict[str, Any] = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "steps": []}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = open(args.out.with_suffix(".server.log"), "w", encoding="utf-8")  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "persona_router", "serve", "--pack", "user", "--port", str(port),
                                "--adapters", str(served), "--watch-interval", "1"],
                               stdout=server_log, stderr=subprocess.STDOUT, env=os.environ.copy())
    client = httpx.Client(base_url=url, timeout=600)

    def step(name: str, **data: Any) -> None:
        log["steps"].append({"step": name, "t": round(time.monotonic() - t0, 1), **data})
        print(json.dumps(log["steps"][-1])[:300], flush=True)

    def ask(question: str, persona: str | None, context: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"question": question, "max_new_tokens": args.max_new_tokens}
        if persona:
            body["persona"] = persona
        if context:
            body["context"] = context[:1000]
        response = client.post("/v1/answer", json=body)
        payload = response.json()
        return {"status": response.status_code, "decision": payload.get("decision"), "adapter": payload.get("adapter"),
                "answer": payload.get("answer"), "error": payload.get("error")}

    def personas() -> dict[str, Any]:
        return {p["name"]: p for p in client.get("/v1/personas").json()["personas"]}

    t0 = time.monotonic()
    try:
        wait(lambda: _ready(client), 900, "the server to be ready")
        step("server ready", personas=sorted(personas()))
        step("unknown before add", **ask(row["question"], "patient"))
        step("persona add", output=cli(*add))
        waited = wait(lambda: "patient" in personas(), 600, "the server to reload the pack")
        step("pack reloaded", waited_s=round(waited, 1), patient=personas()["patient"])
        step("named, prompt-only", **ask(row["question"], "patient", row["context"]))
        step("inferred", **ask(ROUTED, None))
        registry = AdapterRegistry(served)
        with registry.lock("patient"):
            staged = registry.staging_dir("patient")
            for path in args.adapter.iterdir():
                if path.is_file():
                    shutil.copy2(path, staged / path.name)
            version = registry.publish("patient", staged)
        step("adapter published", version=version, source=str(args.adapter))
        waited = wait(lambda: personas()["patient"]["status"] == "adapter", 300, "the adapter to load")
        step("adapter live", waited_s=round(waited, 1), patient=personas()["patient"])
        step("named, with adapter", **ask(row["question"], "patient", row["context"]))
        step("inferred, with adapter", **ask(ROUTED, None))
        step("persona remove", output=cli("persona", "remove", "patient"))
        waited = wait(lambda: "patient" not in personas(), 600, "the server to drop the persona")
        step("pack reloaded", waited_s=round(waited, 1), personas=sorted(personas()))
        step("named after remove", **ask(row["question"], "patient"))
    finally:
        client.close()
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        server_log.close()
    args.out.write_text(json.dumps(log, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return 0


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("/ready").status_code == 200
    except httpx.TransportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
