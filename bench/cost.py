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


def pooled(windows: list[dict[str, Any]], key: str = "instructions") -> float:
    """Per delivery over batches alternating big, small: the big ones' total minus the
    small ones', over the same difference of their deliveries."""
    big, little = windows[0::2], windows[1::2]
    done: float = sum(w["delivered"] for w in big) - sum(w["delivered"] for w in little)
    spent: float = sum(w[key] for w in big) - sum(w[key] for w in little)
    return spent / done


def measure(args: argparse.Namespace, mode: str, server: Server,
            out: Path, fp: str, tokens: list[str]) -> dict[str, Any]:
    """The batches against one server; per-delivery instructions from its dumps."""
    small = max(1, args.sends // 6)
    windows = [args.warmup] + [args.sends, small] * args.pairs
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
    pairs = [pooled(measured[k:k + 2]) for k in range(0, len(measured), 2)]
    per = pooled(measured)
    log(f"  {mode}: {per:,.0f} instructions per delivery (pairs of batches: "
        + ", ".join(f"{q:,.0f}" for q in pairs) + ")")
    return {"per_delivery": per, "pairs": pairs, "windows": measured}


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
            shtalk = measure(args, "shtalk", server, out, fp, tokens)
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
            bare = measure(args, "ceiling", ceiling, out, fp, tokens)
            if args.annotate:
                bare["annotate"] = profile(bare["windows"], args.top)
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
    """Instructions per delivery by C function (own instructions) and by shared object,
    pooled over the batches like the total."""
    per: dict[str, float] = {}
    objs: dict[str, str] = {}
    tables = [functions(w["dump"]) for w in windows]
    for key in set().union(*tables):
        name, obj = key
        rows = [dict(w, own=t.get(key, 0)) for w, t in zip(windows, tables, strict=True)]
        # inlined code has no object of its own: counted with its function's
        per[name] = per.get(name, 0.0) + pooled(rows, "own")
        if obj.endswith((".so", ".so.6")) or ".so." in obj:
            objs.setdefault(name, obj)
    total = sum(per.values())
    by_obj: dict[str, float] = {}
    for name, v in per.items():
        obj = objs.get(name, "(no object named)")
        by_obj[obj] = by_obj.get(obj, 0) + v
    out = [f"{'per delivery':>12} {'share':>6}  C function [shared object]"]
    out += [f"{v:12,.0f} {v / total:6.1%}  {name} [{objs.get(name, '?')}]"
            for name, v in sorted(per.items(), key=lambda kv: -kv[1])[:top]]
    out += ["", f"{'per delivery':>12} {'share':>6}  shared object"]
    out += [f"{v:12,.0f} {v / total:6.1%}  {obj}"
            for obj, v in sorted(by_obj.items(), key=lambda kv: -kv[1])[:12]]
    return "\n".join(out)


# --- the report ------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    return f"{min(values):,.0f}-{max(values):,.0f}"


def report(args: argparse.Namespace, results: dict[str, Any]) -> tuple[str, str]:
    """The terminal table and the markdown section."""
    runs = results["runs"]
    rows = [(f"run {k + 1}", r["shtalk"], r["ceiling"], r["ratio"]) for k, r in enumerate(runs)]
    ratios = [r[3] for r in rows]
    verdict = "met" if max(ratios) <= TARGET else "missed"
    m = results["machine"]
    big = runs[0]["shtalk"]["windows"]
    term = "\n".join(
        [f"{'':6} {'shtalk':>8} {'(pairs)':>15} {'ceiling':>8} {'(pairs)':>15} {'ratio':>6}"]
        + [f"{name:6} {s['per_delivery']:8,.0f} {spread(s['pairs']):>15} "
           f"{c['per_delivery']:8,.0f} {spread(c['pairs']):>15} {q:5.2f}x"
           for name, s, c, q in rows]
        + [f"instructions per delivery; target <= {TARGET:.1f}x: {verdict}"])
    figures = [r[1]["per_delivery"] for r in rows]
    moved = (max(figures) - min(figures)) / min(figures)
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
        f"thread of the server included. After a warm-up batch, {args.pairs} pairs of a "
        f"batch of {args.sends} sends per sender ({big[0]['delivered']:,} deliveries) and one "
        f"of {max(1, args.sends // 6)} ({big[1]['delivered']:,}); instructions per delivery = "
        "the big batches' count minus the small ones', over the same difference of their "
        "deliveries, so start-up, set-up and what a batch costs once cancel out (the range "
        "is that of the pairs taken alone). Each run starts both servers from scratch. The "
        "count moves a little with timing (how many lines one reactor turn reads and writes "
        "together), not with the machine's load as such.", "",
        "| instructions per delivered message | shtalk | (pairs) | ceiling (bare Twisted "
        f"TLS broadcast) | (pairs) | shtalk / ceiling (target <= {TARGET:.1f}x) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    md += [f"| {name} | {s['per_delivery']:,.0f} | {spread(s['pairs'])} | "
           f"{c['per_delivery']:,.0f} | {spread(c['pairs'])} | {q:.2f}x |"
           for name, s, c, q in rows]
    md += ["", f"Target: {verdict} (worst ratio {max(ratios):.2f}x). shtalk's figure moved by "
           f"{moved:.1%} between runs."]
    if runs[0]["shtalk"].get("annotate"):
        md += ["", "Where shtalk's instructions go (run 1, `--annotate`): each C function's own "
               "instructions per delivery, pooled over the batches like the total (code "
               "inlined from a header is counted with its function). Python 3.11 has no perf "
               "trampoline, so the interpreter's share (ceval and the object code it calls) "
               "is not split by Python function.",
               "", "```", runs[0]["shtalk"]["annotate"], "```", "",
               "The same for the ceiling (run 1):", "", "```", runs[0]["ceiling"]["annotate"],
               "```"]
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
    parser.add_argument("--pairs", type=int, default=4,
                        help="pairs of batches (big, small) per server [4]")
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
    given = list(argv if argv is not None else sys.argv[1:])
    # where the figures went is no part of how they were measured
    args.cmdline = "".join(f" {a}" for k, a in enumerate(given) if a not in ("--json", "--no-docs")
                           and not (k and given[k - 1] == "--json") and not a.startswith("--json="))
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
        for mode in ("shtalk", "ceiling"):
            if r[mode].get("annotate"):
                print(f"\nrun {k + 1}, {mode}, instructions per delivery by C function:")
                print(r[mode]["annotate"])
    record(results, args.json, md, None if args.no_docs else DOC, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
