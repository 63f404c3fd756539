"""Group commit: every write of the store is an op queued for ONE writer thread.

Why: SQLite has one writer at a time and each commit costs an fsync, so the store
commits many writes together rather than one per request.

* While a write transaction is in flight, new ops wait; when it commits, everything
  queued goes into the next single transaction.  No timer: the batch is whatever
  arrived during the previous fsync.
* Each op runs inside a SAVEPOINT of its own, so one refusal (Conflict, ...) does not
  undo its neighbours.  An I/O-level error (disk full, corruption) fails the batch.
* Consecutive grouped ops (`GroupedOp`: the appends of messages) share one savepoint
  and are stored together by their ``run_many`` (few ``executemany`` statements).
* Each op's Deferred fires on the reactor thread once the transaction holding it has
  committed; the next transaction is started before those callbacks run, so the
  writer works while the reactor answers the senders.
* A subclass may put one op of its own at the head of each batch (`_board`): the
  acknowledgements ride that way (`shtalk.server.store.acks`).
* Back-pressure: `overloaded` while more ops wait than the writer should be fed.
* Listeners (`BatchListener`) are told before a committed batch's callbacks run and
  after the last: a cluster's bus publisher then writes everything those callbacks
  published at once, in one write, with no timer for the end of the reactor turn.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast

from twisted.internet.defer import Deferred, succeed
from twisted.python.failure import Failure

from shtalk.server.store.sql.common import Conn, KeepWrites
from shtalk.sqlitethread import SQLiteThread

Op = Callable[[Conn], object]
Outcomes = list[tuple[bool, object]]

#: Ops waiting for the writer (beyond the transaction in flight) at which the store
#: reports itself overloaded: the protocol then stops reading senders' sockets.
BACKLOG_HIGH = 1000


class BatchListener(Protocol):
    def batch_begins(self) -> None: ...

    def batch_ends(self) -> None: ...


class GroupedOp:
    """An op that `_run_batch` runs together with the like ops queued right after it."""

    __slots__ = ()

    def run_many(self, conn: Conn, group: Sequence[Any]) -> list[object]:
        """Run every op of ``group`` (``self`` is its first); one result per op."""
        raise NotImplementedError

    def __call__(self, conn: Conn) -> object:
        return self.run_many(conn, [self])[0]


# --- the batch (runs in the writer thread) -----------------------------------


class Engine:
    """What running a batch needs to know of the database: how its transaction
    begins, which errors fail the whole batch, whether a transaction is open.
    This one is SQLite's; another engine's writer brings its own."""

    begin = "BEGIN IMMEDIATE"

    @staticmethod
    def fatal(e: Exception) -> bool:
        """I/O-level errors (disk full, corruption) fail the whole batch, not one op."""
        return isinstance(e, sqlite3.DatabaseError) and not isinstance(
            e, sqlite3.IntegrityError | sqlite3.ProgrammingError
        )

    @staticmethod
    def in_transaction(conn: Any) -> bool:
        return bool(conn.in_transaction)


SQLITE = Engine()


def _run_one(conn: Any, op: Op, outcomes: Outcomes, engine: Engine) -> None:
    """Run ``op`` in a savepoint of its own, so it can fail alone."""
    conn.execute("SAVEPOINT op")
    try:
        result = op(conn)
    except KeepWrites as e:
        conn.execute("RELEASE op")
        outcomes.append((False, e.error))
    except Exception as e:
        if engine.fatal(e):
            raise
        conn.execute("ROLLBACK TO op")
        conn.execute("RELEASE op")
        outcomes.append((False, e))
    else:
        conn.execute("RELEASE op")
        outcomes.append((True, result))


def _run_group(conn: Any, group: list[GroupedOp], outcomes: Outcomes, engine: Engine) -> None:
    """A run of grouped ops: one savepoint, few statements for all of them.

    They are not refused (a duplicate append is an answer, not an error); should the
    group fail anyway, it is undone and every op retried in its own savepoint.
    """
    if len(group) == 1:
        _run_one(conn, group[0], outcomes, engine)
        return
    conn.execute("SAVEPOINT appends")
    try:
        results = group[0].run_many(conn, group)
    except Exception as e:
        if engine.fatal(e):
            raise
        conn.execute("ROLLBACK TO appends")
        conn.execute("RELEASE appends")
        for op in group:
            _run_one(conn, op, outcomes, engine)
        return
    conn.execute("RELEASE appends")
    outcomes.extend((True, r) for r in results)


def run_ops(conn: Any, ops: list[Op], engine: Engine) -> Outcomes:
    """One transaction for all queued ops; each in a savepoint so it can fail alone
    (consecutive grouped ops share one, see _run_group)."""
    outcomes: Outcomes = []
    conn.execute(engine.begin)
    try:
        group: list[GroupedOp] = []
        for op in ops:
            if isinstance(op, GroupedOp):
                group.append(op)
                continue
            if group:
                _run_group(conn, group, outcomes, engine)
                group = []
            _run_one(conn, op, outcomes, engine)
        if group:
            _run_group(conn, group, outcomes, engine)
        conn.execute("COMMIT")
    except BaseException:
        if engine.in_transaction(conn):
            conn.execute("ROLLBACK")
        raise
    return outcomes


def _run_batch(conn: Conn, ops: list[Op]) -> Outcomes:
    """A batch on SQLite."""
    return run_ops(conn, ops, SQLITE)


def _call_run_batch(conn: Conn, ops: list[Op]) -> Outcomes:
    return _run_batch(conn, ops)  # looked up at call time (bench/fanout's probe wraps it)


# --- the queue (reactor thread) -----------------------------------------------


class GroupCommit:
    """The queue of ops in front of the writer thread.  Reactor thread only.

    ``accepting`` is True from `start` (the store is open) until the store closes.
    """

    #: Runs one batch in the writer thread (another engine brings its own).
    run_batch: Callable[[Any, list[Op]], Outcomes] = staticmethod(_call_run_batch)

    def __init__(self) -> None:
        self._writer: SQLiteThread | None = None
        self.accepting = False
        self._queue: list[tuple[Op, Deferred[Any]]] = []
        self.writing = False
        self._idle: list[Deferred[None]] = []
        self._drain_waiters: list[Deferred[None]] = []
        self.listeners: list[BatchListener] = []
        #: Group-commit figures, for tests and benchmarks.
        self.write_transactions = 0
        self.write_ops = 0
        self.max_batch = 0

    def start(self, writer: SQLiteThread) -> None:
        self._writer = writer
        self.accepting = True

    def run(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """Run ``fn(conn, *args)`` on the writer outside any transaction (checkpoints)."""
        assert self._writer is not None
        return self._writer.run(fn, *args)

    def stop(self) -> Deferred[None]:
        """Stop the writer thread once what it was given is done."""
        writer, self._writer = self._writer, None
        return succeed(None) if writer is None else writer.stop()

    @property
    def started(self) -> bool:
        return self._writer is not None

    def enqueue(self, op: Op) -> Deferred[Any]:
        """Queue ``op`` for the next transaction; fires with its result once committed."""
        d: Deferred[Any] = Deferred()
        self._queue.append((op, d))
        if not self.writing:
            self.flush()
        return d

    def flush(self) -> None:
        """Start a transaction with everything queued (the writer must be idle)."""
        batch, self._queue = self._queue, []
        boarding = self._board()
        if boarding is not None:
            batch.insert(0, boarding)
        self.writing = True
        assert self._writer is not None
        self._writer.submit(
            self.run_batch, ([op for op, _ in batch],), lambda r: self._committed(r, batch)
        )

    def _board(self) -> tuple[Op, Deferred[Any]] | None:
        """An op of the subclass's own for the head of the batch being formed."""
        return None

    def _riding(self) -> bool:
        """Whether the subclass has something for the next transaction."""
        return False

    def _committed(
        self, outcome: Outcomes | Failure, batch: list[tuple[Op, Deferred[Any]]]
    ) -> None:
        self.writing = False
        if isinstance(outcome, Failure):
            answers: Outcomes = [(False, outcome)] * len(batch)
        else:
            answers = outcome
            self.write_transactions += 1
            self.write_ops += len(batch)
            self.max_batch = max(self.max_batch, len(batch))
        # Start the next transaction before running callbacks: the writer
        # thread works while the reactor thread answers the senders.
        if self._queue or self._riding():
            self.flush()
        if self._drain_waiters:  # the backlog went into a transaction: read again
            drained, self._drain_waiters = self._drain_waiters, []
            for w in drained:
                w.callback(None)
        listeners = tuple(self.listeners)  # one added by a callback is told from the next
        for listener in listeners:
            listener.batch_begins()
        try:
            for (_, d), (ok, value) in zip(batch, answers, strict=True):
                if ok:
                    d.callback(value)
                else:
                    d.errback(cast(Exception | Failure, value))
        finally:
            for listener in listeners:
                listener.batch_ends()
        if self.idle():
            idle, self._idle = self._idle, []
            for w in idle:
                w.callback(None)

    def idle(self) -> bool:
        return not self.writing and not self._queue and not self._riding()

    def when_idle(self) -> Deferred[None]:
        """Fires once nothing is queued, riding or in flight."""
        if self.idle():
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    # --- back-pressure ---

    def overloaded(self) -> bool:
        """True while more ops wait for the writer than it should be fed."""
        return len(self._queue) >= BACKLOG_HIGH

    def when_drained(self) -> Deferred[None]:
        """Fires when the waiting ops have been taken into a transaction."""
        d: Deferred[None] = Deferred()
        self._drain_waiters.append(d)
        return d
