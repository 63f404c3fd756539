"""The report of bench/cluster: figures per set-up (median of the rounds and their spread),
cross-process latency and bus CPU against their targets, what the figures predict for N
processes on N cores, and the section of docs/PERFORMANCE.md.

Apart from the runs so that a saved run (``--from-json``) renders without starting
anything.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

SECTION = "## Several processes (bench/cluster)"
DEFAULT: dict[str, Any] = {"rounds": 3, "closed_rounds": 3, "duration": 8.0, "warmup": 2.0,
                           "idle": 6.0, "time_budget": 240.0}
#: quick: the paced runs (the targets) twice, for a spread; the closed loop once
QUICK: dict[str, Any] = {"rounds": 2, "closed_rounds": 1, "duration": 2.5, "warmup": 1.0,
                         "idle": 3.0, "time_budget": 60.0}
TARGET_P50_MS = 1.0
TARGET_P99_MS = 5.0
TARGET_BUS_US = 25.0
TITLES = {
    "sqlite-1": "1 process, SQLite",
    "pg-1": "1 process, PostgreSQL",
    "pg-2": "2 processes, PostgreSQL + Redis",
}

Figure = Callable[[dict[str, Any]], float | None]


def stat(name: str) -> Figure:
    """A `pg_stat_database` counter per acknowledged send."""
    return lambda r: float(r["pg_per_s"][name]) / max(float(r["sends_acked_per_s"]), 1.0)


def per(r: dict[str, Any], group: str, unit: str) -> float | None:
    """µs of ``group``'s CPU per delivery or per message (acknowledged send)."""
    cores = r["groups_cpu"].get(group)
    count = r["delivered_per_s"] if unit == "delivery" else r["sends_acked_per_s"]
    if cores is None or not count:
        return None
    return float(cores) / float(count) * 1e6


def busy_per_message(r: dict[str, Any]) -> float | None:
    """µs of shtalk CPU per message above what the processes use with no load."""
    idle = r.get("idle_cpu", {}).get("shtalk")
    if idle is None or not r["sends_acked_per_s"]:
        return None
    return (float(r["groups_cpu"]["shtalk"]) - float(idle)) / float(r["sends_acked_per_s"]) * 1e6


def total_per(r: dict[str, Any], unit: str) -> float | None:
    parts = [per(r, g, unit) for g in ("shtalk", "postgres", "redis")]
    return sum(p for p in parts if p is not None) if parts[0] is not None else None


def lat(r: dict[str, Any], group: str | None, p: str) -> float | None:
    d = r["latency"] if group is None else r["group_latency"][group]
    v = d.get(f"{p}_ms")
    return None if v is None else float(v)


def values(runs: list[dict[str, Any]], fig: Figure) -> list[float]:
    return [v for v in (fig(r) for r in runs) if v is not None]


def med(vs: list[float]) -> float | None:
    return statistics.median(vs) if vs else None


def spread(vs: list[float]) -> float | None:
    """(max - min) / |median|: how far the rounds moved this figure."""
    m = med(vs)
    return (max(vs) - min(vs)) / abs(m) if len(vs) > 1 and m else None


def fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def cell(runs: list[dict[str, Any]], fig: Figure, digits: int = 2) -> str:
    """The median over the rounds, with their spread."""
    vs = values(runs, fig)
    s = spread(vs)
    return fmt(med(vs), digits) + ("" if s is None else f" (±{s / 2:.0%})")


def diffs(a: list[dict[str, Any]], b: list[dict[str, Any]], fig: Figure) -> list[float]:
    """Per round, ``fig`` of ``b`` minus that of ``a`` (rounds where both have it)."""
    out = []
    for ra, rb in zip(a, b, strict=False):
        va, vb = fig(ra), fig(rb)
        if va is not None and vb is not None:
            out.append(vb - va)
    return out


def far_minus_near(r: dict[str, Any], p: str) -> float | None:
    near, far = lat(r, "near", p), lat(r, "far", p)
    return None if near is None or far is None else far - near


def rounds_text(vs: list[float], unit: str, digits: int = 2) -> str:
    return ", ".join(f"{v:+,.{digits}f}" for v in vs) + f" {unit}"


def verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def build_report(results: dict[str, Any]) -> tuple[str, str]:
    """(terminal text, markdown section)."""
    args = results["args"]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = results.get("runs", {})
    names = [n for n in TITLES if n in runs]
    n, rate = args["n"], args["rate"]
    rounds = max((len(runs[s]["paced"]) for s in names), default=0)

    closed = [
        "| set-up | delivered/s | p50 ms | p99 ms | shtalk CPU, cores | shtalk µs per "
        "delivery | PostgreSQL µs per delivery (its database's backends) | PostgreSQL "
        "server-wide µs per delivery (at most) | Redis µs per delivery | all µs per delivery "
        "| load generator, cores | machine busy, cores | other processes, cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in names:
        rs = runs[s]["closed"]
        closed.append(
            f"| {TITLES[s]} | {cell(rs, lambda r: r['delivered_per_s'], 0)} "
            f"| {cell(rs, lambda r: lat(r, None, 'p50'))} "
            f"| {cell(rs, lambda r: lat(r, None, 'p99'))} "
            f"| {cell(rs, lambda r: r['groups_cpu']['shtalk'])} "
            f"| {cell(rs, lambda r: per(r, 'shtalk', 'delivery'))} "
            f"| {cell(rs, lambda r: per(r, 'postgres', 'delivery'))} "
            f"| {cell(rs, lambda r: per(r, 'postgres_shared', 'delivery'))} "
            f"| {cell(rs, lambda r: per(r, 'redis', 'delivery'))} "
            f"| {cell(rs, lambda r: total_per(r, 'delivery'))} "
            f"| {cell(rs, lambda r: r['loadgen_cpu'])} "
            f"| {cell(rs, lambda r: r['machine_busy_cores'])} "
            f"| {cell(rs, lambda r: r['other_processes_cores'])} |")
    paced = [
        "| set-up | sends/s | delivered/s | first half p50 / p99 ms | second half p50 / p99 ms "
        "| shtalk µs per message (reactor threads) "
        "| PostgreSQL µs per message (server-wide, at most) "
        "| Redis µs per message | shtalk CPU, cores | other processes, cores |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in names:
        rs = runs[s]["paced"]
        paced.append(
            f"| {TITLES[s]} | {cell(rs, lambda r: r['sends_acked_per_s'], 0)} "
            f"| {cell(rs, lambda r: r['delivered_per_s'], 0)} "
            f"| {cell(rs, lambda r: lat(r, 'near', 'p50'))} / "
            f"{cell(rs, lambda r: lat(r, 'near', 'p99'))} "
            f"| {cell(rs, lambda r: lat(r, 'far', 'p50'))} / "
            f"{cell(rs, lambda r: lat(r, 'far', 'p99'))} "
            f"| {cell(rs, lambda r: per(r, 'shtalk', 'message'), 1)} "
            f"({cell(rs, lambda r: per(r, 'reactor', 'message'), 1)}) "
            f"| {cell(rs, lambda r: per(r, 'postgres', 'message'), 1)}"
            + ("" if s == "sqlite-1" else
               f" ({cell(rs, lambda r: per(r, 'postgres_shared', 'message'), 1)})")
            + " "
            f"| {cell(rs, lambda r: per(r, 'redis', 'message'), 1)} "
            f"| {cell(rs, lambda r: r['groups_cpu']['shtalk'])} "
            f"| {cell(rs, lambda r: r['other_processes_cores'])} |")

    pg_rows = [
        "| set-up | load | commits per message | rows inserted | rows updated | rows deleted "
        "| rows fetched | PostgreSQL µs per message |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for s in names:
        for key, label in (("closed", "closed loop"), ("paced", f"paced {rate:g}/s")):
            rs = [r for r in runs[s][key] if "pg_per_s" in r]
            if not rs:
                continue

            pg_rows.append(
                f"| {TITLES[s]} | {label} | {cell(rs, stat('xact_commit'))} "
                f"| {cell(rs, stat('tup_inserted'))} | {cell(rs, stat('tup_updated'))} "
                f"| {cell(rs, stat('tup_deleted'))} | {cell(rs, stat('tup_fetched'))} "
                f"| {cell(rs, lambda r: per(r, 'postgres', 'message'), 0)} |")
    verdicts, model = targets(runs, n, rate, results.get("bus_probe", {}).get("pg-2"))
    problems = check(runs)
    cmd = ".venv/bin/python -m bench.cluster" + (" --quick" if args.get("quick") else "")
    m = results["machine"]
    md = [
        SECTION, "",
        f"Measured {results.get('finished', '?')} ({results.get('seconds', '?')} s) on "
        f"{m['nproc']} cores, {m['cpu']}, Linux {m['kernel']}, Python {m['python']}, Twisted "
        f"{m['twisted']}, shtalk at `{m['revision']}`; {rounds} rounds of "
        f"{args['duration']:g} s windows after {args['warmup']:g} s of warm-up. Rerun with:",
        "", "```", cmd, "```", "",
        "### Set-up", "",
        "- Three set-ups running side by side for the whole run, each measured in turn, the "
        "order rotating by round: one `twistd shtalk` on SQLite (the default), one on a "
        "fresh PostgreSQL 15 database, and two on another fresh database with a private "
        "`redis-server` as the bus (`tests/clusterkit.py`, as the system tests start "
        "them). PostgreSQL, Redis, the servers and the load generator share the 2 cores. "
        "Rate limiter and abuse monitor off on all three (in a cluster the limiter's buckets "
        "are in Redis: their round trips would count as bus).",
        f"- Closed loop: {n} members in one room, every one sending with one send "
        "outstanding (bench/fanout's closed loop); on two processes the members alternate "
        "between them.",
        f"- Paced: {rate:g} sends/s in total from the first {n // 2} members (process 0) into "
        f"the {n}-member room; the other {n - n // 2} members are on process 1 of the "
        "two-process set-up, on the same process elsewhere. Latency, send -> receipt in the "
        "load generator (one machine, one clock), is kept per half: the second half minus "
        "the first half on two processes is what crossing processes costs; on one process "
        "the same difference is the control.",
        "- CPU from /proc over each window: all shtalk processes together; the PostgreSQL "
        "backends of the set-up's database; PostgreSQL's server-wide processes (WAL writer, "
        "checkpointer, ...: they work for every database on the machine's server, other "
        "people's included, so their figure is an upper bound, shown apart and left out of "
        "the sums); the private Redis. "
        "Cells are the median of the rounds (± half their max - min spread, relative).",
        "", f"### Closed loop, N = {n}", "", *closed, "",
        f"### Paced, {rate:g} sends/s into {n} members", "", *paced, "",
        "### What PostgreSQL did per message", "",
        "From `pg_stat_database` of the set-up's database over each window (the counters "
        "reach it within a second or so of each transaction: approximate), per "
        "acknowledged send.", "", *pg_rows, "",
        "### Targets", "", *verdicts, "",
        "### What it predicts for N processes on N cores", "", *model, "",
    ]
    if problems:
        md += ["### Problems seen in this run", "", *[f"- {p}" for p in problems], ""]
    md += ["<!-- analysis -->", ""]
    term = "\n".join([*closed, "", *paced, "", *pg_rows, "", *verdicts, "", *model, "", *problems])
    return term, "\n".join(md)


def inside(probes: list[dict[str, Any]] | None) -> tuple[float | None, str]:
    """The bus's CPU per message published, as `bench.busprobe` counted it in every
    process over the whole run; and how it was counted."""
    if not probes:
        return None, ""
    published = sum(p["counts"].get("RedisBus.publish", 0) for p in probes)
    received = sum(p["counts"].get("RedisBus._received", 0) for p in probes)
    fills = sum(p["counts"].get("RedisBus.fill", 0) for p in probes)
    reads = sum(p["counts"].get("RedisBus._read_one", 0) for p in probes)
    missing = sorted({m for p in probes for m in p["missing"]})
    if not published:
        return None, "no message was published on the bus"
    probe_cost = sum(p.get("probe_cost_s", 0.0) for p in probes) / published * 1e6
    bus = sum(p["bus_cpu_s"] for p in probes) / published * 1e6 - probe_cost
    each = ", ".join(f"process {i} {p['bus_cpu_s'] / published * 1e6:.1f} µs"
                     for i, p in enumerate(probes))
    how = (f"{each} per message, less {probe_cost:.1f} µs of the probe's own clock reads; "
           f"{published:,} messages published"
           + (f", {received:,} frames received, {fills:,} gaps filled and {reads:,} "
              "messages read from the store"
              if all("RedisBus.fill" in p["counts"] for p in probes)
              else f" and {received:,} frames received")
           + " by the two "
           "processes over the whole run; reactor-thread CPU in the bus's entry points "
           "minus what one process does without a bus too (encoding the push, writing "
           "it to the local connections)"
           + (f"; entry points not found: {', '.join(missing)}" if missing else ""))
    return bus, how


def targets(runs: dict[str, dict[str, list[dict[str, Any]]]], n: int, rate: float,
            probes: list[dict[str, Any]] | None = None) -> tuple[list[str], list[str]]:
    verdicts: list[str] = []
    model: list[str] = []
    two = runs.get("pg-2", {}).get("paced", [])
    one = runs.get("pg-1", {}).get("paced", [])
    for p, target in (("p50", TARGET_P50_MS), ("p99", TARGET_P99_MS)) if two else ():
        vs = values(two, lambda r, p=p: far_minus_near(r, p))  # type: ignore[misc]
        ctl = values(one, lambda r, p=p: far_minus_near(r, p))  # type: ignore[misc]
        net = diffs(one, two, lambda r, p=p: far_minus_near(r, p))  # type: ignore[misc]
        m = med(vs)
        verdicts.append(
            f"- Cross-process delivery, {p}: the second half (process 1) minus the first half "
            f"(process 0, the senders') at {rate:g} sends/s into {n} members: {fmt(m)} ms, "
            f"the median of rounds {rounds_text(vs, 'ms')}"
            + (f"; the same difference with both halves on one PostgreSQL process (the "
               f"control): {rounds_text(ctl, 'ms')}, so crossing alone adds {fmt(med(net))} "
               f"ms (median of the per-round differences)" if ctl else "")
            + f" (target <= +{target:g} ms, judged on the first figure): "
            f"{verdict(m is not None and m <= target)}.")
    if not (two and one):
        return verdicts, model
    raw = diffs(one, two, lambda r: per(r, "shtalk", "message"))
    busy = diffs(one, two, busy_per_message)
    reactor = diffs(one, two, lambda r: per(r, "reactor", "message"))
    redis = med(values(two, lambda r: per(r, "redis", "message")))
    counted, how = inside(probes)
    m = med(busy) if busy else med(raw)
    judged = counted if counted is not None else m
    idle = [r.get("idle_cpu", {}).get("shtalk") for r in (one[0], two[0])]
    verdicts.append(
        "- Bus CPU per message"
        + (f", counted inside the bus ({how}): **{counted:.1f} µs**" if counted is not None
           else (f" ({how})" if how else ""))
        + f". As a difference, shtalk CPU per message with half the recipients on a second "
        f"process minus with all on one (both PostgreSQL, same round, same {rate:g} sends/s): "
        f"{fmt(med(raw), 1)} µs (rounds {rounds_text(raw, 'µs', 1)})"
        + (f"; {fmt(med(busy), 1)} µs (rounds {rounds_text(busy, 'µs', 1)}) once each "
           f"set-up's CPU with no load is taken off (one process {fmt(idle[0], 3)} cores, "
           f"two {fmt(idle[1], 3)}: heartbeats, reconciliation, keep-alives)" if busy else "")
        + (f"; of the difference, the reactor threads' share: {fmt(med(reactor), 1)} µs "
           f"(rounds {rounds_text(reactor, 'µs', 1)}), the rest is the other threads "
           "(the store's writer and readers)" if reactor else "")
        + f". Redis's own CPU on top: {fmt(redis, 1)} µs per message. Target <= "
        f"{TARGET_BUS_US:g} µs, judged on the "
        + ("count inside" if counted is not None else "difference")
        + f": {verdict(judged is not None and judged <= TARGET_BUS_US)}.")
    procs = [med(values(two, lambda r, i=i: per(r, f"shtalk{i}", "message")))  # type: ignore[misc]
             for i in (0, 1)]
    whole = med(values(one, lambda r: per(r, "shtalk", "message")))
    half = n // 2
    verdicts.append(
        f"- Where it goes on two processes: process 0 (the senders, {half - 1} recipients, "
        f"publishes) {fmt(procs[0], 1)} µs per message, process 1 ({n - half} recipients, "
        f"every message from the bus) {fmt(procs[1], 1)} µs; one process with all {n - 1} "
        f"recipients: {fmt(whole, 1)} µs.")
    model = predict(runs, n, m, counted, redis)
    return verdicts, model


def predict(runs: dict[str, dict[str, list[dict[str, Any]]]], n: int, extra: float | None,
            counted: float | None, redis: float | None) -> list[str]:
    """Server CPU per message, measured, extrapolated to N processes on N cores: one
    process's cost at saturation (closed loop) plus, per further process holding members
    of the room, what the second process added at the same paced load."""
    one = runs["pg-1"]["closed"]
    d = med(values(one, lambda r: per(r, "shtalk", "delivery")))
    pg = med(values(one, lambda r: per(r, "postgres", "delivery")))
    pg_extra = med(diffs(runs["pg-1"]["paced"], runs["pg-2"]["paced"],
                         lambda r: per(r, "postgres", "message")))
    two = med(values(runs.get("pg-2", {}).get("closed", []),
                     lambda r: per(r, "shtalk", "delivery")))
    if d is None or extra is None:
        return ["Not enough figures for a prediction in this run."]
    noise = ""
    if extra < 0:
        noise = f" (measured {extra:.1f} µs: below the rounds' noise, so the model takes 0)"
        extra = 0.0
    fan = n - 1
    msg = fan * d
    pg_msg = None if pg is None else pg * fan
    lines = [
        f"Model: one PostgreSQL process spends {d:.2f} µs of shtalk CPU per delivery at "
        f"saturation (closed loop), {msg:,.0f} µs per message into {n} members; each further "
        f"process holding members of the room adds {extra:,.1f} µs per message{noise} (the "
        "paced runs' difference between two processes and one"
        + (f"; the bus's own code is {counted:.1f} µs of it" if counted is not None else "")
        + ")"
        + (f"; check: two processes measured {two:.2f} µs per delivery in the closed loop, "
           f"the model says {(msg + extra) / fan:.2f}" if two is not None else "")
        + f". PostgreSQL's backends: {fmt(pg_msg, 0)} µs per message on one process, "
        f"{fmt(pg_extra, 0)} µs more per further process; Redis {fmt(redis, 1)} µs per message "
        "with two processes subscribed. Predicted for N processes on N cores (PostgreSQL and "
        "Redis on cores of their own, clients elsewhere), rooms of "
        f"{n} with members on every process (the worst case) and rooms whose members all "
        "use one process (no bus, no extra):",
        "",
        "| N processes | deliveries/s, rooms on every process | PostgreSQL cores | Redis cores "
        "| deliveries/s, rooms on one process | PostgreSQL cores |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for k in (1, 2, 4, 8, 16):
        spread_rate = k * 1e6 / (msg + (k - 1) * extra)  # messages/s
        local_rate = k * 1e6 / msg
        pg_spread = None if pg_msg is None else spread_rate * (
            pg_msg + (k - 1) * (pg_extra or 0.0)) / 1e6
        pg_local = None if pg_msg is None else local_rate * pg_msg / 1e6
        # Redis's cost was measured with two processes subscribed: scaled by k / 2.
        redis_cores = None if redis is None or k == 1 else spread_rate * redis * k / 2 / 1e6
        lines.append(f"| {k} | {spread_rate * fan:,.0f} | {fmt(pg_spread)} | {fmt(redis_cores)} "
                     f"| {local_rate * fan:,.0f} | {fmt(pg_local)} |")
    lines += [
        "",
        "Per-message costs are taken as constant (no contention: one hot room's messages "
        "all take one `mailbox_heads` row lock, which bounds that room at the database's "
        "single-mailbox rate however many processes there are). On this machine two "
        "processes do not double throughput: PostgreSQL, Redis and the load generator take "
        "the same 2 cores.",
    ]
    return lines


def check(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> list[str]:
    problems = []
    for s, by_key in runs.items():
        for key, rs in by_key.items():
            for i, r in enumerate(rs):
                where = f"{s} {key} round {i + 1}"
                if r["errors"]:
                    problems.append(f"{where}: {r['errors']} errors, first: "
                                    f"`{r['first_error']}`")
                if r["total_delivered"] != r["expected_deliveries"]:
                    problems.append(
                        f"{where}: {r['total_delivered']} deliveries for "
                        f"{r['total_sends_acked']} acknowledged sends (expected "
                        f"{r['expected_deliveries']})")
                if r.get("drain_s", 0) > 1:
                    problems.append(f"{where}: still busy {r['drain_s']} s after the load "
                                    "stopped")
                if r["other_processes_cores"] > 0.25:
                    problems.append(f"{where}: other processes on the machine used "
                                    f"{r['other_processes_cores']:.2f} cores")
    return problems
