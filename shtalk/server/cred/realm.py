"""The chat realm: builds the avatar of a device that authenticated.

The avatar id the checkers return names the principal: ``b"<user id>"`` after a
password (the device is the one the login request names, which the mind carries; it
is registered here), ``b"<user id>/<device>/<session family>"`` after an access token
(the token binds all three).  Before handing the avatar out, the realm loads what the
device's requests will need at once (its devices, its rooms and their members, the
monitor's view of its contacts) and registers the connection as online; the logout
callable it returns is what the connection calls when it drops the avatar.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.logger import Logger
from zope.interface import implementer

from shtalk.server.chat.avatar import ChatParts, ChatUser
from shtalk.server.eserver import InvalidCredentials, NoSuchDevice, StoreClosed
from shtalk.server.iserver import IChatMind, IChatUser
from shtalk.server.store.records import User

log = Logger()


@implementer(IRealm)
class ChatRealm:
    def __init__(self, parts: ChatParts) -> None:
        self.parts = parts

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any
    ) -> Deferred[tuple[Any, object, Callable[[], None]]]:
        if IChatUser not in interfaces:
            raise NotImplementedError("shtalk only hands out IChatUser avatars")
        assert isinstance(avatarId, bytes)
        uid, _, rest = avatarId.decode("ascii").partition("/")
        device, _, family = rest.partition("/")
        d: Deferred[tuple[Any, object, Callable[[], None]]] = self._login(
            int(uid), device or None, family or None, IChatMind(mind)
        )
        return d

    @inlineCallbacks
    def _login(
        self, user_id: int, device_id: str | None, family: str | None, mind: IChatMind
    ) -> Any:
        parts = self.parts
        user: User | None = yield parts.store.user_by_id(user_id)
        if user is None:
            raise InvalidCredentials("no such account")
        parts.users.learn(user.id, user.name)
        if device_id is None:
            device_id = mind.device_id
            yield parts.store.upsert_device(user.id, device_id, mind.device_label)
            parts.users.devices_changed(user.id)
        devices = yield parts.users.load_devices(user.id)
        if device_id not in devices:
            raise NoSuchDevice("this device was removed; log in again with a password")
        yield parts.rooms.load_user(user.id)
        if parts.monitor is not None:
            # The monitor knows whom this account talked to before its first send.
            yield parts.monitor.preload(user.id)
        # Subscribed (across processes: confirmed) before the backlog is read, so every
        # message is either in it or delivered live.
        try:
            yield parts.bus.attach(user.id)
            avatar = ChatUser(parts, user, device_id, family, mind)
            first = yield parts.presence.attach(user.id, device_id, mind)
        except BaseException:
            parts.bus.detach(user.id)  # counted by attach: a failed login holds nothing
            raise
        if first:
            try:
                yield parts.audience.announce_presence(user.id, True)
            except Exception:
                # The login stands (the device is registered); contacts learn it later.
                log.failure("announcing an online user")

        def logout() -> None:
            parts.bus.detach(user.id)
            gone = parts.presence.detach(mind)
            if gone is None:
                return
            d = gone.last_anywhere.addCallback(_announce_gone, parts, user.id)
            if gone.last_here:
                # After the announcement, which reads the caches this drops.
                d.addBoth(_forget, parts, user.id)
            d.addErrback(_announce_failed)

        return IChatUser, avatar, logout


def _announce_gone(last: bool, parts: ChatParts, user_id: int) -> Any:
    if last:
        return parts.audience.announce_presence(user_id, False)
    return None


def _announce_failed(failure: Any) -> None:
    if failure.check(StoreClosed):
        # The server is stopping: its connections close after the store did.  The other
        # processes of a cluster announce this one's users offline once it is gone.
        log.info("offline announcement skipped: the server is stopping")
        return
    log.failure("announcing an offline user", failure)


def _forget(result: Any, parts: ChatParts, user_id: int) -> Any:
    parts.audience.forget_if_gone(user_id)
    return result
