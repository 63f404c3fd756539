"""End-to-end encryption through the server: real ShtalkClients against plaintext clients.

    PYTHONPATH=. .venv/bin/python -m bench.e2e [--quick] [--json FILE] [--write docs/PERFORMANCE.md]

(``--rotation`` runs the key-rotation measurement instead: bench/e2e_rotation.py.)

    PYTHONPATH=. .venv/bin/python -m bench.e2e --only dm [--runs 3] [--profile FILE]

runs only the E2EE DM (closed loop, then ping-pong) and prints, for each run, the
"client CPU per E2EE DM (send + receive)": the CPU of the one client process holding
Alice and Bob (their reactor, their local stores' threads: signatures, ratchets,
sealing, SQLite commits with their fsyncs, TLS) per message delivered, split into user
and system time by thread.  ``--profile FILE`` writes cProfile CPU-time profiles of the
reactor thread (FILE) and of the stores' jobs (FILE.store); ``--client-pragma`` runs an
experiment with other SQLite settings on the clients' stores.

What it does (everything on 127.0.0.1, bounded in time, stops by itself, removes its
server and temporary directories):

1. Starts ONE real server (``twistd -n shtalk``, `bench.fanout.start_shtalk`: fresh data
   directory, ``max_connections_per_address = 1000``, ``bcrypt_cost = 10``; the rate
   limits and the abuse monitor off: they would throttle exactly this load).
2. Two parties, a direct message from Alice to Bob:
   * baseline: two raw JSON clients (`bench.loadproto.LoadClient`) sending plaintext
     200-byte envelopes to ``{"user": bob}``;
   * E2EE: two `ShtalkClient`s (real LocalStore, Argon2id cheap for set-up only, PQXDH
     session, Double Ratchet, ECDSA-signed envelopes, SQLite commit per message).
   Each in two variants: *closed loop* (Alice sends the next message as soon as the
   previous ``send`` completes: the server's ``ok`` for raw, ``ShtalkClient.send`` returning
   for E2EE) for messages/s and latency under load, and *ping-pong* (the next message only
   after Bob received the previous one) for the unloaded latency.
3. A room of 50: the baseline is `bench.loadclient`'s ``fanout`` scenario (50 raw clients,
   every one a closed-loop sender, one send outstanding each); E2EE is 50 ShtalkClients in
   one room (Sender Keys), every one a closed-loop sender. Delivered messages/s = every
   message received by any member, summed.
4. The same E2EE room with its members spread round-robin over ``--room-procs`` client
   processes (default 4), kept in step by barriers (``STEP``/``GO`` lines on the workers'
   stdout/stdin): removes the one-process GIL limit, not the 2 cores' limit.
5. E2EE probes through the loaded server (``--probe-rate``, default 20/s): two E2EE
   members (one process) in the room of 48 raw closed-loop senders; the E2EE receiver's
   latency against the raw clients' latency in the same window, i.e. what E2EE adds when
   the server, the shared resource, carries the baseline's load.
6. Prints the table, the ratios (baseline rate / E2EE rate, E2EE latency / baseline
   latency; target <= 2x) and the CPU split, writes ``--json`` and, with ``--write``, the
   section "End-to-end encryption through the server (bench/e2e)" of docs/PERFORMANCE.md.

Latency is send -> receipt, one machine, one monotonic clock: for E2EE from Alice calling
``send`` (before encryption) to Bob's ``MessageReceived`` event (after verification and
decryption; the local commit runs after it, the ack after the commit); for the baseline
from just before the raw client's ``write`` to the recipient's ``dataReceived``.

Processes: the server (one process; reactor thread + SQLite writer + bcrypt threads) and,
for each scenario, ONE fresh client process holding every client of that scenario on one
Twisted reactor (the E2EE clients' SQLite stores each have their own adbapi thread). The
machine has 2 cores shared by both processes; the CPU of each (and of the client process's
reactor thread alone) is measured from /proc over the measured window.

This module is the orchestrator; the client process is bench/e2e_worker.py (its E2EE
clients and ways of sending: bench/e2e_parties.py), the server and the client processes
as seen from here are bench/e2e_procs.py, the report is bench/e2e_report.py.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, BenchError, fingerprint, logger, machine, record, workdir
from bench.cpu import wait_idle
from bench.e2e_procs import go, read_step, run_worker, spawn_worker, start_server
from bench.e2e_report import build_report
from bench.fanout import load
from bench.loadproto import Histogram

ROOM_N = 50
log = logger("e2e")


def run_probe(spec: dict[str, Any], load_spec: dict[str, Any], timeout: float
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """E2EE probes (one client process) through the raw room load (another process)."""
    p = spawn_worker({**spec, "scenario": "e2ee_probe", "time_limit": timeout})
    try:
        step, data = read_step(p)
        if step != "ready":
            raise BenchError(f"probe process: {data}")
        raw: dict[str, Any] = {}

        def raw_load() -> None:
            try:
                raw["result"] = load(load_spec, timeout=timeout)
            except Exception as e:
                raw["error"] = e

        t = threading.Thread(target=raw_load)
        t.start()
        go(p, {"delay": spec["warmup"]})
        step, outcome = read_step(p)
        t.join()
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if "error" in raw:
        raise BenchError(f"raw load with the probes failed: {raw['error']}")
    if step != "RESULT" or "result" not in outcome:
        raise BenchError(f"probe process failed: {outcome}")
    return outcome["result"], raw["result"]


def run_room_procs(spec: dict[str, Any], procs: int, timeout: float) -> dict[str, Any]:
    """One E2EE room whose members are spread round-robin over ``procs`` client processes,
    kept in step by barriers (each process says ``STEP name``, all get ``GO``)."""
    names = spec["users"]
    started: list[subprocess.Popen[str]] = []
    try:
        for i in range(procs):
            started.append(spawn_worker({**spec, "scenario": "e2ee_room_part", "part": i,
                                          "local": names[i::procs], "time_limit": timeout}))

        while True:
            got = [read_step(p) for p in started]
            steps = {name for name, _ in got}
            if steps == {"RESULT"}:
                break
            if len(steps) != 1 or "RESULT" in steps:
                raise BenchError(f"room processes out of step: {got}")
            step = steps.pop()
            data: dict[str, Any] = {}
            if step.endswith("_stopped"):
                data["total_sent"] = sum(int(d["sent"]) for _, d in got)
            log(f"  room processes: {step}")
            for p in started:
                go(p, data)
        parts = []
        for _, outcome in got:
            if "result" not in outcome:
                raise BenchError(f"a room process failed: {outcome}")
            parts.append(outcome["result"])
        for p in started:
            p.wait(timeout=30)
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
                p.wait()
    return {"procs": procs, "paced": _merge(parts, "paced"), **_merge(parts, "closed")}


def _merge(parts: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """One window's figures over the processes: sums of counts and CPU, one histogram."""
    rs = [p[key] for p in parts]
    h = Histogram()
    for r in rs:
        for b, c in r["hist"]["counts"].items():
            h.counts[int(b)] += c
        h.n += r["hist"]["n"]
        h.max_ns = max(h.max_ns, r["hist"]["max_ns"])
    latency = h.summary()
    latency.pop("timeline_max_ms")
    elapsed = sum(r["elapsed_s"] for r in rs) / len(rs)
    delivered = sum(r["delivered"] for r in rs)
    out = {
        "elapsed_s": round(elapsed, 3),
        "delivered": delivered,
        "delivered_per_s": round(delivered / elapsed, 1),
        "latency": latency,
        "lost": sum(r["lost"] for r in rs),
        "send_errors": sum(r["send_errors"] for r in rs),
        # the processes' own CPU summed; server and machine as seen by each, averaged
        "client_cpu": round(sum(r["client_cpu"] for r in rs), 3),
        "client_reactor_cpu": round(sum(r["client_reactor_cpu"] for r in rs), 3),
        "client_cpu_per_process": [r["client_cpu"] for r in rs],
        "server_cpu": round(sum(r["server_cpu"] for r in rs) / len(rs), 3),
        "machine_busy_cores": round(sum(r["machine_busy_cores"] for r in rs) / len(rs), 3),
    }
    if "sends" in rs[0]:
        out["sends_per_s"] = round(sum(r["sends"] for r in rs) / elapsed, 1)
    return out


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    results: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
                               "quick": args.quick, "warmup_s": args.warmup,
                               "duration_s": args.duration, "pingpong": args.pingpong,
                               "room_n": args.room_n}
    server = start_server(work)
    try:
        fp = fingerprint(work / "e2e-data")
        log(f"server pid {server.pid} port {server.port}")
        base = {"port": server.port, "fingerprint": fp, "server_pid": server.pid,
                "warmup": args.warmup, "duration": args.duration, "pingpong": args.pingpong}
        raw_users = ["rawalice", "rawbob"] + [f"raw{i:03d}" for i in range(args.room_n)]
        setup = load({"scenario": "setup", "mode": "shtalk", "port": server.port,
                             "fingerprint": fp, "users": raw_users}, timeout=300)
        tokens = [setup["tokens"][u] for u in raw_users]
        log(f"raw accounts set up in {setup['seconds']} s")
        limit = args.warmup + args.duration + 120

        log("two parties, plaintext baseline ...")
        results["pair_raw"] = run_worker(
            {**base, "scenario": "raw_pair", "users": raw_users[:2], "tokens": tokens[:2]},
            limit)
        wait_idle(server.pid)
        _show("pair raw", results["pair_raw"])

        log("two parties, E2EE ...")
        results["pair_e2ee"] = run_worker(
            {**base, "scenario": "e2ee_pair", "users": ["alice", "bob"],
             "home": str(work / "pair")}, limit + 60)
        wait_idle(server.pid)
        _show("pair e2ee", results["pair_e2ee"])

        log(f"room of {args.room_n}, plaintext baseline, paced {args.room_rate:g} sends/s ...")
        r = load({**base, "scenario": "fanout", "mode": "shtalk", "n": args.room_n,
                         "rate": args.room_rate, "window": 1, "room": "rawroom-paced",
                         "tokens": tokens[2:]}, timeout=limit)
        r["client_cpu"] = r.pop("loadgen_cpu")
        r["rate"] = args.room_rate
        results["room_raw_paced"] = r
        wait_idle(server.pid)
        log(f"  p50 {r['latency']['p50_ms']} p99 {r['latency']['p99_ms']} ms")
        log(f"room of {args.room_n}, plaintext baseline, closed loop ...")
        r = load({**base, "scenario": "fanout", "mode": "shtalk", "n": args.room_n,
                         "rate": 0, "window": 1, "room": "rawroom",
                         "tokens": tokens[2:]}, timeout=limit)
        r["client_cpu"] = r.pop("loadgen_cpu")
        results["room_raw"] = r
        r["drain_s"] = wait_idle(server.pid)
        log(f"  {r['delivered_per_s']:.0f} delivered/s, p50 {r['latency']['p50_ms']} "
            f"p99 {r['latency']['p99_ms']} ms, server {r['server_cpu']:.2f}, "
            f"clients {r['client_cpu']:.2f}")

        log(f"room of {args.room_n}, E2EE (set-up: {args.room_n} registrations, "
            f"{args.room_n * (args.room_n - 1)} pairwise sessions) ...")
        r = run_worker({**base, "scenario": "e2ee_room", "room": "e2eroom",
                        "users": [f"m{i:03d}" for i in range(args.room_n)],
                        "room_rate": args.room_rate, "profile": args.profile,
                        "home": str(work / "room"), "setup_limit": 120}, 2 * limit + 240)
        r["drain_s"] = wait_idle(server.pid)
        results["room_e2ee"] = r
        log(f"  {r['delivered_per_s']:.0f} delivered/s, p50 {r['latency']['p50_ms']} "
            f"p99 {r['latency']['p99_ms']} ms, server {r['server_cpu']:.2f}, "
            f"clients {r['client_cpu']:.2f} (reactor {r['client_reactor_cpu']:.2f}), "
            f"lost {r['lost']}")
        if args.room_procs > 1:
            log(f"room of {args.room_n}, E2EE, members spread over {args.room_procs} client "
                "processes ...")
            r = run_room_procs({**base, "room": "e2eroommp", "room_rate": args.room_rate,
                                "users": [f"q{i:03d}" for i in range(args.room_n)],
                                "home": str(work / "roommp"), "setup_limit": 120},
                               args.room_procs, 2 * limit + 240)
            r["drain_s"] = wait_idle(server.pid)
            results["room_e2ee_mp"] = r
            log(f"  {r['delivered_per_s']:.0f} delivered/s, p50 {r['latency']['p50_ms']} "
                f"p99 {r['latency']['p99_ms']} ms, server {r['server_cpu']:.2f}, "
                f"clients {r['client_cpu']:.2f} {r['client_cpu_per_process']}, "
                f"paced p50 {r['paced']['latency']['p50_ms']} p99 "
                f"{r['paced']['latency']['p99_ms']} ms, lost {r['lost']}")
        if args.probe_rate > 0:
            n_raw = args.room_n - 2
            log(f"room of {args.room_n}: {n_raw} raw clients in a closed loop and 2 E2EE "
                f"members, {args.probe_rate:g} E2EE messages/s through the loaded server ...")
            probe, raw = run_probe(
                {**base, "room": "proberoom", "users": ["probesender", "probereceiver"],
                 "tokens": tokens[2:2 + n_raw], "probe_rate": args.probe_rate,
                 "home": str(work / "probe"), "window": round(0.6 * args.duration, 2)},
                {**base, "scenario": "fanout", "mode": "shtalk", "n": n_raw, "rate": 0,
                 "window": 1, "room": "proberoom", "tokens": tokens[2:2 + n_raw]},
                limit + 120)
            raw["client_cpu"] = raw.pop("loadgen_cpu")
            wait_idle(server.pid)
            results["probe_e2ee"], results["probe_raw"] = probe, raw
            log(f"  raw: {raw['delivered_per_s']:.0f} delivered/s, p50 "
                f"{raw['latency']['p50_ms']} p99 {raw['latency']['p99_ms']} ms; E2EE probes: "
                f"{probe['delivered_per_s']:.1f}/s p50 {probe['latency']['p50_ms']} p99 "
                f"{probe['latency']['p99_ms']} ms, refused {probe['raw_refused_per_s']:.0f}/s, "
                f"lost {probe['lost']}")
        if args.experiment:
            for key, scen, extra in (
                ("pair_e2ee_nosync", "e2ee_pair", {"users": ["carol", "dave"],
                                                   "home": str(work / "pair2")}),
                ("room_e2ee_nosync", "e2ee_room", {"room": "e2eroom2", "setup_limit": 120,
                                                   "users": [f"n{i:03d}"
                                                             for i in range(args.room_n)],
                                                   "room_rate": args.room_rate,
                                                   "home": str(work / "room2")}),
            ):
                log(f"experiment: {scen} with the client stores at synchronous=NORMAL ...")
                r = run_worker({**base, "scenario": scen, "client_sync": "NORMAL", **extra},
                               2 * limit + 240)
                wait_idle(server.pid)
                results[key] = r
                c = r.get("closed", r)
                log(f"  {c['delivered_per_s']:.0f} delivered/s, p50 {c['latency']['p50_ms']} "
                    f"p99 {c['latency']['p99_ms']} ms, server {c['server_cpu']:.2f}, "
                    f"clients {c['client_cpu']:.2f}")
    finally:
        server.stop()
    return results


def run_dm(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``--only dm``: the E2EE two-party scenario alone, ``--runs`` times (fresh users
    each time) through one server, and the client CPU per DM of each run."""
    server = start_server(work)
    runs = []
    try:
        base = {"port": server.port, "fingerprint": fingerprint(work / "e2e-data"),
                "server_pid": server.pid, "warmup": args.warmup,
                "duration": args.duration, "pingpong": args.pingpong}
        for i in range(args.runs):
            profile = (f"{args.profile}.{i}" if args.runs > 1 else args.profile
                       ) if args.profile else None
            r = run_worker({**base, "scenario": "e2ee_pair", "users": [f"alice{i}", f"bob{i}"],
                            "home": str(work / f"pair{i}"), "profile": profile,
                            "client_pragmas": args.client_pragma},
                           args.warmup + args.duration + 180)
            wait_idle(server.pid)
            runs.append(r)
            log(dm_line(r))
    finally:
        server.stop()
    return {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "warmup_s": args.warmup, "duration_s": args.duration, "runs": runs}


def dm_line(r: dict[str, Any]) -> str:
    """"client CPU per E2EE DM (send + receive)": Alice's and Bob's process (one reactor,
    their local stores' threads) over the closed loop, split by thread, and ping-pong."""
    c, p = r["closed"], r["pingpong"]

    def us(share: float) -> str:
        return f"{share / c['delivered_per_s'] * 1e6:,.0f}"

    threads = ", ".join(f"{name} {us(v)}" for name, v in c["client_threads_cpu"].items()
                        if v / c["delivered_per_s"] * 1e6 >= 0.5)
    pp = p["client_cpu"] * p["elapsed_s"] / max(1, p["latency"]["samples"]) * 1e6
    return (f"client CPU per E2EE DM (send + receive): {us(c['client_cpu'])} µs closed loop "
            f"({c['delivered_per_s']:,.0f} DMs/s; by thread: {threads}; server "
            f"{us(c['server_cpu'])} µs); ping-pong {pp:,.0f} µs")


def _show(what: str, r: dict[str, Any]) -> None:
    c, p = r["closed"], r["pingpong"]
    log(f"  {what}: closed {c['delivered_per_s']:.0f} msg/s p50 {c['latency']['p50_ms']} "
        f"p99 {c['latency']['p99_ms']} ms (server {c['server_cpu']:.2f}, clients "
        f"{c['client_cpu']:.2f}); ping-pong p50 {p['latency']['p50_ms']} p99 "
        f"{p['latency']['p99_ms']} ms")


def main() -> None:
    if "--worker" in sys.argv[1:]:
        sys.path.insert(0, str(REPO))
        from bench.e2e_worker import worker

        worker()
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="short windows (about 1 minute)")
    p.add_argument("--json", type=Path, help="write every figure here")
    p.add_argument("--write", type=Path, help="replace our section of this markdown file")
    p.add_argument("--room-n", type=int, default=ROOM_N)
    p.add_argument("--duration", type=float)
    p.add_argument("--warmup", type=float)
    p.add_argument("--pingpong", type=int)
    p.add_argument("--room-rate", type=float, default=5.0,
                   help="paced room: sends/s in total (latency at a sustainable load)")
    p.add_argument("--room-procs", type=int, default=4,
                   help="also run the E2EE room with its members spread over this many "
                   "client processes (1: skip)")
    p.add_argument("--probe-rate", type=float, default=20.0,
                   help="E2EE messages/s through the server loaded by the raw room (0: skip)")
    p.add_argument("--profile", help="cProfile the E2EE room's (with --only dm: the DM's) "
                   "reactor thread during the closed loop into this file and the local "
                   "stores' jobs into FILE.store (perturbs the figures)")
    p.add_argument("--only", choices=["dm"],
                   help="dm: only the E2EE DM, printing the client CPU per DM (send + "
                   "receive) of each of --runs runs")
    p.add_argument("--runs", type=int, default=1, help="with --only: runs, fresh users each")
    p.add_argument("--client-pragma", action="append", default=[], metavar="PRAGMA",
                   help="with --only dm, an experiment: the clients' stores also run "
                   "'PRAGMA <this>' (e.g. 'journal_size_limit = -1'; repeatable)")
    p.add_argument("--from-json", type=Path,
                   help="re-render the report from a --json file of an earlier run")
    p.add_argument("--no-experiment", dest="experiment", action="store_false",
                   help="skip the synchronous=NORMAL experiment (skipped by --quick)")
    p.add_argument("--rotation", action="store_true",
                   help="instead: what key rotation costs against a message (bench/"
                   "e2e_rotation.py; its own section of --write's file)")
    args = p.parse_args()
    if args.rotation:
        from bench import e2e_rotation

        e2e_rotation.main(args)
        return
    if args.quick:
        args.experiment = False
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    if args.pingpong is None:
        args.pingpong = 50 if args.quick else 300
    if args.only == "dm":
        with workdir("shtalk-bench-e2e-") as work:
            results = run_dm(args, work)
        for r in results["runs"]:
            print(dm_line(r))
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")
        return
    if args.from_json:
        results = json.loads(args.from_json.read_text())
    else:
        started = time.monotonic()
        with workdir("shtalk-bench-e2e-") as work:
            results = run(args, work)
        results["wall_s"] = round(time.monotonic() - started, 1)
        log(f"done in {results['wall_s']} s")
    section = build_report(results)
    print(section)
    record(results, None if args.from_json else args.json, section, args.write, log)


if __name__ == "__main__":
    main()
