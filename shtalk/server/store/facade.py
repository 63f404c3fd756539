"""What the SQLite and PostgreSQL stores share: the IStore methods over two lanes.

Why a base class: each IStore method is one op on the write lane (the group commit)
or one read on a reader, given the engine's module of SQL and the records it returns;
only the life cycle (open, close) and the lanes themselves differ between engines.  A
subclass replaces the SQL modules it has its own of (``_devices``, ``_messages``), and
gives its group-commit class, `_read`, `_write`, `open` and its shutdown steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from twisted.internet.defer import Deferred, ensureDeferred, fail, succeed
from twisted.internet.interfaces import IReactorTime

from shtalk.server.eserver import StoreClosed
from shtalk.server.store.acks import AckingGroupCommit, CursorBook
from shtalk.server.store.codes import SQLiteCodeStore
from shtalk.server.store.groupcommit import BatchListener, GroupedOp
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
from shtalk.server.store.sql import (
    accounts,
    devices,
    messages,
    prekeys,
    rooms,
    security,
    sessions,
)  # fmt: skip

T = TypeVar("T")
P = ParamSpec("P")

#: Rows deleted per purge step (one op in a group commit).
PURGE_STEP = 2000
#: Seconds between sweeps deleting acknowledged messages (0: in every ack op).
SWEEP_INTERVAL = 0.5
#: Seconds an ack waits, when the writer is idle, for a transaction to ride on.
ACK_DELAY = 0.005


class AppendOp(GroupedOp):
    """An append queued for the writer; consecutive ones are stored together."""

    __slots__ = ("message", "now", "store")

    def __init__(self, store: LaneStore, message: NewMessage, now: float) -> None:
        self.store = store
        self.message = message
        self.now = now

    def run_many(self, conn: Any, group: Sequence[Any]) -> list[object]:
        return cast(list[object], self.store._append_many(conn, group))


class LaneStore:
    """The IStore methods, each one op on the engine's write lane or one read."""

    # The SQL, one module per group of tables: the shared modules, unless an engine
    # brings its own (the same functions).
    _accounts: Any = accounts
    _devices: Any = devices
    _prekeys: Any = prekeys
    _sessions: Any = sessions
    _rooms: Any = rooms
    _messages: Any = messages
    _security: Any = security
    #: The group commit the engine's writer runs.
    _commit: type[AckingGroupCommit] = AckingGroupCommit

    def __init__(
        self, path: str, storage_key: bytes, clock: IReactorTime | None, reactor: Any,
        retention: float, sweep_interval: float, ack_delay: float,
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
        self._seal = EnvelopeSeal(storage_key, path)
        self.emails = EmailSeal(storage_key)
        self.codes = SQLiteCodeStore(self, self._security)
        # Writer thread only: what it remembers between transactions.
        self._book = CursorBook(self._messages)
        self._writes = self._commit(self._clock, self._book, ack_delay, sweep_interval)
        # While open() runs: what arrived early, run once it is open (or failed with it).
        self._open_waiters: list[Deferred[None]] | None = None
        self._closing: list[Deferred[None]] | None = None

    # Group-commit figures and settings, for tests and benchmarks.
    write_transactions = property(lambda self: int(self._writes.write_transactions))
    write_ops = property(lambda self: int(self._writes.write_ops))
    max_batch = property(lambda self: int(self._writes.max_batch))

    @property
    def ack_delay(self) -> float:
        return self._writes.ack_delay

    @ack_delay.setter
    def ack_delay(self, seconds: float) -> None:
        self._writes.ack_delay = float(seconds)

    # --- the two lanes (the engine's) ---

    def _read(
        self, fn: Callable[Concatenate[Any, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[T]:
        raise NotImplementedError

    def _write(
        self, fn: Callable[Concatenate[Any, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> Deferred[T]:
        raise NotImplementedError

    def run_read(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """The read lane, for store parts that keep their SQL in a module of their own."""
        return self._read(fn, *args)

    def run_write(self, fn: Callable[..., T], *args: Any) -> Deferred[T]:
        """The write lane (the same group commit), for those parts."""
        return self._write(fn, *args)

    def close(self) -> Deferred[None]:
        """Refuse new work, let queued writes commit, close; a second close() waits
        for the first."""
        if not self._is_open():
            return succeed(None)
        if self._closing is not None:
            waiter: Deferred[None] = Deferred()
            self._closing.append(waiter)
            return waiter
        self._closing = []

        def done(result: object) -> object:
            waiters, self._closing = self._closing or [], None
            for w in waiters:
                w.callback(None)
            return result

        return self._shut_down().addBoth(done).addCallback(lambda _: None)

    def _is_open(self) -> bool:
        raise NotImplementedError

    def _shut_down(self) -> Deferred[Any]:
        """The engine's closing steps; the last one closes its connections."""
        raise NotImplementedError

    def _release_open_waiters(self, error: Exception | None) -> None:
        waiters, self._open_waiters = self._open_waiters or [], None
        for w in waiters:
            if error is None:
                w.callback(None)
            else:
                w.errback(error)

    def _after_open(self, then: Callable[[], Deferred[T]]) -> Deferred[T]:
        """Not accepting work: while open() is still running (the listener may already
        accept clients, e.g. right after a restart), ``then`` once it is open;
        otherwise StoreClosed."""
        if self._open_waiters is None:
            return fail(StoreClosed(f"{self.path}: the store is not open"))
        w: Deferred[None] = Deferred()
        self._open_waiters.append(w)
        return w.addCallback(lambda _: then())

    def _when_idle(self) -> Deferred[None]:
        return self._writes.when_idle()

    # --- back-pressure ---

    def overloaded(self) -> bool:
        """True while more ops wait for the writer than it should be fed."""
        return self._writes.overloaded()

    def when_drained(self) -> Deferred[None]:
        """Fires when the waiting ops have been taken into a transaction."""
        return self._writes.when_drained()

    def _now(self) -> float:
        return float(self._clock.seconds())

    def _cutoff_ms(self, now: float) -> int:
        return int((now - self.retention) * 1000)

    # --- accounts ---

    def create_user(
        self, name: str, key: str, email: str, pw_hash: bytes, status: str
    ) -> Deferred[User]:
        return self._write(
            self._accounts.create_user, name, key, self.emails.seal(key, email),
            self.emails.index(email), pw_hash, status, self._now(),
        )

    def email_of(self, user_id: int) -> Deferred[str | None]:
        """The account's address, opened (None: no account, deleted, or unreadable)."""

        def opened(found: tuple[str, bytes] | None) -> str | None:
            return None if found is None else self.emails.open(*found)

        return self._read(self._accounts.sealed_email, user_id).addCallback(opened)

    def user_by_key(self, key: str) -> Deferred[User | None]:
        return self._read(self._accounts.user_by_key, key)

    def user_by_id(self, user_id: int) -> Deferred[User | None]:
        return self._read(self._accounts.user_by_id, user_id)

    def users_by_ids(self, user_ids: Iterable[int]) -> Deferred[dict[int, User]]:
        return self._read(self._accounts.users_by_ids, sorted(set(user_ids)))

    def set_status(self, user_id: int, status: str) -> Deferred[bool]:
        return self._write(self._accounts.set_status, user_id, status)

    def delete_account(self, user_id: int, dummy_hash: bytes) -> Deferred[bool]:
        return self._write(self._accounts.delete_account, user_id, dummy_hash)

    # --- devices and the prekey directory ---

    def upsert_device(self, user_id: int, device_id: str, label: str) -> Deferred[Device]:
        return self._write(self._devices.upsert_device, user_id, device_id, label, self._now())

    def devices(self, user_id: int) -> Deferred[list[Device]]:
        return self._read(self._devices.devices, user_id)

    def remove_device(self, user_id: int, device_id: str) -> Deferred[bool]:
        return self._write(self._devices.remove_device, user_id, device_id)

    def publish_keys(
        self, user_id: int, device_id: str, bundle: bytes | None,
        one_time: Sequence[OneTimeKey], replace: bool = False,
    ) -> Deferred[tuple[dict[str, int], bool]]:
        return self._write(
            self._prekeys.publish, user_id, device_id, bundle, list(one_time), self._now(),
            replace,
        )

    def key_counts(self, user_id: int, device_id: str) -> Deferred[dict[str, int]]:
        return self._read(self._prekeys.counts, user_id, device_id)

    def claim_keys(self, user_id: int, device_id: str | None) -> Deferred[list[ClaimedBundle]]:
        return self._write(self._prekeys.claim, user_id, device_id, self._now())

    def device_bundle(self, user_id: int, device_id: str) -> Deferred[bytes | None]:
        return self._read(self._prekeys.device_bundle, user_id, device_id)

    # --- sessions ---

    def create_session(
        self, family: str, user_id: int, device_id: str, refresh_hash: bytes, expires: float
    ) -> Deferred[None]:
        return self._write(
            self._sessions.create_session, family, user_id, device_id, refresh_hash, expires
        )

    def rotate_refresh(
        self, old_hash: bytes, new_hash: bytes, new_expires: float, now: float
    ) -> Deferred[Session]:
        # Guarded by "AND NOT used": of two concurrent rotations (on any process)
        # exactly one wins, the other is reuse.
        return self._write(self._sessions.rotate_refresh, old_hash, new_hash, new_expires, now)

    def session(self, family: str) -> Deferred[Session | None]:
        return self._read(self._sessions.session, family)

    def revoke_session(self, family: str) -> Deferred[None]:
        return self._write(self._sessions.revoke_session, family)

    def revoke_user_sessions(self, user_id: int) -> Deferred[None]:
        return self._write(self._sessions.revoke_user_sessions, user_id)

    # --- rooms ---

    def create_room(self, name: str, key: str, owner_id: int, invite_only: bool) -> Deferred[Room]:
        return self._write(
            self._rooms.create_room, name, key, owner_id, invite_only, self._now()
        )

    def room_by_key(self, key: str) -> Deferred[Room | None]:
        return self._read(self._rooms.room_by_key, key)

    def rooms_visible_to(self, user_id: int) -> Deferred[list[tuple[Room, int, bool]]]:
        return self._read(self._rooms.rooms_visible_to, user_id)

    def rooms_of(self, user_id: int) -> Deferred[list[Room]]:
        return self._read(self._rooms.rooms_of, user_id)

    def members(self, room_id: int) -> Deferred[list[Member]]:
        return self._read(self._rooms.members, room_id)

    def member_since(self, room_id: int, user_id: int) -> Deferred[float | None]:
        return self._read(self._rooms.member_since, room_id, user_id)

    def add_member(self, room_id: int, user_id: int, role: str) -> Deferred[ChainLink]:
        return self._write(self._rooms.add_member, room_id, user_id, role, self._now())

    def remove_member(self, room_id: int, user_id: int) -> Deferred[ChainLink]:
        return self._write(self._rooms.remove_member, room_id, user_id)

    def set_role(self, room_id: int, user_id: int, role: str) -> Deferred[None]:
        return self._write(self._rooms.set_role, room_id, user_id, role)

    def add_invite(self, room_id: int, user_id: int, by_id: int) -> Deferred[None]:
        return self._write(self._rooms.add_invite, room_id, user_id, by_id, self._now())

    def has_invite(self, room_id: int, user_id: int) -> Deferred[bool]:
        return self._read(self._rooms.has_invite, room_id, user_id)

    def dm_partners(self, user_id: int) -> Deferred[list[int]]:
        return self._read(self._rooms.dm_partners, user_id)

    def presence_readers(self, user_id: int) -> Deferred[list[int]]:
        return self._read(self._rooms.presence_readers, user_id)

    def presence_subjects(self, user_id: int) -> Deferred[list[int]]:
        return self._read(self._rooms.presence_subjects, user_id)

    def has_written(self, writer_id: int, reader_id: int) -> Deferred[bool]:
        return self._read(self._rooms.has_written, writer_id, reader_id)

    # --- messages ---

    def append(self, message: NewMessage) -> Deferred[AppendResult]:
        """Store durably; fires after the group commit holding it.

        A duplicate's result carries the original seqs and no ``messages``
        (they were delivered the first time).
        """
        if not self._writes.accepting:
            return self._after_open(lambda: self.append(message))
        return self._writes.enqueue(AppendOp(self, message, self._now()))

    def _append_many(self, conn: Any, ops: Sequence[AppendOp]) -> list[AppendResult]:
        """Store a run of appends (writer thread)."""
        results: list[AppendResult] = self._messages.append_many(
            conn, ops, self._seal.seal, self._book.seq_mailbox
        )
        self._book.trim()
        return results

    def mailbox_heads(self, mailboxes: Sequence[str]) -> Deferred[dict[str, int]]:
        return self._read(self._messages.heads, list(mailboxes))

    def messages_between(
        self, mailbox: str, after: int, upto: int
    ) -> Deferred[list[StoredMessage]]:
        return self._read(self._messages.between, mailbox, after, upto, self._seal.open)

    def pending(self, user_id: int, device_id: str) -> Deferred[list[StoredMessage]]:
        # Acks received but not yet committed must not be replayed: wait for them.
        def read(_: object) -> Deferred[list[StoredMessage]]:
            now = self._now()
            return self._read(
                self._messages.pending, user_id, device_id, now, self._cutoff_ms(now),
                self._seal.open,
            )

        return self._writes.settled().addCallback(read).addCallback(self._hint_all)

    def _hint_all(self, messages: list[StoredMessage]) -> list[StoredMessage]:
        hint = self._book.hint
        for m in messages:
            hint(m.seq, m.mailbox)
        return messages

    def delivered(self, mailbox: str, seq: int) -> None:
        self._book.hint(seq, mailbox)

    def add_batch_listener(self, listener: BatchListener) -> None:
        self._writes.listeners.append(listener)

    def ack(self, user_id: int, device_id: str, seqs: Sequence[int]) -> Deferred[None]:
        """Coalesced with every other ack into one op of the next transaction; fires
        once committed.  The deletion of what it frees waits for the next sweep."""
        if not self._writes.accepting:
            return self._after_open(lambda: self.ack(user_id, device_id, seqs))
        return self._writes.ack(user_id, device_id, seqs)

    def sweep(self) -> Deferred[int]:
        """Delete the acknowledged messages now (normally every ``sweep_interval``)."""
        if not self._writes.accepting:
            return self._after_open(self.sweep)
        return self._writes.sweep()

    def purge_expired(self, now: float) -> Deferred[int]:
        """Delete in bounded steps, each its own op, so appends and acks queued
        meanwhile are committed between steps instead of waiting for the whole purge."""
        return ensureDeferred(self._purge_all(now))

    async def _purge_all(self, now: float) -> int:
        total = 0
        while True:
            deleted: int
            more: bool
            deleted, more = await self._write(
                self._messages.purge_step, now, self._cutoff_ms(now), now - self.retention,
                PURGE_STEP,
            )
            total += deleted
            if not more:
                return total

    def queued(self) -> Deferred[int]:
        return self._read(self._messages.queued)

    def stats(self) -> Deferred[dict[str, int]]:
        """Row counts per table (not part of IStore: for tests and benchmarks)."""
        return self._read(self._messages.stats)
