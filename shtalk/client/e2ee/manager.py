"""The E2EE manager: the one object the client drives, built from the parts.

Keys (`prekeys`), who presents what (`contacts`), pairwise sessions per device
(`pairwise`), Sender Keys per room (`rooms`), the batched receive (`inbox`) and
sending (`outbox`) share one `common.Local`: the store, the lock, the clock and the
way out.  This module builds them and connects them, in one place (as magic-wormhole's
``_boss.py`` builds its machines); each part's state is reachable here under the names
the client, the UI and the tests use.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from shtalk.client.e2ee.common import Local, Put, Requester
from shtalk.client.e2ee.contacts import Directory
from shtalk.client.e2ee.inbox import Inbox
from shtalk.client.e2ee.outbox import Outbox
from shtalk.client.e2ee.pairwise import Pairwise
from shtalk.client.e2ee.prekeys import Prekeys
from shtalk.client.e2ee.rooms import RoomKeys
from shtalk.client.events import Event
from shtalk.client.localstore import LocalStore
from shtalk.client.rotation import RotationPolicy
from shtalk.client.trust import ContactDevice
from shtalk.crypto import DeviceIdentity, RoomSession, Session
from shtalk.wire.pushes import DevicePush, MessagePush


class E2EE:
    def __init__(
        self,
        store: LocalStore,
        request: Requester,
        emit: Callable[[Event], None],
        username: str,
        device_id: str,
        clock: Callable[[], float] = time.time,
        rotation: RotationPolicy | None = None,
    ) -> None:
        self.local = local = Local(store, request, emit, username, device_id, clock,
                                   rotation or RotationPolicy())
        self.prekeys = Prekeys(local)
        self.directory = Directory(local)
        self.pairwise = Pairwise(local, self.directory)
        self.room_keys = RoomKeys(local, self.pairwise)
        self.inbox = Inbox(local, self.directory, self.pairwise, self.room_keys, self._reload)
        self.outbox = Outbox(local, self.pairwise, self.room_keys)

    # -- state --------------------------------------------------------------------------

    async def load(self) -> None:
        """Load (or on first run create and save) this device's keys and state."""
        local = self.local
        raw = await local.store.get("identity", "self")
        if raw is None:
            local.identity = DeviceIdentity.generate(now=int(local.clock()))
            await local.store.commit(puts=[("identity", "self", local.identity.to_bytes())])
        else:
            local.identity = DeviceIdentity.from_bytes(raw)
        await self.pairwise.load()
        await self.directory.load()
        await self.room_keys.load()
        for key, value in await local.store.items("timer"):
            local.timers[key] = int(value.decode())

    async def _reload(self) -> None:
        """Back to what the store holds (a commit failed: memory ran ahead of it)."""
        self.local.durable.clear()
        self.pairwise.sessions.clear()
        self.directory.clear()
        self.room_keys.clear()
        self.local.timers.clear()
        await self.load()

    # -- what the client and the UI call ------------------------------------------------

    async def publish_keys(self) -> dict[str, int]:
        return await self.prekeys.publish()

    def next_key_event(self) -> float:
        return self.prekeys.next_event()

    async def maintain_keys(self) -> None:
        await self.prekeys.maintain()

    async def baseline_own_devices(self) -> None:
        await self.directory.baseline_own_devices()

    async def device_event(self, push: DevicePush) -> None:
        await self.directory.device_event(push)

    async def device_ids(self, user: str, refresh: bool = False) -> list[str]:
        return await self.directory.device_ids(user, refresh)

    def forget_devices(self, user: str) -> None:
        self.directory.forget_devices(user)

    async def send_text(self, conversation: str, body: str) -> str:
        return await self.outbox.send_text(conversation, body)

    async def set_timer(self, conversation: str, seconds: int) -> None:
        await self.outbox.set_timer(conversation, seconds)

    async def flush_states(self) -> None:
        await self.local.flush_states()

    async def receive(self, push: MessagePush) -> None:
        await self.inbox.receive(push)

    async def expire_held(self) -> None:
        await self.inbox.expire_held()

    async def joined_room(self, room: str, members: Iterable[str]) -> None:
        await self.room_keys.joined(room, members)

    async def rotate_room_key(self, room: str) -> None:
        await self.room_keys.rotate_key(room)

    async def left_room(self, room: str) -> None:
        await self.room_keys.left(room)

    async def membership_changed(self, room: str, user: str, event: str) -> None:
        await self.room_keys.membership_changed(room, user, event)

    async def accept_identity(self, user: str) -> list[str]:
        return await self.pairwise.accept_identity(user)

    async def mark_verified(self, user: str, device: str) -> None:
        await self.directory.mark_verified(user, device)

    def safety_number(self, user: str, device: str) -> str:
        return self.directory.safety_number(user, device)

    def contact_devices(self, user: str) -> list[ContactDevice]:
        return self.directory.contact_devices(user)

    def room_puts(self, room: str, rs: RoomSession) -> list[Put]:
        """Every store row of ``room`` (tests write a room's state with these)."""
        return self.room_keys.puts(room, rs)

    # -- who we are, and the way out (the client swaps some of these) -------------------

    @property
    def me(self) -> str:
        return self.local.me

    @me.setter
    def me(self, name: str) -> None:
        self.local.me = name

    @property
    def clock(self) -> Callable[[], float]:
        return self.local.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.local.clock = clock

    @property
    def ident(self) -> DeviceIdentity:
        return self.local.ident

    @property
    def request(self) -> Requester:
        return self.local.request

    @request.setter
    def request(self, request: Requester) -> None:
        self.local.request = request

    @property
    def emit(self) -> Callable[[Event], None]:
        return self.local.emit

    @emit.setter
    def emit(self, emit: Callable[[Event], None]) -> None:
        self.local.emit = emit

    @property
    def ack(self) -> Callable[[int], None]:
        return self.local.ack

    @ack.setter
    def ack(self, ack: Callable[[int], None]) -> None:
        self.local.ack = ack

    @property
    def ask_extra(self) -> Callable[[str, dict[str, Any]], Any] | None:
        return self.local.ask_extra

    @ask_extra.setter
    def ask_extra(self, ask: Callable[[str, dict[str, Any]], Any] | None) -> None:
        self.local.ask_extra = ask

    # -- the parts' state, by the names the client, the UI and tests read --------------

    @property
    def sessions(self) -> dict[tuple[str, str], list[Session]]:
        return self.pairwise.sessions

    @property
    def contacts(self) -> dict[tuple[str, str], ContactDevice]:
        return self.directory.contacts

    @property
    def devices_of(self) -> dict[str, list[str]]:
        return self.directory.devices_of

    @property
    def rooms(self) -> dict[str, RoomSession]:
        return self.room_keys.rooms

    @property
    def room_members(self) -> dict[str, set[str]]:
        return self.room_keys.members

    @property
    def timers(self) -> dict[str, int]:
        return self.local.timers
