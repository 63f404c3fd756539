"""Acknowledgements: coalesced into one op per transaction, and swept on a timer.

Why: every delivered message is acknowledged by every device it reaches, so acks
outnumber sends; written one by one they would cost a statement (and a savepoint)
each.  Instead:

* The acks that arrive while a transaction is in flight become ONE op at the head of
  the next one, which moves each (device, mailbox) cursor once, to the highest seq
  acknowledged.  An ack's Deferred still fires only once its cursor is committed.
* With the writer idle, an ack waits ``ack_delay`` for a transaction to ride on
  (usually one with sends) rather than commit a transaction of acks alone.
* `AckingGroupCommit.settled` waits for the acks not yet committed, so a device that
  reconnects is not sent what it acknowledged.
* A message is deleted once every device it is for has acknowledged it, by a sweep of
  the acknowledged ranges every ``sweep_interval`` seconds (not per ack); until then
  it is merely still on disk, encrypted.
* The writer remembers the mailbox of recent seqs and the cursors as it last wrote
  them (`CursorBook`), so an ack normally needs no look-up at all.  Seqs it did not
  append (another process's, with several processes on one database; a backlog read
  after a restart) are told to it by the reactor thread as they are delivered
  (`CursorBook.hint`): without them every ack batch for another process's messages
  cost a query inside the write transaction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from shtalk.server.store.groupcommit import GroupCommit, Op
from shtalk.server.store.sql import messages
from shtalk.server.store.sql.common import Conn

#: Recent seqs whose mailbox the writer remembers, so acks need no lookup.
SEQ_MEMORY = 100_000

Acks = dict[tuple[int, str], list[int]]


class CursorSQL(Protocol):
    """The statements the book runs (`shtalk.server.store.sql.messages` or another
    engine's module with the same functions)."""

    def last_seq_by_mailbox(self, conn: Any, seqs: Sequence[int]) -> Iterable[tuple[str, int]]:
        ...

    def cursor(self, conn: Any, user_id: int, device_id: str, mailbox: str) -> int | None: ...

    def move_cursors(self, conn: Any, updates: list[tuple[int, int, str, str, int]]) -> None:
        ...

    def sweep(self, conn: Any, mailbox: str, lo: int, hi: int) -> int: ...


class CursorBook:
    """What the writer thread remembers between transactions.  Writer thread only."""

    def __init__(self, sql: CursorSQL | None = None) -> None:
        self.sql: CursorSQL = cast(CursorSQL, messages) if sql is None else sql
        #: The mailbox of recent seqs (filled by the appends).
        self.seq_mailbox: dict[int, str] = {}
        #: Cursors as last written, by (user, device, mailbox).
        self.cursor_at: dict[tuple[int, str, str], int] = {}
        #: Per mailbox, the acknowledged range not swept yet.
        self.unswept: dict[str, tuple[int, int]] = {}
        #: The mailbox of seqs delivered here that the writer did not append.  Written by
        #: the reactor thread (`hint`), read by the writer: single dict operations,
        #: atomic in CPython; a trim swaps in a new dict.
        self.hints: dict[int, str] = {}

    def hint(self, seq: int, mailbox: str) -> None:
        """Reactor thread: ``seq`` (delivered here, appended elsewhere) is ``mailbox``'s."""
        hints = self.hints
        hints[seq] = mailbox
        if len(hints) > 2 * SEQ_MEMORY:
            floor = max(hints) - SEQ_MEMORY
            self.hints = {k: v for k, v in hints.items() if k > floor}

    def trim(self) -> None:
        """Forget all but the newest `SEQ_MEMORY` seqs once twice that many are known."""
        seq_mailbox = self.seq_mailbox
        if len(seq_mailbox) > 2 * SEQ_MEMORY:
            floor = next(reversed(seq_mailbox)) - SEQ_MEMORY  # seqs arrive in order
            self.seq_mailbox = {k: v for k, v in seq_mailbox.items() if k > floor}

    def apply(self, conn: Conn, acks: Acks, sweep_now: bool) -> None:
        """Move each acknowledged (device, mailbox) cursor once."""
        seq_mailbox = self.seq_mailbox
        best: dict[tuple[int, str, str], int] = {}
        for (user_id, device_id), seqs in acks.items():
            seqs.sort()
            # In C: the last (highest) seq of each mailbox wins the dict.
            highest = dict(zip(map(seq_mailbox.get, seqs), seqs, strict=True))
            unknown: list[int] = []
            if None in highest:
                del highest[None]
                hints = self.hints
                for seq in seqs:
                    if seq in seq_mailbox:
                        continue
                    hinted = hints.get(seq)
                    if hinted is None:
                        unknown.append(seq)
                    elif highest.get(hinted, 0) < seq:
                        highest[hinted] = seq
            for mailbox, seq in highest.items():
                best[(user_id, device_id, cast(str, mailbox))] = seq
            if unknown:  # older than the writer remembers (or not a message at all)
                for mailbox, seq in self.sql.last_seq_by_mailbox(conn, sorted(set(unknown))):
                    k = (user_id, device_id, mailbox)
                    if best.get(k, 0) < seq:
                        best[k] = seq
        cursor_at = self.cursor_at
        updates: list[tuple[int, int, str, str, int]] = []
        unswept = self.unswept
        for k, seq in best.items():
            old = cursor_at.get(k)
            if old is None:
                old = self.sql.cursor(conn, *k)
                if old is None:
                    continue  # not a mailbox this device reads: ignored
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
            self.sql.move_cursors(conn, updates)
        if len(cursor_at) > SEQ_MEMORY:
            cursor_at.clear()
        if sweep_now:
            self.sweep(conn)

    def sweep(self, conn: Conn) -> int:
        """Delete what the acks since the last sweep freed."""
        unswept, self.unswept = self.unswept, {}
        return sum(self.sql.sweep(conn, mailbox, lo, hi) for mailbox, (lo, hi) in unswept.items())


class AckingGroupCommit(GroupCommit):
    """The group commit with the acks buffered on the reactor thread riding along."""

    def __init__(
        self, clock: IReactorTime, book: CursorBook, ack_delay: float, sweep_interval: float
    ) -> None:
        super().__init__()
        self._clock = clock
        self.book = book
        self.ack_delay = float(ack_delay)
        self.sweep_interval = float(sweep_interval)
        # Acks not yet handed to the writer: seqs per device, and who waits for them.
        self._acks: Acks = {}
        self._ack_waiters: list[Deferred[None]] = []
        self._ack_inflight: list[Deferred[None]] | None = None
        self._ack_call: IDelayedCall | None = None
        self._sweep_call: IDelayedCall | None = None

    def ack(self, user_id: int, device_id: str, seqs: Sequence[int]) -> Deferred[None]:
        """Buffer the acks; fires once they are committed."""
        if not seqs:
            return succeed(None)
        key = (user_id, device_id)
        buffered = self._acks.get(key)
        if buffered is None:
            self._acks[key] = list(seqs)  # ints: the wire checked them (`ListOf(Int)`)
        else:
            buffered.extend(seqs)
        d: Deferred[None] = Deferred()
        self._ack_waiters.append(d)
        if not self.writing and self._ack_call is None:
            if self.ack_delay > 0:
                # Ride on the next transaction (usually one with sends) rather than
                # commit a transaction of acks alone.
                self._ack_call = self._clock.callLater(self.ack_delay, self._ack_due)
            else:
                self.flush()
        return d

    def _ack_due(self) -> None:
        self._ack_call = None
        if self._acks and not self.writing:
            self.flush()

    def _riding(self) -> bool:
        return bool(self._acks)

    def _board(self) -> tuple[Op, Deferred[Any]] | None:
        if self._ack_call is not None:
            if self._ack_call.active():
                self._ack_call.cancel()
            self._ack_call = None
        if not self._acks:
            return None
        # Every ack that arrived since the last flush: one op, first (a sweep
        # queued with them then sees their cursors).
        acks, waiters = self._acks, self._ack_waiters
        self._acks, self._ack_waiters = {}, []
        self._ack_inflight = waiters
        done: Deferred[None] = Deferred()
        done.addBoth(self._acks_committed, waiters)
        book, sweep_now = self.book, self.sweep_interval <= 0
        return (lambda conn: book.apply(conn, acks, sweep_now)), done

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
        if self.sweep_interval > 0 and self._sweep_call is None and self.accepting:
            self._sweep_call = self._clock.callLater(self.sweep_interval, self._sweep_soon)

    def _sweep_soon(self) -> None:
        self._sweep_call = None
        if self.accepting:
            d = self.enqueue(self.book.sweep)
            d.addErrback(lambda f: None)  # a failed sweep is retried with the next acks

    def settled(self) -> Deferred[None]:
        """Fires once every ack received so far is committed."""
        if self._acks:
            waiters = self._ack_waiters
            if not self.writing:
                self.flush()
        elif self._ack_inflight is not None:
            waiters = self._ack_inflight
        else:
            return succeed(None)
        d: Deferred[None] = Deferred()
        waiters.append(d)
        return d

    def sweep(self) -> Deferred[int]:
        """Delete the acknowledged messages now (normally every ``sweep_interval``)."""
        return self.enqueue(self.book.sweep)

    def close(self) -> Deferred[None]:
        """Take no more work; the acks buffered and a last sweep go in one more
        transaction; fires once the writer is idle."""
        if self._sweep_call is not None and self._sweep_call.active():
            self._sweep_call.cancel()
        self._sweep_call = None
        if self.accepting:
            self.enqueue(self.book.sweep)  # acks buffered go with it; then sweep
        self.accepting = False
        return self.when_idle()
