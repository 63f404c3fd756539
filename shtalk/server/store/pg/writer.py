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
from shtalk.server.store.groupcommit import GroupedOp, Op, Outcomes
from shtalk.server.store.sql.common import KeepWrites

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


def _fatal(e: Exception) -> bool:
    """Errors of the connection or of the transaction as a whole, not of one op."""
    return isinstance(e, psycopg.OperationalError | psycopg.InterfaceError
                      | psycopg.InternalError)


def _run_one(conn: Any, op: Op, outcomes: Outcomes) -> None:
    conn.execute("SAVEPOINT op")
    try:
        result = op(conn)
    except KeepWrites as e:
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


def _run_group(conn: Any, group: list[GroupedOp], outcomes: Outcomes) -> None:
    if len(group) == 1:
        _run_one(conn, group[0], outcomes)
        return
    conn.execute("SAVEPOINT appends")
    try:
        results = group[0].run_many(conn, group)
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


def _run_once(conn: Any, ops: list[Op]) -> Outcomes:
    outcomes: Outcomes = []
    conn.execute("BEGIN")
    try:
        group: list[GroupedOp] = []
        for op in ops:
            if isinstance(op, GroupedOp):
                group.append(op)
                continue
            if group:
                _run_group(conn, group, outcomes)
                group = []
            _run_one(conn, op, outcomes)
        if group:
            _run_group(conn, group, outcomes)
        conn.execute("COMMIT")
    except BaseException:
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")
        raise
    return outcomes


class PgGroupCommit(AckingGroupCommit):
    """The acking group commit, its batches run on PostgreSQL."""

    #: Batches run again after a deadlock or serialization failure (writer thread).
    reruns = 0

    def run_batch(self, link: PgLink, ops: list[Op]) -> Outcomes:  # type: ignore[override]
        for attempt in range(RETRIES + 1):
            try:
                return _run_once(link.get(), ops)
            except psycopg.Error as e:
                # Class 40 (deadlock, serialization failure): nothing of it was kept.
                if attempt == RETRIES or not (e.sqlstate or "").startswith("40"):
                    raise
                # What the book remembers of cursors may now be ahead of the database.
                self.book.cursor_at.clear()
                self.reruns += 1
        raise AssertionError("unreachable")
