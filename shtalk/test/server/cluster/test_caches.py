"""Caches kept in step across processes, and the catch-up after missed events.

Two sets of caches over one store stand for two processes; the events one publishes
are handed to the other's handler table, as its control listener would.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shtalk.server.chat.fanout import FanOutCache
from shtalk.server.chat.presence import Presence
from shtalk.server.chat.rooms import Rooms
from shtalk.server.chat.users import Users
from shtalk.server.cluster.handlers import cache_handlers, recheck_sessions
from shtalk.server.store.memory import MemoryStore
from shtalk.test.server.cluster.test_control import Mind


class Wire:
    """An IClusterControl that hands each event to the peer's handlers at once."""

    def __init__(self) -> None:
        self.handlers: dict[str, Any] = {}
        self.sent: list[str] = []

    def publish(self, kind: str, payload: dict[str, Any]) -> None:
        self.sent.append(kind)
        result = self.handlers[kind](payload)
        if isinstance(result, Deferred):
            result.addErrback(lambda f: f)  # surfaced by successResultOf in the tests


class CacheEventTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.store = MemoryStore(self.clock)
        self.wire = Wire()
        self.users_a = Users(self.store, self.wire)  # type: ignore[arg-type]
        self.rooms_a = Rooms(self.store, self.users_a, FanOutCache(), self.wire)  # type: ignore[arg-type]
        self.users_b = Users(self.store)
        self.rooms_b = Rooms(self.store, self.users_b, FanOutCache())
        self.wire.handlers = cache_handlers(self.users_b, self.rooms_b)
        self.alice = self.successResultOf(
            self.store.create_user("alice", "alice", "a@example.org", b"h", "active"))
        self.bob = self.successResultOf(
            self.store.create_user("bob", "bob", "b@example.org", b"h", "active"))

    def test_a_suspended_account_is_forgotten_by_every_process(self) -> None:
        self.successResultOf(self.users_b.user("alice"))
        self.assertIn("alice", self.users_b.by_key)
        self.successResultOf(self.store.set_status(self.alice.id, "suspended"))
        self.users_a.forget("alice")
        self.assertNotIn("alice", self.users_b.by_key)
        self.failureResultOf(self.users_b.user("alice"))

    def test_device_lists_follow_additions_and_removals_elsewhere(self) -> None:
        uid = self.alice.id
        self.successResultOf(self.store.upsert_device(uid, "d1", "laptop"))
        self.successResultOf(self.users_b.load_devices(uid))  # alice is online on b
        self.successResultOf(self.store.upsert_device(uid, "d2", "phone"))
        self.users_a.devices_changed(uid)  # a password login on a
        self.assertEqual(set(self.users_b.devices_of(uid) or ()), {"d1", "d2"})
        self.users_a.device_removed(uid, "d1")
        self.assertEqual(set(self.users_b.devices_of(uid) or ()), {"d2"})
        self.users_a.devices_changed(self.bob.id)  # not online on b: nothing loaded
        self.assertIsNone(self.users_b.devices_of(self.bob.id))

    def test_a_demotion_elsewhere_is_seen_here_and_a_deleted_account_leaves_rooms(self) -> None:
        room = self.successResultOf(self.store.create_room("r", "r", self.alice.id, False))
        self.successResultOf(self.store.add_member(room.id, self.bob.id, "admin"))
        for rooms in (self.rooms_a, self.rooms_b):
            self.successResultOf(rooms.room("r"))
        self.rooms_a.role_set(room, self.bob.id, "member")
        self.assertEqual(self.rooms_b.members[room.id][self.bob.id], "member")
        self.rooms_a.account_deleted(self.bob.id)
        self.assertNotIn(self.bob.id, self.rooms_b.members[room.id])
        # A role for someone b does not have as a member is not a join.
        self.rooms_a.role_set(room, self.bob.id, "admin")
        self.assertNotIn(self.bob.id, self.rooms_b.members[room.id])
        self.assertEqual(self.wire.sent, ["rooms.role", "rooms.account_deleted", "rooms.role"])


class RecheckTests(SynchronousTestCase):
    """What a process does after its control subscription was away."""

    def test_sessions_revoked_meanwhile_end_here(self) -> None:
        clock = MemoryReactorClock()
        clock.advance(1000)
        store = MemoryStore(clock)
        presence = Presence(FanOutCache())
        alice = self.successResultOf(store.create_user("alice", "alice", "a@x.org", b"h", "active"))
        bob = self.successResultOf(store.create_user("bob", "bob", "b@x.org", b"h", "active"))
        minds: dict[str, Mind] = {}
        for family, (uid, device) in {
            "kept": (alice.id, "d1"), "logged-out": (alice.id, "d2"),
            "removed-device": (alice.id, "d3"), "suspended": (bob.id, "e1"),
        }.items():
            self.successResultOf(store.upsert_device(uid, device, ""))
            self.successResultOf(store.create_session(family, uid, device, family.encode(), 9e9))
            mind = minds[family] = Mind(presence)
            presence.attach(uid, device, mind)  # type: ignore[arg-type]
            presence.bind_family(mind, family)  # type: ignore[arg-type]
        # What happened on another process while this one heard nothing:
        self.successResultOf(store.revoke_session("logged-out"))
        self.successResultOf(store.remove_device(alice.id, "d3"))
        self.successResultOf(store.set_status(bob.id, "suspended"))
        ended = self.successResultOf(recheck_sessions(presence, store, clock))
        self.assertEqual(ended, 3)
        self.assertEqual(
            {f: bool(m.revoked) for f, m in minds.items()},
            {"kept": False, "logged-out": True, "removed-device": True, "suspended": True},
        )
        self.assertTrue(presence.is_online(alice.id))
