"""The durable store: SQLite through ``twisted.enterprise.adbapi``.

Why it looks like this:

* No SQL on the reactor thread.  Two adbapi pools share the file: ONE writer
  connection (a single writer never fights SQLite's lock) and a few readers
  (WAL lets them read while the writer writes).
* Group commit.  Every write is an "op" (a function of the connection) put on
  a queue.  While a write transaction is in flight, new ops wait; when it
  commits, everything queued goes into the next single transaction, each op
  inside its own SAVEPOINT so one refusal (Conflict, ...) does not undo its
  neighbours.  Each op's Deferred fires on the reactor thread once the
  transaction holding it has committed.  No timer: the batch is whatever
  arrived during the previous fsync.
* Consecutive appends in a batch are stored together: one savepoint for the
  run, one duplicate lookup, one ``executemany`` per table (seqs are assigned
  by the single writer), so a send costs few GIL hand-offs in the writer.
* One row per sent message per mailbox; per-device cursors say what each
  device has acknowledged, and also which devices read which mailbox.
* Acks are coalesced: the acks that arrive while a transaction is in flight
  become ONE op of the next one, which moves each (device, mailbox) cursor
  once to the highest seq acknowledged.  An ack's Deferred still fires only
  once its cursor is committed; ``pending()`` waits for acks not yet
  committed, so a device that reconnects is not sent what it acknowledged.
  A message is deleted once every device it is for has acknowledged it, by
  a sweep of the acknowledged ranges every ``sweep_interval`` seconds (not
  per ack); until then it is merely still on disk, encrypted.
* Envelopes are AES-256-GCM encrypted at rest (random nonce per row, the row's
  identity as associated data), so neither the database nor its WAL ever
  holds them in clear; ``secure_delete`` zeroes what is deleted.
"""

from __future__ import annotations

import os
import sqlite3
import struct
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from shtalk.server.chat.mailbox import users_of
from shtalk.server.iserver import (
    CorruptStore,
    IStore,
    StoreError,
)
from shtalk.server.store import prekeys, schema
from shtalk.server.store import sql as storesql
from shtalk.server.store.emailseal import EmailSeal, seal_clear_emails
from shtalk.server.store.records import (
    AppendResult,
    ClaimedBundle,
    Device,
    Member,
    NewMessage,
    OneTimeKey,
    Room,
    Session,
    StoredMessage,
    User,
)
from shtalk.server.store.schema import check_database_file
from shtalk.sqlitethread import SQLiteThread

__all__ = ["EnvelopeDecryptError", "SQLiteStore", "check_database_file"]

log = Logger()
T = TypeVar("T")
P = ParamSpec("P")
Conn = sqlite3.Connection
Op = Callable[[Conn], object]

#: Reader connections (pending() and lookups run concurrently with the writer).
READERS = 3
#: Rows deleted per purge step (one op in a group commit).
PURGE_STEP = 2000
#: Seconds between sweeps deleting acknowledged messages (0: in every ack op).
SWEEP_INTERVAL = 0.5
#: Seconds an ack waits, when the writer is idle, for a transaction to ride on.
ACK_DELAY = 0.005
#: Ops waiting for the writer (beyond the transaction in flight) at which the store
#: reports itself overloaded: the protocol then stops reading senders' sockets.
BACKLOG_HIGH = 1000
#: Recent seqs whose mailbox the writer remembers, so acks need no lookup.
_SEQ_MEMORY = 100_000


class EnvelopeDecryptError(CorruptStore):
    """A stored envelope failed authentication: wrong storage key or a tampered row."""


class StoreClosed(StoreError):
    """The store is not open (never opened, or closing)."""


# --- envelopes at rest -------------------------------------------------------

_U32 = struct.Struct(">I")
_ENTRY = struct.Struct(">qHI")  # user id, device id length, envelope length
_IDS = struct.Struct(">qq")  # sender id, ts
_FORMAT = 1
_AD_PREFIX = b"shtalk-envelope-v1\x00"


def encode_envelopes(envelope: bytes | None, envelopes: dict[tuple[int, str], bytes]) -> bytes:
    """Compact binary form of the common envelope and the per-device map."""
    parts = [bytes((_FORMAT, 0 if envelope is None else 1))]
    if envelope is not None:
        parts += (_U32.pack(len(envelope)), envelope)
    parts.append(_U32.pack(len(envelopes)))
    for (user_id, device_id), env in envelopes.items():
        dev = device_id.encode()
        parts += (_ENTRY.pack(user_id, len(dev), len(env)), dev, env)
    return b"".join(parts)


def decode_envelopes(blob: bytes) -> tuple[bytes | None, dict[tuple[int, str], bytes]]:
    """Inverse of encode_envelopes; ValueError on anything malformed."""
    try:
        if len(blob) < 6 or blob[0] != _FORMAT:
            raise ValueError("unknown envelope format")
        pos = 2
        envelope = None
        if blob[1]:
            (n,) = _U32.unpack_from(blob, pos)
            pos += _U32.size
            envelope = blob[pos : pos + n]
            pos += n
        (count,) = _U32.unpack_from(blob, pos)
        pos += _U32.size
        envelopes: dict[tuple[int, str], bytes] = {}
        for _ in range(count):
            user_id, dlen, elen = _ENTRY.unpack_from(blob, pos)
            pos += _ENTRY.size
            device_id = blob[pos : pos + dlen].decode()
            pos += dlen
            envelopes[(user_id, device_id)] = blob[pos : pos + elen]
            pos += elen
    except (struct.error, UnicodeDecodeError) as e:
        raise ValueError("truncated envelope record") from e
    if pos != len(blob):
        raise ValueError("truncated envelope record")
    return envelope, envelopes


def associated_data(
    mailbox: str, sender_id: int, sender_device: str, client_id: str, ts: int, target: str
) -> bytes:
    """Bind a ciphertext to its row: moving it to another row fails to decrypt."""
    fields = (mailbox, sender_device, client_id, target)
    return (
        _AD_PREFIX
        + _IDS.pack(sender_id, ts)
        + b"".join(_U32.pack(len(b)) + b for b in (f.encode() for f in fields))
    )


# --- connections and the write batch (run in pool threads) -------------------


def _setup_writer(conn: Conn) -> None:
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA secure_delete = ON")


def _connect_writer(path: str) -> Conn:
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, cached_statements=256
    )
    _setup_writer(conn)
    return conn


def _setup_reader(conn: Conn) -> None:
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA query_only = ON")


def _fatal(e: Exception) -> bool:
    """I/O-level errors (disk full, corruption) fail the whole batch, not one op."""
    return isinstance(e, sqlite3.DatabaseError) and not isinstance(
        e, sqlite3.IntegrityError | sqlite3.ProgrammingError
    )


def _run_one(conn: Conn, op: Op, outcomes: list[tuple[bool, object]]) -> None:
    """Run ``op`` in a savepoint of its own, so it can fail alone."""
    conn.execute("SAVEPOINT op")
    try:
        result = op(conn)
    except storesql.KeepWrites as e:
        conn.execute("RELEASE op")
        outcomes.append((False, e.error))
    except Exception as e:
        if _fatal(e):
            raise
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
        outcomes.append((False, e))
    else:
        conn.execute("RELEASE op")
        outcomes.append((True, result))


def _run_appends(conn: Conn, group: list[_AppendOp], outcomes: list[tuple[bool, object]]) -> None:
    """A run of consecutive appends: one savepoint, few statements for all of them.

    Appends are not refused (a duplicate is an answer, not an error); should the
    group fail anyway, it is undone and every append retried in its own savepoint.
    """
    if len(group) == 1:
        _run_one(conn, group[0], outcomes)
        return
    conn.execute("SAVEPOINT appends")
    try:
        results = group[0].store._append_many(conn, group)
    except Exception as e:
        if _fatal(e):
            raise
        conn.execute("ROLLBACK TO appends")
        conn.execute("RELEASE appends")
        for op in group:
            _run_one(conn, op, outcomes)
        return
    conn.execute("RELEASE appends")
    outcomes.extend((True, r) for r in results)


def _run_batch(conn: Conn, ops: list[Op]) -> list[tuple[bool, object]]:
    """One transaction for all queued ops; each in a savepoint so it can fail alone
    (consecutive appends share one, see _run_appends)."""
    outcomes: list[tuple[bool, object]] = []
    conn.execute("BEGIN IMMEDIATE")
    try:
        group: list[_AppendOp] = []
        for op in ops:
            if isinstance(op, _AppendOp):
                group.append(op)
                continue
            if group:
                _run_appends(conn, group, outcomes)
                group = []
            _run_one(conn, op, outcomes)
        if group:
            _run_appends(conn, group, outcomes)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return outcomes


def _call_run_batch(conn: Conn, ops: list[Op]) -> list[tuple[bool, object]]:
    return _run_batch(conn, ops)  # looked up at call time (bench/fanout's probe wraps it)


class _AppendOp:
    """An append queued for the writer; _run_batch stores consecutive ones together."""

    __slots__ = ("message", "now", "store")

    def __init__(self, store: SQLiteStore, message: NewMessage, now: float) -> None:
        self.store = store
        self.message = message
        self.now = now

    def __call__(self, conn: Conn) -> AppendResult:
        return self.store._append_many(conn, [self])[0]


def _checkpoint(conn: Conn) -> None:
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


_PENDING_SQL = """
SELECT m.seq, m.mailbox, m.sender_id, m.sender_device, m.client_id, m.ts,
       m.expires_at, m.target, m.nonce, m.body
FROM cursors c JOIN messages m ON m.mailbox = c.mailbox AND m.seq > c.acked_seq
WHERE c.user_id = ? AND c.device_id = ?
  AND NOT (m.sender_id = c.user_id AND m.sender_device = c.device_id)
  AND (m.expires_at IS NULL OR m.expires_at > ?)
  AND m.ts >= ?
  AND (m.for_all = 1 OR EXISTS (
    SELECT 1 FROM message_devices d
    WHERE d.seq = m.seq AND d.user_id = c.user_id AND d.device_id = c.device_id))
ORDER BY m.seq
"""

@implementer(IStore)
class SQLiteStore:
    """IStore on one SQLite file.  The constructor does no I/O; open() does."""

    def __init__(
        self,
        path: str,
        storage_key: bytes,
        clock: IReactorTime | None = None,
        reactor: Any = None,
        retention: float = 30 * 24 * 3600,
        sweep_interval: float = SWEEP_INTERVAL,
        ack_delay: float = ACK_DELAY,
    ) -> None:
        if len(storage_key) != 32:
            raise ValueError("storage_key must be 32 bytes (AES-256)")
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self.path = path
        self.retention = float(retention)
        self._reactor: Any = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._aead = AESGCM(storage_key)
        self.emails = EmailSeal(storage_key)
        self._wpool: Any = None
        self._writer: SQLiteThread | None = None
        self._rpool: Any = None
        self._queue: list[tuple[Op, Deferred[Any]]] = []
        self._writing = False
        self._accepting = False  # True between a successful open() and close()
        # While open() runs: what arrived early, run once it is open (or failed with it).
        self._open_waiters: list[Deferred[None]] | None = None
        self._idle: list[Deferred[None]] = []
        self._closing: list[Deferred[None]] | None = None
        # Acks not yet handed to the writer: seqs per device, and who waits for them.
        self.sweep_interval = float(sweep_interval)
        self.ack_delay = float(ack_delay)
        self._ack_call: Any = None
        self._drain_waiters: list[Deferred[None]] = []
        self._acks: dict[tuple[int, str], list[int]] = {}
        self._ack_waiters: list[Deferred[None]] = []
        self._ack_inflight: list[Deferred[None]] | None = None
        self._sweep_call: Any = None
        # Writer thread only (touched by ops, never by the reactor thread): the
        # mailbox of recent seqs, the cursors as last written, and the acked
        # ranges per mailbox not yet swept.
        self._seq_mailbox: dict[int, str] = {}
        self._cursor_at: dict[tuple[int, str, str], int] = {}
        self._unswept: dict[str, tuple[int, int]] = {}
        #: Group-commit figures, for tests and benchmarks.
        self.write_transactions = 0
        self.write_ops = 0
        self.max_batch = 0

    # --- life cycle ---

    def open(self) -> Deferred[None]:
        if self._wpool is not None:
            return fail(StoreError("the store is already open"))
        common: dict[str, Any] = {
            "isolation_level": None,  # we issue BEGIN/COMMIT ourselves
            "check_same_thread": False,  # adbapi closes connections from the reactor thread
            "cached_statements": 256,
            "cp_reactor": self._reactor,
            "cp_noisy": False,
        }
        self._wpool = adbapi.ConnectionPool(  # type: ignore[no-untyped-call]
            "sqlite3", self.path, cp_min=1, cp_max=1, cp_openfun=_setup_writer, **common
        )
        self._rpool = adbapi.ConnectionPool(  # type: ignore[no-untyped-call]
            "sqlite3", self.path, cp_min=1, cp_max=READERS, cp_openfun=_setup_reader, **common
        )
        self._wpool.start()
        self._rpool.start()
        self._open_waiters = []
        d = deferToThreadPool(self._reactor, self._wpool.threadpool, self._prepare_file)
        d.addCallback(lambda _: self._wpool.runWithConnection(schema.migrate, self.path))
        d.addCallback(lambda _: self._wpool.runWithConnection(seal_clear_emails, self.emails))

        def opened(_: object) -> None:
            self._writer = SQLiteThread(
                self._reactor, partial(_connect_writer, self.path), "shtalk-sqlite-writer"
            )
            self._accepting = True
            self._release_open_waiters(None)
            # Acks committed before a crash may not have been swept: do it now.
            self._write(_sweep_all).addErrback(
                lambda f: log.failure("sweeping acknowledged messages failed", f)
            )

        def failed(f: Failure) -> Failure:
            self._close_pools()
            self._release_open_waiters(StoreClosed(f"{self.path}: the store could not open"))
            # OperationalError is "locked", "disk full", ...: not the file's fault.
            if isinstance(f.value, sqlite3.DatabaseError) and not isinstance(
                f.value, sqlite3.OperationalError
            ):
                raise CorruptStore(
                    f"{self.path}: cannot be opened ({f.value}); restore it from a backup"
                    " or move it away to start afresh"
                ) from f.value
            return f

        d.addCallbacks(opened, failed)
        return d

    def _prepare_file(self) -> None:
        """Refuse a bad file; create a missing one 0600 before SQLite can (0644)."""
        check_database_file(self.path)
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            for suffix in ("", "-wal", "-shm"):
                try:
                    mode = os.stat(self.path + suffix).st_mode
                except FileNotFoundError:
                    continue
                if mode & 0o077:
                    os.chmod(self.path + suffix, 0o600)
        else:
            os.close(fd)

    def close(self) -> Deferred[None]:
        """Refuse new work, let queued writes commit, checkpoint, close."""
        if self._wpool is None:
            return succeed(None)
        if self._closing is not None:  # a second close() waits for the first
            waiter: Deferred[None] = Deferred()
            self._closing.append(waiter)
            return waiter
        self._closing = []
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        if self._accepting:
            self._write(self._sweep_unswept)  # acks buffered go with it; then sweep
        self._accepting = False
        d = self._when_idle()

        def checkpoint(_: object) -> Deferred[None]:
            self._rpool.close()
            self._rpool = None
            if self._writer is None:
                return cast(Deferred[None], self._wpool.runWithConnection(_checkpoint))
            return self._writer.run(_checkpoint)

        def stop_writer(result: object) -> object:
            writer, self._writer = self._writer, None
            if writer is None:
                return result
            return writer.stop().addCallback(lambda _: result)

        def done(result: object) -> object:
            self._close_pools()
            waiters, self._closing = self._closing or [], None
            for w in waiters:
                w.callback(None)
            return result

        d.addCallback(checkpoint)
        d.addBoth(stop_writer)
        d.addBoth(done)
        return d.addCallback(lambda _: None)

    def _close_pools(self) -> None:
        for pool in (self._rpool, self._wpool):
            if pool is not None:
                pool.close()
        self._rpool = self._wpool = None

    def _when_idle(self) -> Deferred[None]:
        if not self._writing and not self._queue and not self._acks:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def _release_open_waiters(self, error: Exception | None) -> None:
        waiters, self._open_waiters = self._open_waiters or [], None
        for w in waiters:
            if error is None:
                w.callback(None)
            else:
                w.errback(error)

    def _after_open(self, then: Callable[[], Deferred[T]]) -> Deferred[T] | None:
        """While open() is still running (the listener may already accept clients, e.g.
        right after a restart): ``then`` once it is open.  None: decide now."""
        if self._accepting or self._open_waiters is None:
            return None
        w: Deferred[None] = Deferred()
        self._open_waiters.append(w)
        return w.addCallback(lambda _: then())

    # --- the two lanes ---

    def _read(
        self, fn: Callable[Concatenate[Conn, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[T]:
        if not self._accepting:
            later = self._after_open(lambda: self._read(fn, *args, **kwargs))
            return later if later is not None else fail(
                StoreClosed(f"{self.path}: the store is not open"))
        return cast(Deferred[T], self._rpool.runWithConnection(fn, *args, **kwargs))

    def _write(
        self, fn: Callable[Concatenate[Conn, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[T]:
        """Queue an op for the next group commit."""
        if not self._accepting:
            later = self._after_open(lambda: self._write(fn, *args, **kwargs))
            return later if later is not None else fail(
                StoreClosed(f"{self.path}: the store is not open"))
        return self._enqueue(lambda conn: fn(conn, *args, **kwargs))

    def _enqueue(self, op: Op) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self._queue.append((op, d))
        if not self._writing:
            self._flush()
        return d

    # Public lanes for store extensions that keep their SQL in a module of their own
    # (shtalk.server.store.accounts): same threads, same group commit.
    def run_read(
        self, fn: Callable[Concatenate[Conn, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[T]:
        return self._read(fn, *args, **kwargs)

    def run_write(
        self, fn: Callable[Concatenate[Conn, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[T]:
        return self._write(fn, *args, **kwargs)

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        if self._ack_call is not None:
            if self._ack_call.active():
                self._ack_call.cancel()
            self._ack_call = None
        if self._acks:
            # Every ack that arrived since the last flush: one op, first (a sweep
            # queued with them then sees their cursors).
            acks, waiters = self._acks, self._ack_waiters
            self._acks, self._ack_waiters = {}, []
            self._ack_inflight = waiters
            done: Deferred[None] = Deferred()
            done.addBoth(self._acks_committed, waiters)
            batch.insert(0, (lambda conn: self._apply_acks(conn, acks), done))
        self._writing = True
        assert self._writer is not None
        self._writer.submit(
            _call_run_batch, ([op for op, _ in batch],), lambda r: self._committed(r, batch)
        )

    def _committed(
        self, outcome: list[tuple[bool, object]] | Failure, batch: list[tuple[Op, Deferred[Any]]]
    ) -> None:
        self._writing = False
        if isinstance(outcome, Failure):
            answers: list[tuple[bool, object]] = [(False, outcome)] * len(batch)
        else:
            answers = outcome
            self.write_transactions += 1
            self.write_ops += len(batch)
            self.max_batch = max(self.max_batch, len(batch))
        # Start the next transaction before running callbacks: the writer
        # thread works while the reactor thread answers the senders.
        if self._queue or self._acks:
            self._flush()
        if self._drain_waiters:  # the backlog went into a transaction: read again
            drained, self._drain_waiters = self._drain_waiters, []
            for w in drained:
                w.callback(None)
        for (_, d), (ok, value) in zip(batch, answers, strict=True):
            if ok:
                d.callback(value)
            else:
                d.errback(cast(Exception | Failure, value))
        if not self._writing and not self._queue and not self._acks:
            idle, self._idle = self._idle, []
            for w in idle:
                w.callback(None)

    # --- back-pressure ---

    def overloaded(self) -> bool:
        """True while more ops wait for the writer than it should be fed."""
        return len(self._queue) >= BACKLOG_HIGH

    def when_drained(self) -> Deferred[None]:
        """Fires when the waiting ops have been taken into a transaction."""
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        return d

    def _acks_committed(self, result: object, waiters: list[Deferred[None]]) -> None:
        if self._ack_inflight is waiters:
            self._ack_inflight = None
        for w in waiters:
            if isinstance(result, Failure):
                w.errback(result)
            else:
                w.callback(None)
        if isinstance(result, Failure):
            return
        if self.sweep_interval > 0 and self._sweep_call is None and self._accepting:
            self._sweep_call = self._clock.callLater(self.sweep_interval, self._sweep_soon)

    def _sweep_soon(self) -> None:
        self._sweep_call = None
        if self._accepting:
            d = self._write(self._sweep_unswept)
            d.addErrback(lambda f: None)  # a failed sweep is retried with the next acks

    def _acks_settled(self) -> Deferred[None]:
        """Fires once every ack received so far is committed."""
        if self._acks:
            waiters = self._ack_waiters
            if not self._writing:
                self._flush()
        elif self._ack_inflight is not None:
            waiters = self._ack_inflight
        else:
            return succeed(None)
        d: Deferred[None] = Deferred()
        waiters.append(d)
        return d

    def _now(self) -> float:
        return float(self._clock.seconds())

    # --- accounts ---

    def create_user(
        self, name: str, key: str, email: str, pw_hash: bytes, status: str
    ) -> Deferred[User]:
        return self._write(
            storesql.create_user, name, key, self.emails.seal(key, email),
            self.emails.index(email), pw_hash, status, self._now(),
        )

    def email_of(self, user_id: int) -> Deferred[str | None]:
        """The account's address, opened (None: no account, deleted, or unreadable)."""

        def opened(found: tuple[str, bytes] | None) -> str | None:
            return None if found is None else self.emails.open(*found)

        return self._read(storesql.sealed_email, user_id).addCallback(opened)

    def user_by_key(self, key: str) -> Deferred[User | None]:
        return self._read(storesql.one_user, storesql.USER + " WHERE key = ?", key)

    def user_by_id(self, user_id: int) -> Deferred[User | None]:
        return self._read(storesql.one_user, storesql.USER + " WHERE id = ?", user_id)

    def users_by_ids(self, user_ids: Iterable[int]) -> Deferred[dict[int, User]]:
        return self._read(storesql.users_by_ids, sorted(set(user_ids)))

    # --- devices ---

    def upsert_device(self, user_id: int, device_id: str, label: str) -> Deferred[Device]:
        return self._write(storesql.upsert_device, user_id, device_id, label, self._now())

    def devices(self, user_id: int) -> Deferred[list[Device]]:
        return self._read(storesql.devices, user_id)

    # --- sessions ---

    def remove_device(self, user_id: int, device_id: str) -> Deferred[bool]:
        return self._write(prekeys.remove_device, user_id, device_id)

    # --- prekey directory (SQL in prekeys.py) ---

    def publish_keys(
        self,
        user_id: int,
        device_id: str,
        bundle: bytes | None,
        one_time: Sequence[OneTimeKey],
        replace: bool = False,
    ) -> Deferred[tuple[dict[str, int], bool]]:
        return self._write(
            prekeys.publish, user_id, device_id, bundle, list(one_time), self._now(), replace
        )

    def key_counts(self, user_id: int, device_id: str) -> Deferred[dict[str, int]]:
        return self._read(prekeys.counts, user_id, device_id)

    def claim_keys(self, user_id: int, device_id: str | None) -> Deferred[list[ClaimedBundle]]:
        return self._write(prekeys.claim, user_id, device_id, self._now())

    def create_session(
        self, family: str, user_id: int, device_id: str, refresh_hash: bytes, expires: float
    ) -> Deferred[None]:
        return self._write(
            storesql.create_session, family, user_id, device_id, refresh_hash, expires
        )

    def rotate_refresh(
        self, old_hash: bytes, new_hash: bytes, new_expires: float, now: float
    ) -> Deferred[Session]:
        # Serialised by the single writer, and guarded by "AND used = 0":
        # of two concurrent rotations exactly one wins, the other is reuse.
        return self._write(storesql.rotate_refresh, old_hash, new_hash, new_expires, now)

    def session(self, family: str) -> Deferred[Session | None]:
        return self._read(storesql.session, family)

    def revoke_session(self, family: str) -> Deferred[None]:
        return self._write(
            storesql.execute, "UPDATE sessions SET revoked = 1 WHERE family = ?", family
        )

    def revoke_user_sessions(self, user_id: int) -> Deferred[None]:
        return self._write(
            storesql.execute, "UPDATE sessions SET revoked = 1 WHERE user_id = ?", user_id
        )

    # --- rooms ---

    def create_room(self, name: str, key: str, owner_id: int, invite_only: bool) -> Deferred[Room]:
        return self._write(storesql.create_room, name, key, owner_id, invite_only, self._now())

    def room_by_key(self, key: str) -> Deferred[Room | None]:
        return self._read(storesql.room_by_key, key)

    def rooms_visible_to(self, user_id: int) -> Deferred[list[tuple[Room, int, bool]]]:
        return self._read(storesql.rooms_visible_to, user_id)

    def rooms_of(self, user_id: int) -> Deferred[list[Room]]:
        return self._read(storesql.rooms_of, user_id)

    def members(self, room_id: int) -> Deferred[list[Member]]:
        return self._read(storesql.members, room_id)

    def add_member(self, room_id: int, user_id: int, role: str) -> Deferred[None]:
        return self._write(storesql.add_member, room_id, user_id, role, self._now())

    def remove_member(self, room_id: int, user_id: int) -> Deferred[None]:
        return self._write(storesql.remove_member, room_id, user_id)

    def set_role(self, room_id: int, user_id: int, role: str) -> Deferred[None]:
        return self._write(
            storesql.execute,
            "UPDATE members SET role = ? WHERE room_id = ? AND user_id = ?",
            role,
            room_id,
            user_id,
        )

    def add_invite(self, room_id: int, user_id: int, by_id: int) -> Deferred[None]:
        return self._write(
            storesql.execute,
            "INSERT INTO invites (room_id, user_id, by_id, created) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (room_id, user_id) DO NOTHING",
            room_id,
            user_id,
            by_id,
            self._now(),
        )

    def has_invite(self, room_id: int, user_id: int) -> Deferred[bool]:
        return self._read(
            storesql.exists, "SELECT 1 FROM invites WHERE room_id = ? AND user_id = ?",
            room_id, user_id,
        )

    def dm_partners(self, user_id: int) -> Deferred[list[int]]:
        return self._read(storesql.dm_partners, user_id)

    def presence_readers(self, user_id: int) -> Deferred[list[int]]:
        return self._read(storesql.presence_readers, user_id)

    def presence_subjects(self, user_id: int) -> Deferred[list[int]]:
        return self._read(storesql.presence_subjects, user_id)

    def has_written(self, writer_id: int, reader_id: int) -> Deferred[bool]:
        return self._read(storesql.has_written, writer_id, reader_id)

    # --- messages ---

    def append(self, message: NewMessage) -> Deferred[AppendResult]:
        """Store durably; fires after the group commit holding it.

        A duplicate's result carries the original seqs and no ``messages``
        (they were delivered the first time).
        """
        if not self._accepting:
            later = self._after_open(lambda: self.append(message))
            return later if later is not None else fail(
                StoreClosed(f"{self.path}: the store is not open"))
        return self._enqueue(_AppendOp(self, message, self._now()))

    def pending(self, user_id: int, device_id: str) -> Deferred[list[StoredMessage]]:
        # Acks received but not yet committed must not be replayed: wait for them.
        def read(_: object) -> Deferred[list[StoredMessage]]:
            now = self._now()
            return self._read(self._pending, user_id, device_id, now, self._cutoff_ms(now))

        return self._acks_settled().addCallback(read)

    def ack(self, user_id: int, device_id: str, seqs: Sequence[int]) -> Deferred[None]:
        """Coalesced with every other ack into one op of the next transaction; fires
        once committed.  The deletion of what it frees waits for the next sweep."""
        if not self._accepting:
            later = self._after_open(lambda: self.ack(user_id, device_id, seqs))
            return later if later is not None else fail(
                StoreClosed(f"{self.path}: the store is not open"))
        if not seqs:
            return succeed(None)
        key = (user_id, device_id)
        buffered = self._acks.get(key)
        if buffered is None:
            self._acks[key] = [int(s) for s in seqs]
        else:
            buffered.extend(int(s) for s in seqs)
        d: Deferred[None] = Deferred()
        self._ack_waiters.append(d)
        if not self._writing and self._ack_call is None:
            if self.ack_delay > 0:
                # Ride on the next transaction (usually one with sends) rather than
                # commit a transaction of acks alone.
                self._ack_call = self._clock.callLater(self.ack_delay, self._ack_due)
            else:
                self._flush()
        return d

    def _ack_due(self) -> None:
        self._ack_call = None
        if self._acks and not self._writing:
            self._flush()

    def sweep(self) -> Deferred[int]:
        """Delete the acknowledged messages now (normally every ``sweep_interval``)."""
        return self._write(self._sweep_unswept)

    def purge_expired(self, now: float) -> Deferred[int]:
        """Delete in bounded steps, each its own op, so appends and acks queued
        meanwhile are committed between steps instead of waiting for the whole purge."""
        return ensureDeferred(self._purge_all(now))

    async def _purge_all(self, now: float) -> int:
        total = 0
        while True:
            deleted, more = await self._write(
                _purge_step, now, self._cutoff_ms(now), now - self.retention, PURGE_STEP
            )
            total += deleted
            if not more:
                return total

    def stats(self) -> Deferred[dict[str, int]]:
        """Row counts per table (not part of IStore: for tests and benchmarks)."""
        return self._read(_stats)

    def _cutoff_ms(self, now: float) -> int:
        return int((now - self.retention) * 1000)

    # --- ops that need the cipher (run in pool threads) ---

    def _append_many(self, conn: Conn, ops: Sequence[_AppendOp]) -> list[AppendResult]:
        """Store a run of appends with one statement per table (writer thread)."""
        keys = [(op.message.sender_id, op.message.sender_device, op.message.client_id)
                for op in ops]
        known: dict[tuple[int, str, str], tuple[int, ...]] = {}
        for chunk in storesql.chunks(keys, storesql.CHUNK // 3):
            sql = (
                f"WITH k(a, b, c) AS (VALUES {','.join(['(?,?,?)'] * len(chunk))})"  # noqa: S608
                " SELECT t.sender_id, t.sender_device, t.client_id, t.seqs"
                " FROM k JOIN client_ids t"
                " ON t.sender_id = k.a AND t.sender_device = k.b AND t.client_id = k.c"
            )
            for sid, sdev, cid, seqs_text in conn.execute(sql, [v for k in chunk for v in k]):
                known[(int(sid), sdev, cid)] = tuple(int(x) for x in seqs_text.split(",") if x)
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
        top = int(row[0]) if row is not None else 0
        seq_mailbox = self._seq_mailbox
        encrypt = self._aead.encrypt
        rows: list[tuple[object, ...]] = []
        device_rows: list[tuple[int, int, str]] = []
        client_rows: list[tuple[object, ...]] = []
        partner_rows: list[tuple[int, int]] = []
        wrote_rows: list[tuple[int, int]] = []
        ranges: dict[str, tuple[int, int]] = {}
        results: list[AppendResult] = []
        for op, key in zip(ops, keys, strict=True):
            m = op.message
            earlier = known.get(key)
            if earlier is not None:
                results.append(AppendResult(earlier, duplicate=True))
                continue
            plain = encode_envelopes(m.envelope, m.envelopes)
            for_all = int(m.envelope is not None)
            seqs: list[int] = []
            stored: list[StoredMessage] = []
            for mailbox in m.mailboxes:
                top += 1
                seq = top
                nonce = os.urandom(12)
                ad = associated_data(
                    mailbox, m.sender_id, m.sender_device, m.client_id, m.ts, m.target
                )
                rows.append((
                    seq, mailbox, m.sender_id, m.sender_device, m.client_id, m.ts,
                    m.expires_at, m.target, for_all, nonce, encrypt(nonce, plain, ad),
                ))  # fmt: skip
                if not for_all and m.envelopes:
                    device_rows.extend((seq, uid, dev) for uid, dev in m.envelopes)
                lo_hi = ranges.get(mailbox)
                ranges[mailbox] = (seq - 1, seq) if lo_hi is None else (lo_hi[0], seq)
                seq_mailbox[seq] = mailbox
                seqs.append(seq)
                stored.append(
                    StoredMessage(
                        seq, mailbox, m.sender_id, m.sender_device, m.client_id, m.ts,
                        m.expires_at, m.target, m.envelope, dict(m.envelopes),
                    )
                )  # fmt: skip
            known[key] = tuple(seqs)
            client_rows.append(
                (m.sender_id, m.sender_device, m.client_id, ",".join(map(str, seqs)), op.now)
            )
            if m.target.startswith("user:"):
                partners = set(users_of(m.mailboxes)) - {m.sender_id}
                wrote_rows.extend((m.sender_id, p) for p in partners)
                partner_rows.extend((p, m.sender_id) for p in partners)
            results.append(AppendResult(tuple(seqs), duplicate=False, messages=tuple(stored)))
        if rows:
            conn.executemany(
                "INSERT INTO messages (seq, mailbox, sender_id, sender_device, client_id, ts,"
                " expires_at, target, for_all, nonce, body) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                rows,
            )
        if device_rows:
            conn.executemany(
                "INSERT INTO message_devices (seq, user_id, device_id) VALUES (?, ?, ?)",
                device_rows,
            )
        if client_rows:
            conn.executemany(
                "INSERT INTO client_ids (sender_id, sender_device, client_id, seqs, created)"
                " VALUES (?, ?, ?, ?, ?)",
                client_rows,
            )
        if wrote_rows:
            # The sender has written to the recipient (which shows the sender's presence
            # to them); the recipient is merely a partner of the sender.
            conn.executemany(
                "INSERT INTO dm_partners (user_id, partner_id, wrote) VALUES (?, ?, 1)"
                " ON CONFLICT (user_id, partner_id) DO UPDATE SET wrote = 1"
                " WHERE dm_partners.wrote = 0",
                wrote_rows,
            )
        if partner_rows:
            conn.executemany(
                "INSERT INTO dm_partners (user_id, partner_id) VALUES (?, ?)"
                " ON CONFLICT (user_id, partner_id) DO NOTHING",
                partner_rows,
            )
        # Rows no other device reads (e.g. the sender's own inbox when it has one
        # device) are not kept; their seqs are still reported.
        for mailbox, (lo, hi) in ranges.items():
            storesql.sweep(conn, mailbox, lo, hi)
        if len(seq_mailbox) > 2 * _SEQ_MEMORY:
            floor = top - _SEQ_MEMORY
            self._seq_mailbox = {k: v for k, v in seq_mailbox.items() if k > floor}
        return results

    def _apply_acks(self, conn: Conn, acks: dict[tuple[int, str], list[int]]) -> None:
        """Move each acknowledged (device, mailbox) cursor once (writer thread)."""
        seq_mailbox = self._seq_mailbox
        best: dict[tuple[int, str, str], int] = {}
        for (user_id, device_id), seqs in acks.items():
            seqs.sort()
            # In C: the last (highest) seq of each mailbox wins the dict.
            highest = dict(zip(map(seq_mailbox.get, seqs), seqs, strict=True))
            unknown: list[int] = []
            if None in highest:
                del highest[None]
                unknown = [seq for seq in seqs if seq not in seq_mailbox]
            for mailbox, seq in highest.items():
                best[(user_id, device_id, cast(str, mailbox))] = seq
            if unknown:  # older than the writer remembers (or not a message at all)
                for chunk in storesql.chunks(sorted(set(unknown))):
                    sql = (
                        "SELECT mailbox, MAX(seq) FROM messages"  # noqa: S608 (only ?s)
                        f" WHERE seq IN ({storesql.marks(len(chunk))}) GROUP BY mailbox"
                    )
                    for mailbox, seq in conn.execute(sql, tuple(chunk)):
                        k = (user_id, device_id, mailbox)
                        if best.get(k, 0) < int(seq):
                            best[k] = int(seq)
        cursor_at = self._cursor_at
        updates: list[tuple[int, int, str, str, int]] = []
        unswept = self._unswept
        for k, seq in best.items():
            old = cursor_at.get(k)
            if old is None:
                row = conn.execute(
                    "SELECT acked_seq FROM cursors"
                    " WHERE user_id = ? AND device_id = ? AND mailbox = ?",
                    k,
                ).fetchone()
                if row is None:
                    continue  # not a mailbox this device reads: ignored
                old = int(row[0])
            if seq <= old:
                cursor_at[k] = old
                continue
            cursor_at[k] = seq
            updates.append((seq, k[0], k[1], k[2], seq))
            mailbox = k[2]
            lo_hi = unswept.get(mailbox)
            unswept[mailbox] = (old, seq) if lo_hi is None else (
                min(lo_hi[0], old), max(lo_hi[1], seq))
        if updates:
            # Never moves a cursor back (the cached value may be stale after a re-join).
            conn.executemany(
                "UPDATE cursors SET acked_seq = ?"
                " WHERE user_id = ? AND device_id = ? AND mailbox = ? AND acked_seq < ?",
                updates,
            )
        if len(cursor_at) > _SEQ_MEMORY:
            cursor_at.clear()
        if self.sweep_interval <= 0:
            self._sweep_unswept(conn)

    def _sweep_unswept(self, conn: Conn) -> int:
        """Delete what the acks since the last sweep freed (writer thread)."""
        unswept, self._unswept = self._unswept, {}
        return sum(storesql.sweep(conn, mailbox, lo, hi) for mailbox, (lo, hi) in unswept.items())

    def _pending(
        self, conn: Conn, user_id: int, device_id: str, now: float, cutoff_ms: int
    ) -> list[StoredMessage]:
        rows = conn.execute(_PENDING_SQL, (user_id, device_id, now, cutoff_ms)).fetchall()
        return [self._decrypt(row) for row in rows]

    def _decrypt(self, row: Any) -> StoredMessage:
        seq, mailbox, sender_id, sender_device, client_id, ts, expires_at, target = row[:8]
        ad = associated_data(mailbox, sender_id, sender_device, client_id, ts, target)
        try:
            plain = self._aead.decrypt(bytes(row[8]), bytes(row[9]), ad)
            envelope, envelopes = decode_envelopes(plain)
        except (InvalidTag, ValueError):
            raise EnvelopeDecryptError(
                f"{self.path}: stored message {seq} does not decrypt"
                " (wrong storage key, or the row was altered)"
            ) from None
        return StoredMessage(
            int(seq), mailbox, int(sender_id), sender_device, client_id, int(ts),
            expires_at, target, envelope, envelopes,
        )  # fmt: skip


def _sweep_all(conn: Conn) -> int:
    """Sweep every mailbox over all it holds up to its furthest cursor (at start-up)."""
    deleted = 0
    rows = conn.execute(
        "SELECT m.mailbox, MIN(m.seq), (SELECT MAX(c.acked_seq) FROM cursors c"
        " WHERE c.mailbox = m.mailbox) FROM messages m GROUP BY m.mailbox"
    ).fetchall()
    for mailbox, lo, hi in rows:
        if hi is not None and hi >= lo:
            deleted += storesql.sweep(conn, mailbox, int(lo) - 1, int(hi))
    return deleted


def _purge_step(
    conn: Conn, now: float, cutoff_ms: int, forget_before: float, limit: int
) -> tuple[int, bool]:
    """Delete up to ``limit`` rows of each kind; return (messages deleted, more left?)."""
    expired = conn.execute(
        "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages"
        " WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?)",
        (now, limit),
    ).rowcount
    too_old = conn.execute(
        "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE ts < ? LIMIT ?)",
        (cutoff_ms, limit),
    ).rowcount
    forgotten = conn.execute(
        "DELETE FROM client_ids WHERE rowid IN"
        " (SELECT rowid FROM client_ids WHERE created < ? LIMIT ?)",
        (forget_before, limit),
    ).rowcount
    # An expired family can no longer rotate; its hashes need not be kept.
    ended = conn.execute(
        "DELETE FROM sessions WHERE family IN"
        " (SELECT family FROM sessions WHERE expires <= ? LIMIT ?)",
        (now, limit),
    ).rowcount
    more = max(expired, too_old, forgotten, ended) >= limit
    return int(expired) + int(too_old), more


_TABLES = (
    "users", "devices", "sessions", "refresh_tokens", "rooms", "members", "invites",
    "dm_partners", "messages", "message_devices", "cursors", "client_ids",
)  # fmt: skip


def _stats(conn: Conn) -> dict[str, int]:
    # Table names come from the constant above, never from input.
    return {
        t: int(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])  # noqa: S608
        for t in _TABLES
    }
