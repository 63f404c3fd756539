"""Tests of the SQLite store, on real database files (adbapi threads spin the reactor).

The behaviour every IStore shares is in ``shtalk.test.server.store_contract`` (run here as
`SQLiteContractTests`); this module adds what only the SQLite store has: the file, its
schema and modes, the group commit, the timed sweep, encryption at rest.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from typing import Any

from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from shtalk.server.eserver import CorruptStore
from shtalk.server.iserver import IStore
from shtalk.server.store import facade as store_module
from shtalk.server.store import groupcommit, schema
from shtalk.server.store.sealing import (
    EnvelopeDecryptError,
    decode_envelopes,
    encode_envelopes,
)
from shtalk.server.store.sqlite import (
    SQLiteStore,
    StoreClosed,
    check_database_file,
)
from shtalk.test.server.store_contract import (
    DAY,
    NOW,
    StoreContract,
    StoreHelpers,
    async_test,
    msg,
)
from shtalk.testing import assert_private_files

KEY = bytes(range(32))
MARKER = b"MARKER-" * 10

__all__ = ["DAY", "KEY", "NOW", "StoreTestBase", "async_test", "msg"]


class StoreTestBase(StoreHelpers, TestCase):
    MIGRATIONS = list(schema.MIGRATIONS)

    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "shtalk.sqlite3")
        self.clock = Clock()
        self.clock.advance(NOW)

    async def open_store(self, key: bytes = KEY, **kwargs: Any) -> SQLiteStore:
        # Sweep inside each ack op, so a test sees deletions as soon as the ack fired
        # (AckSweepTests cover the timed sweep the server uses).
        kwargs.setdefault("sweep_interval", 0)
        kwargs.setdefault("ack_delay", 0)  # the test clock does not advance by itself
        store = SQLiteStore(self.path, key, clock=self.clock, **kwargs)
        await store.open()
        self.addCleanup(store.close)
        return store

    def raw(self, sql: str, *params: object) -> list[Any]:
        """Look at the file behind the store's back (a separate connection)."""
        conn = sqlite3.connect(self.path)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()


class SQLiteContractTests(StoreContract, StoreTestBase):
    """Everything an IStore promises, on the SQLite store."""


class FileTests(StoreTestBase):
    """Schema, migrations, refusal of bad files, file modes, pragmas."""

    @async_test
    async def test_create_and_reopen(self) -> None:
        store = await self.open_store()
        self.assertTrue(verifyObject(IStore, store))
        alice = await self.user(store, "Alice", "a1")
        await store.close()
        self.assertEqual(self.raw("PRAGMA user_version"), [(schema.schema_version(),)])
        self.assertEqual(self.raw("PRAGMA application_id"), [(schema.APPLICATION_ID,)])
        self.assertEqual(self.raw("PRAGMA journal_mode"), [("wal",)])
        check_database_file(self.path)
        again = await self.open_store()
        self.assertEqual(await again.user_by_key("alice"), alice)
        self.assertEqual([d.device_id for d in await again.devices(alice.id)], ["a1"])

    @async_test
    async def test_migration_steps_applied_in_order(self) -> None:
        store = await self.open_store()
        await self.user(store, "Alice")
        await store.close()
        self.patch(
            schema,
            "MIGRATIONS",
            [
                *schema.MIGRATIONS,
                ("CREATE TABLE extra (x INTEGER)", "INSERT INTO extra VALUES (1)"),
                ("INSERT INTO extra VALUES (2)",),
            ],
        )
        store = await self.open_store()
        self.assertIsNotNone(await store.user_by_key("alice"))
        await store.close()
        self.assertEqual(self.raw("PRAGMA user_version"), [(len(schema.MIGRATIONS),)])
        self.assertEqual(self.raw("SELECT x FROM extra ORDER BY x"), [(1,), (2,)])

    @async_test
    async def test_chains_continue_from_a_database_without_heads(self) -> None:
        # A database of the release before mailbox chains (schema 4) with messages queued.
        self.patch(schema, "MIGRATIONS", schema.MIGRATIONS[:4])
        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1", "a2")
        room = await store.create_room("Lobby", "lobby", alice.id, False)
        await store.close()
        box = f"r:{room.id}"
        conn = sqlite3.connect(self.path)
        with conn:
            conn.executemany(
                "INSERT INTO messages (seq, mailbox, sender_id, sender_device, client_id, ts,"
                " target, for_all, nonce, body) VALUES (?, ?, ?, 'a1', ?, 0, 'room:lobby', 1,"
                " x'00', x'00')",
                [(seq, box, alice.id, f"c{seq}") for seq in (3, 5, 8)],
            )
        conn.close()
        self.patch(schema, "MIGRATIONS", self.MIGRATIONS)
        store = await self.open_store()
        self.assertEqual(await store.mailbox_heads([box]), {box: 8})
        new = await store.append(msg((box,), alice, "a1", "new"))
        self.assertEqual((new.seqs[0], new.messages[0].prev_seq), (9, 8))

    @async_test
    async def test_failed_migration_leaves_old_version(self) -> None:
        store = await self.open_store()
        await store.close()
        version = schema.schema_version()
        self.patch(
            schema,
            "MIGRATIONS",
            [*schema.MIGRATIONS, ("CREATE TABLE extra (x)", "THIS IS NOT SQL")],
        )
        failing = SQLiteStore(self.path, KEY)
        opening = failing.open()
        early = failing.user_by_key("x")  # waits for the open, then fails with it
        await self.failure_of(opening, Exception)
        await self.failure_of(early, StoreClosed)
        self.assertEqual(self.raw("PRAGMA user_version"), [(version,)])
        self.assertEqual(self.raw("SELECT name FROM sqlite_master WHERE name = 'extra'"), [])

    def test_missing_file_is_fine(self) -> None:
        check_database_file(self.path)

    async def assert_refused(self, fragment: str) -> None:
        with self.assertRaises(CorruptStore) as cm:
            check_database_file(self.path)
        text = str(cm.exception)
        self.assertIn(self.path, text)
        self.assertIn(fragment, text)
        self.assertNotIn("\n", text)
        store = SQLiteStore(self.path, KEY)
        await self.failure_of(store.open(), CorruptStore)
        await store.close()

    @async_test
    async def test_not_sqlite(self) -> None:
        with open(self.path, "wb") as f:
            f.write(b"this is not a database at all" * 100)
        await self.assert_refused("not an SQLite database")

    @async_test
    async def test_newer_schema(self) -> None:
        store = await self.open_store()
        await store.close()
        conn = sqlite3.connect(self.path)
        conn.execute("PRAGMA user_version = 999")
        conn.close()
        await self.assert_refused("newer")

    @async_test
    async def test_other_programs_database(self) -> None:
        conn = sqlite3.connect(self.path)
        conn.execute("CREATE TABLE foo (x)")
        conn.commit()
        conn.close()
        await self.assert_refused("another program")

    @async_test
    async def test_damaged_pages(self) -> None:
        store = await self.open_store()
        for i in range(50):
            await self.user(store, f"user{i}" + "x" * 200)
        await store.close()
        size = os.path.getsize(self.path)
        self.assertGreater(size, 4 * 4096)
        with open(self.path, "r+b") as f:
            f.seek(2 * 4096)
            f.write(b"\xa5" * (size - 2 * 4096))
        await self.assert_refused("")

    @async_test
    async def test_files_are_private(self) -> None:
        store = await self.open_store()
        await self.user(store, "Alice")
        assert_private_files(self, self.path)
        await store.close()
        os.chmod(self.path, 0o644)
        await self.open_store()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    @async_test
    async def test_pragmas(self) -> None:
        store = await self.open_store()

        def read(conn: sqlite3.Connection) -> list[object]:
            names = ("journal_mode", "synchronous", "foreign_keys", "secure_delete")
            return [conn.execute(f"PRAGMA {n}").fetchone()[0] for n in names]

        got = await store._wpool.runWithConnection(read)
        self.assertEqual(got, ["wal", 2, 1, 1])

    def test_key_must_be_32_bytes(self) -> None:
        self.assertRaises(ValueError, SQLiteStore, self.path, b"short")
        self.assertFalse(os.path.exists(self.path))  # the constructor does no I/O

    def test_envelope_codec(self) -> None:
        cases: list[tuple[bytes | None, dict[tuple[int, str], bytes]]] = [
            (None, {}),
            (b"", {}),
            (b"common", {(1, "d\u00e9v"): b"x" * 70000, (2**40, ""): b""}),
            (None, {(3, "phone"): b"\x00\x01"}),
        ]
        for envelope, envelopes in cases:
            self.assertEqual(
                decode_envelopes(encode_envelopes(envelope, envelopes)), (envelope, envelopes)
            )
        blob = encode_envelopes(b"abc", {(1, "x"): b"y"})
        self.assertRaises(ValueError, decode_envelopes, blob[:-1])
        self.assertRaises(ValueError, decode_envelopes, blob + b"\x00")


class GroupCommitTests(StoreTestBase):
    @async_test
    async def test_purge_in_steps(self) -> None:
        self.patch(store_module, "PURGE_STEP", 3)
        store, alice, _, rid = await self.setup_room()
        for i in range(10):
            await store.append(msg((f"r:{rid}",), alice, "a1", f"c{i}", expires_at=NOW + 1))
        before = store.write_transactions
        self.assertEqual(await store.purge_expired(NOW + 2), 10)
        self.assertGreaterEqual(store.write_transactions - before, 4)
        self.assertEqual((await store.stats())["messages"], 0)

    @async_test
    async def test_group_commit_batches(self) -> None:
        store, alice, _, rid = await self.setup_room()
        before = store.write_transactions
        results = await gatherResults(
            [store.append(msg((f"r:{rid}",), alice, "a1", f"c{i}")) for i in range(200)]
        )
        transactions = store.write_transactions - before
        self.assertLessEqual(transactions, 10)
        self.assertGreaterEqual(store.max_batch, 100)
        seqs = [r.seqs[0] for r in results]
        self.assertEqual(seqs, sorted(seqs))  # in submission order
        self.assertEqual(len(set(seqs)), 200)
        self.assertEqual((await store.stats())["messages"], 200)

    @async_test
    async def test_listeners_bracket_each_batchs_answers(self) -> None:
        store, alice, _, rid = await self.setup_room()
        events: list[object] = []

        class Listener:
            def batch_begins(self) -> None:
                events.append("begins")

            def batch_ends(self) -> None:
                events.append("ends")

        store.add_batch_listener(Listener())
        appends = [store.append(msg((f"r:{rid}",), alice, "a1", f"c{i}")) for i in range(50)]
        for d in appends:
            d.addCallback(lambda r: events.append(r.seqs[0]))
        await gatherResults(appends)
        self.assertEqual(events[0], "begins")
        depth = 0
        for e in events:  # every answer inside a bracket, brackets not nested
            depth += 1 if e == "begins" else -1 if e == "ends" else 0
            self.assertIn(depth, (0, 1))
            if e not in ("begins", "ends"):
                self.assertEqual(depth, 1)
        self.assertEqual(len([e for e in events if e not in ("begins", "ends")]), 50)

    @async_test
    async def test_close_flushes_queued_writes(self) -> None:
        store, alice, bob, rid = await self.setup_room()
        appended = [store.append(msg((f"r:{rid}",), alice, "a1", f"c{i}")) for i in range(20)]
        await store.close()
        results = await gatherResults(appended)
        again = await self.open_store()
        self.assertEqual(await self.seqs(again, bob, "b1"), [r.seqs[0] for r in results])


class AckSweepTests(StoreTestBase):
    @async_test
    async def test_acks_coalesce_into_one_op(self) -> None:
        store, alice, bob, rid = await self.setup_room()
        box = f"r:{rid}"
        seqs = [(await store.append(msg((box,), alice, "a1", f"c{i}"))).seqs[0] for i in range(6)]
        blocker = store.append(msg((box,), alice, "a1", "blocker"))  # a transaction in flight
        before = store.write_ops
        acks = [store.ack(bob.id, "b1", [s]) for s in seqs] + [
            store.ack(alice.id, "a2", seqs[:3]),
            store.ack(alice.id, "a2", [10**9]),  # not a message: ignored
        ]
        last = (await blocker).seqs[0]
        await gatherResults(acks)
        self.assertEqual(store.write_ops - before, 2)  # the append, then ONE op for 8 acks
        self.assertEqual(await self.seqs(store, bob, "b1"), [last])
        self.assertEqual(await self.seqs(store, alice, "a2"), [*seqs[3:], last])
        self.assertEqual((await store.stats())["messages"], 4)

    @async_test
    async def test_sweep_runs_on_a_timer(self) -> None:
        store = await self.open_store(sweep_interval=0.5)
        alice = await self.user(store, "Alice", "a1")
        bob = await self.user(store, "Bob", "b1")
        room = await store.create_room("Lobby", "lobby", alice.id, False)
        await store.add_member(room.id, bob.id, "member")
        r = await store.append(msg((f"r:{room.id}",), alice, "a1", "c1"))
        await store.ack(bob.id, "b1", r.seqs)
        self.assertEqual(await self.seqs(store, bob, "b1"), [])  # acknowledged at once
        self.assertEqual((await store.stats())["messages"], 1)  # deleted at the next sweep
        self.clock.advance(0.5)
        await store._when_idle()
        self.assertEqual((await store.stats())["messages"], 0)

    @async_test
    async def test_ack_waits_briefly_for_a_transaction_to_ride_on(self) -> None:
        store, alice, bob, rid = await self.setup_room()
        store.ack_delay = 0.005
        r = await store.append(msg((f"r:{rid}",), alice, "a1", "c1"))
        acked = store.ack(bob.id, "b1", r.seqs)
        self.assertFalse(acked.called)
        before = store.write_transactions
        self.clock.advance(0.005)
        await acked
        self.assertEqual(store.write_transactions - before, 1)
        self.assertEqual(await self.seqs(store, bob, "b1"), [])
        # An append meanwhile takes the ack along at once.
        r = await store.append(msg((f"r:{rid}",), alice, "a1", "c2"))
        acked = store.ack(bob.id, "b1", r.seqs)
        await store.append(msg((f"r:{rid}",), alice, "a1", "c3"))
        self.assertTrue(acked.called)

    @async_test
    async def test_overload_is_reported_until_the_queue_drains(self) -> None:
        self.patch(groupcommit, "BACKLOG_HIGH", 3)
        store, alice, _, rid = await self.setup_room()
        first = store.append(msg((f"r:{rid}",), alice, "a1", "c0"))  # in flight
        self.assertFalse(store.overloaded())
        queued = [store.append(msg((f"r:{rid}",), alice, "a1", f"c{i}")) for i in range(1, 4)]
        self.assertTrue(store.overloaded())
        drained = store.when_drained()
        await first
        self.assertTrue(drained.called)
        self.assertFalse(store.overloaded())
        await gatherResults(queued)

    async def acked_dm(self, store: SQLiteStore) -> None:
        """Alice writes to Bob, who acknowledges it: the row waits for a sweep."""
        alice = await self.user(store, "Alice", "a1")
        bob = await self.user(store, "Bob", "b1")
        r = await store.append(msg((f"u:{bob.id}",), alice, "a1", "dm", target="user:bob"))
        await store.ack(bob.id, "b1", r.seqs)

    @async_test
    async def test_open_sweeps_what_a_crash_left(self) -> None:
        store = await self.open_store(sweep_interval=60)
        await self.acked_dm(store)
        store._book.unswept.clear()  # as if killed before the sweep
        await store.close()
        self.assertEqual(self.raw("SELECT COUNT(*) FROM messages"), [(1,)])
        again = await self.open_store(sweep_interval=60)
        await again._when_idle()
        self.assertEqual((await again.stats())["messages"], 0)

    @async_test
    async def test_close_sweeps(self) -> None:
        store = await self.open_store(sweep_interval=60)
        await self.acked_dm(store)
        await store.close()
        self.assertEqual(self.raw("SELECT COUNT(*) FROM messages"), [(0,)])

    @async_test
    async def test_acks_after_restart_find_their_mailbox(self) -> None:
        store, alice, bob, rid = await self.setup_room()
        r = await store.append(msg((f"r:{rid}",), alice, "a1", "c1"))
        await store.close()
        again = await self.open_store()  # remembers no seq: looks the mailbox up
        await again.ack(bob.id, "b1", r.seqs)
        self.assertEqual(await self.seqs(again, bob, "b1"), [])
        await again.ack(alice.id, "a2", r.seqs)
        self.assertEqual((await again.stats())["messages"], 0)


class EncryptionAtRestTests(StoreTestBase):
    def files_containing(self, needle: bytes) -> list[str]:
        found = []
        for suffix in ("", "-wal", "-shm", "-journal"):
            try:
                with open(self.path + suffix, "rb") as f:
                    if needle in f.read():
                        found.append(suffix or "db")
            except FileNotFoundError:
                pass
        return found

    @async_test
    async def test_envelopes_never_in_clear_and_erased_when_deleted(self) -> None:
        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1")
        bob = await self.user(store, "Bob", "b1")
        boxes = (f"u:{bob.id}",)
        r = await store.append(
            msg(
                boxes,
                alice,
                "a1",
                "m",
                envelope=MARKER,
                envelopes={(bob.id, "b9"): MARKER},
                target="user:bob",
            )
        )
        self.assertEqual(self.files_containing(MARKER), [])
        ((ciphertext,),) = self.raw("SELECT body FROM messages")
        self.assertNotIn(MARKER, ciphertext)
        await store.close()
        self.assertEqual(self.files_containing(MARKER), [])
        self.assertEqual(self.files_containing(ciphertext), ["db"])

        store = await self.open_store()
        (got,) = await store.pending(bob.id, "b1")
        self.assertEqual(got.envelope, MARKER)
        await store.ack(bob.id, "b1", r.seqs)
        self.assertEqual((await store.stats())["messages"], 0)
        await store.close()
        # secure_delete: the deleted ciphertext is overwritten, not merely unlinked.
        self.assertEqual(self.files_containing(ciphertext), [])
        self.assertEqual(self.files_containing(MARKER), [])

    @async_test
    async def test_wrong_key_or_moved_row_is_an_error(self) -> None:
        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1")
        bob = await self.user(store, "Bob", "b1")
        await store.append(msg((f"u:{bob.id}",), alice, "a1", "one", target="user:bob"))
        await store.close()
        wrong = await self.open_store(key=b"\x01" * 32)
        err = await self.failure_of(wrong.pending(bob.id, "b1"), EnvelopeDecryptError)
        self.assertIn("wrong storage key", str(err))
        await wrong.close()

        store = await self.open_store()
        await store.append(msg((f"u:{bob.id}",), alice, "a1", "two", target="user:bob"))
        await store.close()
        # Swap the ciphertexts of two rows: the associated data no longer matches.
        conn = sqlite3.connect(self.path)
        rows = conn.execute("SELECT seq, nonce, body FROM messages ORDER BY seq").fetchall()
        conn.execute(
            "UPDATE messages SET nonce = ?, body = ? WHERE seq = ?",
            (rows[1][1], rows[1][2], rows[0][0]),
        )
        conn.commit()
        conn.close()
        store = await self.open_store()
        await self.failure_of(store.pending(bob.id, "b1"), EnvelopeDecryptError)


class LifeCycleTests(StoreTestBase):
    @async_test
    async def test_refused_before_open_and_after_close(self) -> None:
        store = SQLiteStore(self.path, KEY, clock=self.clock)
        await self.failure_of(store.user_by_key("x"), StoreClosed)
        await self.failure_of(store.create_user("x", "x", "", b"", "active"), StoreClosed)
        opening = store.open()
        # Asked while it opens (a client right after a restart): run once it is open.
        early = store.create_user("x", "x", "", b"", "active")
        early_read = store.user_by_key("nobody")
        self.assertFalse(early.called)
        await opening
        user = await early
        self.assertEqual(user.name, "x")
        self.assertIsNone(await early_read)
        await store.create_user("y", "y", "", b"", "active")
        first, second = store.close(), store.close()
        await gatherResults([first, second])
        await self.failure_of(store.user_by_key("x"), StoreClosed)
        await store.close()
