"""The tables of the in-memory store, and the rules SQLite's schema enforces on them.

Why a module of its own: `MemoryStore` and `MemoryCodeStore` share one set of tables,
and what the SQLite store gets from its schema and queries (foreign-key cascades, the
sweep of acknowledged messages, cursors of new readers) must be written once, here,
to behave the same.  Every public operation runs to completion on the calling thread
and checks before it changes anything, so a refusal leaves the tables as they were
(as a savepoint rollback would).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Concatenate, ParamSpec, Protocol, TypeVar

from twisted.internet.defer import Deferred, fail, succeed

from shtalk.server.eserver import StoreClosed, StoreError
from shtalk.server.store.mailbox import user_mailbox
from shtalk.server.store.records import ChainLink, Device, Room, StoredMessage, User

if TYPE_CHECKING:
    from twisted.internet.interfaces import IReactorTime

P = ParamSpec("P")
T = TypeVar("T")


class MissingRow(StoreError):
    """A write names an account, device or room that does not exist (SQLite refuses
    the same write with a foreign-key IntegrityError)."""


@dataclass(frozen=True, slots=True)
class MessageRow:
    """A stored message and whom it is for."""

    message: StoredMessage
    #: The devices it is for, when it has no common envelope (None: every reader).
    devices: frozenset[tuple[int, str]] | None

    def stored(self) -> StoredMessage:
        """A copy for the caller (nothing it holds aliases the tables)."""
        return dataclasses.replace(self.message, envelopes=dict(self.message.envelopes))

    def for_reader(self, reader: tuple[int, str], now: float, cutoff_ms: int) -> bool:
        """Whether a device reading its mailbox is to be given it: not its sender, an
        envelope for it, not expired, not past the retention time."""
        m = self.message
        return (
            (m.sender_id, m.sender_device) != reader
            and (self.devices is None or reader in self.devices)
            and (m.expires_at is None or m.expires_at > now)
            and m.ts >= cutoff_ms
        )


@dataclass(slots=True)
class SessionRow:
    user_id: int
    device_id: str
    expires: float
    revoked: bool = False


@dataclass(slots=True)
class TokenRow:
    family: str
    expires: float
    used: bool = False


@dataclass(slots=True)
class OneTimeRow:
    key: bytes
    claimed: float | None = None


@dataclass(slots=True)
class CodeRow:
    code_hash: bytes
    expires: float
    attempts: int
    sent: float


@dataclass(slots=True)
class TotpRow:
    sealed: bytes
    enabled: bool
    last_step: int
    created: float


@dataclass
class Tables:
    """Every table of the schema, as dicts keyed like the primary keys."""

    clock: IReactorTime
    open: bool = True
    users: dict[int, User] = field(default_factory=dict)
    user_keys: dict[str, int] = field(default_factory=dict)
    emails: dict[int, str | None] = field(default_factory=dict)
    last_user: int = 0
    devices: dict[tuple[int, str], Device] = field(default_factory=dict)
    sessions: dict[str, SessionRow] = field(default_factory=dict)
    tokens: dict[bytes, TokenRow] = field(default_factory=dict)
    rooms: dict[int, Room] = field(default_factory=dict)
    room_keys: dict[str, int] = field(default_factory=dict)
    last_room: int = 0
    #: room id -> user id -> (role, joined)
    members: dict[int, dict[int, tuple[str, float]]] = field(default_factory=dict)
    #: (room id, user id) -> (invited by, when)
    invites: dict[tuple[int, int], tuple[int, float]] = field(default_factory=dict)
    #: (user id, partner id) -> whether user id has written to partner id
    partners: dict[tuple[int, int], bool] = field(default_factory=dict)
    #: mailbox -> seq -> row, seqs in increasing order
    messages: dict[str, dict[int, MessageRow]] = field(default_factory=dict)
    seq_mailbox: dict[int, str] = field(default_factory=dict)
    last_seq: int = 0
    #: mailbox -> seq of its last change (message or membership)
    heads: dict[str, int] = field(default_factory=dict)
    #: mailbox -> (user id, device id) -> highest seq acknowledged
    cursors: dict[str, dict[tuple[int, str], int]] = field(default_factory=dict)
    #: (sender, sender device, client id) -> (seqs, when stored)
    client_ids: dict[tuple[int, str, str], tuple[tuple[int, ...], float]] = field(
        default_factory=dict
    )
    bundles: dict[tuple[int, str], bytes] = field(default_factory=dict)
    #: (user id, device id) -> (kind, key id) -> key
    one_time: dict[tuple[int, str], dict[tuple[str, int], OneTimeRow]] = field(
        default_factory=dict
    )
    email_codes: dict[tuple[int, str], CodeRow] = field(default_factory=dict)
    totp: dict[int, TotpRow] = field(default_factory=dict)
    recovery: dict[int, set[bytes]] = field(default_factory=dict)

    def now(self) -> float:
        return float(self.clock.seconds())

    # --- rows that must exist (the schema's foreign keys) ---

    def need_user(self, user_id: int) -> User:
        user = self.users.get(user_id)
        if user is None:
            raise MissingRow(f"no account {user_id}")
        return user

    def need_device(self, user_id: int, device_id: str) -> None:
        if (user_id, device_id) not in self.devices:
            raise MissingRow(f"no device {device_id!r} of account {user_id}")

    def need_room(self, room_id: int) -> None:
        if room_id not in self.rooms:
            raise MissingRow(f"no room {room_id}")

    # --- cascades ---

    def drop_device(self, user_id: int, device_id: str) -> bool:
        """The device, and its cursors, bundle and one-time keys."""
        key = (user_id, device_id)
        if self.devices.pop(key, None) is None:
            return False
        for readers in self.cursors.values():
            readers.pop(key, None)
        self.bundles.pop(key, None)
        self.one_time.pop(key, None)
        return True

    def drop_user(self, user_id: int) -> None:
        """The account row and everything that refers to it with ON DELETE CASCADE."""
        for uid, dev in [k for k in self.devices if k[0] == user_id]:
            self.drop_device(uid, dev)
        for family in [f for f, s in self.sessions.items() if s.user_id == user_id]:
            self.drop_session(family)
        for members in self.members.values():
            members.pop(user_id, None)
        for invite in [k for k in self.invites if k[1] == user_id]:
            del self.invites[invite]
        for code in [k for k in self.email_codes if k[0] == user_id]:
            del self.email_codes[code]
        self.totp.pop(user_id, None)
        self.recovery.pop(user_id, None)
        user = self.users.pop(user_id)
        del self.user_keys[user.key]
        self.emails.pop(user_id, None)

    def drop_session(self, family: str) -> None:
        del self.sessions[family]
        for token in [h for h, t in self.tokens.items() if t.family == family]:
            del self.tokens[token]

    def revoke_sessions(self, user_id: int, device_id: str | None = None) -> list[str]:
        """Revoke the user's sessions (of one device, if given); the families that
        were live."""
        live = []
        for family, s in self.sessions.items():
            if s.user_id == user_id and device_id in (None, s.device_id):
                if not s.revoked:
                    live.append(family)
                s.revoked = True
        return live

    def tombstone(self, user_id: int, dummy_hash: bytes) -> bool:
        """Delete an account but its name (see ``IStore.delete_account``)."""
        user = self.users.get(user_id)
        if user is None:
            return False
        self.users[user_id] = dataclasses.replace(user, status="deleted", pw_hash=dummy_hash)
        self.emails[user_id] = None
        self.revoke_sessions(user_id)
        for uid, dev in [k for k in self.devices if k[0] == user_id]:
            self.drop_device(uid, dev)
        for members in self.members.values():
            members.pop(user_id, None)
        for invite in [k for k in self.invites if k[1] == user_id]:
            del self.invites[invite]
        for pair in [k for k in self.partners if user_id in k]:
            del self.partners[pair]
        self.messages.pop(user_mailbox(user_id), None)
        return True

    def purge(self, now: float, retention: float) -> int:
        """Messages expired or older than ``retention`` (how many), client ids older
        than that, sessions expired."""
        cutoff_ms = int((now - retention) * 1000)
        deleted = 0
        for rows in self.messages.values():
            gone = [
                s for s, r in rows.items()
                if (r.message.expires_at is not None and r.message.expires_at <= now)
                or r.message.ts < cutoff_ms
            ]  # fmt: skip
            for seq in gone:
                del rows[seq]
            deleted += len(gone)
        forget_before = now - retention
        for key in [k for k, (_, made) in self.client_ids.items() if made < forget_before]:
            del self.client_ids[key]
        # An expired family can no longer rotate; its hashes need not be kept.
        for family in [f for f, s in self.sessions.items() if s.expires <= now]:
            self.drop_session(family)
        return deleted

    # --- the chain of each mailbox ---

    def next_link(self, mailbox: str) -> ChainLink:
        """A new seq for a change of ``mailbox``, chained to its previous change."""
        self.last_seq += 1
        link = ChainLink(mailbox, self.last_seq, self.heads.get(mailbox, 0))
        self.heads[mailbox] = self.last_seq
        return link

    # --- cursors and the sweep ---

    def add_cursors(self, user_id: int, mailbox: str) -> None:
        """Each of the user's devices reads ``mailbox`` from now on (no history)."""
        readers = self.cursors.setdefault(mailbox, {})
        for key in self.devices:
            if key[0] == user_id:
                readers.setdefault(key, self.last_seq)

    def waited_for(self, row: MessageRow) -> bool:
        """Whether some device it is for has not acknowledged it (the sender's own
        device never holds it back)."""
        m = row.message
        for (user_id, device_id), acked in self.cursors.get(m.mailbox, {}).items():
            if acked >= m.seq:
                continue
            if user_id == m.sender_id and device_id == m.sender_device:
                continue
            if row.devices is None or (user_id, device_id) in row.devices:
                return True
        return False

    def sweep(self, mailbox: str, lo: int, hi: int) -> int:
        """Delete the messages of ``mailbox`` in (lo, hi] that nobody waits for."""
        rows = self.messages.get(mailbox, {})
        gone = [s for s, r in rows.items() if lo < s <= hi and not self.waited_for(r)]
        for seq in gone:
            del rows[seq]
        return len(gone)

    def stats(self) -> dict[str, int]:
        """Row counts named like the SQLite tables (for tests)."""
        messages = [r for rows in self.messages.values() for r in rows.values()]
        return {
            "users": len(self.users),
            "devices": len(self.devices),
            "sessions": len(self.sessions),
            "refresh_tokens": len(self.tokens),
            "rooms": len(self.rooms),
            "members": sum(len(m) for m in self.members.values()),
            "invites": len(self.invites),
            "dm_partners": len(self.partners),
            "messages": len(messages),
            "message_devices": sum(len(r.devices or ()) for r in messages),
            "cursors": sum(len(c) for c in self.cursors.values()),
            "client_ids": len(self.client_ids),
            "mailbox_heads": len(self.heads),
        }


class _HasTables(Protocol):
    tables: Tables


H = TypeVar("H", bound=_HasTables)


def answered(
    fn: Callable[Concatenate[H, P], T],
) -> Callable[Concatenate[H, P], Deferred[T]]:
    """Run a store method now and answer with an already-fired Deferred: its result,
    or its exception as a failure (StoreClosed once the store is closed)."""

    def run(self: H, /, *args: P.args, **kwargs: P.kwargs) -> Deferred[T]:
        if not self.tables.open:
            return fail(StoreClosed(":memory:: the store is not open"))
        try:
            return succeed(fn(self, *args, **kwargs))
        except Exception as e:
            return fail(e)

    run.__name__, run.__qualname__, run.__doc__ = fn.__name__, fn.__qualname__, fn.__doc__
    return run
