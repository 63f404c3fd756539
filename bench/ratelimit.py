"""Rate-limit benchmark: the cost of one check (memory, Redis) and its effect on fan-out.

    .venv/bin/python -m bench.ratelimit [--quick] [--n 50] [--rounds 3] [--duration S]
                                        [--no-docs] [--json out.json]

1. Micro: `RateLimiter.check` with the memory backend (in this process, µs per check);
   `RedisBuckets.take` against the real Redis at 127.0.0.1:6379, one at a time (latency)
   and 200 in flight (throughput).  Skipped, and said so, when Redis is absent.
2. Fan-out (reusing `bench.fanout`'s server runner and `bench.loadclient`): two real
   servers that differ only in ``[ratelimit] enabled`` (memory backend, limits no
   benchmark reaches, so every send pays for a check and none is refused; the monitor
   is on in both).  The closed-loop room of ``--n`` senders runs against each,
   alternating off/on for ``--rounds`` rounds in the same run; the median delivered
   messages per second are compared.  Target: with the limiter on, at most 10 % fewer.
3. Writes the section "Rate limiting (bench/ratelimit)" of docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    DOC,
    HUGE_RATE,
    Server,
    bench_config,
    fingerprint,
    launch_shtalk,
    lifted_limits,
    logger,
    machine,
    record,
    workdir,
    write_section,
)
from bench.cpu import wait_idle
from bench.fanout import load

SECTION = "## Rate limiting (bench/ratelimit)"
TARGET_DROP = 0.10
HUGE = HUGE_RATE
#: every limit and every monitor threshold: this benchmark is about all of them
RATE_KEYS = tuple(f"{a}_{s}" for a in ("register", "login", "verify", "send", "prekey_fetch",
                                       "join", "report") for s in ("account", "address"))
MONITOR_KEYS = ("send_rate", "strangers", "new_account_strangers", "registrations",
                "same_size", "reports")
log = logger("ratelimit")


# --- micro ------------------------------------------------------------------------------


def micro_memory(n: int) -> dict[str, float]:
    from twisted.internet.task import Clock

    from shtalk.server.config import RateLimitSection
    from shtalk.server.ops.ratelimit import RateLimiter

    clock = Clock()
    huge: dict[str, Any] = dict.fromkeys(RATE_KEYS, HUGE)
    section = dataclasses.replace(RateLimitSection(), **huge)
    limiter = RateLimiter(section, clock)
    accounts = [str(i) for i in range(1000)]
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(n):
            limiter.check("send", accounts[i % 1000], "127.0.0.1")
        best = min(best, (time.perf_counter() - t0) / n)
    t0 = time.perf_counter()
    for i in range(n):
        accounts[i % 1000]
    loop = (time.perf_counter() - t0) / n
    return {"check_us": round((best - loop) * 1e6, 2), "checks": n}


def micro_redis(n: int) -> dict[str, Any]:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            pass
    except OSError:
        return {"skipped": "no Redis at 127.0.0.1:6379"}
    from twisted.internet import reactor
    from twisted.internet.defer import gatherResults, inlineCallbacks

    from shtalk.server.ops.ratelimit import Limit
    from shtalk.server.ops.redisbackend import RedisBuckets

    out: dict[str, Any] = {}
    prefix = f"shtalk-bench:{time.time_ns()}:"

    @inlineCallbacks
    def run() -> Any:
        rb = RedisBuckets("redis://127.0.0.1:6379/0", prefix, reactor, timeout=2.0)
        lim = [Limit(1e8, 1e8), Limit(1e8, 1e8)]
        try:
            for i in range(200):  # warm up: connection, script cache
                yield rb.take([f"send:a:{i % 100}", "send:ip:127.0.0.1"], lim)
            t0 = time.perf_counter()
            for i in range(n):
                yield rb.take([f"send:a:{i % 100}", "send:ip:127.0.0.1"], lim)
            out["sequential_us"] = round((time.perf_counter() - t0) / n * 1e6, 1)
            t0 = time.perf_counter()
            done = 0
            while done < n:
                batch = [rb.take([f"send:a:{(done + j) % 100}", "send:ip:127.0.0.1"], lim)
                         for j in range(200)]
                yield gatherResults(batch)
                done += 200
            out["pipelined_checks_per_s"] = round(done / (time.perf_counter() - t0))
        finally:
            rb.close()
            reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(run)  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    return out


# --- fan-out ---------------------------------------------------------------------------


def start(work: Path, name: str, limiter_on: bool) -> Server:
    """Like bench.fanout.start_shtalk, but with the rate limiter switched on or off."""
    limits = lifted_limits(limiter_on, RATE_KEYS, MONITOR_KEYS)
    return launch_shtalk(work, name, bench_config(10, limits=limits))


def run_fanout(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    servers = {"off": start(work, "rl-off", False), "on": start(work, "rl-on", True)}
    try:
        users = [f"rl{i:03d}" for i in range(args.n)]
        tokens: dict[str, list[str]] = {}
        fps: dict[str, str] = {}
        for mode, server in servers.items():
            fps[mode] = fingerprint(work / f"rl-{mode}-data")
            log(f"set-up ({mode}): {len(users)} accounts")
            setup = load({"scenario": "setup", "mode": "shtalk", "port": server.port,
                          "fingerprint": fps[mode], "users": users}, timeout=600)
            tokens[mode] = [setup["tokens"][u] for u in users]
        runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
        for rnd in range(args.rounds):
            order = ("off", "on") if rnd % 2 == 0 else ("on", "off")
            for mode in order:
                server = servers[mode]
                spec = {"scenario": "fanout", "mode": "shtalk", "port": server.port,
                        "server_pid": server.pid, "fingerprint": fps[mode], "n": args.n,
                        "rate": 0, "room": f"rl-{rnd}", "tokens": tokens[mode],
                        "warmup": args.warmup, "duration": args.duration, "window": 1,
                        "ack_interval": 0.010, "ack_batch": 50}
                r = load(spec, timeout=args.warmup + args.duration + 120)
                r["drain_s"] = wait_idle(server.pid)
                runs[mode].append(r)
                log(f"round {rnd + 1} limiter {mode}: {r['delivered_per_s']:.0f} delivered/s, "
                    f"p99 {r['latency']['p99_ms']} ms, errors {r['errors']}, other processes "
                    f"{r['other_processes_cores']:.2f} cores")
        return {"runs": runs}
    finally:
        for s in servers.values():
            s.stop()


# --- report -----------------------------------------------------------------------------


def build_report(args: argparse.Namespace, res: dict[str, Any]) -> str:
    mem, red = res["memory"], res["redis"]
    lines = [
        SECTION, "",
        f"Measured by `.venv/bin/python -m bench.ratelimit` on {res['finished']} "
        f"({res['machine']}); the figures of one run.", "",
        "| one rate-limit check (two buckets: account and address) | cost |",
        "|---|---:|",
        f"| memory backend, in process | {mem['check_us']} µs |",
    ]
    if "skipped" in red:
        lines.append(f"| Redis backend | skipped: {red['skipped']} |")
    else:
        lines += [
            f"| Redis backend, one at a time (round trip, Lua script) | "
            f"{red['sequential_us']} µs |",
            f"| Redis backend, 200 in flight over one connection | "
            f"{red['pipelined_checks_per_s']} checks/s |",
        ]
    off = [r["delivered_per_s"] for r in res["fanout"]["runs"]["off"]]
    on = [r["delivered_per_s"] for r in res["fanout"]["runs"]["on"]]
    runs = res["fanout"]["runs"]
    cpu_per = {m: [r["server_cpu"] / r["delivered_per_s"] * 1e6 for r in runs[m]]
               for m in ("off", "on")}
    cpu_ratio = statistics.median(cpu_per["on"]) / statistics.median(cpu_per["off"])
    m_off, m_on = statistics.median(off), statistics.median(on)
    drop = 1 - m_on / m_off
    ok = drop <= TARGET_DROP
    errs = sum(r["errors"] for rs in res["fanout"]["runs"].values() for r in rs)
    lines += [
        "",
        f"Fan-out, closed loop, one room of {args.n} senders (bench.fanout's load generator), "
        f"{args.rounds} rounds of {args.duration:g} s alternating limiter off/on on two "
        "otherwise identical servers (memory backend, limits no sender reaches, monitor on "
        "in both):", "",
        "| limiter | delivered messages/s (median) | rounds | server CPU µs per delivery "
        "(median) | p99 latency (median) | other processes (cores, median) |",
        "|---|---:|---|---:|---:|---:|",
        *(f"| {label} | {statistics.median(tp):.0f} | {', '.join(f'{x:.0f}' for x in tp)} | "
          f"{statistics.median(cpu_per[m]):.2f} | "
          f"{statistics.median(r['latency']['p99_ms'] for r in runs[m])} ms | "
          f"{statistics.median(r['other_processes_cores'] for r in runs[m]):.2f} |"
          for label, m, tp in (("off", "off", off), ("on (memory)", "on", on))),
        "",
        f"On/off = {m_on / m_off:.3f} ({drop * 100:+.1f} % drop). Target: at most "
        f"{TARGET_DROP * 100:.0f} % fewer delivered messages per second: "
        f"{'met' if ok else 'MISSED'}. Server CPU per delivered message, on/off: "
        f"{cpu_ratio:.3f}. Errors in all rounds: {errs}.",
        "",
        "Read the throughput with the last column: the machine has 2 cores, and other "
        "processes using a large share of them (other benchmarks and test suites) make "
        "single rounds swing widely; the CPU per delivery is the steadier figure of what the "
        "limiter costs.",
        "",
        "A check is one per request (send, login, keys_fetch, ...), not one per delivery: "
        f"at {args.n} members a send is delivered {args.n - 1} times, so the limiter's "
        f"expected share of the server's work per delivered message is "
        f"{mem['check_us'] / (args.n - 1):.3f} µs of "
        f"{statistics.median(cpu_per['off']):.1f} µs, about "
        f"{mem['check_us'] / (args.n - 1) / statistics.median(cpu_per['off']) * 100:.1f} %; "
        "differences between the rows larger than that are the machine's noise. The Redis "
        "backend costs a loopback round "
        "trip per check (the reply to `send` waits for it); its throughput is shared by all "
        "checks of a process, since txredisapi pipelines them over one connection.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ratelimit",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short run (2 rounds of 3 s)")
    p.add_argument("--n", type=int, default=50, help="room size [50]")
    p.add_argument("--rounds", type=int, default=None, help="off/on rounds [3; quick 2]")
    p.add_argument("--duration", type=float, default=None, help="seconds per run [6; quick 3]")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring [1]")
    p.add_argument("--json", type=Path, default=None, help="write every figure here")
    p.add_argument("--from-json", type=Path, default=None,
                   help="re-render the report of a run saved with --json")
    p.add_argument("--no-docs", action="store_true", help="do not write PERFORMANCE.md")
    args = p.parse_args(argv)
    args.rounds = args.rounds or (2 if args.quick else 3)
    res: dict[str, Any]
    args.duration = args.duration or (3.0 if args.quick else 6.0)
    if args.from_json is not None:
        res = json.loads(args.from_json.read_text())
        args.n, args.rounds = res.get("n", args.n), res.get("rounds", args.rounds)
        args.duration = res.get("duration", args.duration)
        md = build_report(args, res)
        print(md)
        if not args.no_docs:
            write_section(md)
        return 0
    res = {"machine": f"{platform.machine()}, {machine().get('cpu', '')}"
                           .rstrip(", ")}
    log("micro: memory backend ...")
    res["memory"] = micro_memory(200_000)
    log(f"  {res['memory']['check_us']} µs per check")
    log("micro: Redis backend ...")
    res["redis"] = micro_redis(2000)
    log(f"  {res['redis']}")
    with workdir("shtalk-ratelimit-") as work:
        res["fanout"] = run_fanout(args, work)
    res["finished"] = time.strftime("%Y-%m-%d %H:%M")
    res.update(n=args.n, rounds=args.rounds, duration=args.duration)
    md = build_report(args, res)
    print(md)
    record(res, args.json, md, None if args.no_docs else DOC, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
