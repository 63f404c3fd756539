"""IStore on one SQLite file, through ``twisted.enterprise.adbapi`` and a writer thread.

Why it looks like this:

* No SQL on the reactor thread.  ONE writer connection on a thread of its own (a
  single writer never fights SQLite's lock) and a pool of a few readers (WAL lets
  them read while the writer writes).
* Writes are ops of a group commit (`shtalk.server.store.groupcommit`); acks ride
  along, coalesced (`shtalk.server.store.acks`); envelopes and email addresses are
  encrypted at rest (`shtalk.server.store.sealing`); the SQL is in
  `shtalk.server.store.sql`, one module per group of tables.
* One row per sent message per mailbox; per-device cursors say what each device has
  acknowledged, and also which devices read which mailbox.
* ``secure_delete`` zeroes what is deleted; the files are private (0600)
  (`shtalk.server.store.connections`).

This module is the life cycle (open, migrate, close) and the two lanes; the IStore
methods, each one op on the write lane or one read on a reader, are the engines'
shared `shtalk.server.store.facade.LaneStore`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from functools import partial
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from twisted.enterprise import adbapi
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from shtalk.server.eserver import CorruptStore, StoreClosed, StoreError
from shtalk.server.iserver import IStore
from shtalk.server.store import connections, schema
from shtalk.server.store.facade import ACK_DELAY, SWEEP_INTERVAL, LaneStore
from shtalk.server.store.schema import check_database_file
from shtalk.server.store.sealing import EnvelopeDecryptError
from shtalk.server.store.sql import accounts, messages
from shtalk.server.store.sql.common import Conn
from shtalk.sqlitethread import SQLiteThread

__all__ = ["EnvelopeDecryptError", "SQLiteStore", "StoreClosed", "check_database_file"]

log = Logger()
T = TypeVar("T")
P = ParamSpec("P")

#: Reader connections (pending() and lookups run concurrently with the writer).
READERS = 3


@implementer(IStore)
class SQLiteStore(LaneStore):
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
        super().__init__(path, storage_key, clock, reactor, retention, sweep_interval, ack_delay)
        self._wpool: Any = None
        self._rpool: Any = None

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
            "sqlite3", self.path, cp_min=1, cp_max=1,
            cp_openfun=connections.setup_writer, **common,
        )
        self._rpool = adbapi.ConnectionPool(  # type: ignore[no-untyped-call]
            "sqlite3", self.path, cp_min=1, cp_max=READERS,
            cp_openfun=connections.setup_reader, **common,
        )
        self._wpool.start()
        self._rpool.start()
        self._open_waiters = []
        d = deferToThreadPool(
            self._reactor, self._wpool.threadpool, connections.prepare_file, self.path
        )
        d.addCallback(lambda _: self._wpool.runWithConnection(schema.migrate, self.path))
        d.addCallback(
            lambda _: self._wpool.runWithConnection(accounts.seal_clear_emails, self.emails)
        )

        def opened(_: object) -> None:
            connect = partial(connections.connect_writer, self.path)
            self._writes.start(SQLiteThread(self._reactor, connect, "shtalk-sqlite-writer"))
            self._release_open_waiters(None)
            # Acks committed before a crash may not have been swept: do it now.
            self._write(messages.sweep_all).addErrback(
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

    def _is_open(self) -> bool:
        return self._wpool is not None

    def _shut_down(self) -> Deferred[Any]:
        """Let queued writes commit, checkpoint, close."""
        d: Deferred[Any] = self._writes.close()

        def checkpoint(_: object) -> Deferred[None]:
            self._rpool.close()
            self._rpool = None
            if not self._writes.started:
                return cast(Deferred[None], self._wpool.runWithConnection(connections.checkpoint))
            return self._writes.run(connections.checkpoint)

        def stop_writer(result: object) -> object:
            return self._writes.stop().addCallback(lambda _: result)

        def close_pools(result: object) -> object:
            self._close_pools()
            return result

        d.addCallback(checkpoint)
        d.addBoth(stop_writer)
        return d.addBoth(close_pools)

    def _close_pools(self) -> None:
        for pool in (self._rpool, self._wpool):
            if pool is not None:
                pool.close()
        self._rpool = self._wpool = None

    # --- the two lanes ---

    def _read(
        self, fn: Callable[Concatenate[Conn, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[T]:
        if not self._writes.accepting:
            return self._after_open(lambda: self._read(fn, *args, **kwargs))
        return cast(Deferred[T], self._rpool.runWithConnection(fn, *args, **kwargs))

    def _write(
        self, fn: Callable[Concatenate[Conn, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[T]:
        """Queue an op for the next group commit."""
        if not self._writes.accepting:
            return self._after_open(lambda: self._write(fn, *args, **kwargs))
        return self._writes.enqueue(lambda conn: fn(conn, *args, **kwargs))
