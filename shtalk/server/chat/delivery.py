"""Moving committed messages to the connections they are for, without looking inside.

A stored message is encoded to its push line once (once per distinct envelope when a
sender addressed devices individually) and the same bytes are written to every
recipient.  Delivery goes through an `IDeliveryBus` so that a cross-process bus (e.g.
Redis pub/sub) can carry messages between server processes; `LocalBus` delivers within
this process.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from shtalk.collaborators import collaborators
from shtalk.server.chat import pushes
from shtalk.server.chat.fanout import FanOutCache
from shtalk.server.chat.presence import Presence
from shtalk.server.chat.rooms import Rooms
from shtalk.server.chat.users import Users
from shtalk.server.iserver import IDeliveryBus
from shtalk.server.store.mailbox import inbox_owner, room_of
from shtalk.server.store.records import ChainLink, StoredMessage


@implementer(IDeliveryBus)
@collaborators
class LocalBus:
    """Delivers within this process: one encoding per distinct envelope."""

    presence: Presence
    rooms: Rooms
    users: Users
    fanout: FanOutCache
    delivered: int = field(default=0, init=False)

    def recipients(self, box: str) -> Iterable[int]:
        owner = inbox_owner(box)
        if owner is not None:
            return (owner,)
        room = room_of(box)
        members = self.rooms.members.get(room) if room is not None else None
        return members.keys() if members is not None else ()

    def connections(self, box: str) -> tuple[Any, ...]:
        """Every online connection of every recipient of ``box`` (cached)."""
        fanout = self.fanout
        cached = fanout.entries.get(box)  # FanOutCache.get, inlined: once per message
        if cached is not None and cached[0] == fanout.version:
            return cached[1]
        online = self.presence.online
        minds = tuple(
            mind
            for uid in self.recipients(box)
            for conns in online.get(uid, {}).values()
            for mind in conns
        )
        fanout.put(box, minds)
        return minds

    # One process: every mailbox is here already, and the rooms cache is the truth.
    def membership_changed(
        self, link: ChainLink | None, room_id: int, user_id: int, joined: bool
    ) -> None:
        pass

    def attach(self, user_id: int) -> Deferred[None]:
        return succeed(None)

    def detach(self, user_id: int) -> None:
        pass

    def reconcile(self) -> Deferred[None]:
        return succeed(None)

    def publish(self, message: StoredMessage) -> None:
        if not message.envelopes and message.envelope is not None:
            # The common case (every room message): one line, one loop.
            line = pushes.message(message, message.envelope, self.users.name(message.sender_id))
            seq = message.seq
            devices = self.presence.online.get(message.sender_id)
            own = devices.get(message.sender_device, ()) if devices else ()
            n = 0
            for mind in self.connections(message.mailbox):
                if mind not in own:
                    mind.deliver(seq, line)
                    n += 1
            self.delivered += n
            return
        self._publish_per_device(message)

    def _publish_per_device(self, message: StoredMessage) -> None:
        """A sender addressed devices individually: each gets its own envelope, or the
        common one if there is one."""
        common: bytes | None = None
        sender = (message.sender_id, message.sender_device)
        sender_name = self.users.name(message.sender_id)
        online = self.presence.online
        for uid in self.recipients(message.mailbox):
            devices = online.get(uid)
            if not devices:
                continue
            for device_id, minds in devices.items():
                if (uid, device_id) == sender:
                    continue
                specific = message.envelopes.get((uid, device_id))
                if specific is not None:
                    line = pushes.message(message, specific, sender_name)
                elif message.envelope is not None:
                    if common is None:
                        common = pushes.message(message, message.envelope, sender_name)
                    line = common
                else:
                    continue
                for mind in minds:
                    mind.deliver(message.seq, line)
                    self.delivered += 1
