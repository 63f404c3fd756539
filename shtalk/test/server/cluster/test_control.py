"""The control channel's events and the presence relay's bookkeeping, without Redis.

What a peer's event does here (and what a forged, stale or unknown one does not), and
which relay calls `Presence` makes, on the test clock.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from shtalk.server.chat.fanout import FanOutCache
from shtalk.server.chat.presence import Presence
from shtalk.server.cluster.control import (
    MAX_AGE,
    BadEvent,
    ControlChannel,
    ControlListener,
    control_key,
)
from shtalk.server.cluster.presence import presence_handlers
from shtalk.server.config.cluster import ClusterSection

KEY = control_key(b"k" * 32)


class Mind:
    device_id = "d"
    device_label = ""

    def __init__(self, presence: Presence | None = None) -> None:
        self.presence = presence
        self.lines: list[bytes] = []
        self.revoked: list[str] = []

    def send_bytes(self, data: bytes) -> None:
        self.lines.append(data)

    def deliver(self, seq: int, line: bytes) -> None:
        self.lines.append(line)

    def session_revoked(self, reason: str) -> None:
        self.revoked.append(reason)
        if self.presence is not None:
            self.presence.detach(self)  # type: ignore[arg-type]


class Published:
    """What a channel handed to Redis (the command connection's ``publish``)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def publish(self, channel: str, data: bytes) -> Deferred[int]:
        self.sent.append((channel, data))
        return succeed(1)


class ControlEventTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(1_000_000)
        self.redis_a = Published()
        self.a = ControlChannel(self.redis_a, "t:", "a", KEY, self.clock)
        self.b = ControlChannel(Published(), "t:", "b", KEY, self.clock)
        self.presence = Presence(FanOutCache())
        self.listener = ControlListener(
            self.b, presence_handlers(self.presence), "redis://127.0.0.1:1/0", self.clock,
            self.clock, ClusterSection(),
        )

    def online(self, uid: int, device: str, family: str) -> Mind:
        mind = Mind(self.presence)
        self.presence.attach(uid, device, mind)  # type: ignore[arg-type]
        self.presence.bind_family(mind, family)  # type: ignore[arg-type]
        return mind

    def deliver(self, data: bytes) -> None:
        self.listener.received(b"t:control", data)

    def test_a_peers_revocation_ends_the_session_here(self) -> None:
        kept, ended = self.online(1, "d1", "F1"), self.online(1, "d2", "F2")
        self.a.publish("presence.revoke_families", {"families": ["F2"], "reason": "logged out"})
        [(channel, data)] = self.redis_a.sent
        self.assertEqual(channel, "t:control")
        self.deliver(data)
        self.assertEqual((kept.revoked, ended.revoked), ([], ["logged out"]))
        self.assertEqual(self.listener.applied, 1)

    def test_lines_and_user_and_device_revocations(self) -> None:
        a1, a2, b1 = self.online(1, "a1", "F"), self.online(1, "a2", "G"), self.online(2, "b1", "H")
        self.deliver(self.a.encode("presence.line", {"users": [2, 3], "line": "{\"x\":1}\n"}))
        self.assertEqual(b1.lines, [b'{"x":1}\n'])
        self.deliver(self.a.encode("presence.revoke_device",
                                   {"user": 1, "device": "a2", "reason": "removed"}))
        self.assertEqual((a1.revoked, a2.revoked), ([], ["removed"]))
        self.deliver(self.a.encode("presence.revoke_user", {"user": 1, "reason": "suspended"}))
        self.assertEqual(a1.revoked, ["suspended"])
        self.assertFalse(self.presence.is_online(1))

    def test_a_forged_event_is_refused(self) -> None:
        mind = self.online(1, "d1", "F")
        forger = ControlChannel(Published(), "t:", "a", control_key(b"x" * 32), self.clock)
        forged = forger.encode("presence.revoke_user", {"user": 1, "reason": "pwned"})
        self.deliver(forged)
        genuine = self.a.encode("presence.revoke_user", {"user": 1, "reason": "suspended"})
        tampered = genuine[:-3] + b'99}'
        self.deliver(tampered)
        self.assertEqual(mind.revoked, [])
        self.assertEqual(self.listener.rejected, 2)
        self.assertRaises(BadEvent, self.b.decode, b"short")

    def test_a_stale_event_is_refused(self) -> None:
        mind = self.online(1, "d1", "F")
        old = self.a.encode("presence.revoke_user", {"user": 1, "reason": "replayed"})
        self.clock.advance(MAX_AGE + 1)
        self.deliver(old)
        self.assertEqual((mind.revoked, self.listener.rejected), ([], 1))

    def test_own_events_and_unknown_kinds_do_nothing_here(self) -> None:
        mind = self.online(1, "d1", "F")
        self.deliver(self.b.encode("presence.revoke_user", {"user": 1, "reason": "mine"}))
        self.deliver(self.a.encode("from.a.newer.peer", {"user": 1}))
        self.assertEqual((mind.revoked, self.listener.applied, self.listener.rejected),
                         ([], 0, 0))

    def test_a_failing_handler_is_logged_and_the_next_event_still_applies(self) -> None:
        mind = self.online(1, "d1", "F")
        self.deliver(self.a.encode("presence.revoke_user", {"user": "not a number",
                                                           "reason": "x"}))
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.deliver(self.a.encode("presence.revoke_user", {"user": 1, "reason": "y"}))
        self.assertEqual(mind.revoked, ["y"])

    def test_events_hold_no_secret_in_their_repr_and_are_json(self) -> None:
        data = self.a.encode("users.forget", {"key": "alice"})
        body = json.loads(data[32:])
        self.assertEqual((body["n"], body["k"], body["p"]), ("a", "users.forget", {"key": "alice"}))
        self.assertNotIn(KEY.hex(), repr(self.a))
        self.assertNotIn(repr(KEY), repr(self.a))

    def test_publish_never_raises_when_redis_is_down(self) -> None:
        class Down:
            def publish(self, channel: str, data: bytes) -> Any:
                raise ConnectionError("Not connected")

        channel = ControlChannel(Down(), "t:", "a", KEY, self.clock)
        channel.publish("users.forget", {"key": "alice"})
        self.assertEqual((channel.published, channel.failed), (0, 1))


class Relay:
    """An IPresenceRelay that records what Presence asks and says the cluster agrees."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def device_up(self, user_id: int, device_id: str, first_here: bool) -> Deferred[bool]:
        self.calls.append(("up", user_id, device_id, first_here))
        return succeed(first_here)

    def device_down(self, user_id: int, device_id: str, last_here: bool) -> Deferred[bool]:
        self.calls.append(("down", user_id, device_id, last_here))
        return succeed(last_here)

    def online_elsewhere(self, user_ids: Any) -> Deferred[set[int]]:
        self.calls.append(("online", sorted(user_ids)))
        return succeed({9})

    def devices_elsewhere(self, user_id: int) -> Deferred[set[str]]:
        return succeed({"far"})

    def send_to_users(self, user_ids: Any, line: bytes) -> None:
        self.calls.append(("line", list(user_ids), line))

    def revoke_families(self, families: Any, reason: str) -> None:
        self.calls.append(("families", list(families), reason))

    def revoke_device(self, user_id: int, device_id: str, reason: str) -> None:
        self.calls.append(("device", user_id, device_id, reason))

    def revoke_user(self, user_id: int, reason: str) -> None:
        self.calls.append(("user", user_id, reason))


class PresenceRelayTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.relay = Relay()
        self.presence = Presence(FanOutCache(), self.relay)  # type: ignore[arg-type]

    def test_a_device_goes_down_once_its_last_connection_here_goes(self) -> None:
        one, two, other = Mind(), Mind(), Mind()
        for mind, dev in ((one, "d1"), (two, "d1"), (other, "d2")):
            self.presence.attach(1, dev, mind)  # type: ignore[arg-type]
        departure = self.presence.detach(one)  # type: ignore[arg-type]
        assert departure is not None
        self.assertFalse(self.successResultOf(departure.last_anywhere))
        self.presence.detach(two)  # type: ignore[arg-type]
        last = self.presence.detach(other)  # type: ignore[arg-type]
        assert last is not None
        self.assertTrue(last.last_here)
        self.assertEqual(self.relay.calls, [
            ("up", 1, "d1", True), ("up", 1, "d1", False), ("up", 1, "d2", False),
            ("down", 1, "d1", False), ("down", 1, "d2", True),
        ])

    def test_revocations_and_lines_apply_here_then_go_to_the_peers(self) -> None:
        mind = Mind(self.presence)
        self.presence.attach(1, "d1", mind)  # type: ignore[arg-type]
        self.presence.bind_family(mind, "F")  # type: ignore[arg-type]
        self.presence.send_to_users(iter([1, 2]), b"hi\n")
        self.presence.revoke_families(iter(["F"]), "gone")
        self.assertEqual((mind.lines, mind.revoked), ([b"hi\n"], ["gone"]))
        self.presence.revoke_device(1, "d1", "removed")
        self.presence.revoke_user(1, "deleted")
        told = [c for c in self.relay.calls if c[0] not in ("up", "down")]
        self.assertEqual(told, [
            ("line", [1, 2], b"hi\n"), ("families", ["F"], "gone"),
            ("device", 1, "d1", "removed"), ("user", 1, "deleted"),
        ])

    def test_online_anywhere_asks_the_peers_only_about_the_others(self) -> None:
        self.presence.attach(1, "d1", Mind())  # type: ignore[arg-type]
        self.assertEqual(self.successResultOf(self.presence.online_among([1, 2, 9])), {1, 9})
        self.assertEqual(self.relay.calls[-1], ("online", [2, 9]))
        self.assertEqual(self.successResultOf(self.presence.online_among([1])), {1})
        self.assertEqual(self.relay.calls[-1], ("online", [2, 9]))
        self.assertEqual(
            self.successResultOf(self.presence.devices_online_anywhere(1)), {"d1", "far"}
        )
