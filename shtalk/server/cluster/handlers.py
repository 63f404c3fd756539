"""What the other processes' cache events do here, and the catch-up after an outage.

Each component that caches (users, rooms) applies its own changes at once and publishes
them (`IClusterControl`); here is the table a process applies its peers' with, through
the same component's ``*_here`` methods (each cache keeps one writer).

`recheck_sessions` is for when the control channel was away: events published meanwhile
are lost, so every session family, device and account this process serves is checked
against the store, and what was revoked meanwhile is ended here.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.interfaces import IReactorTime

from shtalk.server.chat.presence import Presence
from shtalk.server.chat.rooms import Rooms
from shtalk.server.chat.users import Users
from shtalk.server.cluster.control import Handler
from shtalk.server.iserver import IStore


def cache_handlers(users: Users, rooms: Rooms) -> dict[str, Handler]:
    def forget(p: dict[str, Any]) -> None:
        users.forget_here(str(p["key"]))

    def device_removed(p: dict[str, Any]) -> None:
        users.device_removed_here(int(p["user"]), str(p["device"]))

    def devices(p: dict[str, Any]) -> Any:
        return users.reload_devices_here(int(p["user"]))

    def role(p: dict[str, Any]) -> None:
        rooms.role_set_here(int(p["room"]), int(p["user"]), str(p["role"]))

    def account_deleted(p: dict[str, Any]) -> None:
        rooms.account_deleted_here(int(p["user"]))

    return {
        "users.forget": forget,
        "users.device_removed": device_removed,
        "users.devices": devices,
        "rooms.role": role,
        "rooms.account_deleted": account_deleted,
    }


@inlineCallbacks
def recheck_sessions(presence: Presence, store: IStore, clock: IReactorTime) -> Any:
    """End here every session the store no longer allows; returns how many ended."""
    ended = 0
    now = clock.seconds()
    for family in list(presence.families):
        session = yield store.session(family)
        gone = session is None or session.revoked or session.expires <= now
        if gone and family in presence.families:
            ended += 1
            presence.revoke_families_here([family], "this session was logged out")
    for user_id in list(presence.online):
        user = yield store.user_by_id(user_id)
        if user is None or user.status != "active":
            ended += 1
            presence.revoke_user_here(user_id, "this account is no longer active")
            continue
        devices = yield store.devices(user_id)
        known = {d.device_id for d in devices}
        for device_id in list(presence.devices_online(user_id)):
            if device_id not in known:
                ended += 1
                presence.revoke_device_here(
                    user_id, device_id, "this device was removed from the account"
                )
    return ended
