"""Accounts as the chat sees them: display names, active accounts by name, devices.

Caches of the store, written only here.  Names are kept for every account the server
has met (they go into pushes); accounts by key only while active (a suspension, a
deletion, a verified email or a new password `forget` theirs); the device list of a
user while they are online (loaded at login, dropped at their last logout), so a
message to someone online costs no database read to check its devices.

In a cluster each process keeps its own caches; every change is applied here at once
and told to the other processes (``control``), which apply it with the ``*_here``
methods.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import inlineCallbacks

from shtalk.server.chat.naming import user_key
from shtalk.server.eserver import NoSuchUser
from shtalk.server.iserver import IStore
from shtalk.server.ishared import NO_CONTROL, IClusterControl
from shtalk.server.store.records import Device, User


class Users:
    def __init__(self, store: IStore, control: IClusterControl = NO_CONTROL) -> None:
        self.store = store
        self.control = control
        self.names: dict[int, str] = {}
        self.by_key: dict[str, User] = {}  # active accounts only
        self.devices: dict[int, dict[str, Device]] = {}  # online users only

    def name(self, user_id: int) -> str:
        return self.names.get(user_id, f"#{user_id}")

    def learn(self, user_id: int, name: str) -> None:
        self.names[user_id] = name

    @inlineCallbacks
    def user(self, raw: str) -> Any:
        """The active account of that name, or NoSuchUser."""
        _, key = user_key(raw)
        user: User | None = self.by_key.get(key)
        if user is None:
            user = yield self.store.user_by_key(key)
            if user is None or user.status != "active":
                raise NoSuchUser("no such user")
            self.by_key[key] = user
        self.names[user.id] = user.name
        return user

    def forget(self, key: str) -> None:
        """Drop a cached account after its status or password changed."""
        self.forget_here(key)
        self.control.publish("users.forget", {"key": key})

    def forget_here(self, key: str) -> None:
        self.by_key.pop(key, None)

    @inlineCallbacks
    def learn_names(self, user_ids: Iterable[int]) -> Any:
        """Make sure the names of these users are known (one read for those missing)."""
        missing = [u for u in user_ids if u not in self.names]
        if missing:
            users = yield self.store.users_by_ids(missing)
            for uid, user in users.items():
                self.names[uid] = user.name

    # devices of online users -------------------------------------------------------------
    @inlineCallbacks
    def load_devices(self, user_id: int) -> Any:
        devices = yield self.store.devices(user_id)
        self.devices[user_id] = found = {d.device_id: d for d in devices}
        return found

    def devices_of(self, user_id: int) -> dict[str, Device] | None:
        """The cached device list (None: not online, ask the store)."""
        return self.devices.get(user_id)

    def device_removed(self, user_id: int, device_id: str) -> None:
        self.device_removed_here(user_id, device_id)
        self.control.publish("users.device_removed", {"user": user_id, "device": device_id})

    def device_removed_here(self, user_id: int, device_id: str) -> None:
        self.devices.get(user_id, {}).pop(device_id, None)

    def devices_changed(self, user_id: int) -> None:
        """A device may have been added (a password login): processes where the user is
        online read the list again."""
        self.control.publish("users.devices", {"user": user_id})

    def reload_devices_here(self, user_id: int) -> Any:
        if user_id in self.devices:
            return self.load_devices(user_id)
        return None

    def went_offline(self, user_id: int) -> None:
        self.devices.pop(user_id, None)
