"""IStore on PostgreSQL (psycopg 3): what several server processes share.

Why it looks like this:

* No SQL on the reactor thread.  ONE writer connection on a thread of its own runs the
  group commit (`shtalk.server.store.pg.writer`: a batch per transaction, the appends
  with COPY, the acks coalesced); reads go to a psycopg-pool ConnectionPool through a
  Twisted thread pool of the same size (``deferToThreadPool``).
* Several processes may write at once: per-mailbox order comes from the chain heads
  locked in the database (`shtalk.server.store.pg.messages`), never from this process.
* At rest the envelopes and email addresses are sealed exactly as on SQLite (same key,
  same associated data), so `shtalk-admin port-db` copies them as they are.
* The URL may hold a password: only its redacted form (``path``) reaches a log or an
  error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool
from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from shtalk.server.eserver import CorruptStore, StoreClosed, StoreError
from shtalk.server.iserver import IStore
from shtalk.server.store.acks import CursorBook
from shtalk.server.store.codes import SQLiteCodeStore
from shtalk.server.store.groupcommit import GroupedOp
from shtalk.server.store.pg import accounts, messages, rooms, schema, security
from shtalk.server.store.pg.writer import PgGroupCommit, PgLink
from shtalk.server.store.records import (
    AppendResult,
    ChainLink,
    ClaimedBundle,
    Device,
    Member,
    NewMessage,
    OneTimeKey,
    Room,
    Session,
    StoredMessage,
    User,
)  # fmt: skip
from shtalk.server.store.sealing import EmailSeal, EnvelopeSeal
from shtalk.sqlitethread import SQLiteThread

log = Logger()
T = TypeVar("T")
P = ParamSpec("P")

READERS = 4
PURGE_STEP = 2000
SWEEP_INTERVAL = 0.5
ACK_DELAY = 0.005
CONNECT_TIMEOUT = 10


def redact(url: str) -> str:
    """The URL without its password: what messages and logs may show."""
    try:
        params = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    host, db = params.get("host", "localhost"), params.get("dbname", "")
    user = str(params.get("user", ""))
    return f"postgresql://{user + '@' if user else ''}{host}:{params.get('port', 5432)}/{db}"


def connect(url: str) -> psycopg.Connection[Any]:
    """A connection in autocommit mode (the writer issues BEGIN/COMMIT itself)."""
    return psycopg.connect(
        make_conninfo(url, connect_timeout=CONNECT_TIMEOUT, application_name="shtalk"),
        autocommit=True,
    )


def check_database(url: str) -> int:
    """Synchronous start-up check, before the reactor: reachable and not too new (one
    line if not).  Returns the database's schema version (0: empty, to be created)."""
    where = redact(url)
    try:
        with connect(url) as conn:
            row = conn.execute("SELECT to_regclass('shtalk_schema') IS NOT NULL").fetchone()
            if row is None or not row[0]:
                return 0
            found = conn.execute("SELECT version, compat FROM shtalk_schema").fetchone()
    except psycopg.Error as e:
        detail = " ".join(str(e).split())[:200]
        raise CorruptStore(f"{where}: cannot use the database ({detail})") from None
    if found is None:
        return 0
    schema.refuse_newer(where, int(found[0]), int(found[1]))
    return int(found[0])


class _AppendOp(GroupedOp):
    __slots__ = ("message", "now", "store")

    def __init__(self, store: PostgresStore, message: NewMessage, now: float) -> None:
        self.store, self.message, self.now = store, message, now

    def run_many(self, conn: Any, group: Sequence[Any]) -> list[object]:
        store = self.store
        results = messages.append_many(conn, group, store._seal.seal, store._book.seq_mailbox)
        store._book.trim()
        return cast(list[object], results)


@implementer(IStore)
class PostgresStore:
    """IStore on PostgreSQL.  The constructor does no I/O; open() does."""

    def __init__(
        self, url: str, storage_key: bytes, clock: IReactorTime | None = None,
        reactor: Any = None, retention: float = 30 * 24 * 3600,
        sweep_interval: float = SWEEP_INTERVAL, ack_delay: float = ACK_DELAY,
        readers: int = READERS,
    ) -> None:
        if len(storage_key) != 32:
            raise ValueError("storage_key must be 32 bytes (AES-256)")
        if reactor is None:
            from twisted.internet import reactor as global_reactor

            reactor = global_reactor
        self._url = url
        self.path = redact(url)
        self.retention = float(retention)
        self._reactor: Any = reactor
        self._clock: IReactorTime = clock if clock is not None else reactor
        self._seal = EnvelopeSeal(storage_key, self.path)
        self.emails = EmailSeal(storage_key)
        self.codes = SQLiteCodeStore(self, security)
        self._readers = readers
        self._threads: ThreadPool | None = None
        self._pool: ConnectionPool[Any] | None = None
        self._book = CursorBook(messages)
        self._writes = PgGroupCommit(self._clock, self._book, ack_delay, sweep_interval)
        self._open_waiters: list[Deferred[None]] | None = None
        self._closing: list[Deferred[None]] | None = None

    def __repr__(self) -> str:
        return f"<PostgresStore {self.path}>"

    # Group-commit figures, for tests and benchmarks.
    write_transactions = property(lambda self: int(self._writes.write_transactions))
    max_batch = property(lambda self: int(self._writes.max_batch))

    # --- life cycle ---

    def open(self) -> Deferred[None]:
        if self._threads is not None:
            return fail(StoreError("the store is already open"))
        self._threads = ThreadPool(1, self._readers, "shtalk-pg-reader")
        self._threads.start()
        self._open_waiters = []

        def prepare() -> int:
            with connect(self._url) as conn:
                version = schema.migrate(conn, self.path)
            self._pool = ConnectionPool(
                self._url, min_size=1, max_size=self._readers, open=False,
                kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT},
                name="shtalk-pg-readers",
            )
            self._pool.open(wait=True, timeout=CONNECT_TIMEOUT)
            return version

        def opened(version: int) -> None:
            log.info("store: PostgreSQL at {path} (schema version {version})",
                     path=self.path, version=version)
            link = PgLink(partial(connect, self._url))
            self._writes.start(SQLiteThread(self._reactor, cast(Any, lambda: link),
                                            "shtalk-pg-writer"))
            self._release_open_waiters(None)
            self._write(messages.sweep_all).addErrback(
                lambda f: log.failure("sweeping acknowledged messages failed", f))

        def failed(f: Failure) -> Failure:
            self._stop_threads()
            self._release_open_waiters(StoreClosed(f"{self.path}: the store could not open"))
            if isinstance(f.value, psycopg.Error):
                detail = " ".join(str(f.value).split())[:200]
                raise CorruptStore(f"{self.path}: cannot use the database ({detail})") from None
            return f

        d = deferToThreadPool(self._reactor, self._threads, prepare)
        return d.addCallbacks(opened, failed)

    def close(self) -> Deferred[None]:
        """Refuse new work, let queued writes commit, close the connections."""
        if self._threads is None:
            return succeed(None)
        if self._closing is not None:  # a second close() waits for the first
            waiter: Deferred[None] = Deferred()
            self._closing.append(waiter)
            return waiter
        self._closing = []
        d = self._writes.close() if self._writes.started else succeed(None)

        def stop(result: object) -> Deferred[None]:
            return self._writes.stop().addCallback(lambda _: None)

        def close_pool(result: object) -> Deferred[object]:
            # Closing the pool waits for its connections: not on the reactor thread.
            pool, self._pool = self._pool, None
            if pool is None or self._threads is None:
                return succeed(result)
            return deferToThreadPool(self._reactor, self._threads, pool.close).addBoth(
                lambda _: result)

        def done(result: object) -> object:
            self._stop_threads()
            waiters, self._closing = self._closing or [], None
            for w in waiters:
                w.callback(None)
            return result

        return d.addBoth(stop).addBoth(close_pool).addBoth(done).addCallback(lambda _: None)

    def _stop_threads(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:  # only after a failed open: nothing was lent out
            pool.close(timeout=0)
        threads, self._threads = self._threads, None
        if threads is not None:
            threads.stop()

    def _release_open_waiters(self, error: Exception | None) -> None:
        waiters, self._open_waiters = self._open_waiters or [], None
        for w in waiters:
            if error is None:
                w.callback(None)
            else:
                w.errback(error)

    def _after_open(self, then: Callable[[], Deferred[T]]) -> Deferred[T]:
        if self._open_waiters is None:
            return fail(StoreClosed(f"{self.path}: the store is not open"))
        w: Deferred[None] = Deferred()
        self._open_waiters.append(w)
        return w.addCallback(lambda _: then())

    # --- the two lanes ---

    def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._pool is not None
        with self._pool.connection() as conn:
            return fn(conn, *args)

    def _read(self, fn: Callable[Concatenate[Any, P], T], *args: P.args,
              **kwargs: P.kwargs) -> Deferred[T]:
        if not self._writes.accepting:
            return self._after_open(lambda: self._read(fn, *args, **kwargs))
        assert self._threads is not None
        return deferToThreadPool(
            self._reactor, self._threads, self._in_pool, partial(fn, **kwargs), *args
        )

    def _write(self, fn: Callable[Concatenate[Any, P], T], *args: P.args,
               **kwargs: P.kwargs) -> Deferred[T]:
        if not self._writes.accepting:
            return self._after_open(lambda: self._write(fn, *args, **kwargs))
        return self._writes.enqueue(lambda conn: fn(conn, *args, **kwargs))

    run_read = _read
    run_write = _write

    def overloaded(self) -> bool:
        return self._writes.overloaded()

    def when_drained(self) -> Deferred[None]:
        return self._writes.when_drained()

    def _now(self) -> float:
        return float(self._clock.seconds())

    def _cutoff_ms(self, now: float) -> int:
        return int((now - self.retention) * 1000)

    # --- accounts, devices, keys, sessions ---

    def create_user(
        self, name: str, key: str, email: str, pw_hash: bytes, status: str
    ) -> Deferred[User]:
        return self._write(
            accounts.create_user, name, key, self.emails.seal(key, email),
            self.emails.index(email), pw_hash, status, self._now(),
        )

    def email_of(self, user_id: int) -> Deferred[str | None]:
        def opened(found: tuple[str, bytes] | None) -> str | None:
            return None if found is None else self.emails.open(*found)

        return self._read(accounts.sealed_email, user_id).addCallback(opened)

    def user_by_key(self, key: str) -> Deferred[User | None]:
        return self._read(accounts.user_by_key, key)

    def user_by_id(self, user_id: int) -> Deferred[User | None]:
        return self._read(accounts.user_by_id, user_id)

    def users_by_ids(self, user_ids: Iterable[int]) -> Deferred[dict[int, User]]:
        return self._read(accounts.users_by_ids, sorted(set(user_ids)))

    def set_status(self, user_id: int, status: str) -> Deferred[bool]:
        return self._write(accounts.set_status, user_id, status)

    def delete_account(self, user_id: int, dummy_hash: bytes) -> Deferred[bool]:
        return self._write(accounts.delete_account, user_id, dummy_hash)

    def upsert_device(self, user_id: int, device_id: str, label: str) -> Deferred[Device]:
        return self._write(accounts.upsert_device, user_id, device_id, label, self._now())

    def devices(self, user_id: int) -> Deferred[list[Device]]:
        return self._read(accounts.devices, user_id)

    def remove_device(self, user_id: int, device_id: str) -> Deferred[bool]:
        return self._write(accounts.remove_device, user_id, device_id)

    def publish_keys(
        self, user_id: int, device_id: str, bundle: bytes | None,
        one_time: Sequence[OneTimeKey], replace: bool = False,
    ) -> Deferred[tuple[dict[str, int], bool]]:
        return self._write(
            accounts.publish, user_id, device_id, bundle, list(one_time), self._now(), replace
        )

    def key_counts(self, user_id: int, device_id: str) -> Deferred[dict[str, int]]:
        return self._read(accounts.counts, user_id, device_id)

    def claim_keys(self, user_id: int, device_id: str | None) -> Deferred[list[ClaimedBundle]]:
        return self._write(accounts.claim, user_id, device_id, self._now())

    def device_bundle(self, user_id: int, device_id: str) -> Deferred[bytes | None]:
        return self._read(accounts.device_bundle, user_id, device_id)

    def create_session(
        self, family: str, user_id: int, device_id: str, refresh_hash: bytes, expires: float
    ) -> Deferred[None]:
        return self._write(
            accounts.create_session, family, user_id, device_id, refresh_hash, expires
        )

    def rotate_refresh(
        self, old_hash: bytes, new_hash: bytes, new_expires: float, now: float
    ) -> Deferred[Session]:
        return self._write(accounts.rotate_refresh, old_hash, new_hash, new_expires, now)

    def session(self, family: str) -> Deferred[Session | None]:
        return self._read(accounts.session, family)

    def revoke_session(self, family: str) -> Deferred[None]:
        return self._write(accounts.revoke_session, family)

    def revoke_user_sessions(self, user_id: int) -> Deferred[None]:
        return self._write(accounts.revoke_user_sessions, user_id)

    # --- rooms ---

    def create_room(self, name: str, key: str, owner_id: int, invite_only: bool) -> Deferred[Room]:
        return self._write(rooms.create_room, name, key, owner_id, invite_only, self._now())

    def room_by_key(self, key: str) -> Deferred[Room | None]:
        return self._read(rooms.room_by_key, key)

    def rooms_visible_to(self, user_id: int) -> Deferred[list[tuple[Room, int, bool]]]:
        return self._read(rooms.rooms_visible_to, user_id)

    def rooms_of(self, user_id: int) -> Deferred[list[Room]]:
        return self._read(rooms.rooms_of, user_id)

    def members(self, room_id: int) -> Deferred[list[Member]]:
        return self._read(rooms.members, room_id)

    def member_since(self, room_id: int, user_id: int) -> Deferred[float | None]:
        return self._read(rooms.member_since, room_id, user_id)

    def add_member(self, room_id: int, user_id: int, role: str) -> Deferred[ChainLink]:
        return self._write(rooms.add_member, room_id, user_id, role, self._now())

    def remove_member(self, room_id: int, user_id: int) -> Deferred[ChainLink]:
        return self._write(rooms.remove_member, room_id, user_id)

    def set_role(self, room_id: int, user_id: int, role: str) -> Deferred[None]:
        return self._write(rooms.set_role, room_id, user_id, role)

    def add_invite(self, room_id: int, user_id: int, by_id: int) -> Deferred[None]:
        return self._write(rooms.add_invite, room_id, user_id, by_id, self._now())

    def has_invite(self, room_id: int, user_id: int) -> Deferred[bool]:
        return self._read(rooms.has_invite, room_id, user_id)

    def dm_partners(self, user_id: int) -> Deferred[list[int]]:
        return self._read(rooms.dm_partners, user_id)

    def presence_readers(self, user_id: int) -> Deferred[list[int]]:
        return self._read(rooms.presence_readers, user_id)

    def presence_subjects(self, user_id: int) -> Deferred[list[int]]:
        return self._read(rooms.presence_subjects, user_id)

    def has_written(self, writer_id: int, reader_id: int) -> Deferred[bool]:
        return self._read(rooms.has_written, writer_id, reader_id)

    # --- messages ---

    def append(self, message: NewMessage) -> Deferred[AppendResult]:
        if not self._writes.accepting:
            return self._after_open(lambda: self.append(message))
        return self._writes.enqueue(_AppendOp(self, message, self._now()))

    def mailbox_heads(self, mailboxes: Sequence[str]) -> Deferred[dict[str, int]]:
        return self._read(messages.heads, list(mailboxes))

    def messages_between(
        self, mailbox: str, after: int, upto: int
    ) -> Deferred[list[StoredMessage]]:
        return self._read(messages.between, mailbox, after, upto, self._seal.open)

    def pending(self, user_id: int, device_id: str) -> Deferred[list[StoredMessage]]:
        def read(_: object) -> Deferred[list[StoredMessage]]:
            now = self._now()
            return self._read(
                messages.pending, user_id, device_id, now, self._cutoff_ms(now), self._seal.open
            )

        return self._writes.settled().addCallback(read)

    def ack(self, user_id: int, device_id: str, seqs: Sequence[int]) -> Deferred[None]:
        if not self._writes.accepting:
            return self._after_open(lambda: self.ack(user_id, device_id, seqs))
        return self._writes.ack(user_id, device_id, seqs)

    def sweep(self) -> Deferred[int]:
        if not self._writes.accepting:
            return self._after_open(self.sweep)
        return self._writes.sweep()

    def purge_expired(self, now: float) -> Deferred[int]:
        return ensureDeferred(self._purge_all(now))

    async def _purge_all(self, now: float) -> int:
        total = 0
        while True:
            deleted, more = await self._write(
                messages.purge_step, now, self._cutoff_ms(now), now - self.retention, PURGE_STEP
            )
            total += deleted
            if not more:
                return total

    def queued(self) -> Deferred[int]:
        return self._read(messages.queued)

    def stats(self) -> Deferred[dict[str, int]]:
        return self._read(messages.stats)
