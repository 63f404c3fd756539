"""One SQLite connection on a thread of its own, for the server's writer and the
client's local store.

Cheaper per operation than a thread pool (``adbapi``, ``deferToThreadPool``):
a C ``SimpleQueue`` in, one ``callFromThread`` out, no Deferred or context
plumbing on the reactor thread for each hand-off.  One thread also means the
operations run in the order they were submitted and never two at once.
"""

from __future__ import annotations

import queue
import sqlite3
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, fail, succeed
from twisted.python.failure import Failure

T = TypeVar("T")


class SQLiteThread:
    """Runs ``fn(conn, *args)`` jobs in submission order on one connection.

    ``connect`` opens (and configures) the connection in the thread, at the
    first job; if it fails, that job fails and the next one tries again.
    """

    def __init__(
        self, reactor: Any, connect: Callable[[], sqlite3.Connection], name: str
    ) -> None:
        self._reactor = reactor
        self._connect = connect
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._stop_waiters: list[Deferred[None]] | None = []  # None once stopped
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def submit(
        self, fn: Callable[..., Any], args: tuple[Any, ...], done: Callable[[Any], None]
    ) -> None:
        """Run ``fn(conn, *args)`` in the thread; ``done(result or Failure)`` on the reactor."""
        if self._stopping:
            raise RuntimeError("the database thread is stopped")
        self._jobs.put((fn, args, done))

    def run(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        if self._stopping:
            return fail(RuntimeError("the database thread is stopped"))
        d: Deferred[T] = Deferred()

        def done(result: Any) -> None:
            if isinstance(result, Failure):
                d.errback(result)
            else:
                d.callback(result)

        self.submit(fn, args, done)
        return d

    def stop(self) -> Deferred[None]:
        """Finish the queued jobs, close the connection; fires once the thread is done.

        Each call gets a Deferred of its own (callers cannot disturb each other's chains).
        """
        if self._stop_waiters is None:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._stop_waiters.append(d)
        if not self._stopping:
            self._stopping = True
            self._jobs.put(None)
        return d

    def _stopped(self) -> None:
        waiters, self._stop_waiters = self._stop_waiters or [], None
        for d in waiters:
            d.callback(None)

    def _main(self) -> None:
        conn: sqlite3.Connection | None = None
        call = self._reactor.callFromThread
        while True:
            job = self._jobs.get()
            if job is None:
                break
            fn, args, done = job
            try:
                if conn is None:
                    conn = self._connect()
                result = fn(conn, *args)
            except BaseException:
                result = Failure()  # type: ignore[no-untyped-call]
            call(done, result)
        if conn is not None:
            conn.close()
        call(self._stopped)
