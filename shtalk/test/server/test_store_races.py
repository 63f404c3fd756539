"""The store's one-time uses, raced on the SQLite file by two connections in two threads.

The server's SQLite store has one writer, so its ops never overlap; a database with
concurrent writers (PostgreSQL at READ COMMITTED) lets two transactions' statements
interleave, each statement seeing what the other committed before it.  Two autocommit
SQLite connections held in lockstep (each waits before every statement until the other
reaches its own) interleave exactly so.  Each test runs a read-then-write version of an
op (the pattern a guarded statement must replace) to show the harness really provokes the
race, then the store's op to show its guarded statement holds.  Where the two sides run
different ops, one fixed interleaving (``Interrupted``) puts the other's commit between
the read and the write.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from typing import Any, cast

from shtalk.server.store.records import CODE_NONE, CODE_OK, ClaimedBundle, Device, OneTimeKey
from shtalk.server.store.sql import devices, prekeys, security
from shtalk.server.store.sql.common import Conn
from shtalk.test.server.store_contract import NOW, async_test
from shtalk.test.server.test_store import StoreTestBase

TIMEOUT = 30.0


class Lockstep:
    """Holds each party before each statement until every party still running is there."""

    def __init__(self, parties: int) -> None:
        self._cond = threading.Condition()
        self._active = parties
        self._arrived = 0
        self._round = 0

    def step(self) -> None:
        with self._cond:
            mine = self._round
            self._arrived += 1
            self._release_if_all_in()
            if not self._cond.wait_for(lambda: self._round != mine, TIMEOUT):
                raise AssertionError("a party never reached its next statement")

    def leave(self) -> None:
        """A party done (or failed) no longer holds the others back."""
        with self._cond:
            self._active -= 1
            self._release_if_all_in()

    def _release_if_all_in(self) -> None:
        if self._arrived and self._arrived >= self._active:
            self._arrived = 0
            self._round += 1
            self._cond.notify_all()


class SteppedConnection:
    """A connection whose every statement first waits for the lockstep."""

    def __init__(self, conn: sqlite3.Connection, lockstep: Lockstep) -> None:
        self._conn = conn
        self._lockstep = lockstep

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        self._lockstep.step()
        return self._conn.execute(sql, params)

    def executemany(self, sql: str, params: Any) -> sqlite3.Cursor:
        self._lockstep.step()
        return self._conn.executemany(sql, params)


class Interrupted:
    """A connection that runs ``between`` (on another connection) just before its
    statement number ``at`` (counted from 0): one fixed interleaving, in one thread."""

    def __init__(self, conn: sqlite3.Connection, at: int, between: Callable[[], None]) -> None:
        self._conn = conn
        self._at = at
        self._between = between
        self._n = 0

    def execute(self, sql: str, params: Any = ()) -> sqlite3.Cursor:
        if self._n == self._at:
            self._between()
        self._n += 1
        return self._conn.execute(sql, params)

    def finish(self) -> None:
        """Run ``between`` now if the op ended before statement ``at``."""
        if self._n <= self._at:
            self._n = self._at + 1
            self._between()


def read_then_write_claim(conn: Conn, user_id: int, device_id: str, now: float) -> list[int]:
    """A claim as a read then an unguarded write: the ids of the ec keys it got."""
    row = conn.execute(
        "SELECT key_id FROM one_time_keys WHERE user_id = ? AND device_id = ? AND kind = 'ec'"
        " AND claimed IS NULL ORDER BY key_id LIMIT 1",
        (user_id, device_id),
    ).fetchone()
    if row is None:
        return []
    conn.execute(
        "UPDATE one_time_keys SET claimed = ?, key = x'' WHERE user_id = ? AND device_id = ?"
        " AND kind = 'ec' AND key_id = ?",
        (now, user_id, device_id, row[0]),
    )
    return [int(row[0])]


def read_then_write_code(conn: Conn, user_id: int, code_hash: bytes, now: float) -> str:
    """An email code used by a read then an unguarded write."""
    row = conn.execute(
        "SELECT code_hash, expires, attempts FROM email_codes WHERE user_id = ?"
        " AND purpose = 'verify'",
        (user_id,),
    ).fetchone()
    if row is None or float(row[1]) <= now or bytes(row[0]) != code_hash:
        return CODE_NONE
    conn.execute(
        "UPDATE email_codes SET expires = 0, code_hash = x'' WHERE user_id = ?"
        " AND purpose = 'verify'",
        (user_id,),
    )
    return CODE_OK


def read_then_insert_device(conn: Conn, user_id: int, device_id: str, now: float) -> str:
    """A device created by a read then an insert."""
    if conn.execute(
        "SELECT 1 FROM devices WHERE user_id = ? AND device_id = ?", (user_id, device_id)
    ).fetchone():
        return "found"
    conn.execute(
        "INSERT INTO devices (user_id, device_id, label, created) VALUES (?, ?, 'x', ?)",
        (user_id, device_id, now),
    )
    return "created"


def read_then_put_code(conn: Conn, user_id: int, code_hash: bytes, now: float) -> bool:
    """A code stored after a read of when the last one was sent (interval 60 s)."""
    row = conn.execute(
        "SELECT sent FROM email_codes WHERE user_id = ? AND purpose = 'reset'", (user_id,)
    ).fetchone()
    if row is not None and now - float(row[0]) < 60:
        return False
    conn.execute(
        "INSERT INTO email_codes (user_id, purpose, code_hash, expires, attempts, sent)"
        " VALUES (?, 'reset', ?, ?, 0, ?) ON CONFLICT (user_id, purpose) DO UPDATE SET"
        " code_hash = excluded.code_hash, sent = excluded.sent",
        (user_id, code_hash, now + 600, now),
    )
    return True


def read_then_put_totp(conn: Conn, user_id: int, sealed: bytes, now: float) -> bool:
    """A pending TOTP secret stored after a read of whether TOTP is enabled."""
    row = conn.execute("SELECT enabled FROM totp WHERE user_id = ?", (user_id,)).fetchone()
    if row is not None and row[0]:
        return False
    conn.execute(
        "INSERT INTO totp (user_id, sealed, enabled, last_step, created) VALUES (?, ?, 0, 0, ?)"
        " ON CONFLICT (user_id) DO UPDATE SET sealed = excluded.sealed, enabled = 0",
        (user_id, sealed, now),
    )
    return True


class TwoConnectionRaceTests(StoreTestBase):
    async def prepared(self) -> int:
        """A user with device d1 (10 ec keys) and a verify code c1; the store closed."""
        store = await self.open_store()
        user = await store.create_user("Alice", "alice", "a@example.org", b"h", "pending")
        await store.upsert_device(user.id, "d1", "phone")
        await store.publish_keys(
            user.id, "d1", b"B", [OneTimeKey("ec", i, b"k%d" % i) for i in range(1, 11)]
        )
        await store.codes.put_email_code(user.id, "verify", b"c1", NOW + 600, NOW, 60)
        await store.close()
        return user.id

    def race(self, op: Callable[[Conn], Any]) -> list[Any]:
        """``op`` on two connections in two threads, statements in lockstep; each result
        (or the exception it raised)."""
        lockstep = Lockstep(2)
        results: list[Any] = [None, None]

        def run(i: int) -> None:
            conn = sqlite3.connect(
                self.path, isolation_level=None, timeout=TIMEOUT, check_same_thread=False
            )
            try:
                conn.execute("PRAGMA foreign_keys = ON")
                results[i] = op(cast(Conn, SteppedConnection(conn, lockstep)))
            except Exception as e:  # the outcome under test
                results[i] = e
            finally:
                lockstep.leave()
                conn.close()

        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT)
        self.assertFalse(any(t.is_alive() for t in threads), "a racer hung")
        return results

    @async_test
    async def test_claim(self) -> None:
        uid = await self.prepared()
        # The harness makes a read then an unguarded write hand one key out twice ...
        self.assertEqual(self.race(lambda c: read_then_write_claim(c, uid, "d1", NOW)),
                         [[1], [1]])
        # ... while the store's claim hands out two different keys.
        got = self.race(lambda c: prekeys.claim(c, uid, "d1", NOW))
        self.assertTrue(all(isinstance(r, list) for r in got), got)
        bundles = cast(list[list[ClaimedBundle]], got)
        ids = sorted(k.key_id for (b,) in bundles for k in b.one_time)
        self.assertEqual(ids, [2, 3])
        self.assertEqual(
            self.raw("SELECT key_id, key FROM one_time_keys WHERE claimed IS NOT NULL"
                     " ORDER BY key_id"),
            [(1, b""), (2, b""), (3, b"")],
        )

    @async_test
    async def test_email_code(self) -> None:
        uid = await self.prepared()
        self.assertEqual(self.race(lambda c: read_then_write_code(c, uid, b"c1", NOW)),
                         [CODE_OK, CODE_OK])
        self.raw_write(
            "UPDATE email_codes SET code_hash = ?, expires = ?, attempts = 0", b"c2", NOW + 600
        )
        got = self.race(lambda c: security.check_email_code(c, uid, "verify", b"c2", NOW, 5))
        self.assertEqual(sorted(got), [CODE_NONE, CODE_OK])
        self.assertEqual(self.raw("SELECT status FROM users WHERE id = ?", uid), [("active",)])

    @async_test
    async def test_upsert_device(self) -> None:
        uid = await self.prepared()
        got = self.race(lambda c: read_then_insert_device(c, uid, "d2", NOW))
        self.assertEqual(got.count("created"), 1)
        self.assertEqual([type(r) for r in got if r != "created"], [sqlite3.IntegrityError])
        new = self.race(lambda c: devices.upsert_device(c, uid, "d3", "laptop", NOW))
        self.assertEqual(new, [Device(uid, "d3", "laptop", NOW)] * 2)
        self.assertEqual(
            self.raw("SELECT mailbox FROM cursors WHERE device_id = 'd3'"), [(f"u:{uid}",)]
        )

    @async_test
    async def test_email_code_interval(self) -> None:
        uid = await self.prepared()
        self.assertEqual(self.race(lambda c: read_then_put_code(c, uid, b"r1", NOW)),
                         [True, True])  # two mails where the interval allows one
        self.raw_write("DELETE FROM email_codes")
        got = self.race(
            lambda c: security.put_email_code(c, uid, "reset", b"r2", NOW + 600, NOW, 60)
        )
        self.assertEqual(sorted(got), [False, True])

    @async_test
    async def test_pending_totp_never_overwrites_an_enable(self) -> None:
        uid = await self.prepared()

        def enabled_after(op: Callable[[Conn], bool], at: int) -> int:
            """Run ``op`` with an enable committed before its statement ``at`` (or after
            it, when it has fewer): is TOTP on in the end?"""
            self.raw_write("DELETE FROM totp")
            self.raw_write("INSERT INTO totp (user_id, sealed, enabled, last_step, created)"
                           " VALUES (?, x'01', 0, 0, ?)", uid, NOW)
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=TIMEOUT)
            interrupted = Interrupted(conn, at, lambda: self.raw_write(
                "UPDATE totp SET enabled = 1, last_step = 5"))
            try:
                op(cast(Conn, interrupted))
                interrupted.finish()
            finally:
                conn.close()
            return int(self.raw("SELECT enabled FROM totp")[0][0])

        # The enable lands between the read and the write: TOTP silently off again.
        self.assertEqual(enabled_after(lambda c: read_then_put_totp(c, uid, b"x", NOW), 1), 0)
        # One guarded statement: wherever the enable lands, it stays enabled.
        for at in (0, 1):
            self.assertEqual(
                enabled_after(lambda c: security.put_pending_totp(c, uid, b"x", NOW), at), 1
            )

    def raw_write(self, sql: str, *params: object) -> None:
        conn = sqlite3.connect(self.path)
        try:
            with conn:
                conn.execute(sql, params)
        finally:
            conn.close()
