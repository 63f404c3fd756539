"""A change that should cost nothing, measured: bench.crypto and bench.fanout on an older
revision and on this checkout, alternating in one run.

    .venv/bin/python -m bench.beforeafter --base REV [--rounds 3] [--write docs/PERFORMANCE.md]

The older revision's tree is extracted with ``git archive`` (no worktree). Each round runs,
in turn, the base and this tree: ``bench.crypto`` from each tree itself (its own code, its
own benchmark), then ``bench.fanout --quick`` (this checkout's load generator and ceiling,
the shtalk server from each tree: ``--server-tree``). Alternating spreads the machine's
drifts over both sides; every round is kept, so the report gives the run-to-run spread
next to the ratio and a ratio inside the spread reads as no change.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, extract, logger, machine, workdir, write_section

log = logger("beforeafter")

HEADING = "## Before and after a change (bench/beforeafter)"

#: bench.crypto rows compared (label prefix in its tables -> name in the report).
CRYPTO_ROWS = {
    "one direction (sender and receiver": "DM, one direction (µs)",
    "alternating (DH step each message)": "DM, alternating (µs)",
    "encrypt + sign (seal)": "seal (µs)",
    "verify + decrypt (open)": "open (µs)",
    "ratchet alone, one direction": "ratchet alone (µs)",
    "total": "session set-up (µs)",
    "Sender Keys: encrypt once": "room send (µs)",
    "Sender Keys: one member receives": "room receive (µs)",
}
ROW = re.compile(r"^\|\s*([^|]+?)\s*\|\s*([0-9][0-9.,]*)\s*\|")


def crypto_figures(tree: Path) -> dict[str, float]:
    """One ``bench.crypto`` run of ``tree``'s own code: the compared rows, in µs."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.crypto"], cwd=str(tree), env={"PYTHONPATH": str(tree)},
        capture_output=True, text=True, check=True, timeout=900,
    ).stdout
    found: dict[str, float] = {}
    for line in out.splitlines():
        m = ROW.match(line)
        if not m:
            continue
        for prefix, name in CRYPTO_ROWS.items():
            if m.group(1).startswith(prefix) and name not in found:
                found[name] = float(m.group(2).replace(",", ""))
    return found


def fanout_figures(tree: Path | None, work: Path, tag: str) -> dict[str, float]:
    """One ``bench.fanout --quick`` run (closed loop and paced, N = 50, no storm) with the
    server from ``tree`` (None: this checkout)."""
    out = work / f"fanout-{tag}.json"
    argv = [sys.executable, "-m", "bench.fanout", "--quick", "--n", "50", "--rounds", "1",
            "--skip-storm", "--no-docs", "--json", str(out)]
    if tree is not None:
        argv += ["--server-tree", str(tree)]
    subprocess.run(argv, cwd=str(REPO), check=True, timeout=1800, stdout=subprocess.DEVNULL)
    results = json.loads(out.read_text())
    closed = results["closed"]["50"]
    paced = max(results["paced"].values(), key=lambda r: r["shtalk"]["rate"])
    shtalk, ceiling = closed["shtalk"], closed["ceiling"]
    return {
        "closed: delivered/s": shtalk["delivered_per_s"],
        "closed: / ceiling": shtalk["delivered_per_s"] / max(ceiling["delivered_per_s"], 1),
        "closed: server CPU µs per delivery":
            shtalk["server_cpu"] / max(shtalk["delivered_per_s"], 1) * 1e6,
        "closed: p50 ms": shtalk["latency"]["p50_ms"],
        "paced (highest rate): sends/s": paced["shtalk"]["rate"],
        "paced (highest rate): server CPU %": paced["shtalk"]["server_cpu"] * 100,
        "paced (highest rate): p50 ms": paced["shtalk"]["latency"]["p50_ms"],
        "paced (highest rate): p99 ms": paced["shtalk"]["latency"]["p99_ms"],
    }


def spread(values: list[float]) -> float:
    """(max - min) / median: how far this machine moves the same figure between rounds."""
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else 0.0


def report(base: str, rounds: list[dict[str, dict[str, float]]]) -> str:
    info = machine()
    lines = [
        HEADING, "",
        f"`.venv/bin/python -m bench.beforeafter --base {base} --rounds {len(rounds)}` on "
        f"{time.strftime('%Y-%m-%d %H:%M')} (Python {info['python']}, {info['nproc']} cores, "
        f"{info['cpu']}); "
        f"base {base} against this checkout at {info['revision']}. Each round ran "
        "bench.crypto (each tree's own) and bench.fanout --quick (this checkout's load "
        "generator, each tree's server), base first, then this tree. Medians over the "
        "rounds; spread = (max - min) / median of each side.", "",
        "| figure | base | this tree | this / base | spread base / this |",
        "|---|---:|---:|---:|---:|",
    ]
    names = list(rounds[0]["base"])
    for name in names:
        b = [r["base"][name] for r in rounds if name in r["base"]]
        t = [r["this"][name] for r in rounds if name in r["this"]]
        if not b or not t:
            continue
        mb, mt = statistics.median(b), statistics.median(t)
        lines.append(f"| {name} | {mb:,.2f} | {mt:,.2f} | {mt / mb if mb else 0:.3f} | "
                     f"{spread(b):.0%} / {spread(t):.0%} |")
    lines += ["", "Every round: " + "; ".join(
        f"{i + 1}: " + ", ".join(f"{k} {r['base'][k]:.4g}/{r['this'][k]:.4g}"
                                 for k in ("DM, one direction (µs)",
                                           "closed: server CPU µs per delivery")
                                 if k in r["base"] and k in r["this"])
        for i, r in enumerate(rounds)) + " (base/this).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--base", required=True, help="the older revision (any git rev)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds [3]")
    parser.add_argument("--skip-fanout", action="store_true", help="bench.crypto only")
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    args = parser.parse_args(argv)
    with workdir("shtalk-beforeafter-") as work:
        base_tree = extract(args.base, work / "base")
        rounds: list[dict[str, dict[str, float]]] = []
        for i in range(args.rounds):
            r: dict[str, dict[str, float]] = {}
            for side, tree in (("base", base_tree), ("this", REPO)):
                log(f"round {i + 1}: bench.crypto on {side}")
                r[side] = crypto_figures(tree)
            if not args.skip_fanout:
                for side, server_tree in (("base", base_tree), ("this", None)):
                    log(f"round {i + 1}: bench.fanout on {side}")
                    r[side].update(fanout_figures(server_tree, work, f"{side}-{i}"))
            rounds.append(r)
            log(f"round {i + 1}: {json.dumps(r)}")
    section = report(args.base, rounds)
    print(section)
    if args.write:
        write_section(section, args.write, heading=HEADING)


if __name__ == "__main__":
    main()
