"""The SQLite store's write path (group commit, acks) against an earlier revision.

Run:  .venv/bin/python -m bench.store [--baseline REV] [--rounds N] [--quick]
                                      [--write docs/PERFORMANCE.md]

Why: the group commit is the message hot path; a change to the store must not make it
slower.  The baseline revision's ``shtalk`` package is extracted with ``git archive``
into a temporary directory, and each round runs the same workload in two fresh child
processes, baseline and working tree alternately (so drift of the machine hits both),
each on a fresh database file in a temporary directory.

The workload, all through the public IStore methods: a room of ``members`` accounts of
one device each; every member sends in a closed loop (the next append once the previous
committed), and every other member acknowledges each message as soon as its append
committed (acks coalesce).  Then a burst: ``burst`` appends queued at once.  Last, the
reactor thread's CPU for one ``ack()`` call while acks are only buffered (best of 5).  Figures:
CPU time of the child process (all threads) per message sent, wall time per message,
write transactions, and the largest batch.  The ratio is working tree / baseline,
median of the rounds; the spread is (max - min) / median of one side's rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SECTION = "## Store write path (bench/store)"
DEFAULT_BASELINE = "9db595a"
ACK_CALLS = 20000  # the layout commit before the store was split


def child(members: int, each: int, burst: int) -> dict[str, Any]:
    """One measured run in this process (the ``shtalk`` on sys.path is the one tested)."""
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred, gatherResults

    from shtalk.server.store.records import NewMessage
    from shtalk.server.store.sqlite import SQLiteStore

    out: dict[str, Any] = {}
    tmp = tempfile.mkdtemp(prefix="shtalk-bench-store-")

    async def run() -> None:
        store = SQLiteStore(os.path.join(tmp, "s.sqlite3"), bytes(32), reactor=reactor)
        await store.open()
        users = []
        for i in range(members):
            u = await store.create_user(f"U{i}", f"u{i}", f"u{i}@example.org", b"h", "active")
            await store.upsert_device(u.id, "d", "d")
            users.append(u)
        room = await store.create_room("R", "r", users[0].id, False)
        for u in users[1:]:
            await store.add_member(room.id, u.id, "member")
        box = f"r:{room.id}"
        envelope = b"\x01" * 400
        t0, c0, tx0 = time.perf_counter(), time.process_time(), store.write_transactions
        r0 = time.thread_time()  # the reactor thread's own CPU

        async def sender(i: int) -> None:
            u = users[i]
            for k in range(each):
                r = await store.append(NewMessage(
                    (box,), u.id, "d", f"c{k}", int(time.time() * 1000), None, "room:r",
                    envelope))
                for other in users:
                    if other.id != u.id:
                        store.ack(other.id, "d", r.seqs)

        await gatherResults([ensureDeferred(sender(i)) for i in range(members)])
        await store.pending(users[0].id, "d")  # every ack committed
        out["loop_cpu"] = time.process_time() - c0
        out["loop_reactor"] = time.thread_time() - r0
        out["loop_wall"] = time.perf_counter() - t0
        out["loop_tx"] = store.write_transactions - tx0
        t0, c0, tx0 = time.perf_counter(), time.process_time(), store.write_transactions
        r0 = time.thread_time()
        await gatherResults([
            store.append(NewMessage(
                (box,), users[0].id, "d", f"b{k}", int(time.time() * 1000), None, "room:r",
                envelope))
            for k in range(burst)
        ])
        out["burst_cpu"] = time.process_time() - c0
        out["burst_reactor"] = time.thread_time() - r0
        out["burst_wall"] = time.perf_counter() - t0
        out["burst_tx"] = store.write_transactions - tx0
        out["max_batch"] = store.max_batch
        # The cost of one ack() on the reactor thread, buffered (no transaction).
        store.ack_delay = 3600.0
        best = float("inf")
        for _ in range(5):
            r0 = time.thread_time()
            for k in range(ACK_CALLS):
                store.ack(users[1].id, "d", (k,))
            best = min(best, time.thread_time() - r0)
        out["ack_call"] = best
        await store.close()

    def done(result: object) -> None:
        out["error"] = None if result is None else str(result)
        reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(  # type: ignore[attr-defined]
        lambda: ensureDeferred(run()).addBoth(done))
    reactor.run()  # type: ignore[attr-defined]
    shutil.rmtree(tmp, ignore_errors=True)
    return out


def extract(rev: str, into: Path) -> str:
    """The baseline's ``shtalk`` package under ``into``; returns the full commit id."""
    commit = subprocess.run(["git", "rev-parse", rev], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", "--format=tar", commit, "shtalk"], cwd=REPO,
                             check=True, capture_output=True).stdout
    tar_path = into / "base.tar"
    tar_path.write_bytes(archive)
    with tarfile.open(tar_path) as tar:
        tar.extractall(into, filter="data")
    tar_path.unlink()
    return commit


def measure(tree: Path, members: int, each: int, burst: int) -> dict[str, Any]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child",
           json.dumps([members, each, burst])]
    # The script's own directory is sys.path[0], so ``shtalk`` comes from ``tree``.
    proc = subprocess.run(cmd, env=env, cwd=tempfile.gettempdir(), check=True,
                          capture_output=True, text=True, timeout=600)
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if result.get("error"):
        raise RuntimeError(f"{tree}: {result['error']}")
    return result


def spread(values: list[float]) -> float:
    return (max(values) - min(values)) / statistics.median(values)


def report(args: argparse.Namespace) -> str:
    members, each, burst = args.members, args.each, args.burst
    sent = members * each
    with tempfile.TemporaryDirectory(prefix="shtalk-bench-base-") as tmp:
        commit = extract(args.baseline, Path(tmp))
        runs: dict[str, list[dict[str, Any]]] = {"base": [], "new": []}
        for i in range(args.rounds):
            order = [("base", Path(tmp)), ("new", REPO)]
            if i % 2:
                order.reverse()
            for name, tree in order:
                runs[name].append(measure(tree, members, each, burst))
                print(f"round {i + 1} {name}: {runs[name][-1]}", file=sys.stderr)
    rows = []

    def figure(label: str, key: str, per: int, unit: float = 1e6) -> None:
        base = [r[key] / per * unit for r in runs["base"]]
        new = [r[key] / per * unit for r in runs["new"]]
        mb, mn = statistics.median(base), statistics.median(new)
        rows.append(f"| {label} | {mb:.1f} | {mn:.1f} | {mn / mb:.2f}x "
                    f"| {spread(base):.0%} / {spread(new):.0%} |")

    figure("closed loop: CPU µs per message (append + its acks)", "loop_cpu", sent)
    figure("closed loop: reactor thread CPU µs per message", "loop_reactor", sent)
    figure("closed loop: wall µs per message", "loop_wall", sent)
    figure("burst: CPU µs per append", "burst_cpu", burst)
    figure("burst: reactor thread CPU µs per append", "burst_reactor", burst)
    figure("burst: wall µs per append", "burst_wall", burst)
    figure("one ack() call, buffered: reactor thread ns", "ack_call", ACK_CALLS, 1e9)
    tx = [(statistics.median(r["loop_tx"] for r in runs[k]),
           statistics.median(r["burst_tx"] for r in runs[k]),
           max(r["max_batch"] for r in runs[k])) for k in ("base", "new")]
    py = f"Python {sys.version.split()[0]}"
    cmd = "`.venv/bin/python -m bench.store" + (" --quick" if args.quick else "") + \
        f" --baseline {args.baseline} --write docs/PERFORMANCE.md`"
    return "\n".join([
        SECTION,
        "",
        f"Measured by {cmd} on {time.strftime('%Y-%m-%d')} ({os.cpu_count()} cores, {py}):"
        f" baseline {commit[:9]} against the working tree, {args.rounds} rounds alternating"
        " in fresh processes, medians. A room of"
        f" {members} one-device members, each sending {each} messages of 400 bytes in a"
        " closed loop while every other member acknowledges each one; then a burst of"
        f" {burst} appends queued at once. CPU is the child process's, all threads"
        " (the writer's included); the reactor thread's is also shown alone.",
        "",
        "| figure | baseline | working tree | ratio | spread (base / new) |",
        "|---|---:|---:|---:|---:|",
        *rows,
        "",
        f"Write transactions: closed loop {tx[0][0]:.0f} / {tx[1][0]:.0f}, burst"
        f" {tx[0][1]:.0f} / {tx[1][1]:.0f}; largest batch {tx[0][2]} / {tx[1][2]} ops"
        " (baseline / working tree). A ratio inside the spread is no change.",
        "",
    ])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        print(json.dumps(child(*json.loads(argv[1]))))
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--baseline", default=DEFAULT_BASELINE,
                        help=f"git revision to compare with [{DEFAULT_BASELINE}]")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds [5]")
    parser.add_argument("--members", type=int, default=20, help="room size [20]")
    parser.add_argument("--each", type=int, default=50, help="messages per member [50]")
    parser.add_argument("--burst", type=int, default=2000, help="appends at once [2000]")
    parser.add_argument("--quick", action="store_true", help="3 rounds, smaller workload")
    parser.add_argument("--write", type=Path, help="update this markdown file's section")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.each, args.burst = 3, 20, 500
    section = report(args)
    print(section)
    if args.write:
        from bench.common import write_section

        write_section(section, args.write, heading=SECTION)


if __name__ == "__main__":
    main()
