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

from collections.abc import Callable
from functools import partial
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg_pool import ConnectionPool
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from shtalk.server.eserver import CorruptStore, StoreClosed, StoreError
from shtalk.server.iserver import IStore
from shtalk.server.store.facade import ACK_DELAY, SWEEP_INTERVAL, LaneStore
from shtalk.server.store.pg import devices, messages, schema
from shtalk.server.store.pg.conn import PgConn
from shtalk.server.store.pg.writer import PgGroupCommit, PgLink
from shtalk.sqlitethread import SQLiteThread

log = Logger()
T = TypeVar("T")
P = ParamSpec("P")

READERS = 4
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


@implementer(IStore)
class PostgresStore(LaneStore):
    """IStore on PostgreSQL.  The constructor does no I/O; open() does."""

    _devices = devices
    _messages = messages
    _commit = PgGroupCommit

    def __init__(
        self, url: str, storage_key: bytes, clock: IReactorTime | None = None,
        reactor: Any = None, retention: float = 30 * 24 * 3600,
        sweep_interval: float = SWEEP_INTERVAL, ack_delay: float = ACK_DELAY,
        readers: int = READERS,
    ) -> None:
        super().__init__(
            redact(url), storage_key, clock, reactor, retention, sweep_interval, ack_delay
        )
        self._url = url
        self._readers = readers
        self._threads: ThreadPool | None = None
        self._pool: ConnectionPool[Any] | None = None

    def __repr__(self) -> str:
        return f"<PostgresStore {self.path}>"

    # --- life cycle ---

    def open(self) -> Deferred[None]:
        if self._threads is not None:
            return fail(StoreError("the store is already open"))
        self._threads = ThreadPool(1, self._readers, "shtalk-pg-reader")
        self._threads.start()
        self._open_waiters = []

        def prepare() -> int:
            with connect(self._url) as conn:
                version = schema.migrate(PgConn(conn), self.path)
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

    def _is_open(self) -> bool:
        return self._threads is not None

    def _shut_down(self) -> Deferred[Any]:
        """Let queued writes commit, stop the writer, close the connections."""
        d: Deferred[Any] = self._writes.close() if self._writes.started else succeed(None)

        def stop(result: object) -> Deferred[None]:
            return self._writes.stop().addCallback(lambda _: None)

        def close_pool(result: object) -> Deferred[object]:
            # Closing the pool waits for its connections: not on the reactor thread.
            pool, self._pool = self._pool, None
            if pool is None or self._threads is None:
                return succeed(result)
            return deferToThreadPool(self._reactor, self._threads, pool.close).addBoth(
                lambda _: result)

        def stop_threads(result: object) -> object:
            self._stop_threads()
            return result

        return d.addBoth(stop).addBoth(close_pool).addBoth(stop_threads)

    def _stop_threads(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:  # only after a failed open: nothing was lent out
            pool.close(timeout=0)
        threads, self._threads = self._threads, None
        if threads is not None:
            threads.stop()

    # --- the two lanes ---

    def _in_pool(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._pool is not None
        with self._pool.connection() as conn:
            return fn(PgConn(conn), *args)

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
