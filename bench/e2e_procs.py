"""bench/e2e's orchestrator side of its processes: the server it measures through, and
the client processes (``python -m bench.e2e --worker``) it runs, alone or kept in step.

Shared by bench/e2e.py and bench/e2e_rotation.py, so both measure through the same
server configured the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import (
    NO_LIMITS,
    REPO,
    BenchError,
    Server,
    bench_config,
    launch_shtalk,
    run_child,
)

WORKER = ["-m", "bench.e2e", "--worker"]


def start_server(work: Path) -> Server:
    """The real server, like `bench.fanout.start_shtalk` (fresh data directory, bcrypt cost
    10, 1000 connections per address), accounts active at once (no email code, no
    CAPTCHA: the closed-deployment switches the system tests use too) and the abuse
    defences off: 50 accounts sending
    hundreds of messages per second from one address and fetching 49 pre-key bundles each
    are exactly what the per-account/per-address token buckets and the monitor throttle.
    This benchmark measures the message path, not those defences."""
    return launch_shtalk(work, "e2e", bench_config(10, limits=NO_LIMITS), label="shtalk")


def run_worker(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    """One scenario in a fresh client process; its result."""
    return run_child(WORKER, spec, timeout, f"client process ({spec['scenario']})",
                     show_stderr=True)


def spawn_worker(spec: dict[str, Any]) -> subprocess.Popen[str]:
    """A client process that will stop at barriers (`read_step`, `go`)."""
    p = subprocess.Popen(
        [sys.executable, *WORKER], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=None, env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=str(REPO), text=True,
    )
    assert p.stdin is not None
    p.stdin.write(json.dumps(spec) + "\n")
    p.stdin.flush()
    return p


def read_step(p: subprocess.Popen[str]) -> tuple[str, dict[str, Any]]:
    """The next ``STEP name {json}`` (or ``RESULT {json}``) line of a client process."""
    assert p.stdout is not None
    while True:
        line = p.stdout.readline()
        if not line:
            raise BenchError(f"client process {p.pid} exited {p.wait()}")
        if line.startswith("STEP "):
            name, _, data = line[5:].partition(" ")
            return name, json.loads(data)
        if line.startswith("RESULT "):
            return "RESULT", json.loads(line[7:])


def go(p: subprocess.Popen[str], data: dict[str, Any]) -> None:
    assert p.stdin is not None
    p.stdin.write("GO " + json.dumps(data) + "\n")
    p.stdin.flush()
