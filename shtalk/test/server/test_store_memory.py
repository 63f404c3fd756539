"""The in-memory store: the shared IStore contract, plus what is its own (answers at
once, no thread, no file)."""

from __future__ import annotations

import os
import random
import sqlite3
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from shtalk.server.eserver import Conflict, StoreClosed
from shtalk.server.store.memory import MemoryStore, MissingRow
from shtalk.server.store.records import OneTimeKey, User
from shtalk.server.store.sqlite import SQLiteStore
from shtalk.test.server.store_contract import NOW, StoreContract, StoreHelpers, async_test, msg


class MemoryTestBase(StoreHelpers, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)

    async def open_store(self) -> MemoryStore:
        store = MemoryStore(clock=self.clock)
        await store.open()
        self.addCleanup(store.close)
        return store


class MemoryContractTests(StoreContract, MemoryTestBase):
    """Everything an IStore promises, in memory."""


class AnswersAtOnceTests(MemoryTestBase):
    """What a unit test relies on: no waiting, no thread, refusals when closed."""

    def test_answers_are_already_fired(self) -> None:
        store = MemoryStore(clock=self.clock)
        d = store.create_user("Alice", "alice", "a@example.org", b"h", "active")
        alice = self.successResultOf(d)
        self.assertEqual((alice.id, alice.created), (1, NOW))
        self.failureResultOf(
            store.create_user("ALICE", "alice", "", b"", "active"), Conflict
        )
        self.successResultOf(store.upsert_device(alice.id, "a1", "phone"))
        self.failureResultOf(store.upsert_device(99, "x", "x"), MissingRow)
        self.assertEqual(self.successResultOf(store.close()), None)
        self.failureResultOf(store.user_by_id(alice.id), StoreClosed)
        self.successResultOf(store.open())
        self.assertEqual(self.successResultOf(store.user_by_id(alice.id)), alice)

    def test_time_comes_from_the_clock(self) -> None:
        store = MemoryStore(clock=self.clock, retention=3600)
        alice = self.successResultOf(store.create_user("A", "a", "", b"", "active"))
        bob = self.successResultOf(store.create_user("B", "b", "", b"", "active"))
        self.successResultOf(store.upsert_device(bob.id, "b1", "x"))
        m = msg((f"u:{bob.id}",), alice, "a1", "c1", target="user:b", expires_at=NOW + 10)
        (seq,) = self.successResultOf(store.append(m)).seqs
        self.assertEqual([s.seq for s in self.successResultOf(store.pending(bob.id, "b1"))],
                         [seq])
        self.clock.advance(10)
        self.assertEqual(self.successResultOf(store.pending(bob.id, "b1")), [])


def _outcome_name(e: BaseException) -> str:
    # A write naming a missing row: SQLite's foreign keys and MemoryStore say it apart.
    return "missing" if isinstance(e, MissingRow | sqlite3.IntegrityError) else type(e).__name__


class SameAnswersTests(TestCase):
    """The same random operations on both stores get the same answers, step by step
    (seeded, so a failure names the seed and step that reproduce it)."""

    STEPS = 100

    @async_test
    async def test_random_operations_agree(self) -> None:
        self.calls = 0
        for seed in range(3):
            await self.run_seed(seed)
        self.assertGreater(self.calls, 3 * self.STEPS)  # every step compared something

    async def run_seed(self, seed: int) -> None:
        rnd = random.Random(seed)
        clock = Clock()
        clock.advance(NOW)
        directory = self.mktemp()
        os.makedirs(directory)
        sql = SQLiteStore(os.path.join(directory, "s.sqlite3"), bytes(32), clock=clock,
                          retention=3600, sweep_interval=0, ack_delay=0)
        await sql.open()
        self.addCleanup(sql.close)
        mem = MemoryStore(clock=clock, retention=3600)
        stores: tuple[Any, Any] = (sql, mem)
        users: list[User] = []
        rooms: list[int] = []
        seqs: list[int] = []

        async def both(what: str, method: str, *args: Any) -> Any:
            answers = []
            for store in stores:
                try:
                    answers.append(("ok", await getattr(store, method)(*args)))
                except Exception as e:
                    answers.append(("error", _outcome_name(e)))
            self.assertEqual(answers[0], answers[1], f"seed {seed}, {what}: {method}{args}")
            self.calls += 1
            return answers[0][1]

        # Four people with devices, two rooms: most random steps then touch live data.
        for n in ("Ann", "Ben", "Cat", "Dan"):
            users.append(await both("setup", "create_user", n, n.lower(), "", b"h", "active"))
        for u in users:
            for d in ("d1", "d2")[: 1 + u.id % 2]:
                await both("setup", "upsert_device", u.id, d, "l")
        for owner, others in ((users[0], users[1:3]), (users[1], users[3:])):
            room = await both("setup", "create_room", owner.key, owner.key, owner.id, False)
            rooms.append(room.id)
            for u in others:
                await both("setup", "add_member", room.id, u.id, "member")

        def someone() -> User:
            return rnd.choice(users)

        def device() -> str:
            return rnd.choice(("d1", "d1", "d2", "d3"))

        kinds = ["append"] * 6 + ["pending"] * 4 + [
            "ack", "time", "member", "device", "keys", "new", "read", "session"]
        for step in range(self.STEPS):
            at = f"step {step}"
            kind = rnd.choice(kinds)
            if kind == "append":
                sender, dev = someone(), device()
                if rnd.random() < 0.5:
                    boxes: tuple[str, ...] = (f"r:{rnd.choice(rooms)}",)
                    target = "room:x"
                else:
                    to = someone()
                    boxes = tuple(dict.fromkeys((f"u:{to.id}", f"u:{sender.id}")))
                    target = f"user:{to.key}"
                per_device = {(u.id, d): b"own" for u in users for d in ("d1", "d2")
                              if rnd.random() < 0.3}
                m = msg(boxes, sender, dev, f"c{rnd.randrange(40)}", target=target,
                        envelope=None if per_device and rnd.random() < 0.5 else b"all",
                        envelopes=per_device,
                        expires_at=rnd.choice((None, None, clock.seconds() + 50)),
                        ts=int((clock.seconds() - rnd.choice((0, 0, 0, 4000))) * 1000))
                result = await both(at, "append", m)
                seqs.extend(result.seqs)
            elif kind == "pending":
                u, d = someone(), device()
                got = await both(at, "pending", u.id, d)
                if got and rnd.random() < 0.6:
                    acked = [x.seq for x in got if rnd.random() < 0.7]
                    await both(at, "ack", u.id, d, acked)
            elif kind == "ack":
                u, d = someone(), device()
                acked = [*rnd.sample(seqs, min(len(seqs), 3)), 10**6]
                await both(at, "ack", u.id, d, acked)
            elif kind == "time":
                clock.advance(rnd.choice((1, 30, 600, 2000)))
                if rnd.random() < 0.5:
                    await both(at, "purge_expired", clock.seconds())
            elif kind == "member":
                r, u = rnd.choice(rooms), someone()
                if rnd.random() < 0.6:
                    await both(at, "add_member", r, u.id, "member")
                else:
                    await both(at, "remove_member", r, u.id)
            elif kind == "device":
                u, d = someone(), device()
                if rnd.random() < 0.6:
                    await both(at, "upsert_device", u.id, d, "l")
                else:
                    await both(at, "remove_device", u.id, d)
            elif kind == "keys":
                u, d = someone(), device()
                if rnd.random() < 0.5:
                    keys = [OneTimeKey(rnd.choice(("ec", "pq")), rnd.randrange(6), b"k")
                            for _ in range(3)]
                    bundle = rnd.choice((None, b"B1", b"B2"))
                    replace = rnd.random() < 0.1
                    await both(at, "publish_keys", u.id, d, bundle, keys, replace)
                else:
                    await both(at, "claim_keys", u.id, rnd.choice((None, d)))
            elif kind == "new":
                n = rnd.choice(("Ann", "Eve", "Fay"))
                user = await both(at, "create_user", n, n.lower(), "", b"h", "active")
                if isinstance(user, User):
                    users.append(user)
                u, name = someone(), rnd.choice(("ann", "x", "y"))
                room = await both(at, "create_room", name, name, u.id, rnd.random() < 0.5)
                if not isinstance(room, str):
                    rooms.append(room.id)
            elif kind == "read":
                u = someone()
                await both(at, "rooms_visible_to", u.id)
                await both(at, "dm_partners", u.id)
                await both(at, "presence_readers", u.id)
            else:
                u, d, fam = someone(), device(), f"f{rnd.randrange(4)}"
                await both(at, "create_session", fam, u.id, d, fam.encode(), clock.seconds() + 900)
                old, new = rnd.choice((b"f0", b"f1", b"n0", b"n1")), rnd.choice((b"n0", b"n1"))
                await both(at, "rotate_refresh", old, new, clock.seconds() + 900, clock.seconds())
            await both(at, "stats")
