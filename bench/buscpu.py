"""The Redis bus's CPU per message: publisher plus subscriber, on the machine's Redis.

Two bus "processes" in this Python process (as in the bus's tests): A publishes N
committed room messages, B delivers each to one connection.  The CPU of this process
(``time.process_time``: both sides, the reactor included, Redis not) from the first
publish to the last delivery, divided by N, against the same messages through
`LocalBus` alone (one process: encode once, write to the connection): the difference is
what the bus adds per message.  Messages are pre-committed, so the store is not counted;
the CPU of the loop that paces the publishes (one reactor turn per burst) is measured
alone and subtracted.  ``--burst 1`` is one message per reactor turn: every publish
and every receipt its own system call, the worst case.

    .venv/bin/python -m bench.buscpu [--n 10000] [--burst 200]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, ensureDeferred

from shtalk.server.store.mailbox import room_mailbox
from shtalk.test.server.cluster.processes import ChainStore, Mind, Process, random_prefix


class CountingMind(Mind):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.count, self.n = 0, n
        self.done: Deferred[None] = Deferred()

    def deliver(self, seq: int, line: bytes) -> None:
        self.count += 1
        if self.count == self.n:
            self.done.callback(None)


async def run(n: int, burst: int) -> dict[str, float]:
    store = ChainStore()
    room = 1
    store.room_members[room] = {1: "member", 2: "member"}
    prefix = random_prefix()
    a, b = Process(store, prefix, "bench-a"), Process(store, prefix, "bench-b")
    await a.start()
    await b.start()
    await a.login(1, "sender")
    box = room_mailbox(room)
    mind = CountingMind(n)
    b.users.learn(2, "u2")
    await b.rooms.load_user(2)
    await b.bus.attach(2)
    b.presence.attach(2, "d", mind)  # type: ignore[arg-type]
    messages = [store.commit(box, 1, "sender", b"x" * 200) for _ in range(n)]

    # LocalBus alone, same messages, same connection count (one).
    local_mind = CountingMind(n)
    b.local.presence.attach(3, "d", local_mind)  # type: ignore[arg-type]
    store.room_members[room][3] = "member"
    await b.rooms.reload(room)
    t0 = time.process_time()
    for m in messages:
        b.local.publish(m)
    local = (time.process_time() - t0) / n
    b.local.presence.detach(local_mind)  # type: ignore[arg-type]
    del store.room_members[room][3]
    await b.rooms.reload(room)

    # The pacing loop alone (reactor turns without a publish), subtracted below.
    t0 = time.process_time()
    for _ in range(0, n, burst):
        await task.deferLater(reactor, 0, lambda: None)
    pacing = (time.process_time() - t0) / n

    start_wall = time.monotonic()
    t0 = time.process_time()
    for i in range(0, n, burst):
        for m in messages[i:i + burst]:
            a.bus.publish(m)
        await task.deferLater(reactor, 0, lambda: None)
    await mind.done
    cpu = (time.process_time() - t0) / n - pacing
    wall = time.monotonic() - start_wall
    fills = b.bus.chains.fills
    await a.stop()
    await b.stop()
    return {"bus_us": cpu * 1e6, "local_us": local * 1e6, "wall_s": wall, "fills": fills,
            "pacing_us": pacing * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--burst", type=int, default=200)
    args = parser.parse_args()
    out: dict[str, Any] = {}

    async def go() -> None:
        out.update(await run(args.n, args.burst))

    d = ensureDeferred(go())
    d.addErrback(lambda f: (f.printTraceback(), None))
    d.addBoth(lambda _: reactor.stop())  # type: ignore[attr-defined]
    reactor.run()  # type: ignore[attr-defined]
    if out:
        print(f"{args.n} messages, bursts of {args.burst}: "
              f"RedisBus {out['bus_us']:.1f} us/message (publisher + subscriber + delivery), "
              f"LocalBus {out['local_us']:.1f} us/message; bus adds "
              f"{out['bus_us'] - out['local_us']:.1f} us; {out['wall_s']:.2f} s wall, "
              f"{out['fills']} gap fills (pacing loop {out['pacing_us']:.1f} us/message "
              "subtracted)")


if __name__ == "__main__":
    main()
