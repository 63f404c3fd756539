"""Tests of the SQLite store, on real database files (adbapi threads spin the reactor)."""

from __future__ import annotations

import functools
import os
import sqlite3
import stat
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, ensureDeferred, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from shtalk.server import schema
from shtalk.server.interfaces import (
    Conflict,
    CorruptStore,
    IStore,
    TokenReuse,
    TokenUnknown,
)
from shtalk.server.records import AppendResult, NewMessage, User
from shtalk.server.store import (
    EnvelopeDecryptError,
    SQLiteStore,
    check_database_file,
    decode_envelopes,
    encode_envelopes,
)

KEY = bytes(range(32))
NOW = 1_800_000_000.0
DAY = 24 * 3600.0
MARKER = b"MARKER-" * 10

S = TypeVar("S", bound=TestCase)


def async_test(
    f: Callable[[S], Coroutine[Any, Any, None]],
) -> Callable[[S], Deferred[None]]:
    """Let a test be an ``async def`` (trial wants a Deferred)."""

    @functools.wraps(f)
    def run(self: S) -> Deferred[None]:
        return ensureDeferred(f(self))

    return run


class StoreTestBase(TestCase):
    def setUp(self) -> None:
        self.dir = self.mktemp()
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "shtalk.sqlite3")
        self.clock = Clock()
        self.clock.advance(NOW)

    async def open_store(self, key: bytes = KEY, **kwargs: Any) -> SQLiteStore:
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

    async def failure_of(self, d: Deferred[Any], *errors: type[BaseException]) -> BaseException:
        try:
            await d
        except errors as e:
            return e
        self.fail(f"no {errors} raised")

    async def user(self, store: SQLiteStore, name: str, *devices: str) -> User:
        user = await store.create_user(name, name.lower(), f"{name}@example.org", b"h", "active")
        for dev in devices:
            await store.upsert_device(user.id, dev, f"{name}'s {dev}")
        return user


def msg(
    mailboxes: tuple[str, ...],
    sender: User,
    device: str,
    client_id: str,
    envelope: bytes | None = b"env",
    envelopes: dict[tuple[int, str], bytes] | None = None,
    target: str = "room:lobby",
    ts: int = int(NOW * 1000),
    expires_at: float | None = None,
) -> NewMessage:
    return NewMessage(
        mailboxes=mailboxes,
        sender_id=sender.id,
        sender_device=device,
        client_id=client_id,
        ts=ts,
        expires_at=expires_at,
        target=target,
        envelope=envelope,
        envelopes=envelopes or {},
    )


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
    async def test_failed_migration_leaves_old_version(self) -> None:
        store = await self.open_store()
        await store.close()
        version = schema.schema_version()
        self.patch(
            schema,
            "MIGRATIONS",
            [*schema.MIGRATIONS, ("CREATE TABLE extra (x)", "THIS IS NOT SQL")],
        )
        await self.failure_of(SQLiteStore(self.path, KEY).open(), Exception)
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
        for suffix in ("", "-wal", "-shm"):
            mode = stat.S_IMODE(os.stat(self.path + suffix).st_mode)
            self.assertEqual(mode, 0o600, suffix)
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
            (b"common", {(1, "d\u00e9v"): b"x" * 70000, (2 ** 40, ""): b""}),
            (None, {(3, "phone"): b"\x00\x01"}),
        ]
        for envelope, envelopes in cases:
            self.assertEqual(decode_envelopes(encode_envelopes(envelope, envelopes)), (envelope, envelopes))
        blob = encode_envelopes(b"abc", {(1, "x"): b"y"})
        self.assertRaises(ValueError, decode_envelopes, blob[:-1])
        self.assertRaises(ValueError, decode_envelopes, blob + b"\x00")
