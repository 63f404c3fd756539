"""The narrow interface the controller uses to reach the chat (`ChatBackend`), and its
implementation over the headless `ShtalkClient` (`ClientBackend`).

Everything that may wait returns a Deferred; the UI never blocks on it.  The fake used by
the unit tests and the benchmark (`shtalk.clientui.fakeclient.FakeBackend`) implements the
same protocol.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

from twisted.internet.defer import Deferred

from shtalk.client.client import ShtalkClient
from shtalk.client.localstore import HistoryMessage
from shtalk.client.trust import CHANGED, VERIFIED

T = TypeVar("T")


def _d(coro: Coroutine[Any, Any, T]) -> Deferred[T]:
    return Deferred.fromCoroutine(coro)


class ChatBackend(Protocol):
    @property
    def me(self) -> str: ...
    @property
    def device(self) -> str: ...

    def history(self, conversation: str, limit: int,
                before_ts: int | None) -> Deferred[list[HistoryMessage]]: ...
    def conversations(self) -> Deferred[list[tuple[str, int, int]]]: ...
    def send(self, conversation: str, body: str) -> Deferred[str]: ...
    def set_timer(self, conversation: str, seconds: int) -> Deferred[None]: ...
    def timer(self, conversation: str) -> int: ...
    def search(self, text: str) -> Deferred[list[HistoryMessage]]: ...
    def create_room(self, room: str, invite_only: bool) -> Deferred[dict[str, Any]]: ...
    def join_room(self, room: str) -> Deferred[dict[str, Any]]: ...
    def leave_room(self, room: str) -> Deferred[None]: ...
    def invite(self, room: str, user: str) -> Deferred[None]: ...
    def kick(self, room: str, user: str) -> Deferred[None]: ...
    def members(self, room: str) -> Deferred[list[dict[str, Any]]]: ...
    def rooms(self) -> Deferred[list[dict[str, Any]]]: ...
    def devices(self, user: str | None) -> Deferred[list[dict[str, Any]]]: ...
    def remove_device(self, device: str) -> Deferred[None]: ...
    def accept_identity(self, user: str) -> Deferred[list[str]]: ...
    def mark_verified(self, user: str, device: str) -> Deferred[None]: ...
    def safety_number(self, user: str, device: str) -> str: ...
    def trust_state(self, user: str) -> str: ...
    def contact_device_states(self, user: str) -> list[tuple[str, str]]: ...
    def known_users(self) -> list[str]: ...
    def joined_rooms(self) -> list[str]: ...
    def room_member_count(self, room: str) -> int | None: ...
    def change_passphrase(self, old: str, new: str) -> Deferred[None]: ...
    def logout(self) -> Deferred[None]: ...


class ClientBackend:
    """`ChatBackend` over a real `ShtalkClient`."""

    def __init__(self, client: ShtalkClient) -> None:
        self.client = client
        self.e2ee = client.e2ee

    @property
    def me(self) -> str:
        return self.client.credentials.username

    @property
    def device(self) -> str:
        return self.client.credentials.device_id

    def history(self, conversation: str, limit: int,
                before_ts: int | None) -> Deferred[list[HistoryMessage]]:
        return _d(self.client.history(conversation, limit, before_ts))

    def conversations(self) -> Deferred[list[tuple[str, int, int]]]:
        d: Deferred[list[tuple[str, int, int]]] = self.client.store.conversations()
        return d

    def send(self, conversation: str, body: str) -> Deferred[str]:
        return _d(self.client.send(conversation, body))

    def set_timer(self, conversation: str, seconds: int) -> Deferred[None]:
        return _d(self.client.set_timer(conversation, seconds))

    def timer(self, conversation: str) -> int:
        return int(self.e2ee.timers.get(conversation, 0))

    def search(self, text: str) -> Deferred[list[HistoryMessage]]:
        return _d(self.client.search(text))

    def create_room(self, room: str, invite_only: bool) -> Deferred[dict[str, Any]]:
        return _d(self.client.create_room(room, invite_only))

    def join_room(self, room: str) -> Deferred[dict[str, Any]]:
        return _d(self.client.join_room(room))

    def leave_room(self, room: str) -> Deferred[None]:
        return _d(self.client.leave_room(room))

    def invite(self, room: str, user: str) -> Deferred[None]:
        return _d(self.client.invite(room, user))

    def kick(self, room: str, user: str) -> Deferred[None]:
        return _d(self.client.kick(room, user))

    def members(self, room: str) -> Deferred[list[dict[str, Any]]]:
        return _d(self.client.members(room))

    def rooms(self) -> Deferred[list[dict[str, Any]]]:
        return _d(self.client.rooms())

    def devices(self, user: str | None) -> Deferred[list[dict[str, Any]]]:
        return _d(self.client.devices(user))

    def remove_device(self, device: str) -> Deferred[None]:
        return _d(self.client.remove_device(device))

    def accept_identity(self, user: str) -> Deferred[list[str]]:
        return _d(self.client.accept_identity(user))

    def mark_verified(self, user: str, device: str) -> Deferred[None]:
        return _d(self.client.mark_verified(user, device))

    def safety_number(self, user: str, device: str) -> str:
        return self.client.safety_number(user, device)

    def contact_device_states(self, user: str) -> list[tuple[str, str]]:
        return [(c.device, c.state) for c in self.e2ee.contact_devices(user)]

    def trust_state(self, user: str) -> str:
        states = [s for _, s in self.contact_device_states(user)]
        if not states:
            return ""
        if CHANGED in states:
            return "changed"
        if all(s == VERIFIED for s in states):
            return "verified"
        return "unverified"

    def known_users(self) -> list[str]:
        users = {u for (u, _) in self.e2ee.contacts}
        for members in self.e2ee.room_members.values():
            users.update(members)
        return sorted(users)

    def joined_rooms(self) -> list[str]:
        return sorted(self.e2ee.room_members)

    def room_member_count(self, room: str) -> int | None:
        members = self.e2ee.room_members.get(room)
        return len(members) if members is not None else None

    def change_passphrase(self, old: str, new: str) -> Deferred[None]:
        d: Deferred[None] = self.client.store.change_passphrase(old, new)
        return d

    def logout(self) -> Deferred[None]:
        return _d(self.client.logout())
