"""The report of bench/fanout: the table, the verdicts against the targets, and the
section of docs/PERFORMANCE.md with how it was measured.

Apart from the runs so that a saved run (``--from-json``) renders without starting
anything, and so that the set-up it describes is read in one place.
"""

from __future__ import annotations

import argparse
from typing import Any

from shtalk.client.client import ACK_BATCH, ACK_DELAY

__all__ = [
    "ACK_BATCH", "ACK_INTERVAL", "DEFAULT_DURATION", "DEFAULT_N", "QUICK_DURATION", "SECTION",
    "TARGET_P99_MS", "TARGET_RATIO", "TARGET_STORM", "build_report", "storm_factor",
]

ACK_INTERVAL = ACK_DELAY
SECTION = "## Server fan-out (bench/fanout)"
TARGET_RATIO = 0.70
TARGET_P99_MS = 5.0
TARGET_STORM = 2.0
#: server CPU per delivery against the ceiling's, closed loop (same run)
TARGET_CPU_RATIO = 2.5
#: paced: the server's CPU, as a share of one core, and its p99 against the ceiling's
TARGET_PACED_CPU = 0.60
TARGET_PACED_P99_RATIO = 2.0
DEFAULT_N = [10, 50, 200]
DEFAULT_DURATION = 10.0
QUICK_DURATION = 3.0


def storm_factor(r: dict[str, Any]) -> float:
    bp, sp = r["baseline"]["latency"]["p99_ms"], r["storm"]["latency"]["p99_ms"]
    return (sp / bp) if bp and sp else float("inf")


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _cores(v: float | None) -> str:
    return "not measured" if v is None else f"{v:.2f} cores"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.0%}" if b else "-"


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def build_report(args: argparse.Namespace, results: dict[str, Any]) -> tuple[str, str]:
    """(terminal table, markdown section)."""
    m = results["machine"]
    rows = []
    header = ("| scenario | server | N | sends/s | delivered/s | vs ceiling | p50 ms | p99 ms "
              "| p99.9 ms | acks/s | server CPU (reactor) | loadgen CPU | machine busy "
              "| other processes |")
    sep = "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    for key in ("closed", "paced"):
        for pair in results.get(key, {}).values():
            ceiling = pair["ceiling"]
            for mode in ("ceiling", "shtalk"):
                r = pair[mode]
                lat = r["latency"]
                n = r["n"]
                scen = "closed loop" if key == "closed" else f"paced {r['rate']:g}/s"
                ratio = "100%" if mode == "ceiling" else _ratio(
                    r["delivered_per_s"], ceiling["delivered_per_s"])
                rows.append(
                    f"| {scen} | {mode} | {n} | {r['sends_acked_per_s']:,.0f} "
                    f"| {r['delivered_per_s']:,.0f} | {ratio} | {_ms(lat['p50_ms'])} "
                    f"| {_ms(lat['p99_ms'])} | {_ms(lat['p999_ms'])} | {r['acks_per_s']:,.0f} "
                    f"| {r['server_cpu']:.0%} ({r['server_reactor_cpu']:.0%}) "
                    f"| {r['loadgen_cpu']:.0%} | {r['machine_busy_cores']:.2f} cores "
                    f"| {_cores(r.get('other_processes_cores'))} |"
                )
    table = "\n".join([header, sep, *rows])

    verdicts = []
    closed = results.get("closed", {})
    if str(args.target_n) in closed:
        pair = closed[str(args.target_n)]
        ratio = pair["shtalk"]["delivered_per_s"] / max(pair["ceiling"]["delivered_per_s"], 1)
        spread = ""
        if pair.get("rounds"):
            spread = (f" (the median of {len(pair['rounds'])} interleaved rounds: "
                      + ", ".join(f"{x['shtalk']:,.0f} / {x['ceiling']:,.0f} = {x['ratio']:.0%}"
                                  for x in pair["rounds"]) + ")")
        verdicts.append(
            f"- Throughput at N = {args.target_n}: shtalk delivers {ratio:.0%} of the ceiling's "
            f"messages per second{spread} (target >= {TARGET_RATIO:.0%}): "
            f"{_verdict(ratio >= TARGET_RATIO)}."
        )
        us = {m: pair[m]["server_cpu"] / max(pair[m]["delivered_per_s"], 1) * 1e6
              for m in ("ceiling", "shtalk")}
        cpu_ratio = us["shtalk"] / max(us["ceiling"], 1e-9)
        verdicts.append(
            f"- Server CPU per delivery at N = {args.target_n} (closed loop, the same round): "
            f"shtalk {us['shtalk']:.2f} µs, the ceiling {us['ceiling']:.2f} µs: "
            f"x{cpu_ratio:.2f} (target <= x{TARGET_CPU_RATIO:g}): "
            f"{_verdict(cpu_ratio <= TARGET_CPU_RATIO)}."
        )
    target_rate = args.rate[0]
    paced = results.get("paced", {}).get(f"{args.paced_n}@{target_rate:g}")
    if paced:
        cpu = paced["shtalk"]["server_cpu"]
        sp99, cp99_ = paced["shtalk"]["latency"]["p99_ms"], paced["ceiling"]["latency"]["p99_ms"]
        p99_ratio = sp99 / cp99_ if sp99 is not None and cp99_ else None
        met = (cpu < TARGET_PACED_CPU and p99_ratio is not None
               and p99_ratio <= TARGET_PACED_P99_RATIO)
        verdicts.append(
            f"- At {target_rate:g} sends/s into {args.paced_n} members: the server at "
            f"{cpu:.0%} of a core (target < {TARGET_PACED_CPU:.0%}), p99 {_ms(sp99)} ms "
            f"against the ceiling's {_ms(cp99_)} ms: "
            + (f"x{p99_ratio:.2f}" if p99_ratio is not None else "-")
            + f" (target <= x{TARGET_PACED_P99_RATIO:g}): {_verdict(met)}."
        )
        p99 = paced["shtalk"]["latency"]["p99_ms"]
        achieved = paced["shtalk"]["sends_acked_per_s"]
        met = p99 is not None and p99 <= TARGET_P99_MS and achieved >= 0.95 * target_rate
        cp99 = paced["ceiling"]["latency"]["p99_ms"]
        verdicts.append(
            f"- p99 latency at {target_rate:g} sends/s into a {args.paced_n}-member room: "
            f"{_ms(p99)} ms (target <= {TARGET_P99_MS:g} ms; achieved {achieved:,.0f} sends/s "
            f"acknowledged; the ceiling's p99 in the same scenario: {_ms(cp99)} ms): "
            f"{_verdict(met)}."
        )
    storm_md = ""
    storm = results.get("storm")
    if storm:
        b, s = storm["baseline"], storm["storm"]
        bp, sp = b["latency"]["p99_ms"], s["latency"]["p99_ms"]
        factor = storm_factor(storm)
        spread = ""
        if storm.get("rounds"):
            spread = (f" (the median of {len(storm['rounds'])} storms: "
                      + ", ".join(f"{x['during_p99_ms']} / {x['without_p99_ms']} ms = "
                                  f"x{x['factor']:.2f}" for x in storm["rounds"]) + ")")
        verdicts.append(
            f"- Login storm: chat p99 {_ms(sp)} ms during {storm['storm']['logins']} logins "
            f"vs {_ms(bp)} ms without: x{factor:.2f}{spread} (target <= x{TARGET_STORM:g}): "
            f"{_verdict(factor <= TARGET_STORM)}."
        )
        storm_md = "\n".join([
            "| chat phase | sends/s | delivered/s | p50 ms | p99 ms | p99.9 ms | max ms "
            "| server CPU |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
            *(
                f"| {name} | {r['sends_acked_per_s']:,.0f} | {r['delivered_per_s']:,.0f} "
                f"| {_ms(r['latency']['p50_ms'])} | {_ms(r['latency']['p99_ms'])} "
                f"| {_ms(r['latency']['p999_ms'])} | {_ms(r['latency']['max_ms'])} "
                f"| {r['server_cpu']:.0%} |"
                for name, r in (("without storm", b), ("during the storm", s))
            ),
            "",
            f"The {storm['storm']['logins']} logins (TLS connect + hello + login, bcrypt cost "
            f"12) were answered between {storm['storm']['login_first_s']} s and "
            f"{storm['storm']['login_last_s']} s after they started (median "
            f"{storm['storm']['login_median_s']} s).",
        ])

    problems = []
    for key in ("closed", "paced"):
        for n, pair in results.get(key, {}).items():
            for mode, r in ((m, pair[m]) for m in ("ceiling", "shtalk") if m in pair):
                if r["errors"]:
                    problems.append(f"{key} N={n} {mode}: {r['errors']} errors, first: "
                                    f"`{r['first_error']}`")
                if r.get("other_processes_cores", 0) > args.max_other:
                    problems.append(
                        f"{key} N={r['n']} {mode}: disturbed by other processes on the machine "
                        f"({r['other_processes_cores']:.2f} cores) in every one of "
                        f"{r.get('attempts', 1)} attempts")
                if r.get("drain_s", 0) > 1:
                    problems.append(
                        f"{key} N={r['n']}" + (f" at {r['rate']:g}/s" if r["rate"] else "")
                        + f" {mode}: still busy {r['drain_s']} s after the load generator had "
                        "stopped (work queued inside the server: no back-pressure)")
                if mode == "shtalk" and r["total_delivered"] != r["expected_deliveries"]:
                    problems.append(
                        f"{key} N={n} shtalk: {r['total_delivered']} deliveries for "
                        f"{r['total_sends_acked']} acknowledged sends (expected "
                        f"{r['expected_deliveries']})")
    if storm and storm.get("other_processes_cores", 0) > args.max_other:
        problems.append(f"storm: disturbed by other processes on the machine "
                        f"({storm['other_processes_cores']:.2f} cores) in every one of "
                        f"{storm.get('attempts', 1)} attempts")
    if storm and storm["errors"]:
        problems.append(f"storm: {storm['errors']} errors, first: `{storm['first_error']}`")

    rates = " and ".join(f"{r:g}" for r in args.rate)
    cmd = ".venv/bin/python -m bench.fanout" + (" --quick" if args.quick else "")
    if args.n != DEFAULT_N:
        cmd += " --n " + ",".join(map(str, args.n))
    if args.duration != (QUICK_DURATION if args.quick else DEFAULT_DURATION):
        cmd += f" --duration {args.duration:g}"
    md = [
        SECTION,
        "",
        f"Measured {results.get('finished', '?')} on {m['nproc']} cores, {m['cpu']}, "
        f"Linux {m['kernel']}, Python {m['python']}, Twisted {m['twisted']}, shtalk at "
        f"`{m['revision']}`"
        + (" (with uncommitted changes in the tree)" if "dirty" in m["revision"] else "")
        + ". Rerun with:",
        "",
        "```",
        cmd,
        "```",
        "",
        "### Set-up",
        "",
        "- Servers: the real `twistd -n shtalk` (fresh data directory on the local ext4 disk, "
        "SQLite `synchronous=FULL`, so every acknowledged send is fsynced) and "
        "`bench/ceiling.py`, a `LineOnlyReceiver` that writes each `send` line unchanged to "
        "every other connection and acknowledges the sender with a constant line: no JSON, no "
        "storage, no authentication. Both serve TLS from the same certificate (shtalk's "
        "self-signed ECDSA P-256) with shtalk's TLS policy, both set `TCP_NODELAY`. They run "
        "one at a time, the other idle.",
        "- Load: one separate process (`bench/loadclient.py`), every connection on one "
        "Twisted reactor, TLS with the server certificate pinned by fingerprint "
        "(`shtalk.server.tls.client_options_pinned`). The server and the load generator "
        "share the 2 cores. CPU columns, over the measured window: the server process as a "
        "share of one core, with its reactor (main) thread alone in brackets (the rest is its "
        "SQLite writer/reader and bcrypt threads), the load generator, and the whole "
        "machine in cores busy (2.00 = saturated; kernel networking included), and the "
        "CPU of every other process on the machine (it is shared with other people's "
        "tests and benchmarks: a row with other processes well above 0 was disturbed).",
        "- Messages: `send` to the room with an opaque `envelope` (base64 of 200 random "
        "bytes), the send time in `client_id`; every recipient acknowledges, in `ack` "
        f"batches of {args.ack_batch} seqs or every {args.ack_interval * 1000:g} ms"
        + (" (as ShtalkClient does)"
           if (args.ack_batch, args.ack_interval) == (ACK_BATCH, ACK_INTERVAL) else "")
        + ". The ceiling gets the same lines (its `ack` replies are a constant line).",
        f"- Closed loop: every one of the N members is a sender with {args.window} send "
        f"outstanding, the next sent as its acknowledgement arrives"
        + (f"; ceiling and shtalk alternate for {args.rounds} rounds per N and the table "
           "shows the round with the median ratio (all rounds under Targets)"
           if args.rounds > 1 else "")
        + ". Paced: an open loop, "
        f"{rates} sends/s in total round-robin over the {args.paced_n} members from a "
        "1 ms timer, whether or not earlier sends were acknowledged.",
        f"- Latency: send -> receipt at each recipient (monotonic clock, one machine), every "
        f"delivery in a {args.duration:g} s window after a {args.warmup:g} s warm-up, "
        "10 us histogram buckets. Delivered/s counts message pushes received by all "
        "members in the window.",
        "- The fan-out server uses `bcrypt_cost = 10` only to shorten account set-up "
        "(measured connections authenticate with `resume`); the storm server uses the "
        "default cost 12.",
        "",
        "### Fan-out",
        "",
        table,
        "",
    ]
    if storm_md:
        md += [
            f"### Login storm ({args.storm_rate:g} sends/s into a {args.storm_n}-member room, "
            f"{args.storm_logins} logins at once)",
            "",
            storm_md,
            "",
        ]
    md += ["### Targets", "", *verdicts, ""]
    if problems:
        md += ["### Problems seen in this run", "", *[f"- {p}" for p in problems], ""]
    notes = results.get("notes")
    if notes:
        md += ["### Where the time goes", "", notes.strip(), ""]
    term = "\n".join([table, "", storm_md, "", *verdicts, *problems])
    return term, "\n".join(md)
