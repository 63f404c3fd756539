"""Pre-handshake flood benchmark: silent sockets against legitimate logins, and memory.

    .venv/bin/python -m bench.flood                 # both servers, ~3-6 minutes
    .venv/bin/python -m bench.flood --no-baseline   # this checkout only, ~1.5 minutes

What it does (everything on 127.0.0.1 and 127.0.0.2-101, bounded in time):

1. Starts the real server (``twistd -n shtalk``) from this checkout, with its defaults
   for everything the flood touches (bcrypt cost 12, every connection limit, TLS), a
   fresh data directory and one account made by the benchmark.  Logs in a few times to
   warm up, waits for it to go idle and reads its RSS ("before").
2. Starts the attacker (`bench.floodattack`, its own process): ``--sockets`` (2,000)
   TCP connections from ``--addresses`` (100) source addresses, 127.0.0.2 ... 101,
   that never send a byte, plus ``--rate`` (8) new ones per second, all held open.
3. Meanwhile a legitimate client (Python's ``ssl``, the server's certificate pinned by
   fingerprint, from 127.0.0.1) connects, completes TLS, sends ``hello`` and a password
   ``login``, and waits for the login reply, ``--tries`` (50) times one after the other.
   Each try is timed from ``connect`` to the login reply (10 s at most).
4. The attacker stops opening sockets but keeps holding every one it has; the server's
   RSS is read once the server is back to the file descriptors it had before the flood
   ("after, attacker still holding"), then again after the attacker closed everything.
5. Runs the same scenario against the server before the flood defences (``--baseline``,
   a git revision extracted with ``git archive``; its config gets the same keys), in the
   same run, and writes the section "Pre-handshake flood (bench/flood)" of
   ``docs/PERFORMANCE.md`` (unless ``--no-docs``).

Targets: p99 of TLS + login <= 1 s over the tries, and the RSS after within
10 % of the RSS before.  The machine is shared: the CPU used by every other process
during the flood is measured and reported; a run where it is high was disturbed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import (
    DOC,
    LIFTED_LIMITS,
    REPO,
    Server,
    extract,
    fingerprint,
    launch_shtalk,
    logger,
    machine,
    record,
    terminate,
)
from bench.cpu import cpu_seconds_of, grown, least_disturbed, other_processes_cpu, wait_idle
from tests.harness import open_fds, rss_kib

SECTION = "## Pre-handshake flood (bench/flood)"
#: The server before the flood defences (the handshake slots and the per-address cap).
BASELINE = "61e3044"
PASSWORD = "tangerine-quokka-43"
P99_TARGET = 1.0
RSS_TARGET = 0.10
TRY_TIMEOUT = 10.0
log = logger("flood")


# --- the server ---------------------------------------------------------------------------


def start_server(work: Path, name: str, repo: Path) -> Server:
    """Defaults for all the flood is about; account set-up and limits the tries would hit
    (50 logins from 127.0.0.1 in a minute) lifted, as bench/fanout does."""
    cfg = (
        "[accounts]\n"
        "bcrypt_cost = 12\n"
        "require_email_verification = false\n"
        "require_captcha = false\n"
        + LIFTED_LIMITS
    )
    return launch_shtalk(work, name, cfg, repo=repo)


# --- the legitimate client ----------------------------------------------------------------


class Legit:
    """TLS with the certificate pinned, then hello and login: what a real client does."""

    def __init__(self, port: int, fingerprint: str, username: str) -> None:
        self.port = port
        self.pin = bytes.fromhex(fingerprint.replace(":", ""))
        self.username = username
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        self.ctx.check_hostname = False
        self.ctx.verify_mode = ssl.CERT_NONE  # pinned below, as shtalk's clients do

    def exchange(self, requests: list[dict[str, Any]], timeout: float) -> dict[str, Any]:
        """Connect, send ``requests``, wait for the reply to the last; timings in seconds."""
        start = time.monotonic()
        deadline = start + timeout
        out: dict[str, Any] = {"ok": False}
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with self.ctx.wrap_socket(raw, server_hostname="localhost") as tls:
                    out["tls_s"] = time.monotonic() - start
                    der = tls.getpeercert(binary_form=True) or b""
                    if hashlib.sha256(der).digest() != self.pin:
                        out["error"] = "certificate does not match the pin"
                        return out
                    tls.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in requests))
                    reply = self._reply(tls, requests[-1]["id"], deadline)
            out["reply"] = reply
            out["ok"] = bool(reply.get("ok"))
            if not out["ok"]:
                out["error"] = json.dumps(reply)[:200]
        except (OSError, ssl.SSLError, ValueError) as e:
            out["error"] = f"{type(e).__name__}: {e}"[:200]
        out["elapsed_s"] = time.monotonic() - start
        return out

    @staticmethod
    def _reply(tls: ssl.SSLSocket, rid: int, deadline: float) -> dict[str, Any]:
        buf = b""
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                obj = json.loads(line)
                if obj.get("id") == rid:
                    return obj  # type: ignore[no-any-return]
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply in time")
            tls.settimeout(left)
            data = tls.recv(65536)
            if not data:
                raise ConnectionError("the server closed the connection")
            buf += data

    def register(self) -> None:
        r = self.exchange([
            {"id": 1, "type": "hello", "version": 1},
            {"id": 2, "type": "register", "username": self.username, "password": PASSWORD,
             "email": f"{self.username}@example.org"},
        ], 30.0)
        if not r["ok"]:
            raise RuntimeError(f"registration failed: {r.get('error')}")

    def login(self, n: int) -> dict[str, Any]:
        return self.exchange([
            {"id": 1, "type": "hello", "version": 1},
            {"id": 2, "type": "login", "username": self.username, "password": PASSWORD,
             "device": {"id": f"bench{n}"}},
        ], TRY_TIMEOUT)


# --- one scenario -------------------------------------------------------------------------


class Attack:
    """The attacker process and the status lines it prints."""

    def __init__(self, port: int, args: argparse.Namespace, reopen: float | None) -> None:
        argv = [sys.executable, "-m", "bench.floodattack", "--port", str(port),
                "--sockets", str(args.sockets), "--addresses", str(args.addresses),
                "--rate", str(args.rate)]
        if reopen is not None:
            argv += ["--reopen-delay", str(reopen)]
        self.proc = subprocess.Popen(argv, cwd=str(REPO), stdout=subprocess.PIPE,
                                     env=dict(os.environ, PYTHONPATH=str(REPO)))
        self.last: dict[str, Any] = {}
        self.ready = threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.last = json.loads(raw)
            if self.last["event"] == "ready":
                self.ready.set()

    def stop_opening(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)

    def close(self) -> None:
        terminate(self.proc, 15)


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: with 50 values p99 is the largest, p90 the 45th."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def scenario(args: argparse.Namespace, work: Path, name: str, repo: Path,
             reopen: float | None = None) -> dict[str, Any]:
    server = start_server(work, name, repo)
    result: dict[str, Any] = {"name": name, "reopen_delay": reopen}
    try:
        pid = server.pid
        legit = Legit(server.port, fingerprint(work / f"{name}-data"), "floodbench")
        legit.register()
        for i in range(5):  # warm-up: code paths, bcrypt threads, the store
            legit.login(i)
        wait_idle(pid, 60)
        result["rss_before_kib"] = rss_kib(pid)
        result["fds_before"] = base_fds = open_fds(pid)
        log(f"{name}: RSS before {result['rss_before_kib'] / 1024:.1f} MiB, {base_fds} fds")

        attack = Attack(server.port, args, reopen)
        try:
            if not attack.ready.wait(60):
                raise RuntimeError("the attacker could not open its sockets in 60 s")
            time.sleep(1.0)  # let the server accept them
            result["held_at_start"] = attack.last.get("open", 0)
            result["server_fds_at_start"] = open_fds(pid) - base_fds
            log(f"{name}: attacker holds {result['held_at_start']}, "
                f"server has {result['server_fds_at_start']} more fds")
            started = time.monotonic()
            cpu0 = cpu_seconds_of(pid)
            others0 = other_processes_cpu({pid, attack.proc.pid, os.getpid()})
            tries, peak = [], rss_kib(pid)
            streak = 0
            for i in range(args.tries):
                r = legit.login(100 + i)
                tries.append(r)
                peak = max(peak, rss_kib(pid))
                streak = 0 if r["ok"] else streak + 1
                if streak >= args.give_up:
                    log(f"{name}: {streak} failed tries in a row; giving up")
                    break
                time.sleep(args.gap)
            elapsed = time.monotonic() - started
            result["flood_s"] = round(elapsed, 1)
            result["server_cpu_cores"] = round((cpu_seconds_of(pid) - cpu0) / elapsed, 3)
            others = other_processes_cpu({pid, attack.proc.pid, os.getpid()})
            result["other_processes_cores"] = round(grown(others0, others) / elapsed, 3)
            result["attacker_end"] = dict(attack.last)
            result["server_fds_at_end"] = open_fds(pid) - base_fds
            result["rss_peak_kib"] = peak
            times = [t["elapsed_s"] if t["ok"] else float("inf") for t in tries]
            result["tries"] = len(tries)
            result["failed"] = sum(1 for t in tries if not t["ok"])
            result["errors"] = sorted({t.get("error", "") for t in tries if not t["ok"]})[:5]
            ok_tls = [t["tls_s"] for t in tries if "tls_s" in t]
            result["tls_p50_s"] = percentile(ok_tls, 0.5) if ok_tls else None
            for q in (50, 90, 99):
                result[f"p{q}_s"] = percentile(times, q / 100)
            result["max_s"] = max(times)

            # The flood is over: no new sockets, but the attacker keeps what it has.
            attack.stop_opening()
            result["reclaim_s"] = wait_fds(pid, base_fds, args.settle)
            wait_idle(pid, 10)
            result["rss_after_held_kib"] = rss_kib(pid)
            result["attacker_after"] = dict(attack.last)
        finally:
            attack.close()
        result["closed_s"] = wait_fds(pid, base_fds, 30.0)
        wait_idle(pid, 10)
        result["rss_after_kib"] = rss_kib(pid)
        worst = max(result["rss_after_held_kib"], result["rss_after_kib"])
        result["rss_growth"] = worst / result["rss_before_kib"] - 1
        result["met"] = result["p99_s"] <= P99_TARGET and result["rss_growth"] <= RSS_TARGET
        log(f"{name}: p99 {result['p99_s']:.3f} s ({result['failed']} failed), RSS "
            f"{result['rss_before_kib'] / 1024:.1f} -> peak {peak / 1024:.1f} -> "
            f"{result['rss_after_held_kib'] / 1024:.1f} (held) / "
            f"{result['rss_after_kib'] / 1024:.1f} MiB (closed)")
    finally:
        server.stop()
    return result


def wait_fds(pid: int, base: int, limit: float) -> float | None:
    """Seconds until the server is back to ``base`` (+5) file descriptors; None: never."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if open_fds(pid) <= base + 5:
            return round(time.monotonic() - started, 1)
        time.sleep(0.25)
    return None


# --- report -------------------------------------------------------------------------------


def _s(v: float | None) -> str:
    if v is None:
        return "-"
    return "timeout" if v == float("inf") else f"{v:.3f}"


def _mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


RUNS = (
    ("baseline", "before ({rev})"),
    ("current", "after (this checkout)"),
    ("reopen", "after, attacker reopening ({reopen:g} s later) what the server closes"),
)


def report(args: argparse.Namespace, results: dict[str, Any]) -> str:
    m = results["machine"]
    lines = [
        SECTION, "",
        f"Run {results['finished']} on {m['nproc']} cores ({m['cpu']}), Python {m['python']}, "
        f"Twisted {m['twisted']}, revision {m['revision']}; one command: "
        "`.venv/bin/python -m bench.flood` (about 5 minutes).", "",
        f"Flood: {args.sockets:,} silent TCP sockets from {args.addresses} source addresses "
        f"(127.0.0.2 ... 127.0.0.{args.addresses + 1}), held open (never closed by the "
        f"attacker), plus {args.rate:g} new ones per second. Meanwhile {args.tries} "
        "legitimate TLS + password logins (bcrypt cost 12) one after the other from "
        f"127.0.0.1, {args.gap:g} s apart, each timed from `connect` to the login reply "
        f"({TRY_TIMEOUT:g} s at most; with 50 tries p99 is the slowest). A server that "
        f"fails {args.give_up} tries in a row is given up on. Each server runs with its "
        "defaults for everything the flood touches. RSS: the server's VmRSS after warm-up "
        "(before), its peak during the flood, once the flood stopped and the server is back "
        "to its file descriptors from before while the attacker still keeps its sockets "
        "(after, held; or after the settle time if it never is), and after the attacker "
        "closed them (after, closed). Growth is the larger of the two against before. "
        "Other processes: CPU used by everything else on the (shared) machine during the "
        f"tries; a run above {args.max_other:g} cores is repeated.", "",
        "| server | tries (failed) | p50 s | p90 s | p99 s | TLS p50 s | RSS before MiB "
        "| peak | after, held | after, closed | growth | server CPU | other processes "
        "| target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    runs = [(results[key], label) for key, label in RUNS if results.get(key)]
    for r, label in runs:
        label = label.format(rev=results["baseline_rev"], reopen=r.get("reopen_delay") or 0)
        lines.append(
            f"| {label} | {r['tries']} ({r['failed']}) | {_s(r['p50_s'])} | {_s(r['p90_s'])} "
            f"| {_s(r['p99_s'])} | {_s(r['tls_p50_s'])} | {_mib(r['rss_before_kib'])} "
            f"| {_mib(r['rss_peak_kib'])} | {_mib(r['rss_after_held_kib'])} "
            f"| {_mib(r['rss_after_kib'])} | {r['rss_growth']:+.1%} "
            f"| {r['server_cpu_cores']:.2f} cores | {r['other_processes_cores']:.2f} cores "
            f"| {'**met**' if r['met'] else '**missed**'} |")
    lines.append("")
    for r, label in runs:
        end = r["attacker_end"]
        label = label.format(rev=results["baseline_rev"], reopen=r.get("reopen_delay") or 0)
        lines.append(
            f"- {label} (attempt {r['attempts']}): the server held "
            f"{r['server_fds_at_start']:,} of the sockets when the tries began; "
            f"{end.get('closed_by_server', 0):,} were closed by the server "
            f"during the flood; after it, the server was back to its descriptors "
            + (f"{r['reclaim_s']} s later, the attacker having closed none"
               if r["reclaim_s"] is not None else
               f"never within {args.settle:g} s ({r['server_fds_at_end']:,} more at the end "
               "of the tries)")
            + (f"; errors: {'; '.join(r['errors'])}" if r["errors"] else "") + ".")
    lines += [
        "",
        "What the rows show: the server before never closes a silent socket (its "
        "descriptors and memory only grow, and with a listen backlog of 50 it takes the "
        "flood in slowly), and each of them holds a handshake slot in turn, so every "
        "legitimate handshake waits behind them until it times out. After: at most 1,000 "
        "sockets wait for their handshake (the oldest are aborted first), each at most "
        "10 s from accept; a slot goes only to bytes that arrived; silent sockets never "
        "get an OpenSSL object. The flood costs the server CPU only for accepting and "
        "aborting; the reopening attacker, who makes it accept and abort over a thousand "
        "sockets a second, slows the logins a little, well within the target. What RSS "
        "keeps afterwards is Python's allocator (1-MiB arenas still holding a live "
        "object, 3-4 MB), reused by the next flood rather than grown.",
        "",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.flood",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sockets", type=int, default=2000)
    parser.add_argument("--addresses", type=int, default=100)
    parser.add_argument("--rate", type=float, default=8.0, help="new silent sockets/s [8]")
    parser.add_argument("--reopen-delay", type=float, default=1.0,
                        help="the extra run: the attacker reopens what the server closed "
                        "after this long [1]")
    parser.add_argument("--no-reopen", action="store_true", help="skip the extra run")
    parser.add_argument("--tries", type=int, default=50)
    parser.add_argument("--gap", type=float, default=0.2, help="seconds between tries")
    parser.add_argument("--give-up", type=int, default=5,
                        help="stop after this many failed tries in a row [5]")
    parser.add_argument("--settle", type=float, default=60.0,
                        help="seconds to wait for the server to drop the held sockets [60]")
    parser.add_argument("--baseline", default=BASELINE,
                        help=f"git revision of the server to compare with [{BASELINE}]")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--retries", type=int, default=2,
                        help="repeat a run up to this many times while other processes "
                        "on the machine disturbed it [2]")
    parser.add_argument("--max-other", type=float, default=0.5,
                        help="cores of other processes that count as disturbed [0.5]")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="shtalk-flood-", dir="/tmp"))
    results: dict[str, Any] = {"machine": machine(), "args": vars(args) | {"json": None},
                               "baseline_rev": args.baseline}
    try:
        if not args.no_baseline:
            old = extract(args.baseline, work / "baseline-tree")
            results["baseline"] = least_disturbed(
                args, lambda i: scenario(args, work, f"baseline{i}", old), log)
        results["current"] = least_disturbed(
            args, lambda i: scenario(args, work, f"current{i}", REPO), log)
        if not args.no_reopen:
            results["reopen"] = least_disturbed(
                args, lambda i: scenario(args, work, f"reopen{i}", REPO, args.reopen_delay),
                log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["finished"] = time.strftime("%Y-%m-%d %H:%M")
    md = report(args, results)
    print(md)
    record(results, args.json, md, None if args.no_docs else DOC, log)
    return 0 if results["current"]["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
