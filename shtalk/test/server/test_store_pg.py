"""The store on PostgreSQL: the IStore contract, and what only several writers show.

Each test gets a schema of its own (`shtalk.test.pgtest`); without PostgreSQL they skip.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from shtalk.server.eserver import CorruptStore
from shtalk.server.store.pg import schema
from shtalk.server.store.pg.store import PostgresStore, check_database
from shtalk.server.store.records import CODE_NONE, CODE_OK, OneTimeKey
from shtalk.server.store.sealing import EnvelopeDecryptError
from shtalk.server.store.sql.prekeys import MAX_ONE_TIME_KEYS
from shtalk.test.pgtest import fresh_schema
from shtalk.test.server.store_contract import (
    NOW,
    StoreContract,
    StoreHelpers,
    async_test,
    msg,
)

KEY = bytes(range(32))


class PgTestBase(StoreHelpers, TestCase):
    def setUp(self) -> None:
        self.url = fresh_schema(self)
        self.clock = Clock()
        self.clock.advance(NOW)

    async def open_store(self, key: bytes = KEY, **kwargs: Any) -> PostgresStore:
        kwargs.setdefault("sweep_interval", 0)
        kwargs.setdefault("ack_delay", 0)
        store = PostgresStore(self.url, key, clock=self.clock, **kwargs)
        await store.open()
        self.addCleanup(store.close)
        return store


class PgContractTests(StoreContract, PgTestBase):
    """Everything an IStore promises, on PostgreSQL."""


class TwoWriterTests(PgTestBase):
    """Two stores on one database: what two server processes do to it at once."""

    async def two_stores(self) -> tuple[PostgresStore, PostgresStore]:
        first = await self.open_store()
        return first, await self.open_store()

    @async_test
    async def test_concurrent_appends_keep_one_unbroken_chain(self) -> None:
        a, b = await self.two_stores()
        alice = await self.user(a, "Alice", "a1", "a2")  # a2 keeps every message stored
        bob = await self.user(a, "Bob", "b1")
        room = await a.create_room("Lobby", "lobby", alice.id, False)
        await b.add_member(room.id, bob.id, "member")
        box = f"r:{room.id}"
        (start,) = (await a.mailbox_heads([box])).values()
        sends = [
            store.append(msg((box,), alice, "a1", f"{name}{i}"))
            for i in range(150) for name, store in (("a", a), ("b", b))
        ]  # fmt: skip
        changes = [b.remove_member(room.id, bob.id), a.add_member(room.id, bob.id, "member")]
        results: list[Any] = await gatherResults([*sends, *changes])  # type: ignore[arg-type]
        links = [(r.messages[0].seq, r.messages[0].prev_seq) for r in results[:300]]
        links += [(link.seq, link.prev_seq) for link in results[300:]]
        prev = start
        for seq, prev_seq in sorted(links):
            self.assertEqual(prev_seq, prev, f"chain broken at {seq}")
            prev = seq
        self.assertEqual(await b.mailbox_heads([box]), {box: prev})
        got = await a.messages_between(box, start, prev)
        self.assertEqual([m.seq for m in got], sorted(s for s, _ in links[:300]))

    @async_test
    async def test_same_client_id_on_both_is_stored_once(self) -> None:
        a, b = await self.two_stores()
        alice = await self.user(a, "Alice", "a1", "a2")
        bob = await self.user(a, "Bob", "b1")
        for i in range(20):
            m = msg((f"u:{bob.id}", f"u:{alice.id}"), alice, "a1", f"dup{i}", target="user:bob")
            first, second = await gatherResults([a.append(m), b.append(m)])
            self.assertEqual(first.seqs, second.seqs)
            self.assertEqual(sorted([first.duplicate, second.duplicate]), [False, True])
        self.assertEqual(len(await a.pending(bob.id, "b1")), 20)
        self.assertEqual((await b.stats())["client_ids"], 20)

    @async_test
    async def test_one_time_keys_and_codes_are_used_once_across_writers(self) -> None:
        a, b = await self.two_stores()
        alice = await self.user(a, "Alice", "a1")
        bob = await self.user(a, "Bob", "b1")
        await a.publish_keys(alice.id, "a1", b"B", [OneTimeKey("ec", i, b"k%d" % i)
                                                  for i in range(MAX_ONE_TIME_KEYS)])
        claims = await gatherResults([
            (a if i % 2 else b).claim_keys(alice.id, "a1") for i in range(MAX_ONE_TIME_KEYS + 50)
        ])
        handed = [k.key_id for c in claims for bundle in c for k in bundle.one_time]
        self.assertEqual(sorted(handed), list(range(MAX_ONE_TIME_KEYS)))  # each once
        await a.codes.put_email_code(bob.id, "verify", b"h" * 32, NOW + 600, NOW, 0)
        outcomes = await gatherResults([
            (a if i % 2 else b).codes.check_email_code(bob.id, "verify", b"h" * 32, NOW, 5)
            for i in range(40)
        ])
        self.assertEqual(outcomes.count(CODE_OK), 1)
        self.assertEqual(set(outcomes) - {CODE_OK}, {CODE_NONE})

    @async_test
    async def test_acks_for_the_other_writers_messages(self) -> None:
        """A process acknowledges messages another process appended: the cursor moves
        either way; once the bus has told the store their mailbox (`delivered`), without
        a look-up inside the write transaction."""
        a, b = await self.two_stores()
        alice = await self.user(a, "Alice", "a1")
        bob = await self.user(a, "Bob", "b1")
        sent = [await a.append(msg((f"u:{bob.id}",), alice, "a1", f"m{i}", target="user:bob"))
                for i in range(4)]
        seqs = [r.messages[0].seq for r in sent]
        lookups: list[list[int]] = []
        sql = b._book.sql

        class Counting:
            def __getattr__(self, name: str) -> Any:
                return getattr(sql, name)

            def last_seq_by_mailbox(self, conn: Any, unknown: Any) -> Any:
                lookups.append(list(unknown))
                return sql.last_seq_by_mailbox(conn, unknown)

        b._book.sql = Counting()  # type: ignore[assignment]
        await b.ack(bob.id, "b1", seqs[:2])  # never delivered through b: looked up
        self.assertEqual(lookups, [seqs[:2]])
        for seq in seqs[2:]:
            b.delivered(f"u:{bob.id}", seq)
        await b.ack(bob.id, "b1", seqs[2:])
        self.assertEqual(lookups, [seqs[:2]], "a delivered seq was looked up")
        self.assertEqual(await b.pending(bob.id, "b1"), [])
        self.assertEqual(await a.pending(bob.id, "b1"), [])

    @async_test
    async def test_upsert_device_from_both_creates_it_once(self) -> None:
        a, b = await self.two_stores()
        alice = await self.user(a, "Alice")
        made = await gatherResults([
            (a if i % 2 else b).upsert_device(alice.id, "d1", f"label {i % 2}") for i in range(20)
        ])
        self.assertEqual({d.created for d in made}, {made[0].created})
        self.assertEqual(len(await a.devices(alice.id)), 1)
        self.assertEqual((await a.stats())["cursors"], 1)


class MigrationTests(PgTestBase):
    def raw(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(sql)

    @async_test
    async def test_concurrent_first_opens_migrate_once(self) -> None:
        stores = [PostgresStore(self.url, KEY, clock=self.clock) for _ in range(3)]
        for s in stores:
            self.addCleanup(s.close)
        await gatherResults([s.open() for s in stores])
        self.assertEqual(check_database(self.url), schema.schema_version())

    @async_test
    async def test_a_newer_database_is_refused_in_one_line(self) -> None:
        store = await self.open_store()
        await store.close()
        # Newer, yet usable by this code (an added table): accepted.
        self.raw("UPDATE shtalk_schema SET version = version + 5")
        self.assertEqual(check_database(self.url), schema.schema_version() + 5)
        await self.open_store()
        # Needs newer code: refused before the reactor runs, and by open().
        self.raw("UPDATE shtalk_schema SET compat = 99")
        with self.assertRaises(CorruptStore) as e:
            check_database(self.url)
        self.assertIn("upgrade shtalk", str(e.exception))
        self.assertNotIn("\n", str(e.exception))
        late = PostgresStore(self.url, KEY, clock=self.clock)
        self.addCleanup(late.close)
        await self.failure_of(late.open(), CorruptStore)

    def test_unreachable_database_named_without_its_password(self) -> None:
        with self.assertRaises(CorruptStore) as e:
            check_database("postgresql://shtalk:s3cr3t-pw@127.0.0.1:1/shtalk")
        self.assertIn("postgresql://shtalk@127.0.0.1:1/shtalk", str(e.exception))
        self.assertNotIn("s3cr3t-pw", str(e.exception))
        self.assertNotIn("s3cr3t-pw", repr(PostgresStore(
            "postgresql://shtalk:s3cr3t-pw@127.0.0.1:1/shtalk", KEY, clock=self.clock)))


class ReconnectTests(PgTestBase):
    @async_test
    async def test_writer_connects_again_after_its_connection_dies(self) -> None:
        import psycopg

        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1", "a2")
        pid = await store.run_write(lambda conn: conn.info.backend_pid)
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
        lost = msg((f"u:{alice.id}",), alice, "a1", "lost")
        await self.failure_of(store.append(lost), psycopg.OperationalError)
        # The client retries its send: stored once, now.
        stored = await store.append(lost)
        self.assertFalse(stored.duplicate)
        self.assertEqual([m.client_id for m in await store.pending(alice.id, "a2")], ["lost"])
        self.assertNotEqual(await store.run_write(lambda conn: conn.info.backend_pid), pid)


class AtRestTests(PgTestBase):
    @async_test
    async def test_envelopes_and_addresses_are_sealed_in_the_database(self) -> None:
        import psycopg

        store = await self.open_store()
        alice = await store.create_user("Alice", "alice", "alice-secret@example.org", b"h",
                                        "active")
        for dev in ("a1", "a2"):
            await store.upsert_device(alice.id, dev, dev)
        marker = b"MARKER-" * 10
        await store.append(msg((f"u:{alice.id}",), alice, "a1", "c1", envelope=marker))
        await store.append(msg((f"u:{alice.id}",), alice, "a1", "c2", envelope=None,
                               envelopes={(alice.id, "a2"): marker}))
        with psycopg.connect(self.url, autocommit=True) as conn:
            rows = conn.execute("SELECT nonce, body FROM messages").fetchall()
            email = conn.execute("SELECT email FROM users").fetchall()[0][0]
        self.assertEqual(len(rows), 2)
        for nonce, body in rows:
            self.assertNotIn(b"MARKER", bytes(nonce) + bytes(body))
        self.assertNotIn(b"alice-secret", bytes(email))
        self.assertEqual(await store.email_of(alice.id), "alice-secret@example.org")
        self.assertEqual([m.envelope_for(alice.id, "a2") for m in
                          await store.pending(alice.id, "a2")], [marker, marker])
        # Another key cannot open them.
        other = await self.open_store(key=bytes(32))
        await self.failure_of(other.pending(alice.id, "a2"), EnvelopeDecryptError)


class ConcurrencyControlTests(PgTestBase):
    @async_test
    async def test_a_batch_is_run_again_after_a_deadlock(self) -> None:
        from psycopg import errors

        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1", "a2")
        runs: list[int] = []

        def deadlocking(conn: Any) -> str:
            runs.append(1)
            conn.execute("UPDATE users SET status = 'suspended' WHERE id = ?", (alice.id,))
            if len(runs) == 1:
                raise errors.DeadlockDetected("deadlock detected")
            return "done"

        m = msg((f"u:{alice.id}",), alice, "a1", "c1")
        results: list[Any] = await gatherResults(
            [store.run_write(deadlocking), store.append(m)]  # type: ignore[arg-type]
        )
        self.assertEqual(results[0], "done")
        self.assertEqual(len(runs), 2)
        self.assertEqual([x.client_id for x in await store.pending(alice.id, "a2")], ["c1"])
        self.assertEqual((await store.user_by_id(alice.id)).status, "suspended")  # type: ignore[union-attr]

    @async_test
    async def test_purge_runs_in_one_process_at_a_time(self) -> None:
        import psycopg

        from shtalk.server.store.pg.conn import translate
        from shtalk.server.store.pg.schema import LOCK_CLASS, LOCK_KEY, LOCK_PURGE

        store = await self.open_store(retention=3600)
        alice = await self.user(store, "Alice", "a1", "a2")
        await store.append(msg((f"u:{alice.id}",), alice, "a1", "old", expires_at=NOW + 10))
        with psycopg.connect(self.url) as other:  # another process, purging right now
            other.execute(translate(f"SELECT pg_advisory_xact_lock(?, {LOCK_KEY})"),
                          (LOCK_CLASS, LOCK_PURGE))
            self.assertEqual(await store.purge_expired(NOW + 20), 0)
            self.assertEqual(await store.queued(), 1)
        self.assertEqual(await store.purge_expired(NOW + 20), 1)
        self.assertEqual(await store.queued(), 0)

    @async_test
    async def test_crossed_locks_of_two_writers_resolve(self) -> None:
        # Deadlocks found in 50 ms instead of a second (the test server lets us set it).
        self.url += quote(" -c deadlock_timeout=50")
        a, b = await self.open_store(), await self.open_store()
        alice = await self.user(a, "Alice", "a1", "a2")
        users = [await self.user(a, f"U{i}", "d") for i in range(8)]
        one = await a.create_room("One", "one", alice.id, False)
        two = await a.create_room("Two", "two", alice.id, False)
        box1, box2 = f"r:{one.id}", f"r:{two.id}"
        chains: dict[str, list[tuple[int, int]]] = {box1: [], box2: []}
        for i, u in enumerate(users):
            # Each store: a membership change of one room, then a message to the other,
            # in one transaction (the lock orders cross).
            done: list[Any] = await gatherResults([  # type: ignore[arg-type]
                a.run_write(lambda conn: None), b.run_write(lambda conn: None),  # then both
                a.add_member(one.id, u.id, "member"),
                a.append(msg((box2,), alice, "a1", f"x{i}")),
                b.add_member(two.id, u.id, "member"),
                b.append(msg((box1,), alice, "a1", f"y{i}")),
            ])
            for link in (done[2], done[4]):
                chains[link.mailbox].append((link.seq, link.prev_seq))
            for result in (done[3], done[5]):
                m = result.messages[0]
                chains[m.mailbox].append((m.seq, m.prev_seq))
        # Every change took its place in its room's chain, whatever was re-run.
        heads = await a.mailbox_heads([box1, box2])
        for box, links in chains.items():
            prev = 0
            for seq, prev_seq in sorted(links):
                self.assertEqual(prev_seq, prev, f"{box} broken at {seq}")
                prev = seq
            self.assertEqual(heads[box], prev)
            self.assertEqual(len(await a.messages_between(box, 0, prev)), len(users))


class LifeCycleTests(PgTestBase):
    @async_test
    async def test_close_commits_what_is_queued_and_then_refuses(self) -> None:
        from shtalk.server.eserver import StoreClosed

        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1", "a2")
        queued = [store.append(msg((f"u:{alice.id}",), alice, "a1", f"c{i}")) for i in range(50)]
        first, second = store.close(), store.close()
        await gatherResults([*queued, first, second])  # type: ignore[arg-type]
        await self.failure_of(store.user_by_id(alice.id), StoreClosed)
        again = await self.open_store()
        self.assertEqual(len(await again.pending(alice.id, "a2")), 50)
