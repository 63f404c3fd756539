"""Memory per idle TLS connection: shtalk (logged in) against the bare broadcast, same run.

    .venv/bin/python -m bench.connmem [--n 1000] [--rounds 2] [--json F] [--no-docs]

What it does (127.0.0.1 only, bounded in time):

1. Starts the real server (``twistd -n shtalk``, fresh data directory, `bench_config`)
   and the ceiling (`bench.ceiling`, the same certificate and TLS policy).
2. Registers ``--n`` accounts and logs each in once (bcrypt cost 10, not measured), so
   the measured connections authenticate with ``resume``.
3. For each server, one load-generator process opens ``--warm`` TLS connections and
   holds them (what the first connections cost once: modules, OpenSSL, caches, arenas),
   reads the server's RSS (``VmRSS`` in ``/proc/PID/status``), opens ``--n`` more
   (shtalk: ``hello``, ``resume``, the backlog drained: a client after login), waits
   ``--settle`` seconds and reads the RSS again.  The growth over the ``--n`` is the
   figure.  Measured on fresh servers only: memory freed by closed connections is kept
   by the allocators and reused, so a later round would read low (``--rounds`` shows it).

Target (docs/PERFORMANCE.md): <= 32 KB per idle logged-in connection.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks

from bench.common import (
    ANALYSIS,
    CURRENT_LIMITS,
    DOC,
    BenchError,
    bench_config,
    bounded,
    child_main,
    fingerprint,
    launch_shtalk,
    logger,
    machine,
    record,
    run_child,
    sleep,
    workdir,
)

SECTION = "## Memory per idle connection (bench/connmem)"
TARGET_KB = 32.0
log = logger("connmem")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for {pid}")


# --- the load generator's side (a child process) -----------------------------------------


@inlineCallbacks
def scenario_idle(spec: dict[str, Any]) -> Any:
    """``warm`` connections opened and held (the server's one-time costs: modules,
    OpenSSL, caches), then ``n`` more: the RSS growth over those is per connection."""
    from bench.loadproto import Run, check, connect

    ceiling = spec["mode"] == "ceiling"
    run = Run(ceiling=ceiling)
    pid = spec["server_pid"]

    @inlineCallbacks
    def one(i: int) -> Any:
        client = yield connect(spec, run, i)
        if not ceiling:
            yield client.request("hello", version=1).addCallback(check)
            yield client.request("resume", access_token=spec["tokens"][i]).addCallback(check)
            yield client.backlog_d
        return client

    warm, n = spec["warm"], spec["n"]
    clients = yield bounded(50, [partial(one, i) for i in range(warm)])
    yield sleep(spec["settle"])
    before = rss_kib(pid)
    more = yield bounded(50, [partial(one, i) for i in range(warm, warm + n)])
    yield sleep(spec["settle"])
    after = rss_kib(pid)
    for c in clients + more:
        c.close()
    yield sleep(0.5)
    return {"before_kib": before, "after_kib": after, "n": len(more)}


# --- the orchestrator ----------------------------------------------------------------------


def measure(mode: str, port: int, pid: int, fp: str, tokens: list[str], args: Any) -> list[Any]:
    rounds = []
    for i in range(args.rounds):  # a fresh server's figure: the first round's
        r = run_child(["-m", "bench.connmem", "--child"], {
            "scenario": "idle", "mode": mode, "port": port, "server_pid": pid,
            "fingerprint": fp, "n": args.n, "warm": args.warm, "tokens": tokens,
            "settle": args.settle,
        }, timeout=300, what=f"{mode} connections")
        r["per_conn_kib"] = (r["after_kib"] - r["before_kib"]) / r["n"]
        log(f"{mode} round {i + 1}: RSS {r['before_kib'] / 1024:.1f} -> "
            f"{r['after_kib'] / 1024:.1f} MiB, {r['per_conn_kib']:.1f} KiB per connection")
        rounds.append(r)
    return rounds


def run(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from bench.fanout import start_ceiling

    cfg = bench_config(10, limits=CURRENT_LIMITS).replace("max_connections_per_address = 1000",
                                   f"max_connections_per_address = {args.warm + args.n + 10}")
    shtalk = launch_shtalk(work, "connmem", cfg)
    try:
        data_dir = work / "connmem-data"
        ceiling = start_ceiling(work, data_dir)
        try:
            fp = fingerprint(data_dir)
            users = [f"idle{i:04d}" for i in range(args.warm + args.n)]
            log(f"set-up: registering and logging in {len(users)} accounts (bcrypt cost 10)")
            setup = run_child(["-m", "bench.loadclient"], {
                "scenario": "setup", "mode": "shtalk", "port": shtalk.port,
                "fingerprint": fp, "users": users, "concurrency": 4}, timeout=900,
                what="set-up")
            tokens = [setup["tokens"][u] for u in users]
            log(f"set-up took {setup['seconds']} s")
            out: dict[str, Any] = {}
            for mode, server in (("ceiling", ceiling), ("shtalk", shtalk)):
                out[mode] = measure(mode, server.port, server.pid, fp, tokens, args)
            return out
        finally:
            ceiling.stop()
    finally:
        shtalk.stop()


def report(results: dict[str, Any]) -> str:
    m = results["machine"]
    n = results["args"]["n"]
    lines = [
        SECTION, "",
        f"Measured {results['finished']} on {m['nproc']} cores, {m['cpu']}, Python "
        f"{m['python']}, Twisted {m['twisted']}, shtalk at `{m['revision']}`. Rerun with:",
        "", "```", ".venv/bin/python -m bench.connmem", "```", "",
        f"{n} idle TLS connections to each server, opened by one load-generator process "
        f"while {results['args']['warm']} others opened first are held (so the server's "
        "one-time costs are not counted); shtalk's are logged in (`hello`, `resume`, "
        "backlog drained). The server process's RSS growth (`VmRSS`) over those "
        f"{n} divided by {n}; on a fresh server (the first round).", "",
        "| server | rounds: KiB per connection | RSS with the connections, MiB |",
        "|---|---:|---:|",
    ]
    for mode in ("ceiling", "shtalk"):
        rounds = results[mode]
        lines.append(f"| {mode} | " + ", ".join(f"{r['per_conn_kib']:.1f}" for r in rounds)
                     + f" | {rounds[0]['after_kib'] / 1024:.1f} |")
    figure = results["shtalk"][0]["per_conn_kib"]
    met = "met" if figure <= TARGET_KB else "missed"
    lines += ["", f"- shtalk, per idle logged-in connection: **{figure:.1f} KiB** (target <= "
              f"{TARGET_KB:g} KB): **{met}**; the ceiling "
              f"{results['ceiling'][0]['per_conn_kib']:.1f} KiB.", "", ANALYSIS, ""]
    return "\n".join(lines)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        spec = json.loads(sys.stdin.read())
        sys.exit(0 if child_main(spec, {"idle": scenario_idle}) else 1)
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="connections [1000]")
    parser.add_argument("--warm", type=int, default=200,
                        help="connections opened and held first, not counted [200]")
    parser.add_argument("--rounds", type=int, default=1, help="rounds per server [1]")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds before reading")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--no-docs", action="store_true", help="do not write PERFORMANCE.md")
    args = parser.parse_args()
    results: dict[str, Any] = {"machine": machine(),
                               "args": {"n": args.n, "warm": args.warm}}
    import time

    with workdir("shtalk-connmem-") as work:
        results.update(run(args, work))
    results["finished"] = time.strftime("%Y-%m-%d %H:%M")
    section = report(results)
    print(section)
    record(results, args.json, section, None if args.no_docs else DOC, log)


if __name__ == "__main__":
    main()
