"""Who hears about whom: presence and key changes, by the visibility rules.

Whether someone is online shows only to people who share a room with them, or to whom
they have written directly (being written to by a stranger shows the stranger nothing).
Device lists stay open to everyone who may message the user (E2EE needs them), without
the online marks; new or removed keys are announced to everyone in a room or a
conversation with the user, so no key change is silent.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import inlineCallbacks

from shtalk.collaborators import collaborators
from shtalk.server.chat import pushes
from shtalk.server.chat.presence import Presence
from shtalk.server.chat.rooms import Rooms
from shtalk.server.chat.users import Users
from shtalk.server.iserver import IStore


@collaborators
class Audience:
    store: IStore
    presence: Presence
    rooms: Rooms
    users: Users

    def _online_with(self, user_id: int, others: Iterable[int]) -> set[int]:
        """``others`` and the members of ``user_id``'s rooms, those online."""
        found = self.rooms.roommates(user_id)
        found.update(others)
        online = self.presence.online
        return {u for u in found if u in online}

    @inlineCallbacks
    def presence_audience(self, user_id: int) -> Any:
        """Online users who may see ``user_id``'s presence."""
        readers = yield self.store.presence_readers(user_id)
        return self._online_with(user_id, readers)

    @inlineCallbacks
    def may_see_presence(self, viewer_id: int, subject_id: int) -> Any:
        if viewer_id == subject_id or self.rooms.shares_room(viewer_id, subject_id):
            return True
        written = yield self.store.has_written(subject_id, viewer_id)
        return bool(written)

    @inlineCallbacks
    def announce_presence(self, user_id: int, online: bool) -> Any:
        interested = yield self.presence_audience(user_id)
        interested.discard(user_id)
        self.presence.send_to_users(interested, pushes.presence(self.users.name(user_id), online))
        if not online:
            self.rooms.went_offline(user_id)
            self.users.went_offline(user_id)

    @inlineCallbacks
    def presence_snapshot(self, user_id: int) -> Any:
        """``presence`` pushes for a device that just logged in (after its backlog), by the
        same rule as the live ones: every user whose presence it may see (room members,
        and those who have written to it directly) who is online now, and of those who
        have written to it, the ones who are not (offline room members stay unknown, so
        a big room costs no line per absent member)."""
        writers = set((yield self.store.presence_subjects(user_id)))
        online = self._online_with(user_id, writers)
        wanted = (online | writers) - {user_id}
        yield self.users.learn_names(wanted)
        names = self.users.names
        return [
            pushes.presence(names[u], u in online)
            for u in sorted(wanted, key=self.users.name)
            if u in names
        ]

    @inlineCallbacks
    def announce_keys(self, user_id: int, device_id: str, event: str) -> Any:
        """New or removed device keys are never silent: contacts are told to refetch."""
        partners = yield self.store.dm_partners(user_id)
        users = self._online_with(user_id, partners)
        users.add(user_id)
        line = pushes.device(self.users.name(user_id), device_id, event)
        self.presence.send_to_users(users, line)
