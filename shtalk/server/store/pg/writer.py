"""The PostgreSQL writer: the SQLite store's group commit, run on a psycopg connection.

Why the same design: a transaction costs ~0.7 ms of fixed work whatever it holds, and a
message ~20 µs when a batch's rows go in with ``COPY``, so the writer takes everything
queued while the previous transaction ran into the next one (`GroupCommit`), and the
acks ride along coalesced (`AckingGroupCommit`).  What differs from SQLite:

* Errors: a failed statement aborts the transaction, so every op runs in a savepoint
  (as on SQLite) and the SQL of this package never runs a statement after a failed one
  without rolling back to its savepoint (guarded ``ON CONFLICT``/``RETURNING`` instead).
* Another process may hold the locks this batch needs: a deadlock or serialization
  failure rolls the batch back and it is run again (ops are re-runnable: they read what
  they need inside the transaction).
* The connection can break (a restart of PostgreSQL): the batch fails and the next one
  connects again.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import psycopg

from shtalk.server.store.acks import AckingGroupCommit
from shtalk.server.store.groupcommit import Engine, Op, Outcomes, run_ops
from shtalk.server.store.pg.conn import PgConn

#: Times a batch is run again after a deadlock or serialization failure.
RETRIES = 5


class PgLink:
    """The writer thread's connection, opened again after it broke.  Writer thread only."""

    def __init__(self, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        self._connect = connect
        self._conn: psycopg.Connection[Any] | None = None

    def get(self) -> psycopg.Connection[Any]:
        conn = self._conn
        if conn is None or conn.closed or conn.broken:
            if conn is not None:
                conn.close()
            conn = self._conn = self._connect()
        return conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class PgEngine(Engine):
    """A batch's transaction on PostgreSQL."""

    begin = "BEGIN"

    @staticmethod
    def fatal(e: Exception) -> bool:
        """Errors of the connection or of the transaction as a whole, not of one op."""
        return isinstance(e, psycopg.OperationalError | psycopg.InterfaceError
                          | psycopg.InternalError)

    @staticmethod
    def in_transaction(conn: Any) -> bool:
        return not conn.closed and (
            conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE)


POSTGRES = PgEngine()


class PgGroupCommit(AckingGroupCommit):
    """The acking group commit, its batches run on PostgreSQL."""

    #: Batches run again after a deadlock or serialization failure (writer thread).
    reruns = 0

    def run_batch(self, link: PgLink, ops: list[Op]) -> Outcomes:  # type: ignore[override]
        for attempt in range(RETRIES + 1):
            try:
                return run_ops(PgConn(link.get()), ops, POSTGRES)
            except psycopg.Error as e:
                # Class 40 (deadlock, serialization failure): nothing of it was kept.
                if attempt == RETRIES or not (e.sqlstate or "").startswith("40"):
                    raise
                # What the book remembers of cursors may now be ahead of the database.
                self.book.cursor_at.clear()
                self.reruns += 1
        raise AssertionError("unreachable")
