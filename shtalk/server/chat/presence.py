"""Who is connected: the one registry of live connections, and where revocations go.

Each logged-in connection (the avatar's mind) is registered once, under its user and
device, and, once its session is known, under its session family.  Whatever ends a
session elsewhere — logout on another connection, reuse of a refresh token, a password
change or reset, a removed device, a suspended or deleted account — asks this registry,
which tells each affected connection (`IChatMind.session_revoked`); the connection then
says why to its peer and drops its avatar, which detaches it here.

Several processes (a cluster) each keep their own registry; its relay
(`IPresenceRelay`) carries revocations and lines to the peers' registries and keeps who
is online cluster-wide, so a user with a device in each of two processes comes online
once and goes offline once.  The ``*_here`` methods are what a peer's relayed event
applies: this process's connections only, telling nobody.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

from twisted.internet.defer import Deferred, succeed
from zope.interface import implementer

from shtalk.server.chat.fanout import FanOutCache
from shtalk.server.iserver import IChatMind, IPresence
from shtalk.server.ishared import IPresenceRelay


class Departure(NamedTuple):
    """What a detached connection leaves behind."""

    user_id: int
    last_here: bool  # this process serves none of the user's devices now
    last_anywhere: Deferred[bool]  # fires True if no process does


@implementer(IPresenceRelay)
class LocalRelay:
    """One process: what this process knows is all there is, and nobody to tell."""

    def device_up(self, user_id: int, device_id: str, first_here: bool) -> Deferred[bool]:
        return succeed(first_here)

    def device_down(self, user_id: int, device_id: str, last_here: bool) -> Deferred[bool]:
        return succeed(last_here)

    def online_elsewhere(self, user_ids: Iterable[int]) -> Deferred[set[int]]:
        return succeed(set())

    def devices_elsewhere(self, user_id: int) -> Deferred[set[str]]:
        return succeed(set())

    def send_to_users(self, user_ids: Iterable[int], line: bytes) -> None:
        return None

    def revoke_families(self, families: Iterable[str], reason: str) -> None:
        return None

    def revoke_device(self, user_id: int, device_id: str, reason: str) -> None:
        return None

    def revoke_user(self, user_id: int, reason: str) -> None:
        return None


@implementer(IPresence)
class Presence:
    def __init__(self, fanout: FanOutCache, relay: IPresenceRelay | None = None) -> None:
        self.fanout = fanout
        self.relay: IPresenceRelay = relay if relay is not None else LocalRelay()
        # user id -> device id -> connections (a device may briefly have two); read
        # directly by the delivery bus on every message.
        self.online: dict[int, dict[str, set[IChatMind]]] = {}
        self.families: dict[str, set[IChatMind]] = {}
        # connection -> (user id, device id, family or "")
        self._where: dict[IChatMind, tuple[int, str, str]] = {}

    def attach(self, user_id: int, device_id: str, mind: IChatMind) -> Deferred[bool]:
        self.fanout.changed()
        devices = self.online.setdefault(user_id, {})
        first = not devices
        devices.setdefault(device_id, set()).add(mind)
        self._where[mind] = (user_id, device_id, "")
        # Repeated for a device's second connection: the relay's mark is idempotent.
        return self.relay.device_up(user_id, device_id, first)

    def detach(self, mind: IChatMind) -> Departure | None:
        where = self._where.pop(mind, None)
        if where is None:
            return None
        user_id, device_id, family = where
        self.fanout.connection_gone()
        self._unbind(mind, family)
        devices = self.online.get(user_id)
        if devices is None:
            return Departure(user_id, False, succeed(False))
        minds = devices.get(device_id)
        if minds is not None:
            minds.discard(mind)
            if minds:  # the device is still connected here
                return Departure(user_id, False, succeed(False))
            del devices[device_id]
        last = not devices
        if last:
            del self.online[user_id]
        return Departure(user_id, last, self.relay.device_down(user_id, device_id, last))

    def bind_family(self, mind: IChatMind, family: str) -> None:
        where = self._where.get(mind)
        if where is None:
            return  # gone meanwhile (closed during the login)
        user_id, device_id, old = where
        self._unbind(mind, old)
        self._where[mind] = (user_id, device_id, family)
        self.families.setdefault(family, set()).add(mind)

    def _unbind(self, mind: IChatMind, family: str) -> None:
        peers = self.families.get(family) if family else None
        if peers is not None:
            peers.discard(mind)
            if not peers:
                del self.families[family]

    def is_online(self, user_id: int) -> bool:
        return user_id in self.online

    def devices_online(self, user_id: int) -> dict[str, set[IChatMind]]:
        return self.online.get(user_id, {})

    def minds_of(self, user_id: int) -> Iterator[tuple[str, IChatMind]]:
        for device_id, minds in self.online.get(user_id, {}).items():
            for mind in minds:
                yield device_id, mind

    def online_among(self, user_ids: Iterable[int]) -> Deferred[set[int]]:
        online = self.online
        ids = set(user_ids)
        here = {uid for uid in ids if uid in online}
        rest = ids - here
        if not rest:
            return succeed(here)
        return self.relay.online_elsewhere(rest).addCallback(here.union)

    def devices_online_anywhere(self, user_id: int) -> Deferred[set[str]]:
        here = set(self.online.get(user_id, ()))
        return self.relay.devices_elsewhere(user_id).addCallback(here.union)

    def send_to_users(self, user_ids: Iterable[int], line: bytes) -> None:
        user_ids = list(user_ids)
        self.send_to_users_here(user_ids, line)
        self.relay.send_to_users(user_ids, line)

    def send_to_users_here(self, user_ids: Iterable[int], line: bytes) -> None:
        for uid in user_ids:
            for _, mind in self.minds_of(uid):
                mind.send_bytes(line)

    # revocations: here at once, then in every other process ----------------------------
    def revoke_families(self, families: Iterable[str], reason: str, keep: object = None) -> None:
        families = list(families)
        self.revoke_families_here(families, reason, keep)
        self.relay.revoke_families(families, reason)

    def revoke_device(self, user_id: int, device_id: str, reason: str) -> None:
        self.revoke_device_here(user_id, device_id, reason)
        self.relay.revoke_device(user_id, device_id, reason)

    def revoke_user(self, user_id: int, reason: str) -> None:
        self.revoke_user_here(user_id, reason)
        self.relay.revoke_user(user_id, reason)

    def revoke_families_here(
        self, families: Iterable[str], reason: str, keep: object = None
    ) -> None:
        for family in families:
            for mind in list(self.families.pop(family, ())):
                if mind is not keep:
                    mind.session_revoked(reason)

    def revoke_device_here(self, user_id: int, device_id: str, reason: str) -> None:
        for dev, mind in list(self.minds_of(user_id)):
            if dev == device_id:
                mind.session_revoked(reason)

    def revoke_user_here(self, user_id: int, reason: str) -> None:
        for _, mind in list(self.minds_of(user_id)):
            mind.session_revoked(reason)
