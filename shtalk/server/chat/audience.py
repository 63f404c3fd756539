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
from shtalk.server.chat.rooms import Rooms
from shtalk.server.chat.users import Users
from shtalk.server.iserver import IPresence, IStore


@collaborators
class Audience:
    store: IStore
    presence: IPresence
    rooms: Rooms
    users: Users

    @inlineCallbacks
    def _with_roommates(self, user_id: int, others: Iterable[int]) -> Any:
        """``others`` and the members of ``user_id``'s rooms (from the store when this
        process has not loaded them: the user may be online in another process only)."""
        found = yield self.rooms.roommates_of(user_id)
        found.update(others)
        return found

    @inlineCallbacks
    def presence_audience(self, user_id: int) -> Any:
        """Users who may see ``user_id``'s presence, online or not: a line for them
        reaches only their live connections, wherever they are."""
        readers = yield self.store.presence_readers(user_id)
        found = yield self._with_roommates(user_id, readers)
        return found

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
        yield self.users.learn_names([user_id])
        self.presence.send_to_users(interested, pushes.presence(self.users.name(user_id), online))

    def forget_if_gone(self, user_id: int) -> None:
        """Drop what this process cached for a user while they were online here, unless
        they came back meanwhile."""
        if not self.presence.is_online(user_id):
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
        candidates = yield self._with_roommates(user_id, writers)
        online = yield self.presence.online_among(candidates)
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
        users = yield self._with_roommates(user_id, partners)
        users.add(user_id)
        line = pushes.device(self.users.name(user_id), device_id, event)
        self.presence.send_to_users(users, line)
