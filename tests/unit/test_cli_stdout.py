"""``--json`` commands keep stdout for results: library prints and native writes to fd 1 go to stderr."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def test_only_results_reach_stdout_inside_stdout_for_results() -> None:
    script = textwrap.dedent("""
        import os, sys
        from persona_router.cli.main import stdout_for_results

        print("before", flush=True)
        with stdout_for_results() as out:
            os.write(1, b"native library noise\\n")  # e.g. a C extension writing to file descriptor 1
            print("python library noise")  # e.g. a library's print()
            sys.stdout.write("more noise\\n")
            out.write('{"result": 1}\\n')
            out.write('{"result": 2}\\n')
        print("after", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.splitlines() == ["before", '{"result": 1}', '{"result": 2}', "after"]
    assert "native library noise" in done.stderr and "python library noise" in done.stderr
    assert "more noise" in done.stderr


def test_personas_json_is_pure_json_on_stdout() -> None:
    done = subprocess.run([sys.executable, "-m", "persona_router", "personas", "--json"], capture_output=True,
                          text=True, timeout=120, check=True)
    assert json.loads(done.stdout)[0]["name"] == "student"
