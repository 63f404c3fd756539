"""Several processes: one process on SQLite, one on PostgreSQL and two on PostgreSQL with
the Redis bus, measured in the same run, alternating.

    .venv/bin/python -m bench.cluster [--quick] [--configs sqlite-1,pg-1,pg-2] [--rounds R]

What it does (everything on 127.0.0.1, bounded in time, stops by itself):

1. Starts the three set-ups side by side and leaves them running: ``sqlite-1`` (today's
   default: one ``twistd shtalk``, SQLite in its data directory), ``pg-1`` (one process on
   a fresh PostgreSQL database, no bus) and ``pg-2`` (two processes on another fresh
   database with a private ``redis-server``: `tests.clusterkit.Cluster`, as the system
   tests start them).  Registers the members on each (bcrypt cost 10; the measured
   connections ``resume`` with access tokens).
2. For ``--rounds`` rounds, each set-up in turn (the order rotates by round, so that the
   machine's drift falls on all of them):

   * closed loop: N members in one room, each sending with one send outstanding; on
     ``pg-2`` the members alternate between the two processes.
   * paced: ``--rate`` (500) sends/s into an N-member room from the first half of the
     members only, on process 0; the other half is on process 1 in ``pg-2`` (on the same
     process elsewhere).  Latency is kept per half: on ``pg-2`` the second half's minus the
     first half's is what crossing processes adds (the same difference on ``pg-1`` is the
     control: what the halves differ by without a bus).

3. CPU over each window from /proc: all shtalk processes together, the database's
   PostgreSQL backends, PostgreSQL's server-wide processes (WAL writer, checkpointer: they
   also work for everyone else's databases on that server), the private Redis, the load
   generator, the machine and every other process.  Per delivery (closed loop) and per
   message (paced).  The bus's CPU per message is the paced run's shtalk CPU per message on
   ``pg-2`` minus that on ``pg-1`` in the same round (same load, same store; only where
   half the recipients are differs).
4. Prints the report and writes the section "Several processes (bench/cluster)" of
   ``docs/PERFORMANCE.md`` (``--no-docs`` to skip; ``--json FILE`` for every figure).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest

from bench.cluster_report import DEFAULT, QUICK, build_report
from bench.clusterload import main_threads, pid_group
from bench.common import DOC, BenchError, logger, machine, record, run_child, workdir
from bench.cpu import GroupCpuWindow, wait_idle
from bench.loadproto import ACK_BATCH, ACK_INTERVAL
from tests.clusterkit import Cluster
from tests.harness import ServerProcess

log = logger("cluster")

CONFIGS = ("sqlite-1", "pg-1", "pg-2")
PROBE_FILE = "bus-probe.json"  # in each process's directory (its working directory)

#: every set-up's server: many connections from one address, sessions that last the run,
#: accounts usable at once; the rate limiter and the abuse monitor off (in a cluster the
#: limiter's buckets live in Redis: its round trips would be charged to the bus)
BENCH_CONFIG: dict[str, dict[str, object]] = {
    "server": {"max_connections_per_address": 1000,
               "max_pending_handshakes_per_address": 1000,
               "idle_timeout": 3600, "pre_auth_timeout": 600},
    "tokens": {"access_ttl": 7200},
    # Set-up only (the measured connections resume): bcrypt at full priority, so that
    # registering on three set-ups at once is not starved by the rest of the machine.
    "accounts": {"bcrypt_nice": 0},
    "ratelimit": {"enabled": False},
    "monitor": {"enabled": False},
}


@dataclass
class Setup:
    """One configuration, running: its processes and what the load generator needs."""

    name: str
    servers: list[ServerProcess]
    cluster: Cluster | None = None
    tokens: list[str] = field(default_factory=list)
    #: what `bench.busprobe` wrote in each process at exit (two-process set-up)
    probes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def pids(self) -> list[int]:
        pids = []
        for s in self.servers:
            assert s.process is not None
            pids.append(s.process.pid)
        return pids

    def cpu_groups(self) -> dict[str, dict[str, Any]]:
        groups: dict[str, dict[str, Any]] = {"shtalk": {"pids": self.pids},
                                             "reactor": {"reactors": self.pids}}
        if len(self.pids) > 1:  # and each process alone
            groups.update({f"shtalk{i}": {"pids": [pid]} for i, pid in enumerate(self.pids)})
        if self.cluster is not None:
            groups["postgres"] = {"postgres": self.cluster.database.name}
            groups["postgres_shared"] = {"postgres": None}
            redis = self.cluster.redis.process
            if redis is not None:
                groups["redis"] = {"pids": [redis.pid]}
        return groups

    def stop(self, logs: Path | None = None) -> None:
        """Stop every process (and the cluster's Redis and database); with ``logs``, copy
        each process's log there first."""
        try:
            for i, s in enumerate(self.servers):
                s.stop()
                probe = s.base_dir / PROBE_FILE
                if probe.exists():
                    self.probes.append(json.loads(probe.read_text()))
                if logs is not None and s.log_path.exists():
                    logs.mkdir(parents=True, exist_ok=True)
                    shutil.copy(s.log_path, logs / f"{self.name}-node{i}.log")
        finally:
            if self.cluster is not None:
                self.cluster.cleanup()
            else:
                for s in self.servers:
                    s.cleanup()


def start_setup(name: str, work: Path) -> Setup:
    if name == "sqlite-1":
        base = work / name
        base.mkdir(mode=0o700)
        server = ServerProcess(BENCH_CONFIG, base_dir=str(base))
        try:
            server.start()
        except BaseException:
            server.cleanup()
            raise
        return Setup(name, [server])
    n = int(name.split("-")[1])
    # The bus's own CPU, counted inside each process of the two-process set-up.
    boot = f"import bench.busprobe as p; p.install({PROBE_FILE!r})" if n > 1 else ""
    try:
        cluster = Cluster(n, BENCH_CONFIG, bus=n > 1, base_dir=work / name, boot=boot)
    except SkipTest as e:
        raise BenchError(f"{name} needs PostgreSQL and redis-server: {e}") from e
    try:
        cluster.start()
    except BaseException:
        cluster.cleanup()
        raise
    return Setup(name, cluster.servers, cluster)


def load(spec: dict[str, Any], timeout: float) -> dict[str, Any]:
    return run_child(["-m", "bench.clusterload"], spec, timeout,
                     f"load generator ({spec['scenario']})")


def register(setup: Setup, users: list[str]) -> None:
    s0 = setup.servers[0]
    started = time.monotonic()
    out = load({"scenario": "setup", "mode": "shtalk", "port": s0.port,
                "fingerprint": s0.fingerprint, "users": users}, timeout=300)
    setup.tokens = [out["tokens"][u] for u in users]
    log(f"{setup.name}: {len(users)} accounts in {time.monotonic() - started:.1f} s")


def measure(args: argparse.Namespace, setup: Setup, key: str, rnd: int) -> dict[str, Any]:
    """One closed-loop or paced window on ``setup``; its figures."""
    n = args.n
    procs = len(setup.servers)
    half = n // 2
    spec: dict[str, Any] = {
        "scenario": "placed", "mode": "shtalk", "fingerprint": setup.servers[0].fingerprint,
        "ports": setup.ports, "port": setup.ports[0], "server_pid": setup.pids[0],
        "n": n, "tokens": setup.tokens[:n], "room": f"{key}-{rnd}",
        "warmup": args.warmup, "duration": args.duration, "window": 1,
        "ack_interval": ACK_INTERVAL, "ack_batch": ACK_BATCH, "cpu": setup.cpu_groups(),
        "pg_url": setup.cluster.database.url if setup.cluster is not None else None,
    }
    if key == "closed":
        spec.update(rate=0, placement=[i % procs for i in range(n)])
    else:
        spec.update(rate=args.rate, placement=[0 if i < half else procs - 1 for i in range(n)],
                    senders=list(range(half)),
                    groups={"near": list(range(half)), "far": list(range(half, n))})
    r = load(spec, timeout=args.warmup + args.duration + 90)
    r["drain_s"] = max(wait_idle(pid, limit=15) for pid in setup.pids)
    groups = r["groups_cpu"]
    lat = r["latency"]
    extra = ""
    if key == "paced":
        near, far = r["group_latency"]["near"], r["group_latency"]["far"]
        extra = (f", near p50/p99 {near['p50_ms']}/{near['p99_ms']} ms, far "
                 f"{far['p50_ms']}/{far['p99_ms']} ms")
    log(f"  {setup.name} {key}: {r['sends_acked_per_s']:.0f} sends/s, "
        f"{r['delivered_per_s']:.0f} delivered/s, p50 {lat['p50_ms']} p99 {lat['p99_ms']} ms"
        f"{extra}; cores " + ", ".join(f"{k} {v:.2f}" for k, v in groups.items())
        + f", loadgen {r['loadgen_cpu']:.2f}, machine {r['machine_busy_cores']:.2f}, other "
        f"processes {r['other_processes_cores']:.2f}; errors {r['errors']} {r['first_error']}")
    return r


def idle_cpu(setups: list[Setup], seconds: float) -> dict[str, dict[str, float]]:
    """Each set-up's CPU with nothing to do, all at once (cores per group): what a cluster
    spends on heartbeats, reconciliation and keep-alives whatever the traffic."""
    groups = {f"{s.name}/{g}": pid_group(what) for s in setups
              for g, what in s.cpu_groups().items()}
    window = GroupCpuWindow(groups, frozenset(
        f"{s.name}/{g}" for s in setups for g in main_threads(s.cpu_groups())))
    time.sleep(seconds)
    cpu = window.stop()["groups_cpu"]
    idle = {s.name: {g.split("/", 1)[1]: v for g, v in cpu.items()
                     if g.startswith(s.name + "/")} for s in setups}
    log("idle: " + "; ".join(f"{n} " + ", ".join(f"{g} {v:.3f}" for g, v in d.items())
                             for n, d in idle.items()))
    return idle


def run(args: argparse.Namespace, work: Path, results: dict[str, Any]) -> None:
    setups: list[Setup] = []
    try:
        for name in args.configs:
            log(f"starting {name}")
            setups.append(start_setup(name, work))
        log("registering the members on each set-up (bcrypt cost 10)")
        users = [f"bench{i:03d}" for i in range(args.n)]
        with ThreadPoolExecutor(len(setups)) as pool:  # each in its own child process
            list(pool.map(lambda setup: register(setup, users), setups))
        results["idle"] = idle_cpu(setups, args.idle)
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            s.name: {"closed": [], "paced": []} for s in setups}
        deadline = time.monotonic() + args.time_budget
        for rnd in range(args.rounds):
            if rnd and time.monotonic() > deadline:
                log(f"time budget spent: stopping after {rnd} rounds")
                break
            order = setups[rnd % len(setups):] + setups[:rnd % len(setups)]
            for key in ("closed", "paced"):
                if key == "closed" and rnd >= args.closed_rounds:
                    continue
                for setup in order:
                    log(f"round {rnd + 1}: {key} on {setup.name} ...")
                    r = measure(args, setup, key, rnd)
                    r["idle_cpu"] = results["idle"][setup.name]
                    runs[setup.name][key].append(r)
        results["runs"] = runs
    finally:
        for setup in setups:
            try:
                setup.stop(args.logs)
            except Exception as e:  # one failed stop must not leave the others running
                log(f"stopping {setup.name}: {e}")
            if setup.probes:
                results.setdefault("bus_probe", {})[setup.name] = setup.probes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cluster",
                                     description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help=f"short run: {QUICK['rounds']} rounds of {QUICK['duration']:g} s "
                        "windows (about 2 minutes)")
    parser.add_argument("--configs", type=lambda s: s.split(","), default=list(CONFIGS),
                        help="set-ups to run [" + ",".join(CONFIGS) + "]")
    parser.add_argument("--n", type=int, default=50, help="room size [50]")
    parser.add_argument("--rate", type=float, default=500.0, help="paced sends/s [500]")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"rounds [{DEFAULT['rounds']}; quick: {QUICK['rounds']}]")
    parser.add_argument("--closed-rounds", type=int, default=None,
                        help=f"rounds with a closed loop [{DEFAULT['closed_rounds']}; quick: "
                        f"{QUICK['closed_rounds']}]")
    parser.add_argument("--duration", type=float, default=None,
                        help=f"measured seconds per window [{DEFAULT['duration']:g}; quick: "
                        f"{QUICK['duration']:g}]")
    parser.add_argument("--warmup", type=float, default=None, help="seconds before measuring")
    parser.add_argument("--idle", type=float, default=None,
                        help=f"seconds of CPU measured with no load [{DEFAULT['idle']:g}; "
                        f"quick: {QUICK['idle']:g}]")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="start no new round after this many seconds of rounds")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="render the report of a run saved with --json instead of running")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--no-docs", action="store_true", help="do not write PERFORMANCE.md")
    parser.add_argument("--logs", type=Path, default=None,
                        help="copy every server's log into this directory at the end")
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else DEFAULT
    for key in ("rounds", "closed_rounds", "duration", "warmup", "idle", "time_budget"):
        if getattr(args, key) is None:
            setattr(args, key, preset[key])
    unknown = set(args.configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown set-ups {sorted(unknown)}; known: {', '.join(CONFIGS)}")

    if args.from_json is not None:
        results = json.loads(args.from_json.read_text())
    else:
        results = {"machine": machine(), "args": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
        started = time.monotonic()
        with workdir("shtalk-cluster-bench-") as work:
            try:
                run(args, work, results)
            except BenchError as e:
                log(f"FAILED: {e}")
                return 1
        results["finished"] = time.strftime("%Y-%m-%d %H:%M")
        results["seconds"] = round(time.monotonic() - started)
    term, md = build_report(results)
    print(term)
    record(results, args.json, md, None if args.no_docs else DOC, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
