"""The sequencer: each mailbox's changes applied once, in seq order (sans-IO).

The bus is a fast path: Redis drops what is published while a subscriber is away, and
the messages of one mailbox arrive from several publishers in any order.  The store is
the truth: every change of a mailbox (message or membership) has a seq and the seq of
the change before it (``prev_seq``), so a receiver knows when it is missing one.

Per mailbox, `Chains` keeps the seq of the last change applied.  A change whose
``prev_seq`` is that one is applied at once, and so are the ones waiting behind it; any
other waits up to ``gap_wait``, then the sink is asked to read the gap from the store
(`Sink.fill`).  A room mailbox whose chain was broken (a membership change, or a message
never seen) has its members re-read (`Sink.reload`) before anything later is applied,
so a kick is in force before the next message goes out.  Nothing here does I/O or reads
a clock: the driver passes ``now`` and answers `fill` and `reload` by calling `filled`
and `reloaded`, at once or later.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple, Protocol


class Item(NamedTuple):
    """One change of a mailbox: ``value`` is the driver's (a message, a line, a link).
    A tuple: made once per message on every process, at half a frozen dataclass's cost."""

    seq: int
    prev_seq: int
    value: Any = None
    # A membership change made elsewhere: the members are re-read before what follows.
    reload: bool = False


class Sink(Protocol):
    """What the sequencer asks of its driver."""

    def apply(self, mailbox: str, item: Item) -> None:
        """Deliver this change (called once per change, in seq order)."""

    def fill(self, mailbox: str, after: int, upto: int) -> None:
        """Read the mailbox's changes in ``(after, upto]``; answer with `Chains.filled`."""

    def reload(self, mailbox: str) -> None:
        """Re-read the room's members; answer with `Chains.reloaded`."""


class _Chain:
    __slots__ = ("busy", "force_upto", "last", "pending", "room", "started")

    def __init__(self, room: bool) -> None:
        self.room = room
        self.started = False
        self.last = 0
        self.pending: dict[int, Item] = {}  # seq -> change not applied yet
        self.busy = False  # a fill or a reload is under way: nothing is applied meanwhile
        self.force_upto = 0  # after a fill: everything up to here is applied in seq order


class Chains:
    """Every subscribed mailbox's chain (see the module's docstring)."""

    def __init__(self, sink: Sink, gap_wait: float) -> None:
        self.sink = sink
        self.gap_wait = gap_wait
        self._chains: dict[str, _Chain] = {}
        # mailbox -> when its wait for a missing change ends (in the order they began,
        # which is deadline order: the first is the next one due)
        self.waiting: dict[str, float] = {}
        self.fills = 0  # gaps read from the store (for metrics and tests)

    # subscriptions ----------------------------------------------------------------------
    def add(self, mailbox: str, room: bool) -> None:
        """Subscribed: hold what arrives until `start` says where the chain begins."""
        if mailbox not in self._chains:
            self._chains[mailbox] = _Chain(room)

    def start(self, mailbox: str, head: int, now: float) -> None:
        """The chain begins after ``head`` (read once the subscription was confirmed)."""
        chain = self._chains.get(mailbox)
        if chain is None or chain.started:
            return
        chain.started = True
        chain.last = head
        self._drain(mailbox, chain, now)

    def remove(self, mailbox: str) -> None:
        self._chains.pop(mailbox, None)
        self.waiting.pop(mailbox, None)

    def __contains__(self, mailbox: object) -> bool:
        return mailbox in self._chains

    def started(self) -> dict[str, int]:
        """mailbox -> last seq applied, for every chain that has begun."""
        return {mb: c.last for mb, c in self._chains.items() if c.started}

    def is_started(self, mailbox: str) -> bool:
        chain = self._chains.get(mailbox)
        return chain is not None and chain.started

    # changes ----------------------------------------------------------------------------
    def offer(self, mailbox: str, item: Item, now: float) -> None:
        """A change arrived (from the bus, or committed here)."""
        chain = self._chains.get(mailbox)
        if chain is None or item.seq <= chain.last or item.seq in chain.pending:
            return  # not subscribed, or already applied or waiting: a duplicate
        if (
            not chain.pending and chain.started and not chain.busy
            and item.prev_seq == chain.last
        ):  # fmt: skip
            # The common case: the next change, nothing waiting.
            chain.last = item.seq
            self.sink.apply(mailbox, item)
            if item.reload and chain.room:
                self._reload(mailbox, chain)
            return
        chain.pending[item.seq] = item
        self._drain(mailbox, chain, now)

    def behind(self, mailbox: str, head: int) -> None:
        """The store's head of ``mailbox`` (reconciliation): read what was missed."""
        chain = self._chains.get(mailbox)
        if chain is None or not chain.started or chain.busy or head <= chain.last:
            return
        self._fill(mailbox, chain, head)

    def tick(self, now: float) -> None:
        """Read the gaps whose wait is over."""
        due = [mb for mb, t in self.waiting.items() if t <= now]
        for mailbox in due:
            del self.waiting[mailbox]
            chain = self._chains.get(mailbox)
            if chain is not None and chain.pending and not chain.busy and chain.started:
                self._fill(mailbox, chain, max(chain.pending))

    def filled(self, mailbox: str, upto: int, items: Iterable[Item], now: float) -> None:
        """The store's changes in ``(last, upto]`` (what `Sink.fill` asked for)."""
        chain = self._chains.get(mailbox)
        if chain is None or not chain.busy:
            return
        chain.busy = False
        expected, broken = chain.last, False
        for item in sorted(items, key=lambda i: i.seq):
            if chain.last < item.seq <= upto:
                chain.pending.setdefault(item.seq, item)
        for seq in sorted(s for s in chain.pending if s <= upto):
            item = chain.pending[seq]
            if item.prev_seq != expected or item.reload:
                broken = True  # a change not read, or a membership change, in the range
            expected = seq
        chain.force_upto = max(chain.force_upto, upto)
        if chain.room and (broken or expected != upto):
            self._reload(mailbox, chain)
            return
        self._drain(mailbox, chain, now)

    def fill_failed(self, mailbox: str, now: float) -> None:
        """The read failed: wait again, then retry."""
        chain = self._chains.get(mailbox)
        if chain is not None and chain.busy:
            chain.busy = False
            if chain.pending:
                self.waiting.pop(mailbox, None)
                self.waiting[mailbox] = now + self.gap_wait

    def reloaded(self, mailbox: str, now: float) -> None:
        chain = self._chains.get(mailbox)
        if chain is not None and chain.busy:
            chain.busy = False
            self._drain(mailbox, chain, now)

    # ------------------------------------------------------------------------------------
    def _fill(self, mailbox: str, chain: _Chain, upto: int) -> None:
        chain.busy = True
        self.waiting.pop(mailbox, None)
        self.fills += 1
        self.sink.fill(mailbox, chain.last, upto)

    def _reload(self, mailbox: str, chain: _Chain) -> None:
        chain.busy = True
        self.sink.reload(mailbox)

    def _drain(self, mailbox: str, chain: _Chain, now: float) -> None:
        """Apply what can be, in seq order; stop at a gap, a fill or a reload."""
        pending = chain.pending
        while pending and chain.started and not chain.busy:
            seq = min(pending)
            item = pending[seq]
            if seq <= chain.last:
                del pending[seq]  # covered by where the chain started, or by a fill
                continue
            if item.prev_seq > chain.last and seq > chain.force_upto:
                break  # a gap: something before it has not arrived
            del pending[seq]
            chain.last = seq
            self.sink.apply(mailbox, item)
            if item.reload and chain.room and seq > chain.force_upto:
                self._reload(mailbox, chain)
                return  # `reloaded` goes on
        if chain.busy or not chain.started:
            return
        if chain.force_upto > chain.last:
            chain.last = chain.force_upto  # what the store had no more of (deleted, links)
            self._drain(mailbox, chain, now)
            return
        if pending:
            if mailbox not in self.waiting:
                self.waiting[mailbox] = now + self.gap_wait
        else:
            self.waiting.pop(mailbox, None)
