"""Who is online where, and moving opaque envelopes to them.

The router never looks inside an envelope.  A stored message is encoded to
its push line once (once per distinct envelope when a sender addressed
devices individually) and the same bytes are written to every recipient.
Delivery goes through an IDeliveryBus so that a later cross-process bus
(e.g. Redis pub/sub) can carry messages between server processes; the
LocalBus here delivers within this process.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from zope.interface import Interface, implementer

from shtalk.server.cred.checkers import IChatMind
from shtalk.server.store.records import StoredMessage
from shtalk.wire.frames import push


class IDeliveryBus(Interface):
    def publish(message: StoredMessage) -> None:
        """Deliver a committed message to every online device it is for."""


def target_field(target: str) -> dict[str, str]:
    kind, _, name = target.partition(":")
    return {kind: name}


def mailbox_of(kind: str, ident: int) -> str:
    return f"{kind}:{ident}"


class _Versioned:
    """Counts changes to presence and membership, so fan-out lists can be cached."""

    version = 0


class _Counted(dict[int, Any]):
    """A dict whose every change bumps ``clock.version`` (the fan-out cache's key);
    bulk changes are refused so that none can slip past the count."""

    def __init__(self, clock: _Versioned) -> None:
        super().__init__()
        self._clock = clock

    def __delitem__(self, key: int) -> None:
        self._clock.version += 1
        super().__delitem__(key)

    def pop(self, key: int, *default: Any) -> Any:
        self._clock.version += 1
        return super().pop(key, *default)

    def _unsupported(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("change entries one at a time (the fan-out cache counts them)")

    update = setdefault = popitem = clear = __ior__ = _unsupported  # type: ignore[assignment]


class Members(_Counted):
    """A room's {user id: role}; every change invalidates the router's fan-out lists."""

    def __init__(self, clock: _Versioned, members: Mapping[int, str]) -> None:
        super().__init__(clock)
        dict.update(self, members)
        clock.version += 1

    def __setitem__(self, key: int, value: str) -> None:
        self._clock.version += 1
        super().__setitem__(key, value)


class RoomMembers(_Counted):
    """room id -> Members: whatever mapping is stored is wrapped so changes are seen
    (wrapping counts as a change)."""

    def __setitem__(self, key: int, value: Mapping[int, str]) -> None:
        super().__setitem__(key, Members(self._clock, value))


class Router(_Versioned):
    """In-memory presence and room-membership caches for this process."""

    def __init__(self, user_name: Callable[[int], str]) -> None:
        self._user_name = user_name
        # user id -> device id -> connections (a device may briefly have two).
        self.online: dict[int, dict[str, set[Any]]] = {}
        # room id -> {user id: role}; loaded on first use, kept in step by ChatService.
        self.room_members = RoomMembers(self)
        self.room_names: dict[int, str] = {}
        # mailbox -> (version, every connection of every recipient): a room send
        # is then one loop over connections.  Rebuilt after any presence or
        # membership change (``version``).
        self._fanout: dict[str, tuple[int, tuple[Any, ...]]] = {}

    # presence --------------------------------------------------------------
    def attach(self, user_id: int, device_id: str, mind: IChatMind) -> bool:
        """Return True if this is the user's first online connection."""
        self.version += 1
        devices = self.online.setdefault(user_id, {})
        first = not devices
        devices.setdefault(device_id, set()).add(mind)
        return first

    def detach(self, user_id: int, device_id: str, mind: IChatMind) -> bool:
        """Return True if the user has no connection left."""
        self.version += 1
        self._fanout.clear()  # no cached list keeps a closed connection alive
        devices = self.online.get(user_id)
        if devices is None:
            return False
        minds = devices.get(device_id)
        if minds is not None:
            minds.discard(mind)
            if not minds:
                del devices[device_id]
        if not devices:
            del self.online[user_id]
            return True
        return False

    def is_online(self, user_id: int) -> bool:
        return user_id in self.online

    def minds_of(self, user_id: int) -> Iterable[tuple[str, Any]]:
        for device_id, minds in self.online.get(user_id, {}).items():
            for mind in minds:
                yield device_id, mind

    def send_to_users(self, user_ids: Iterable[int], line: bytes) -> None:
        for uid in user_ids:
            for _, mind in self.minds_of(uid):
                mind.send_bytes(line)

    # messages --------------------------------------------------------------
    def recipients(self, mailbox: str) -> Iterable[int]:
        kind, _, ident = mailbox.partition(":")
        if kind == "u":
            return (int(ident),)
        members = self.room_members.get(int(ident))
        return members.keys() if members is not None else ()

    def connections(self, mailbox: str) -> tuple[Any, ...]:
        """Every online connection of every recipient of ``mailbox`` (cached)."""
        cached = self._fanout.get(mailbox)
        if cached is not None and cached[0] == self.version:
            return cached[1]
        online = self.online
        minds = tuple(
            mind
            for uid in self.recipients(mailbox)
            for conns in online.get(uid, {}).values()
            for mind in conns
        )
        if len(self._fanout) > 4096:  # bounded: stale entries of idle rooms go
            self._fanout.clear()
        self._fanout[mailbox] = (self.version, minds)
        return minds

    def encode_message(self, m: StoredMessage, envelope: bytes) -> bytes:
        fields: dict[str, Any] = {
            "seq": m.seq,
            "ts": m.ts,
            "from": {"user": self._user_name(m.sender_id), "device": m.sender_device},
            "to": target_field(m.target),
            "client_id": m.client_id,
            "envelope": base64.b64encode(envelope).decode("ascii"),
        }
        if m.expires_at is not None:
            fields["expires_at"] = int(m.expires_at)
        return push("message", **fields)


@implementer(IDeliveryBus)
class LocalBus:
    """Delivers within this process: one encoding per distinct envelope."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.delivered = 0

    def publish(self, message: StoredMessage) -> None:
        router = self.router
        if not message.envelopes and message.envelope is not None:
            # The common case (every room message): one line, one loop.
            line = router.encode_message(message, message.envelope)
            seq = message.seq
            devices = router.online.get(message.sender_id)
            own = devices.get(message.sender_device, ()) if devices else ()
            n = 0
            for mind in router.connections(message.mailbox):
                if mind not in own:
                    mind.deliver(seq, line)
                    n += 1
            self.delivered += n
            return
        common: bytes | None = None
        sender = (message.sender_id, message.sender_device)
        for uid in router.recipients(message.mailbox):
            devices = router.online.get(uid)
            if not devices:
                continue
            for device_id, minds in devices.items():
                if (uid, device_id) == sender:
                    continue
                specific = message.envelopes.get((uid, device_id))
                if specific is not None:
                    line = router.encode_message(message, specific)
                elif message.envelope is not None:
                    if common is None:
                        common = router.encode_message(message, message.envelope)
                    line = common
                else:
                    continue
                for mind in minds:
                    mind.deliver(message.seq, line)
                    self.delivered += 1
