"""What every part of this device's E2EE shares: who we are, the store, the one lock,
the clock, the way out (requests, events, acks), and the bookkeeping of commits.

The guarantee the parts keep together (docs/SECURITY.md, "Client local store"): every
state change (a session advanced by a decrypt, a one-time pre-key used, a sender key
installed) is committed to the LocalStore in ONE transaction with the message it
produced, before the server is sent an ``ack``, so a crash can neither replay a message
key nor lose a message; and a message leaves only once a saved state is past its
message key ("saving ahead", `Saves`).  The lock serialises every state change, so a
send and a receive never interleave on a session.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock

from shtalk.client.events import Event
from shtalk.client.localstore import HistoryMessage, LocalStore
from shtalk.client.rotation import RotationPolicy
from shtalk.collaborators import collaborators
from shtalk.crypto import DeviceIdentity
from shtalk.wire.errors import ErrorCode
from shtalk.wire.records import ClientRequest

MAX_SESSIONS = 5  # sessions kept per contact device
PENDING_ROOM_TTL = 60.0  # seconds a room message may wait for its sender key
MAX_PENDING_ROOM = 500
MAX_BATCH = 200  # received messages handled per store commit
MAX_SEND_STEPS = 3  # CAPTCHA answers tried for one send
CAPTCHA_CODES = frozenset({ErrorCode.CAPTCHA_REQUIRED, ErrorCode.CAPTCHA_FAILED})

Put = tuple[str, str, bytes | None]
Mark = tuple[bytes, int] | None
"""A sending chain's saved position (``send_mark``): its key and the index reserved up to."""
Value = bytes | Callable[[], bytes | None] | None
"""A stored value, or a function giving it as it is at commit time."""
Requester = Callable[[ClientRequest], Deferred[dict[str, Any]]]
"""Sends a request over the session, fires with the reply (`ServerSession.request`)."""


def new_client_id() -> str:
    return secrets.token_urlsafe(12)


def chain_key(room: str, user: str, device: str, epoch: int) -> str:
    """The store key of one sender chain (names cannot contain "/": wire/names.py)."""
    return f"{room}/{user}/{device}/{epoch}"


class Unreadable(Exception):
    """A received message this device cannot use; the text says why (a BadMessage)."""


class NotYet(Exception):
    """A room message whose sender key has not arrived: it waits, unacknowledged."""

    def __init__(self, room: str) -> None:
        super().__init__(room)
        self.room = room


class Saves:
    """The sending positions one commit saves (``send_mark`` per device session and per
    own room chain), and whether every chain a message used was covered before it."""

    __slots__ = ("covered", "marks", "rooms")

    def __init__(self) -> None:
        self.covered = True
        self.marks: dict[tuple[str, str], Mark] = {}
        self.rooms: dict[str, Mark] = {}


class Durable:
    """The sending positions that completed commits saved: a message below one may
    leave before its own commit (the crash that follows cannot reuse its key)."""

    def __init__(self) -> None:
        #: per device, the position of its current session
        self.sessions: dict[tuple[str, str], Mark] = {}
        #: per room, the position of our own sender chain
        self.rooms: dict[str, Mark] = {}

    def saved(self, saves: Saves) -> None:
        """A commit holding ``saves`` completed."""
        self.sessions.update(saves.marks)
        self.rooms.update(saves.rooms)

    def clear(self) -> None:
        self.sessions.clear()
        self.rooms.clear()


class Batch:
    """What a batch of received messages changed, committed at once, then acked."""

    __slots__ = ("after", "messages", "puts", "rooms", "saves", "shown")

    def __init__(self) -> None:
        #: (kind, key) -> value, or a function giving the value as it is at commit time
        #: (an object changed by several messages is serialised once).
        self.puts: dict[tuple[str, str], Value] = {}
        self.messages: list[HistoryMessage] = []
        #: events of readable messages, in order, run before the commit
        self.shown: list[Callable[[], None]] = []
        #: acks and the other events, in message order, run after the commit
        self.after: list[Callable[[], None]] = []
        self.saves = Saves()
        #: rooms whose whole state (own key and every chain) is written
        self.rooms: set[str] = set()

    def put(self, kind: str, key: str, value: Value) -> None:
        self.puts[(kind, key)] = value


@collaborators
class Local:
    """This device as every part sees it.  ``request``, ``emit``, ``ack`` and
    ``ask_extra`` are read at the time of use: the client (or a test) may swap them."""

    store: LocalStore
    request: Requester
    emit: Callable[[Event], None]
    me: str
    device: str
    clock: Callable[[], float]
    rotation: RotationPolicy

    def __post_init__(self) -> None:
        self.lock = DeferredLock()
        self.identity: DeviceIdentity | None = None
        self.ack: Callable[[int], None] = lambda seq: None
        #: answers a refusal that asks for more (a CAPTCHA the server's monitoring
        #: demands before a flagged account's next send): (code, error) -> extra fields
        self.ask_extra: Callable[[str, dict[str, Any]], Any] | None = None
        #: disappearing-message timers per conversation (seconds; 0 = off)
        self.timers: dict[str, int] = {}
        #: delivery states ("sent") not saved yet: they go with the next commit
        self.states: list[tuple[str, str]] = []
        self.durable = Durable()

    @property
    def ident(self) -> DeviceIdentity:
        assert self.identity is not None, "call load() first"
        return self.identity

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    def own(self, user: str) -> str:
        """Our own name as we spell it, for a sender the server spelled otherwise."""
        return self.me if user.casefold() == self.me.casefold() else user

    def take_states(self) -> list[tuple[str, str]]:
        states, self.states = self.states, []
        return states

    def return_states(self, states: list[tuple[str, str]]) -> None:
        """A commit that carried ``states`` failed: they go with the next one."""
        self.states[:0] = states

    async def flush_states(self) -> None:
        """Save the delivery states not saved yet (``history`` and ``close`` call this)."""
        states = self.take_states()
        if states:
            try:
                await self.store.commit(states=states)
            except Exception:
                self.return_states(states)
                raise
