"""Who is connected: the one registry of live connections, and where revocations go.

Each logged-in connection (the avatar's mind) is registered once, under its user and
device, and, once its session is known, under its session family.  Whatever ends a
session elsewhere — logout on another connection, reuse of a refresh token, a password
change or reset, a removed device, a suspended or deleted account — asks this registry,
which tells each affected connection (`IChatMind.session_revoked`); the connection then
says why to its peer and drops its avatar, which detaches it here.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from zope.interface import implementer

from shtalk.server.chat.fanout import FanOutCache
from shtalk.server.iserver import IChatMind, IPresence


@implementer(IPresence)
class Presence:
    def __init__(self, fanout: FanOutCache) -> None:
        self.fanout = fanout
        # user id -> device id -> connections (a device may briefly have two); read
        # directly by the delivery bus on every message.
        self.online: dict[int, dict[str, set[IChatMind]]] = {}
        self.families: dict[str, set[IChatMind]] = {}
        # connection -> (user id, device id, family or "")
        self._where: dict[IChatMind, tuple[int, str, str]] = {}

    def attach(self, user_id: int, device_id: str, mind: IChatMind) -> bool:
        self.fanout.changed()
        devices = self.online.setdefault(user_id, {})
        first = not devices
        devices.setdefault(device_id, set()).add(mind)
        self._where[mind] = (user_id, device_id, "")
        return first

    def detach(self, mind: IChatMind) -> tuple[int, bool] | None:
        where = self._where.pop(mind, None)
        if where is None:
            return None
        user_id, device_id, family = where
        self.fanout.connection_gone()
        self._unbind(mind, family)
        devices = self.online.get(user_id)
        if devices is None:
            return user_id, False
        minds = devices.get(device_id)
        if minds is not None:
            minds.discard(mind)
            if not minds:
                del devices[device_id]
        if devices:
            return user_id, False
        del self.online[user_id]
        return user_id, True

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

    def send_to_users(self, user_ids: Iterable[int], line: bytes) -> None:
        for uid in user_ids:
            for _, mind in self.minds_of(uid):
                mind.send_bytes(line)

    # revocations ------------------------------------------------------------------------
    def revoke_families(self, families: Iterable[str], reason: str, keep: object = None) -> None:
        for family in families:
            for mind in list(self.families.pop(family, ())):
                if mind is not keep:
                    mind.session_revoked(reason)

    def revoke_device(self, user_id: int, device_id: str, reason: str) -> None:
        for dev, mind in list(self.minds_of(user_id)):
            if dev == device_id:
                mind.session_revoked(reason)

    def revoke_user(self, user_id: int, reason: str) -> None:
        for _, mind in list(self.minds_of(user_id)):
            mind.session_revoked(reason)
