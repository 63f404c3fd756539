"""Delivery with fake minds: who gets which bytes, encoded how often.

Presence, the room caches and the bus are the real ones (shtalk.server.chat), sharing
one fan-out cache as compose connects them; the minds record what they are given.
"""

from __future__ import annotations

import json
from typing import Any, cast

from twisted.trial.unittest import SynchronousTestCase

from shtalk.server.chat.delivery import LocalBus
from shtalk.server.chat.fanout import FanOutCache
from shtalk.server.chat.presence import Presence
from shtalk.server.chat.rooms import Rooms
from shtalk.server.chat.users import Users
from shtalk.server.iserver import IStore
from shtalk.server.store.records import StoredMessage


class FakeMind:
    def __init__(self) -> None:
        self.lines: list[tuple[int, bytes]] = []

    def deliver(self, seq: int, line: bytes) -> None:
        self.lines.append((seq, line))

    def send_bytes(self, data: bytes) -> None:
        self.lines.append((0, data))


def message(
    seq: int,
    mailbox: str,
    sender: tuple[int, str] = (1, "a1"),
    envelope: bytes | None = b"common",
    envelopes: dict[tuple[int, str], bytes] | None = None,
) -> StoredMessage:
    return StoredMessage(
        seq=seq,
        mailbox=mailbox,
        sender_id=sender[0],
        sender_device=sender[1],
        client_id=f"c{seq}",
        ts=1000,
        expires_at=None,
        target="room:general" if mailbox.startswith("r:") else "user:bob",
        envelope=envelope,
        envelopes=envelopes or {},
    )


class RouterTests(SynchronousTestCase):
    def setUp(self) -> None:
        fanout = FanOutCache()
        no_store = cast(IStore, None)  # every look-up here hits the caches
        users = Users(no_store)
        for uid, name in {1: "alice", 2: "bob", 3: "carol"}.items():
            users.learn(uid, name)
        self.presence = Presence(fanout)
        self.rooms = Rooms(no_store, users, fanout)
        self.bus = LocalBus(self.presence, self.rooms, users, fanout)
        self.minds: dict[tuple[int, str], FakeMind] = {}
        for uid, dev in ((1, "a1"), (1, "a2"), (2, "b1"), (3, "c1")):
            mind = FakeMind()
            self.minds[(uid, dev)] = mind
            self.presence.attach(uid, dev, mind)  # type: ignore[arg-type]
        self.rooms.members[10] = {1: "owner", 2: "member"}

    def last_gone(self, mind: FakeMind) -> bool:
        """Detach; whether that was the user's last connection."""
        gone = self.presence.detach(mind)  # type: ignore[arg-type]
        assert gone is not None
        return gone[1]

    def got(self, uid: int, dev: str) -> list[dict[str, Any]]:
        return [json.loads(line) for _, line in self.minds[(uid, dev)].lines]

    def test_room_fanout_skips_sender_device_and_non_members(self) -> None:
        self.bus.publish(message(5, "r:10"))
        self.assertEqual(self.got(1, "a1"), [])
        self.assertEqual([m["seq"] for m in self.got(1, "a2")], [5])
        self.assertEqual([m["seq"] for m in self.got(2, "b1")], [5])
        self.assertEqual(self.got(3, "c1"), [])
        push = self.got(2, "b1")[0]
        self.assertEqual(push["from"], {"user": "alice", "device": "a1"})
        self.assertEqual(push["to"], {"room": "general"})

    def test_one_encoding_shared_by_every_recipient(self) -> None:
        self.bus.publish(message(6, "r:10"))
        a = self.minds[(1, "a2")].lines[0][1]
        b = self.minds[(2, "b1")].lines[0][1]
        self.assertIs(a, b)

    def test_device_specific_envelopes(self) -> None:
        self.bus.publish(message(7, "u:2", envelope=None, envelopes={(2, "b1"): b"only-b1"}))
        self.assertEqual(len(self.got(2, "b1")), 1)
        self.bus.publish(message(8, "u:1", envelope=None, envelopes={(2, "b1"): b"x"}))
        # Alice's other device has no envelope of its own and there is no common one.
        self.assertEqual(self.got(1, "a2"), [])

    def test_presence_bookkeeping(self) -> None:
        mind = self.minds[(1, "a1")]
        self.assertFalse(self.last_gone(mind))
        self.assertTrue(self.last_gone(self.minds[(1, "a2")]))
        self.assertFalse(self.presence.is_online(1))
        self.assertTrue(self.successResultOf(self.presence.attach(1, "a1", mind)))  # type: ignore[arg-type]

    def test_fanout_follows_membership_and_presence_changes(self) -> None:
        """The cached fan-out list is rebuilt after every change, never stale."""
        self.bus.publish(message(20, "r:10"))
        members = self.rooms.members[10]
        members[3] = "member"  # carol joins
        self.bus.publish(message(21, "r:10"))
        del members[2]  # bob is kicked
        self.bus.publish(message(22, "r:10"))
        self.presence.detach(self.minds[(1, "a2")])  # type: ignore[arg-type]
        self.bus.publish(message(23, "r:10"))
        late = FakeMind()
        self.presence.attach(3, "c2", late)  # type: ignore[arg-type]
        members.pop(1)  # alice leaves
        self.bus.publish(message(24, "r:10", sender=(3, "c1")))
        seqs = {k: [m["seq"] for m in self.got(*k)] for k in self.minds}
        self.assertEqual(seqs[(2, "b1")], [20, 21])
        self.assertEqual(seqs[(3, "c1")], [21, 22, 23])
        self.assertEqual(seqs[(1, "a2")], [20, 21, 22])
        self.assertEqual(seqs[(1, "a1")], [])
        self.assertEqual([s for s, _ in late.lines], [24])

    def test_member_maps_refuse_bulk_changes(self) -> None:
        # Bulk changes would bypass the fan-out cache's change count.
        with self.assertRaises(TypeError):
            self.rooms.members[10].update({3: "member"})
        with self.assertRaises(TypeError):
            self.rooms.members.setdefault(11, {1: "owner"})
        # A room dropped from the cache is no longer a fan-out target.
        self.rooms.members.pop(10)
        self.bus.publish(message(30, "r:10"))
        self.assertEqual(self.got(2, "b1"), [])
