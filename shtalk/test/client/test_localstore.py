"""Tests of the client's encrypted local store, on real SQLite files in a temp dir."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
import time
from typing import Any

from twisted.internet.defer import gatherResults
from twisted.trial.unittest import TestCase

from shtalk.client import localschema, localseal
from shtalk.client.localstore import (
    DEFAULT_KDF,
    CorruptEntry,
    HistoryMessage,
    KdfParams,
    LocalStore,
    LocalStoreError,
    StoreClosed,
    WrongPassphrase,
)
from shtalk.sqlitefiles import SUFFIXES
from shtalk.testing import assert_private_files

#: Argon2id's cheapest legal setting: the tests exercise the store, not the KDF.
CHEAP = KdfParams(memory_kib=8, iterations=1, lanes=1)
MARKER = "Zq7-MARKER-xK9"
PASS = "correct horse battery staple"


def msg(
    n: int,
    conv: str = "user:bob",
    ts: int | None = None,
    body: str | None = None,
    expires_at: float | None = None,
    state: str = "received",
    sender: str = "bob",
) -> HistoryMessage:
    return HistoryMessage(
        id=f"{sender}/dev1/{n}",
        conversation=conv,
        sender=sender,
        sender_device="dev1",
        ts=1_000 * n if ts is None else ts,
        body=f"message {n}" if body is None else body,
        expires_at=expires_at,
        state=state,
    )


def raw_bytes(path: str) -> bytes:
    out = b""
    for suffix in SUFFIXES:
        try:
            with open(path + suffix, "rb") as f:
                out += f.read()
        except FileNotFoundError:
            pass
    return out


class Base(TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "client.db")
        self.stores: list[LocalStore] = []
        self.addCleanup(self._close_all)

    async def _close_all(self) -> None:
        for s in self.stores:
            await s.close()

    async def create(self, passphrase: str = PASS, kdf: KdfParams = CHEAP) -> LocalStore:
        store = await LocalStore.create(self.path, passphrase, kdf=kdf)
        self.stores.append(store)
        return store

    async def open(self, passphrase: str = PASS) -> LocalStore:
        store = await LocalStore.open(self.path, passphrase)
        self.stores.append(store)
        return store

    async def reopen(self, store: LocalStore, passphrase: str = PASS) -> LocalStore:
        await store.close()
        return await self.open(passphrase)

    def raw(self, sql: str, *args: Any) -> list[Any]:
        """Direct access to the file, as an attacker with the file would have (store closed)."""
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            rows = conn.execute(sql, args).fetchall()
        finally:
            conn.close()
        return rows


class LifeCycleTests(Base):
    async def test_create_then_open(self) -> None:
        store = await self.create()
        await store.commit(puts=[("meta", "k", b"v")])
        store = await self.reopen(store)
        self.assertEqual(await store.get("meta", "k"), b"v")
        self.assertEqual(store.kdf, CHEAP)

    async def test_create_refuses_an_existing_file(self) -> None:
        await self.create()
        with self.assertRaises(LocalStoreError):
            await LocalStore.create(self.path, PASS, kdf=CHEAP)

    async def test_open_missing_or_foreign_file(self) -> None:
        with self.assertRaises(LocalStoreError) as cm:
            await LocalStore.open(self.path, PASS)
        self.assertIn("no such store", str(cm.exception))
        self.raw("CREATE TABLE other (x)")
        with self.assertRaises(LocalStoreError) as cm2:
            await LocalStore.open(self.path, PASS)
        self.assertIn("not a shtalk local store", str(cm2.exception))

    async def test_wrong_passphrase(self) -> None:
        store = await self.create()
        await store.close()
        with self.assertRaises(WrongPassphrase):
            await LocalStore.open(self.path, "wrong horse battery staple")
        await (await self.open(PASS)).close()  # a failed attempt changes nothing

    async def test_normalised_passphrase(self) -> None:
        self.path = os.path.join(self.dir, "n.db")
        store = await LocalStore.create(self.path, "caf\u00e9", kdf=CHEAP)
        await store.close()
        await (await self.open("cafe\u0301")).close()

    async def test_tampered_kdf_parameters_do_not_unlock(self) -> None:
        store = await self.create()
        await store.close()
        self.raw("UPDATE header SET value = ? WHERE name = 'kdf'", b"argon2id;m=16;t=1;p=1")
        with self.assertRaises(WrongPassphrase):
            await LocalStore.open(self.path, PASS)
        self.raw("UPDATE header SET value = ? WHERE name = 'kdf'", b"argon2id;m=999999999;t=1;p=1")
        with self.assertRaises(LocalStoreError):
            await LocalStore.open(self.path, PASS)

    async def test_change_passphrase(self) -> None:
        store = await self.create()
        await store.commit(puts=[("identity", "me", b"secret key")], messages=[msg(1)])
        before = self.raw_header()
        with self.assertRaises(WrongPassphrase):
            await store.change_passphrase("not it", "new passphrase")
        self.assertEqual(self.raw_header(), before)
        await store.change_passphrase(PASS, "new passphrase")
        after = self.raw_header()
        self.assertNotEqual(after["wrapped_key"], before["wrapped_key"])
        self.assertNotEqual(after["salt"], before["salt"])
        # Still usable after the change, with the same data.
        self.assertEqual(await store.get("identity", "me"), b"secret key")
        await store.close()
        with self.assertRaises(WrongPassphrase):
            await LocalStore.open(self.path, PASS)
        store = await self.open("new passphrase")
        self.assertEqual(await store.get("identity", "me"), b"secret key")
        self.assertEqual([m.id for m in await store.history("user:bob")], ["bob/dev1/1"])
        await store.close()
        # The old wrapped key is gone from the WAL too (checkpoint after the change).
        self.assertNotIn(before["wrapped_key"], raw_bytes(self.path))

    def raw_header(self) -> dict[str, bytes]:
        conn = sqlite3.connect(self.path)
        try:
            return {n: bytes(v) for n, v in conn.execute("SELECT name, value FROM header")}
        finally:
            conn.close()

    async def test_change_passphrase_can_change_parameters(self) -> None:
        store = await self.create()
        stronger = KdfParams(memory_kib=64, iterations=2, lanes=2)
        await store.change_passphrase(PASS, "other", kdf=stronger)
        store = await self.reopen(store, "other")
        self.assertEqual(store.kdf, stronger)

    async def test_default_parameters(self) -> None:
        """The real setting once: 64 MiB, t=3, p=4, stored in the file."""
        self.assertEqual(DEFAULT_KDF, KdfParams(memory_kib=65536, iterations=3, lanes=4))
        start = time.perf_counter()
        store = await self.create(kdf=DEFAULT_KDF)
        elapsed = time.perf_counter() - start
        self.assertEqual(self.raw_header()["kdf"], b"argon2id;m=65536;t=3;p=4")
        store = await self.reopen(store)
        self.assertEqual(store.kdf, DEFAULT_KDF)
        # Slow on purpose, but not absurd for an unlock (generous bound for CI).
        self.assertLess(elapsed, 30.0)

    async def test_empty_passphrase_refused_at_creation(self) -> None:
        with self.assertRaises(ValueError):
            await LocalStore.create(self.path, "", kdf=CHEAP)
        self.assertFalse(os.path.exists(self.path))

    async def test_failed_create_leaves_no_file(self) -> None:
        def boom(*args: object) -> bytes:
            raise RuntimeError("injected")

        self.patch(localseal, "derive_kek", boom)
        with self.assertRaises(RuntimeError):
            await LocalStore.create(self.path, PASS, kdf=CHEAP)
        for suffix in SUFFIXES:
            self.assertFalse(os.path.exists(self.path + suffix), suffix)

    async def test_permissions_0600_whatever_the_umask(self) -> None:
        old = os.umask(0)
        try:
            store = await self.create()
            await store.commit(puts=[("meta", "a", b"b")])
        finally:
            os.umask(old)
        assert_private_files(self, self.path)
        await store.close()
        os.chmod(self.path, 0o644)
        await self.open()
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)

    async def test_pragmas(self) -> None:
        store = await self.create()

        def read(conn: sqlite3.Connection) -> list[object]:
            names = ("journal_mode", "synchronous", "secure_delete")
            return [conn.execute(f"PRAGMA {n}").fetchone()[0] for n in names]

        self.assertEqual(await store._run(read), ["wal", 2, 1])

    async def test_work_stays_off_the_reactor_thread(self) -> None:
        threads: list[bool] = []
        real_derive, real_setup = localseal.derive_kek, localschema.setup_connection

        def derive(*args: Any) -> bytes:
            threads.append(threading.current_thread() is threading.main_thread())
            return bytes(real_derive(*args))

        def setup(conn: sqlite3.Connection) -> None:
            conn.set_trace_callback(
                lambda _: threads.append(threading.current_thread() is threading.main_thread())
            )
            real_setup(conn)

        self.patch(localseal, "derive_kek", derive)
        self.patch(localschema, "setup_connection", setup)
        store = await self.create()
        await store.commit(puts=[("meta", "a", b"b")], messages=[msg(1)])
        await store.history("user:bob")
        await store.search("message")
        store = await self.reopen(store)
        self.assertTrue(threads)
        self.assertNotIn(True, threads)

    async def test_closed_store_refuses_work(self) -> None:
        store = await self.create()
        await store.close()
        await store.close()  # idempotent
        with self.assertRaises(StoreClosed):
            await store.get("meta", "a")
        with self.assertRaises(StoreClosed):
            await store.commit(puts=[("meta", "a", b"b")])


class KeyValueTests(Base):
    async def test_round_trip_overwrite_delete(self) -> None:
        store = await self.create()
        self.assertIsNone(await store.get("session", "bob/dev1"))
        await store.commit(puts=[("session", "bob/dev1", b"one")])
        self.assertEqual(await store.get("session", "bob/dev1"), b"one")
        await store.commit(puts=[("session", "bob/dev1", b"two")])
        self.assertEqual(await store.get("session", "bob/dev1"), b"two")
        self.assertIsNone(await store.get("contact", "bob/dev1"))  # kinds are separate
        await store.commit(puts=[("session", "bob/dev1", None)])
        self.assertIsNone(await store.get("session", "bob/dev1"))
        await store.commit(puts=[("session", "gone", None)])  # deleting nothing is fine
        await store.commit(puts=[("meta", "", b""), ("meta", "bin", bytes(range(256)))])
        store = await self.reopen(store)
        self.assertEqual(await store.get("meta", ""), b"")
        self.assertEqual(await store.get("meta", "bin"), bytes(range(256)))

    async def test_items(self) -> None:
        store = await self.create()
        await store.commit(
            puts=[
                ("contact", "carol", b"3"),
                ("contact", "alice", b"1"),
                ("contact", "bob", b"2"),
                ("room", "general", b"r"),
                ("contact", "bob", None),
            ]
        )
        self.assertEqual(await store.items("contact"), [("alice", b"1"), ("carol", b"3")])
        self.assertEqual(await store.items("room"), [("general", b"r")])
        self.assertEqual(await store.items("nothing"), [])

    async def test_puts_apply_in_order(self) -> None:
        store = await self.create()
        await store.commit(puts=[("meta", "k", b"1"), ("meta", "k", None), ("meta", "k", b"3")])
        self.assertEqual(await store.get("meta", "k"), b"3")

    async def test_bad_arguments_fail_before_writing(self) -> None:
        store = await self.create()
        for puts in ([("meta", "k", "str")], [("", "k", b"v")], [("meta", 1, b"v")]):
            with self.assertRaises((TypeError, ValueError)):
                await store.commit(puts=[("meta", "ok", b"v"), *puts])  # type: ignore[list-item]
        with self.assertRaises(ValueError):
            await store.commit(puts=[("meta", "ok", b"v")], states=[("x", "read")])
        with self.assertRaises(UnicodeEncodeError):
            await store.commit(puts=[("meta", "ok", b"v"), ("meta", "\ud800", b"v")])
        self.assertIsNone(await store.get("meta", "ok"))

    async def test_value_moved_to_another_key_fails(self) -> None:
        store = await self.create()
        await store.commit(puts=[("contact", "alice", b"A"), ("contact", "mallory", b"M")])
        await store.commit(puts=[("session", "alice", b"S")])
        await store.close()
        rows = dict(self.raw("SELECT hkey, value FROM kv WHERE kind = 'contact'"))
        (h1, v1), (h2, _) = rows.items()
        self.raw("UPDATE kv SET value = ? WHERE hkey = ?", v1, h2)
        # The same value copied to another kind, same hashed key: fails too.
        self.raw(
            "UPDATE kv SET value = (SELECT value FROM kv WHERE kind = 'contact' AND hkey = ?)"
            " WHERE kind = 'session'",
            h1,
        )
        store = await self.open()
        with self.assertRaises(CorruptEntry):
            await store.items("contact")
        with self.assertRaises(CorruptEntry):
            await store.get("session", "alice")

    async def test_edited_value_fails(self) -> None:
        store = await self.create()
        await store.commit(puts=[("identity", "me", b"key")])
        await store.close()
        (value,) = self.raw("SELECT value FROM kv")[0]
        flipped = bytes(value[:-1]) + bytes([value[-1] ^ 1])
        self.raw("UPDATE kv SET value = ?", flipped)
        store = await self.open()
        with self.assertRaises(CorruptEntry):
            await store.get("identity", "me")


class CommitTests(Base):
    async def test_failure_mid_commit_persists_nothing(self) -> None:
        store = await self.create()
        await store.commit(puts=[("session", "bob", b"old state")], messages=[msg(1)])
        real = localschema.insert_message
        calls: list[str] = []

        def insert(conn: sqlite3.Connection, keys: Any, m: HistoryMessage) -> None:
            calls.append(m.id)
            if len(calls) == 2:  # after a put and one message were written
                raise RuntimeError("crash in the middle of the commit")
            real(conn, keys, m)

        self.patch(localschema, "insert_message", insert)
        with self.assertRaises(RuntimeError):
            await store.commit(
                puts=[("session", "bob", b"new state"), ("skipped", "bob/7", b"mk")],
                messages=[msg(2), msg(3)],
                states=[("bob/dev1/1", "failed")],
            )
        self.assertEqual(len(calls), 2)
        store = await self.reopen(store)
        self.assertEqual(await store.get("session", "bob"), b"old state")
        self.assertIsNone(await store.get("skipped", "bob/7"))
        history = await store.history("user:bob")
        self.assertEqual([(m.id, m.state) for m in history], [("bob/dev1/1", "received")])
        # The store still works after the failed transaction.
        await store.commit(puts=[("session", "bob", b"new state")], messages=[msg(2)])
        self.assertEqual(len(await store.history("user:bob")), 2)

    async def test_sql_error_mid_commit_persists_nothing(self) -> None:
        store = await self.create()
        real = localschema.set_state

        def bad_state(conn: sqlite3.Connection, keys: Any, mid: str, state: str) -> None:
            conn.execute("INSERT INTO history (hid) VALUES (NULL)")  # NOT NULL violation
            real(conn, keys, mid, state)

        self.patch(localschema, "set_state", bad_state)
        with self.assertRaises(sqlite3.IntegrityError):
            await store.commit(
                puts=[("session", "bob", b"s")], messages=[msg(1)], states=[("bob/dev1/1", "sent")]
            )
        self.assertIsNone(await store.get("session", "bob"))
        self.assertEqual(await store.history("user:bob"), [])

    def sealed(self) -> dict[bytes, bytes]:
        return {bytes(h): bytes(v) for h, v in self.raw("SELECT hkey, value FROM kv")}

    async def test_a_value_the_file_holds_is_not_rewritten(self) -> None:
        # Most messages sent leave their session's saved state as it was: committing
        # it again must cost no write, and must not change what the file holds.
        store = await self.create()
        await store.commit(puts=[("session", "bob", b"s1")])
        first = self.sealed()
        await store.commit(puts=[("session", "bob", b"s1")], messages=[msg(1)])
        self.assertEqual(self.sealed(), first)
        self.assertEqual(len(await store.history("user:bob")), 1)
        await store.commit(puts=[("session", "bob", b"s2")])
        self.assertNotEqual(self.sealed(), first)
        self.assertEqual(await store.get("session", "bob"), b"s2")
        # Puts apply in order, also when one of them repeats the stored value.
        await store.commit(puts=[("session", "bob", b"s3"), ("session", "bob", b"s2")])
        self.assertEqual(await store.get("session", "bob"), b"s2")
        await store.commit(puts=[("session", "bob", b"s2"), ("session", "bob", b"s4")])
        self.assertEqual(await store.get("session", "bob"), b"s4")

    async def test_a_value_is_rewritten_after_a_failed_commit(self) -> None:
        store = await self.create()
        await store.commit(puts=[("session", "bob", b"s1")])
        real = localschema.insert_message

        def crash(conn: sqlite3.Connection, keys: Any, m: HistoryMessage) -> None:
            raise RuntimeError("crash in the middle of the commit")

        self.patch(localschema, "insert_message", crash)
        with self.assertRaises(RuntimeError):
            await store.commit(puts=[("session", "bob", b"s2")], messages=[msg(1)])
        self.patch(localschema, "insert_message", real)
        # Whatever the failed commit left, the next commit of s2 writes it.
        await store.commit(puts=[("session", "bob", b"s2")])
        store = await self.reopen(store)
        self.assertEqual(await store.get("session", "bob"), b"s2")

    async def test_queued_commits_of_one_entry_all_apply(self) -> None:
        # s1 -> s2 -> s1 queued at once: the last s1 is written although the file held
        # s1 when it was queued (the s2 before it was still in flight).
        store = await self.create()
        await store.commit(puts=[("session", "bob", b"s1")])
        await gatherResults([store.commit(puts=[("session", "bob", v)])
                             for v in (b"s2", b"s1")])
        store = await self.reopen(store)
        self.assertEqual(await store.get("session", "bob"), b"s1")

    async def test_set_state(self) -> None:
        store = await self.create()
        mine = msg(1, sender="", state="sending")
        await store.commit(messages=[mine])
        await store.commit(states=[(mine.id, "sent"), ("no/such/id", "failed")])
        store = await self.reopen(store)
        (got,) = await store.history("user:bob")
        self.assertEqual(got.state, "sent")
        self.assertEqual(got.body, mine.body)

    async def test_idempotent_insert(self) -> None:
        store = await self.create()
        first = msg(1, body="first copy")
        await store.commit(messages=[first])
        await store.commit(messages=[msg(1, body="redelivered", ts=99_000)])
        await store.commit(messages=[msg(2), msg(2, body="again")])  # within one commit
        store = await self.reopen(store)
        history = await store.history("user:bob")
        self.assertEqual([m.body for m in history], ["first copy", "message 2"])
        self.assertEqual(history[0], first)


class HistoryTests(Base):
    async def test_order_limit_before(self) -> None:
        store = await self.create()
        # Inserted out of order; two share a timestamp (insertion order breaks the tie).
        await store.commit(
            messages=[msg(3), msg(1), msg(5), msg(4, ts=5_000), msg(2), msg(9, conv="room:x")]
        )
        ids = [m.id.split("/")[-1] for m in await store.history("user:bob")]
        self.assertEqual(ids, ["1", "2", "3", "5", "4"])
        ids = [m.id.split("/")[-1] for m in await store.history("user:bob", limit=2)]
        self.assertEqual(ids, ["5", "4"])
        got = await store.history("user:bob", limit=2, before_ts=5_000)
        self.assertEqual([m.id.split("/")[-1] for m in got], ["2", "3"])
        self.assertEqual(await store.history("user:bob", before_ts=1_000), [])
        self.assertEqual(await store.history("user:nobody"), [])
        (room,) = await store.history("room:x")
        self.assertEqual(room, msg(9, conv="room:x"))

    async def test_history_survives_restart(self) -> None:
        store = await self.create()
        messages = [msg(n, expires_at=5e9 if n % 2 else None) for n in range(1, 6)]
        await store.commit(messages=messages)
        store = await self.reopen(store)
        self.assertEqual(await store.history("user:bob"), messages)

    async def test_search(self) -> None:
        store = await self.create()
        await store.commit(
            messages=[
                msg(1, body="Lunch at noon?"),
                msg(2, body="no LUNCH today"),
                msg(3, conv="room:food", body="lunchtime"),
                msg(4, body="dinner"),
                msg(5, conv="room:food", body="Über lunch"),
            ]
        )
        found = await store.search("lunch")
        self.assertEqual([m.id.split("/")[-1] for m in found], ["1", "2", "3", "5"])
        found = await store.search("LUNCH", conversation="user:bob")
        self.assertEqual([m.id.split("/")[-1] for m in found], ["1", "2"])
        found = await store.search("lunch", limit=2)  # the newest matches, newest last
        self.assertEqual([m.id.split("/")[-1] for m in found], ["3", "5"])
        self.assertEqual([m.body for m in await store.search("über")], ["Über lunch"])
        self.assertEqual(await store.search("breakfast"), [])

    async def test_conversations(self) -> None:
        store = await self.create()
        await store.commit(messages=[msg(1), msg(2), msg(3, conv="room:x"), msg(7, conv="room:y")])
        self.assertEqual(
            await store.conversations(),
            [("room:y", 1, 7_000), ("room:x", 1, 3_000), ("user:bob", 2, 2_000)],
        )

    async def test_purge_expired(self) -> None:
        store = await self.create()
        await store.commit(
            messages=[
                msg(1, expires_at=100.0),
                msg(2),
                msg(3, expires_at=200.0),
                msg(4, expires_at=100.5),
            ]
        )
        self.assertEqual(await store.purge_expired(50.0), 0)
        self.assertEqual(await store.purge_expired(100.5), 2)  # expires_at <= now
        self.assertEqual([m.id[-1] for m in await store.history("user:bob")], ["2", "3"])
        store = await self.reopen(store)
        self.assertEqual(await store.purge_expired(1e12), 1)
        self.assertEqual([m.id[-1] for m in await store.history("user:bob")], ["2"])
        self.assertEqual(await store.conversations(), [("user:bob", 1, 2_000)])

    async def test_edited_clear_columns_fail(self) -> None:
        """ts and expires_at are in clear but bound to the body: editing them is detected."""
        store = await self.create()
        await store.commit(messages=[msg(1, expires_at=100.0), msg(2)])
        await store.close()
        self.raw("UPDATE history SET expires_at = NULL WHERE expires_at IS NOT NULL")
        store = await self.open()
        with self.assertRaises(CorruptEntry):
            await store.history("user:bob")
        await store.close()
        self.raw("UPDATE history SET expires_at = 100.0 WHERE ts = 1000")
        self.raw("UPDATE history SET ts = 5 WHERE ts = 2000")
        store = await self.open()
        with self.assertRaises(CorruptEntry):
            await store.search("x")

    async def test_body_moved_to_another_row_fails(self) -> None:
        store = await self.create()
        await store.commit(messages=[msg(1), msg(2, ts=1_000)])
        await store.close()
        rows = self.raw("SELECT seq, body, state FROM history ORDER BY seq")
        self.raw("UPDATE history SET body = ? WHERE seq = ?", rows[0][1], rows[1][0])
        store = await self.open()
        with self.assertRaises(CorruptEntry):
            await store.history("user:bob")
        await store.close()
        self.raw("UPDATE history SET body = ? WHERE seq = ?", rows[1][1], rows[1][0])
        self.raw("UPDATE history SET state = ? WHERE seq = ?", rows[0][2], rows[1][0])
        store = await self.open()
        with self.assertRaises(CorruptEntry):
            await store.history("user:bob")


class AtRestTests(Base):
    """What someone holding the files (not the passphrase) can read."""

    async def write_markers(self, store: LocalStore) -> None:
        await store.commit(
            puts=[
                ("contact", f"{MARKER}-contact", f"{MARKER}-value".encode()),
                ("session", "bob/dev1", MARKER.encode() * 3),
            ],
            messages=[
                msg(1, conv=f"user:{MARKER}", sender=MARKER, body=f"hi {MARKER}"),
                msg(2, body=f"{MARKER} expiring", expires_at=10.0),
            ],
        )

    def assert_no_marker(self) -> None:
        data = raw_bytes(self.path)
        self.assertTrue(data)
        for encoding in ("utf-8", "utf-16-le", "utf-16-be"):
            self.assertNotIn(MARKER.encode(encoding), data)
        self.assertNotIn(b"bob/dev1", data)  # kv keys are hashed
        self.assertNotIn(b"user:bob", data)  # conversation names are sealed

    async def test_marker_not_in_files(self) -> None:
        store = await self.create()
        await self.write_markers(store)
        self.assert_no_marker()  # while open: db, -wal and -shm
        await store.close()
        self.assert_no_marker()

    async def test_deleted_ciphertext_not_in_files(self) -> None:
        """secure_delete and the WAL checkpoint: purged rows leave no ciphertext behind."""
        store = await self.create()
        await self.write_markers(store)
        await store.close()
        sealed = [bytes(b) for (b,) in self.raw("SELECT body FROM history WHERE ts = 2000")]
        sealed += [bytes(v) for (v,) in self.raw("SELECT value FROM kv WHERE kind = 'contact'")]
        self.assertEqual(len(sealed), 2)
        store = await self.open()
        self.assertEqual(await store.purge_expired(11.0), 1)
        await store.commit(puts=[("contact", f"{MARKER}-contact", None)])
        self.assert_no_marker()
        await store.close()
        data = raw_bytes(self.path)
        for blob in sealed:
            self.assertNotIn(blob[-32:], data)
        self.assert_no_marker()

    async def test_purge_clears_the_wal_while_open(self) -> None:
        store = await self.create()
        await self.write_markers(store)
        sealed: list[bytes] = []

        def grab(conn: sqlite3.Connection) -> None:
            sealed.extend(bytes(b) for (b,) in conn.execute("SELECT body FROM history"))

        await store._run(grab)
        self.assertTrue(any(b[-32:] in raw_bytes(self.path) for b in sealed))
        self.assertEqual(await store.purge_expired(11.0), 1)
        remaining = raw_bytes(self.path)
        self.assertEqual(sum(b[-32:] in remaining for b in sealed), 1)
