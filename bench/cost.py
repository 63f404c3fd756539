"""Instructions per delivered message: shtalk against the bare Twisted TLS broadcast
(`bench.ceiling`), both counted by callgrind in the same run.

    .venv/bin/python -m bench.cost [--runs 2] [--sends 82] [--no-docs] [--json F] [--annotate]

What it does (everything on 127.0.0.1, bounded in time, stops by itself):

1. Starts the real server (``twistd -n shtalk``, fresh data directory, `bench.fanout`'s
   configuration: `bench.common.bench_config`) under ``valgrind --tool=callgrind
   --instr-atstart=no`` with a fixed ``PYTHONHASHSEED``: nothing is counted until told.
2. Registers and logs in ``--n`` accounts (`bench.loadclient`'s set-up, not counted).
3. `bench.costload` (not under valgrind) gathers the ``--n`` connections in one room; the
   first ``--senders`` send 200-byte envelopes, ``--window`` in flight each, every
   delivery acknowledged in batches.  A warm-up batch, then a batch of ``--sends`` and one
   of ``--sends / 6`` per sender, each counted alone (``callgrind_control``).
4. The same against the ceiling (same certificate and TLS policy), also under callgrind.
5. Per delivery = (instructions of the big batch - of the small one) / (deliveries of the
   big one - of the small one): start-up, set-up and whatever a batch costs once cancel
   out.  ``--runs`` times from scratch, to show how repeatable it is.

Counts include every thread of the server (the store's writer too) and do not depend on
the machine's load.  The figure is per delivery, so the batch sizes matter little.
Python 3.11 has no perf trampoline: callgrind sees C functions only (``--annotate``: shtalk's
instructions per delivery by C function and by shared object), not which Python code ran them.
Writes the section "Cost per delivery (bench/cost)" of docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from bench.common import (
    DOC,
    LIFTED_LIMITS,
    NO_LIMITS,
    BenchError,
    Server,
    bench_config,
    fingerprint,
    launch_shtalk,
    logger,
    machine,
    record,
    run_child,
    workdir,
)

log = logger("cost")
SECTION = "## Cost per delivery (bench/cost)"
HASHSEED = "0"
TARGET = 2.0
#: valgrind's start of twistd, instrumentation off, takes tens of seconds on this machine
START_TIMEOUT = 300


def valgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={out}"]


def totals(path: Path) -> int:
    """The instruction count of one callgrind dump."""
    found = re.search(r"^totals:\s+(\d+)", path.read_text(errors="replace"), re.M)
    if found is None:
        found = re.search(r"^summary:\s+(\d+)", path.read_text(errors="replace"), re.M)
    if found is None:
        raise BenchError(f"no totals in {path}")
    return int(found.group(1))


def dumps(out: Path) -> list[Path]:
    """The window dumps of one server (``out.1``, ``out.2``, ...), in order."""
    found = [p for p in out.parent.glob(out.name + ".*") if p.suffix[1:].isdigit()]
    return sorted(found, key=lambda p: int(p.suffix[1:]))


def measure(args: argparse.Namespace, work: Path, mode: str, server: Server,
            out: Path, fp: str, tokens: list[str]) -> dict[str, Any]:
    """The batches against one server; per-delivery instructions from its dumps."""
    small = max(1, args.sends // 6)
    windows = [args.warmup, args.sends, small]
    spec = {"scenario": "cost", "mode": mode, "port": server.port, "fingerprint": fp,
            "server_pid": server.pid, "n": args.n, "room": f"cost-{mode}",
            "tokens": tokens, "senders": args.senders, "window": args.window,
            "windows": windows, "warmup_windows": 1, "settle": args.settle}
    log(f"{mode}: batches of {', '.join(map(str, windows))} sends per sender "
        f"(the first a warm-up) ...")
    r = run_child(["-m", "bench.costload"], spec, args.time_limit, f"load ({mode})")
    files = dumps(out)
    measured = [w for w in r["windows"] if w["measured"]]
    if len(files) != len(measured):
        raise BenchError(f"{mode}: {len(files)} callgrind dumps for {len(measured)} batches")
    for w, f in zip(measured, files, strict=True):
        w["instructions"] = totals(f)
        w["dump"] = f
    big, little = measured
    per = (big["instructions"] - little["instructions"]) / (big["delivered"]
                                                            - little["delivered"])
    log(f"  {mode}: {big['instructions']:,} instructions for {big['delivered']:,} deliveries, "
        f"{little['instructions']:,} for {little['delivered']:,}: {per:,.0f} per delivery")
    return {"per_delivery": per, "windows": measured}


def one_run(args: argparse.Namespace, i: int) -> dict[str, Any]:
    env = {"PYTHONHASHSEED": HASHSEED}
    with workdir("shtalk-cost-") as work:
        out = work / "shtalk.callgrind"
        config = bench_config(10, limits=NO_LIMITS if args.no_limits else LIFTED_LIMITS)
        started = time.monotonic()
        server = launch_shtalk(work, "cost", config, wrapper=valgrind(out), env=env,
                               start_timeout=START_TIMEOUT)
        try:
            log(f"run {i + 1}: shtalk under callgrind, pid {server.pid}, port {server.port} "
                f"(started in {time.monotonic() - started:.0f} s)")
            fp = fingerprint(work / "cost-data")
            users = [f"cost{k:03d}" for k in range(args.n)]
            setup = run_child(["-m", "bench.loadclient"],
                              {"scenario": "setup", "mode": "shtalk", "port": server.port,
                               "fingerprint": fp, "users": users, "concurrency": 8},
                              args.time_limit, "set-up")
            log(f"  set-up (register + login {args.n} accounts) took {setup['seconds']} s")
            tokens = [setup["tokens"][u] for u in users]
            shtalk = measure(args, work, "shtalk", server, out, fp, tokens)
            if args.annotate:
                shtalk["annotate"] = profile(shtalk["windows"], args.top)
        finally:
            server.stop()
        out = work / "ceiling.callgrind"
        argv = [*valgrind(out), sys.executable, "-m", "bench.ceiling",
                "--data-dir", str(work / "cost-data"), "--port", "0"]
        ceiling = Server("ceiling", argv, r"ceiling listening on [^:]+:(\d+)",
                         work / "ceiling.stderr", env=env, start_timeout=START_TIMEOUT)
        try:
            log(f"run {i + 1}: ceiling under callgrind, pid {ceiling.pid}")
            bare = measure(args, work, "ceiling", ceiling, out, fp, tokens)
        finally:
            ceiling.stop()
        for w in (*shtalk["windows"], *bare["windows"]):
            w["dump"] = w["dump"].name
    return {"shtalk": shtalk, "ceiling": bare,
            "ratio": shtalk["per_delivery"] / bare["per_delivery"],
            "seconds": round(time.monotonic() - started, 1)}


LINE = re.compile(r"^\s*([\d,]+)\s+\([\s\d.]+%\)\s+(.*?)(?:\s+\[(.*)\])?$")


def functions(dump: Path) -> dict[tuple[str, str], int]:
    """(function, shared object) -> its own instructions, for every function of a dump."""
    proc = subprocess.run(["callgrind_annotate", "--inclusive=no", "--threshold=100", str(dump)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise BenchError(f"callgrind_annotate failed: {proc.stderr[-500:]}")
    lines = proc.stdout.splitlines()
    start = next(k for k, line in enumerate(lines) if "file:function" in line)
    found: dict[tuple[str, str], int] = {}
    for line in lines[start + 1:]:
        m = LINE.match(line)
        if m is None:
            continue
        where = m.group(2)
        # "path/ceval.c:_PyEval_EvalFrameDefault'2": the function, recursion levels merged
        name = where.rsplit(":", 1)[-1].split("'", 1)[0]
        obj = Path(m.group(3) or where.split(":", 1)[0]).name
        found[name, obj] = found.get((name, obj), 0) + int(m.group(1).replace(",", ""))
    return found


def profile(windows: list[dict[str, Any]], top: int) -> str:
    """Instructions per delivery by C function (own instructions) and by shared object:
    the big batch's minus the small one's, like the total."""
    big, little = (functions(w["dump"]) for w in windows)
    deliveries = windows[0]["delivered"] - windows[1]["delivered"]
    per = {k: (big.get(k, 0) - little.get(k, 0)) / deliveries for k in big.keys() | little}
    total = sum(per.values())
    by_obj: dict[str, float] = {}
    for (_, obj), v in per.items():
        by_obj[obj] = by_obj.get(obj, 0) + v
    out = [f"{'per delivery':>12} {'share':>6}  C function [shared object]"]
    out += [f"{v:12,.0f} {v / total:6.1%}  {name} [{obj}]"
            for (name, obj), v in sorted(per.items(), key=lambda kv: -kv[1])[:top]]
    out += ["", f"{'per delivery':>12} {'share':>6}  shared object"]
    out += [f"{v:12,.0f} {v / total:6.1%}  {obj}"
            for obj, v in sorted(by_obj.items(), key=lambda kv: -kv[1])[:12]]
    return "\n".join(out)


# --- the report ------------------------------------------------------------------------


def report(args: argparse.Namespace, results: dict[str, Any]) -> tuple[str, str]:
    """The terminal table and the markdown section."""
    runs = results["runs"]
    rows = [(f"run {k + 1}", r["shtalk"]["per_delivery"], r["ceiling"]["per_delivery"],
             r["ratio"]) for k, r in enumerate(runs)]
    ratios = [r[3] for r in rows]
    verdict = "met" if max(ratios) <= TARGET else "missed"
    m = results["machine"]
    big = runs[0]["shtalk"]["windows"]
    term = "\n".join(
        [f"{'':8} {'shtalk':>10} {'ceiling':>10} {'ratio':>7}"]
        + [f"{name:8} {s:10,.0f} {c:10,.0f} {q:7.2f}x" for name, s, c, q in rows]
        + [f"target <= {TARGET:.1f}x: {verdict}"])
    spread = (max(r[1] for r in rows) - min(r[1] for r in rows)) / min(r[1] for r in rows)
    limits = ("`[ratelimit]` and `[monitor]` off" if args.no_limits else
              "`[ratelimit]` and `[monitor]` on with limits no load reaches, as bench.fanout")
    md = [
        SECTION, "",
        f"Measured by `PYTHONPATH=. .venv/bin/python -m bench.cost{args.cmdline}` on "
        f"{results['finished']} ({m['nproc']} cores, {m['cpu']}, Python {m['python']}, "
        f"Twisted {m['twisted']}, valgrind {results['valgrind']}, revision {m['revision']}); "
        f"the whole command took {results['seconds']:.0f} s.", "",
        f"Fixed workload: {args.n} members in one room, {args.senders} senders with "
        f"{args.window} sends in flight each (closed loop), 200-byte envelopes, every delivery "
        "acknowledged in batches (bench.loadclient's connection, not under valgrind); TLS 1.3 "
        "with shtalk's certificate and policy for both servers. shtalk: `twistd -n shtalk`, "
        f"fresh data directory, durable store (SQLite) and acks on, {limits}. Each server "
        "runs under `valgrind --tool=callgrind --instr-atstart=no` (PYTHONHASHSEED="
        f"{HASHSEED}); only the measured batches are counted (`callgrind_control`), every "
        f"thread included. After a warm-up batch, a batch of {args.sends} sends per sender "
        f"({big[0]['delivered']:,} deliveries) and one of {max(1, args.sends // 6)} "
        f"({big[1]['delivered']:,}); instructions per delivery = difference of their counts "
        "over difference of their deliveries, so start-up, set-up and per-batch costs cancel "
        "out. Each run starts both servers from scratch.", "",
        "| instructions per delivered message | shtalk | ceiling (bare Twisted TLS "
        f"broadcast) | shtalk / ceiling (target <= {TARGET:.1f}x) |",
        "|---|---:|---:|---:|",
    ]
    md += [f"| {name} | {s:,.0f} | {c:,.0f} | {q:.2f}x |" for name, s, c, q in rows]
    md += ["", f"Target: {verdict} (worst ratio {max(ratios):.2f}x). shtalk's figure moved by "
           f"{spread:.2%} between runs."]
    if runs[0]["shtalk"].get("annotate"):
        md += ["", "Where shtalk's instructions go (run 1, `--annotate`): each C function's own "
               "instructions per delivery, the big batch's minus the small one's like the total. "
               "Python 3.11 has no perf trampoline, so the interpreter's share (ceval and the "
               "object code it calls) is not split by Python function.",
               "", "```", runs[0]["shtalk"]["annotate"], "```"]
    return term, "\n".join(md) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="runs from scratch [2]")
    parser.add_argument("--n", type=int, default=50, help="room members [50]")
    parser.add_argument("--senders", type=int, default=5, help="senders [5]")
    parser.add_argument("--window", type=int, default=16, help="sends in flight each [16]")
    parser.add_argument("--sends", type=int, default=82,
                        help="sends per sender in the big batch (5 x 82 x 49 = 20,090 "
                        "deliveries); the small one has 1/6 [82]")
    parser.add_argument("--warmup", type=int, default=10, help="warm-up sends per sender [10]")
    parser.add_argument("--settle", type=float, default=1.0,
                        help="seconds counted after a batch's last reply [1.0]")
    parser.add_argument("--no-limits", action="store_true",
                        help="shtalk with [ratelimit] and [monitor] off")
    parser.add_argument("--annotate", action="store_true",
                        help="print callgrind's top C functions of shtalk's big batch")
    parser.add_argument("--top", type=int, default=25, help="functions --annotate shows [25]")
    parser.add_argument("--time-limit", type=float, default=600,
                        help="seconds for each load process [600]")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--no-docs", action="store_true", help="do not write PERFORMANCE.md")
    args = parser.parse_args(argv)
    args.cmdline = "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:])
                           if a not in ("--no-docs",))
    version = shutil.which("valgrind") and subprocess.run(
        ["valgrind", "--version"], capture_output=True, text=True).stdout.strip()
    if not version or not shutil.which("callgrind_control"):
        log("valgrind (with callgrind_control) is not installed: nothing to measure")
        return 1

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # unwinds through every server's stop()

    signal.signal(signal.SIGTERM, stop)
    started = time.monotonic()
    results: dict[str, Any] = {"machine": machine(), "valgrind": version.split("-", 1)[-1],
                               "args": {k: v for k, v in vars(args).items()
                                        if not isinstance(v, Path)}, "runs": []}
    try:
        for i in range(args.runs):
            results["runs"].append(one_run(args, i))
    except BenchError as e:
        log(f"FAILED: {e}")
        return 1
    results["seconds"] = time.monotonic() - started
    results["finished"] = time.strftime("%Y-%m-%d %H:%M")
    term, md = report(args, results)
    print(term)
    for k, r in enumerate(results["runs"]):
        if r["shtalk"].get("annotate"):
            print(f"\nrun {k + 1}, shtalk, top C functions (own instructions):")
            print(r["shtalk"]["annotate"])
    record(results, args.json, md, None if args.no_docs else DOC, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
