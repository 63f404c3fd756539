"""Rooms and who is in them: the one writer of the membership caches.

Rooms never change name or kind, so a room found once stays cached (a send to a known
room then costs no thread hop, which also keeps a device's sends in order without
waiting).  Members are cached per room from its first use, and the rooms of each
online user from their login; every change goes through the methods here, after the
store committed it.  The member maps count each change into the fan-out cache and
refuse bulk changes, so no change can slip past that count.

In a cluster, a role change and a deleted account are told to the other processes
(``control``), which apply them with the ``*_here`` methods; joins and leaves reach them
in order with the room's messages (the delivery bus).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.internet.defer import inlineCallbacks

from shtalk.server.chat.fanout import FanOutCache
from shtalk.server.chat.naming import room_key
from shtalk.server.chat.users import Users
from shtalk.server.eserver import NoSuchRoom
from shtalk.server.iserver import IStore
from shtalk.server.ishared import NO_CONTROL, IClusterControl
from shtalk.server.store.records import Room


class _Counted(dict[int, Any]):
    """A dict whose every change is counted into the fan-out cache; bulk changes are
    refused so that none can slip past the count."""

    def __init__(self, fanout: FanOutCache) -> None:
        super().__init__()
        self._fanout = fanout

    def __delitem__(self, key: int) -> None:
        self._fanout.version += 1
        super().__delitem__(key)

    def pop(self, key: int, *default: Any) -> Any:
        self._fanout.version += 1
        return super().pop(key, *default)

    def _unsupported(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("change entries one at a time (the fan-out cache counts them)")

    update = setdefault = popitem = clear = __ior__ = _unsupported  # type: ignore[assignment]


class Members(_Counted):
    """A room's {user id: role}."""

    def __init__(self, fanout: FanOutCache, members: Mapping[int, str]) -> None:
        super().__init__(fanout)
        dict.update(self, members)
        fanout.version += 1

    def __setitem__(self, key: int, value: str) -> None:
        self._fanout.version += 1
        super().__setitem__(key, value)


class RoomMembers(_Counted):
    """room id -> Members: whatever mapping is stored is wrapped so changes are seen
    (wrapping counts as a change)."""

    def __setitem__(self, key: int, value: Mapping[int, str]) -> None:
        super().__setitem__(key, Members(self._fanout, value))


class Rooms:
    def __init__(
        self, store: IStore, users: Users, fanout: FanOutCache,
        control: IClusterControl = NO_CONTROL,
    ) -> None:
        self.store = store
        self.control = control
        self.users = users
        self.by_key: dict[str, Room] = {}
        self.members = RoomMembers(fanout)  # room id -> Members, loaded on first use
        self.of_user: dict[int, set[int]] = {}  # online user -> ids of their rooms

    # look-ups ------------------------------------------------------------------------------
    @inlineCallbacks
    def room(self, raw: str) -> Any:
        """(room, its members) by a name as typed; NoSuchRoom if there is none."""
        _, key = room_key(raw)
        room: Room | None = self.by_key.get(key)
        if room is None:
            room = yield self.store.room_by_key(key)
            if room is None:
                raise NoSuchRoom("no such room; /rooms lists them")
            self.by_key[key] = room
        members = yield self.load(room)
        return room, members

    @inlineCallbacks
    def load(self, room: Room) -> Any:
        members = self.members.get(room.id)
        if members is None:
            rows = yield self.store.members(room.id)
            members = self.members.get(room.id)  # loaded meanwhile by another request
            if members is None:
                self.members[room.id] = {m.user_id: m.role for m in rows}
                members = self.members[room.id]
            for m in rows:
                self.users.learn(m.user_id, m.user_name)
        return members

    @inlineCallbacks
    def load_user(self, user_id: int) -> Any:
        """At login: the user's rooms, each with its members."""
        rooms = yield self.store.rooms_of(user_id)
        self.of_user[user_id] = {r.id for r in rooms}
        for room in rooms:
            yield self.load(room)

    def roommates(self, user_id: int) -> set[int]:
        """Everyone in a room with ``user_id`` (who is logged in, so this is cached)."""
        found: set[int] = set()
        members = self.members
        for rid in self.of_user.get(user_id, ()):
            found.update(members.get(rid, {}))
        return found

    @inlineCallbacks
    def roommates_of(self, user_id: int) -> Any:
        """`roommates` of any user: for one not logged in here, their rooms are read from
        the store (and not kept: only the rooms' members are cached, as on first use)."""
        if user_id in self.of_user:
            return self.roommates(user_id)
        rooms = yield self.store.rooms_of(user_id)
        found: set[int] = set()
        for room in rooms:
            members = yield self.load(room)
            found.update(members)
        return found

    def shares_room(self, viewer_id: int, subject_id: int) -> bool:
        members = self.members
        return any(subject_id in members.get(rid, {}) for rid in self.of_user.get(viewer_id, ()))

    # changes, after the store committed them ----------------------------------------------
    def created(self, room: Room, owner_id: int) -> None:
        self.members[room.id] = {owner_id: "owner"}
        self.by_key[room.key] = room
        self.of_user.setdefault(owner_id, set()).add(room.id)

    def joined(self, room: Room, user_id: int) -> None:
        self._role_set(room.id, user_id, "member")
        self.of_user.setdefault(user_id, set()).add(room.id)

    def left(self, room: Room, user_id: int) -> None:
        """Left or kicked."""
        members = self.members.get(room.id)
        if members is not None:
            members.pop(user_id, None)
        self.of_user.get(user_id, set()).discard(room.id)

    def role_set(self, room: Room, user_id: int, role: str) -> None:
        self._role_set(room.id, user_id, role)
        self.control.publish("rooms.role", {"room": room.id, "user": user_id, "role": role})

    def role_set_here(self, room_id: int, user_id: int, role: str) -> None:
        """A peer changed a role: only a member's (a join is the bus's to apply)."""
        members = self.members.get(room_id)
        if members is not None and user_id in members:
            members[user_id] = role

    def _role_set(self, room_id: int, user_id: int, role: str) -> None:
        members = self.members.get(room_id)
        if members is not None:  # else the store has it for the next load
            members[user_id] = role

    def went_offline(self, user_id: int) -> None:
        self.of_user.pop(user_id, None)

    # changes made by another process ------------------------------------------------------
    @inlineCallbacks
    def reload(self, room_id: int) -> Any:
        """Re-read a room's members (changed elsewhere, or changes may have been missed):
        its member map and the rooms of every online user follow the store."""
        rows = yield self.store.members(room_id)
        self.members[room_id] = {m.user_id: m.role for m in rows}
        for m in rows:
            self.users.learn(m.user_id, m.user_name)
        for user_id, rooms in self.of_user.items():
            if user_id in self.members[room_id]:
                rooms.add(room_id)
            else:
                rooms.discard(room_id)

    def forget(self, room_id: int) -> None:
        """No change of this room reaches this process any more: drop its members, so
        that the next use reads them again rather than trust a stale list."""
        self.members.pop(room_id, None)

    def account_deleted(self, user_id: int) -> None:
        self.account_deleted_here(user_id)
        self.control.publish("rooms.account_deleted", {"user": user_id})

    def account_deleted_here(self, user_id: int) -> None:
        for members in self.members.values():
            members.pop(user_id, None)
        self.of_user.pop(user_id, None)
