"""Who has which devices, what each device presents, and what we trust.

A device we never knew of is news exactly once (`NewDevice`), whether it shows up in a
``device`` push, a fetched bundle or its first message; a known device presenting
another identity key is an `IdentityChanged`, and sending to it is blocked until the
change is accepted.  The first list of a contact's devices is the baseline, not news.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from shtalk.client.e2ee.common import Local
from shtalk.client.errors import ClientError
from shtalk.client.events import IdentityChanged, NewDevice
from shtalk.client.trust import CHANGED, ContactDevice
from shtalk.crypto import IdentityKey, safety_number
from shtalk.wire.pushes import DevicePush
from shtalk.wire.requests import Devices


class Directory:
    def __init__(self, local: Local) -> None:
        self.local = local
        self.contacts: dict[tuple[str, str], ContactDevice] = {}
        self.devices_of: dict[str, list[str]] = {}
        #: per user, the device ids that are no news: those there when we first listed
        #: the user's devices, and those announced since (NewDevice once per device)
        self.seen: dict[str, set[str]] = {}
        #: users whose devices were listed once (that first list was the baseline)
        self.listed: set[str] = set()

    async def load(self) -> None:
        store = self.local.store
        for _, value in await store.items("contact"):
            c = ContactDevice.from_bytes(value)
            self.contacts[(c.user, c.device)] = c
        for key, value in await store.items("seen"):
            saved = json.loads(value)
            self.seen[key] = set(saved["devices"])
            if saved.get("listed"):
                self.listed.add(key)

    def clear(self) -> None:
        self.contacts.clear()

    async def device_ids(self, user: str, refresh: bool = False) -> list[str]:
        if refresh or user not in self.devices_of:
            reply = await self.local.request(Devices(user=user))
            self.devices_of[user] = [d["id"] for d in reply["devices"]]
            if user not in self.listed:
                # The first list of a contact's devices is the baseline, not news (our
                # own account's baseline is taken at this device's first login).
                self.listed.add(user)
                if user != self.local.me:
                    self.seen.setdefault(user, set()).update(self.devices_of[user])
        return self.devices_of[user]

    def forget_devices(self, user: str) -> None:
        self.devices_of.pop(user, None)

    def _knows(self, user: str) -> bool:
        """Whether a device of ``user`` we did not know of yet is news (our own account
        always is, once this device's first login recorded the baseline)."""
        return (user == self.local.me or bool(self.seen.get(user))
                or any(u == user for u, _ in self.contacts))

    def is_new_device(self, user: str, device: str) -> bool:
        """True once per device that is news (see `seen`); records it as seen."""
        seen = self.seen.setdefault(user, set())
        if device in seen:
            return False
        news = self._knows(user) and (user, device) != (self.local.me, self.local.device)
        seen.add(device)
        return news

    def seen_value(self, user: str) -> Callable[[], bytes]:
        return lambda: json.dumps({"devices": sorted(self.seen.get(user, ())),
                                   "listed": user in self.listed}).encode()

    def contact_value(self, key: tuple[str, str]) -> Callable[[], bytes | None]:
        def value() -> bytes | None:
            c = self.contacts.get(key)
            return None if c is None else c.to_bytes()

        return value

    async def baseline_own_devices(self) -> None:
        """At this device's first login the account's other devices are not news: record
        them (before publishing our keys, which tells every other device about us)."""
        local = self.local
        if await local.store.get("meta", "published") is not None:
            return
        ids = await self.device_ids(local.me, refresh=True)
        self.seen[local.me] = set(ids) | {local.device}
        await local.store.commit(puts=[("seen", local.me, self.seen_value(local.me)())])

    async def device_event(self, push: DevicePush) -> None:
        """A ``device`` push: a contact (or we) got a new device, or one was removed.
        A device we never knew of is announced now, once, not at its first message."""
        local = self.local
        user, device = local.own(push.user), push.device
        self.forget_devices(user)
        if push.event == "removed" or (user, device) in self.contacts:
            return  # gone, or a known device's new keys (its identity is checked at use)
        async with local.lock:
            if not self.is_new_device(user, device):
                return
            await local.store.commit(puts=[("seen", user, self.seen_value(user)())])
        local.emit(NewDevice(user, device))

    def pin(self, user: str, device: str, identity: IdentityKey) -> ContactDevice:
        """Record what ``device`` presents; emit NewDevice / IdentityChanged as due (the
        caller saves ``seen[user]`` with the contact)."""
        key = (user, device)
        old = self.contacts.get(key)
        if old is None:
            rec = ContactDevice.first(user, device, identity)
            if self.is_new_device(user, device):
                self.local.emit(NewDevice(user, device))
        else:
            rec = old.presents(identity)
            if rec.state == CHANGED and old.state != CHANGED:
                self.local.emit(IdentityChanged(user, device))
        self.contacts[key] = rec
        return rec

    async def mark_verified(self, user: str, device: str) -> None:
        async with self.local.lock:
            c = self.contacts.get((user, device))
            if c is None:
                raise ClientError(f"no known device {device} of {user}")
            if c.state == CHANGED:
                raise ClientError(f"{user}'s key changed; accept it first, then verify")
            rec = c.verified()
            self.contacts[(user, device)] = rec
            await self.local.store.commit(puts=[("contact", rec.key, rec.to_bytes())])

    def safety_number(self, user: str, device: str) -> str:
        local = self.local
        c = self.contacts.get((user, device))
        if c is None:
            raise ClientError(f"no known device {device} of {user}; exchange a message first")
        return safety_number(
            f"{local.me}/{local.device}",
            local.ident.identity_key,
            f"{user}/{device}",
            IdentityKey.from_bytes(c.pending or c.identity),
        )

    def contact_devices(self, user: str) -> list[ContactDevice]:
        return sorted(
            (c for (u, _), c in self.contacts.items() if u == user), key=lambda c: c.device
        )
