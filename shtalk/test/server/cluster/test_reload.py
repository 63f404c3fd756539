"""Rooms.reload and Rooms.forget: the membership caches follow changes made elsewhere."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from shtalk.server.chat.fanout import FanOutCache
from shtalk.server.chat.rooms import Rooms
from shtalk.server.chat.users import Users
from shtalk.test.server.cluster.processes import ChainStore


class ReloadTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.store = ChainStore()
        self.store.room_members[5] = {1: "owner", 2: "member"}
        self.fanout = FanOutCache()
        users = Users(self.store)  # type: ignore[arg-type]
        self.rooms = Rooms(self.store, users, self.fanout)  # type: ignore[arg-type]
        for uid in (1, 2, 3):
            self.successResultOf(self.rooms.load_user(uid))

    def test_reload_follows_the_store(self) -> None:
        """Elsewhere, 2 was kicked and 3 joined: members, each online user's rooms and
        the fan-out cache's version all follow."""
        self.store.change_member(5, 2, joined=False)
        self.store.change_member(5, 3, joined=True)
        version = self.fanout.version
        self.successResultOf(self.rooms.reload(5))
        self.assertEqual(dict(self.rooms.members[5]), {1: "owner", 3: "member"})
        self.assertEqual(self.rooms.of_user, {1: {5}, 2: set(), 3: {5}})
        self.assertGreater(self.fanout.version, version)

    def test_forgotten_room_is_read_again_on_next_use(self) -> None:
        self.rooms.forget(5)
        self.assertNotIn(5, self.rooms.members)
        self.store.change_member(5, 3, joined=True)
        room = self.successResultOf(self.store.rooms_of(3))[0]
        members = self.successResultOf(self.rooms.load(room))
        self.assertIn(3, members)
