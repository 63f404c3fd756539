"""Appends per second and µs per message: the SQLite store against the PostgreSQL one.

Run:  .venv/bin/python -m bench.pgstore [--url postgresql://...] [--size 200]
                                        [--bursts 30] [--senders 50] [--rounds 3]

Why: the PostgreSQL writer pays ~0.7 ms per transaction whatever it holds, and ~20 µs
per message when a batch's rows go in with COPY; whether the group commit keeps batches
large enough is what decides its throughput.  Each run opens a fresh store (a temporary
SQLite file; a new schema of the PostgreSQL database, dropped afterwards), makes a room
of two accounts with two devices each, then:

* burst: ``size`` appends queued at once behind an empty transaction, ``bursts`` times
  (the writer takes what is queued: one batch of ``size``; the empty transaction writes
  nothing, so it costs no fsync);
* loop: ``senders`` closed loops (the next append after the previous committed).

Figures: wall µs per message, appends per second, process CPU µs per message (all
threads: the reactor, the writer, the driver), transactions and the largest batch.
Best of ``rounds`` (the machine is shared).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import tempfile
import time
from typing import Any

DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def measure(kind: str, url: str, size: int, bursts: int, senders: int) -> dict[str, Any]:
    """One run on a fresh store, on its own reactor turn loop (returns the figures)."""
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred, gatherResults

    from shtalk.server.store.records import NewMessage

    out: dict[str, Any] = {}
    tmp = tempfile.mkdtemp(prefix="shtalk-bench-pg-")
    schema = "shtalk_bench_" + secrets.token_hex(4)

    def make() -> Any:
        if kind == "sqlite":
            from shtalk.server.store.sqlite import SQLiteStore

            return SQLiteStore(os.path.join(tmp, "s.sqlite3"), bytes(32), reactor=reactor)
        import psycopg

        from shtalk.server.store.pg.store import PostgresStore
        from shtalk.test.pgtest import with_schema

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
        return PostgresStore(with_schema(url, schema), bytes(32), reactor=reactor)

    async def run() -> None:
        store = make()
        await store.open()
        users = []
        for i in range(2):
            u = await store.create_user(f"U{i}", f"u{i}", f"u{i}@example.org", b"h", "active")
            for d in ("d1", "d2"):
                await store.upsert_device(u.id, d, d)
            users.append(u)
        room = await store.create_room("R", "r", users[0].id, False)
        await store.add_member(room.id, users[1].id, "member")
        box, envelope = f"r:{room.id}", b"\x01" * 400

        def new(cid: str) -> NewMessage:
            return NewMessage((box,), users[0].id, "d1", cid, int(time.time() * 1000), None,
                              "room:r", envelope)

        t0, c0, tx0 = time.perf_counter(), time.process_time(), store.write_transactions
        for b in range(bursts):
            # An empty transaction first: the burst queues behind it, one batch of `size`.
            lead = store.run_write(lambda conn: None)
            await gatherResults([lead, *(store.append(new(f"b{b}.{k}")) for k in range(size))])
        n = bursts * size
        out["burst"] = (time.perf_counter() - t0, time.process_time() - c0,
                        store.write_transactions - tx0, n)
        out["max_batch"] = store.max_batch

        async def loop(i: int) -> None:
            for k in range(size):
                await store.append(new(f"l{i}.{k}"))

        t0, c0, tx0 = time.perf_counter(), time.process_time(), store.write_transactions
        await gatherResults([ensureDeferred(loop(i)) for i in range(senders)])
        out["loop"] = (time.perf_counter() - t0, time.process_time() - c0,
                       store.write_transactions - tx0, senders * size)
        await store.close()

    def done(result: object) -> None:
        out["error"] = None if result is None else str(result)
        reactor.stop()  # type: ignore[attr-defined]

    reactor.callWhenRunning(  # type: ignore[attr-defined]
        lambda: ensureDeferred(run()).addBoth(done))
    reactor.run()  # type: ignore[attr-defined]
    shutil.rmtree(tmp, ignore_errors=True)
    if kind == "postgres":
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=DEFAULT_URL, help="PostgreSQL (a schema is made in it)")
    p.add_argument("--size", type=int, default=200, help="appends per burst [200]")
    p.add_argument("--bursts", type=int, default=30, help="bursts per run [30]")
    p.add_argument("--senders", type=int, default=50, help="closed loops [50]")
    p.add_argument("--rounds", type=int, default=3, help="runs per store, best kept [3]")
    p.add_argument("--child", choices=["sqlite", "postgres"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import json

        print(json.dumps(measure(args.child, args.url, args.size, args.bursts, args.senders)))
        return
    import json
    import subprocess
    import sys

    print(f"{'store':9} {'phase':6} {'µs/msg':>8} {'msgs/s':>8} {'CPU µs/msg':>10} "
          f"{'tx':>5} {'msgs/tx':>7}")
    for kind in ("sqlite", "postgres"):
        best: dict[str, tuple[float, float, int, int]] = {}
        for _ in range(args.rounds):
            # A child process per run: one reactor each, nothing carried over.
            proc = subprocess.run(
                [sys.executable, "-m", "bench.pgstore", "--child", kind, "--url", args.url,
                 "--size", str(args.size), "--bursts", str(args.bursts),
                 "--senders", str(args.senders)],
                capture_output=True, text=True, check=True,
            )
            res = json.loads(proc.stdout.strip().splitlines()[-1])
            if res.get("error"):
                raise SystemExit(f"{kind}: {res['error']}")
            for phase in ("burst", "loop"):
                if phase not in best or res[phase][0] < best[phase][0]:
                    best[phase] = tuple(res[phase])  # type: ignore[assignment]
        for phase, (wall, cpu, tx, n) in best.items():
            print(f"{kind:9} {phase:6} {wall / n * 1e6:8.1f} {n / wall:8.0f} "
                  f"{cpu / n * 1e6:10.1f} {tx:5d} {n / max(tx, 1):7.1f}")


if __name__ == "__main__":
    main()
