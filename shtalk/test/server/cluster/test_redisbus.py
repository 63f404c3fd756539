"""RedisBus on the real Redis: two "processes" in this test process, one shared store.

Each test has its own channel prefix, so tests running at once (other helpers, CI) never
see each other's messages; nothing is flushed.
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.task import deferLater
from twisted.trial import unittest

from shtalk.server.cluster import codec
from shtalk.server.cluster.bus import RedisBus
from shtalk.server.store.mailbox import room_mailbox, user_mailbox
from shtalk.test.server.cluster.processes import (
    ChainStore,
    Process,
    need_redis,
    random_prefix,
    redis_command,
)

ALICE, BOB, CAROL = 1, 2, 3


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


class DroppingBus(RedisBus):
    """Publishes all but the changes whose seq is in ``drop`` (a publish Redis lost)."""

    drop: set[int]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.drop = set()
        real = self.publisher.publish

        def publish(channel: bytes, payload: bytes) -> None:
            seq = codec.decode(payload).seq
            if seq not in self.drop:
                real(channel, payload)

        self.publisher.publish = publish  # type: ignore[method-assign]


def dropping(p: Process) -> DroppingBus:
    assert isinstance(p.bus, DroppingBus)
    return p.bus


class RedisBusTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> Deferred[Any]:  # type: ignore[override]
        need_redis(self)
        self.store = ChainStore()
        self.store.names.update({ALICE: "alice", BOB: "bob", CAROL: "carol"})
        prefix = random_prefix()
        self.a = Process(self.store, prefix, "node-a", DroppingBus)
        self.b = Process(self.store, prefix, "node-b", DroppingBus)
        self.addCleanup(self.b.stop)
        self.addCleanup(self.a.stop)
        return gatherResults([self.a.start(), self.b.start()])

    def send(self, p: Process, mailbox: str, sender: int = ALICE, device: str = "a1") -> int:
        m = self.store.commit(mailbox, sender, device)
        p.bus.publish(m)
        return m.seq

    def test_hiredis_parses_the_replies(self) -> None:
        import hiredis

        proto = self.a.bus.subscriptions.proto
        self.assertIsInstance(proto._reader, hiredis.Reader)

    def test_both_connections_send_small_writes_at_once(self) -> None:
        """TCP_NODELAY: with Redis's replies off, Nagle's algorithm held each publish
        until Redis's delayed ACK came (milliseconds per message)."""
        import socket

        for proto in (self.a.bus.subscriptions.proto, self.a.bus.publisher.proto):
            sock = proto.transport.getHandle()
            self.assertTrue(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    @inlineCallbacks
    def test_message_committed_on_a_reaches_b_once_in_order(self) -> Any:
        bob = yield self.b.login(BOB, "b1")
        seqs = [self.send(self.a, user_mailbox(BOB)) for _ in range(50)]
        yield bob.wait(50)
        yield sleep(0.05)  # nothing more comes
        self.assertEqual(bob.seqs, seqs)
        self.assertEqual(self.store.reads, 0, "no gap: nothing read from the store")

    @inlineCallbacks
    def test_the_store_learns_the_mailbox_of_what_another_process_appended(self) -> Any:
        """So that the acks for it need no look-up in the store's write transaction;
        a process's own messages the store knows already."""
        bob_a = yield self.a.login(BOB, "b1")
        bob_b = yield self.b.login(BOB, "b2")
        seqs = [self.send(self.a, user_mailbox(BOB)) for _ in range(3)]
        yield gatherResults([bob_a.wait(3), bob_b.wait(3)])
        self.assertEqual(self.store.hinted, [(user_mailbox(BOB), s) for s in seqs])

    @inlineCallbacks
    def test_a_turns_publishes_are_one_write_and_redis_does_not_answer_them(self) -> Any:
        bob = yield self.b.login(BOB, "b1")
        pub = self.a.bus.publisher
        for _ in range(100):  # the connection's probe PUBLISH is answered
            if pub.counts:
                break
            yield sleep(0.01)
        self.assertEqual(pub.counts, 1)
        writes = pub.writes
        seqs = [self.send(self.a, user_mailbox(BOB)) for _ in range(200)]
        yield bob.wait(200)
        self.assertEqual(bob.seqs, seqs)
        self.assertEqual(pub.writes - writes, 1)
        yield sleep(0.05)
        self.assertEqual(pub.counts, 1, "a PUBLISH was answered")
        self.assertEqual(pub.refused, 0)

    @inlineCallbacks
    def test_a_write_larger_than_the_socket_takes_arrives_whole_and_in_order(self) -> Any:
        """Written straight to the socket, what it does not take goes through the
        transport's buffer, after what was written before it."""
        bob = yield self.b.login(BOB, "b1")
        box = user_mailbox(BOB)
        pub = self.a.bus.publisher
        writes = pub.writes
        seqs = []
        for i in range(16):
            m = self.store.commit(box, ALICE, "a1")
            seqs.append(m.seq)
            pub.publish(self.a.bus.channel(box), codec.encode(
                codec.MESSAGE, b"node-a", box, m.seq, m.prev_seq, ALICE, "a1",
                b"%d" % i * 100_000))  # 16 x 100-600 kB: more than one send() takes
        yield bob.wait(16, timeout=10)
        self.assertEqual(bob.seqs, seqs)
        self.assertEqual(pub.writes - writes, 1)
        self.assertEqual(self.store.reads, 0)

    @inlineCallbacks
    def test_a_publisher_refused_client_reply_still_publishes(self) -> Any:
        """An ACL user without ``client|reply``: the publisher's answers stay on, its
        publishes still arrive, and the refusals are counted."""
        user = random_prefix().rstrip(":").encode()
        password = secrets.token_hex(8).encode()
        reply = redis_command(b"ACL", b"SETUSER", user, b"on", b">" + password, b"~*",
                              b"&*", b"+@all", b"-client")
        if not reply.startswith(b"+OK"):
            raise unittest.SkipTest(f"this Redis does not take ACL users: {reply[:60]!r}")
        self.addCleanup(redis_command, b"ACL", b"DELUSER", user)
        url = f"redis://{user.decode()}:{password.decode()}@127.0.0.1:6379/0"
        c = Process(self.store, self.a.bus.channel_prefix.decode()[:-3], "node-c",
                    redis_url=url)
        self.addCleanup(c.stop)
        yield c.start()
        bob = yield self.b.login(BOB, "b1")
        m = self.store.commit(user_mailbox(BOB), ALICE, "a1")
        c.bus.publish(m)
        yield bob.wait(1)
        self.assertEqual(bob.seqs, [m.seq])
        for _ in range(100):
            if c.bus.publisher.refused:
                break
            yield sleep(0.01)
        self.assertGreaterEqual(c.bus.publisher.refused, 1)  # CLIENT REPLY OFF
        self.assertGreaterEqual(c.bus.publisher.counts, 2)  # the probe's, and m's

    @inlineCallbacks
    def test_attach_fires_after_redis_confirmed_each_subscription(self) -> Any:
        """Many logins at once (multi-channel SUBSCRIBEs back to back): when each one's
        attach fires, Redis already counts a subscriber on every one of its channels."""
        for rid in range(1, 6):
            for uid in range(10, 30):
                self.store.room_members.setdefault(rid, {})[uid] = "member"

        @inlineCallbacks
        def login(uid: int) -> Any:
            yield self.b.login(uid, "d")
            channels = [self.b.bus.channel(user_mailbox(uid))] + [
                self.b.bus.channel(room_mailbox(r)) for r in range(1, 6)]
            reply = redis_command(b"PUBSUB", b"NUMSUB", *channels)
            return reply

        replies = yield gatherResults([login(uid) for uid in range(10, 30)])
        for reply in replies:
            counts = [line for line in reply.split(b"\r\n") if line.startswith(b":")]
            self.assertEqual(counts, [b":1"] * 6, reply)

    @inlineCallbacks
    def test_a_local_message_waits_for_a_remote_earlier_one(self) -> Any:
        """Bob has a device on each process; carol (on B) writes, and that publish is
        lost; alice (on A) writes next: A delivers carol's message first."""
        bob_a = yield self.a.login(BOB, "b1")
        yield self.b.login(BOB, "b2")
        dropping(self.b).drop.add(self.store.seq + 1)
        first = self.send(self.b, user_mailbox(BOB), CAROL, "c1")
        second = self.send(self.a, user_mailbox(BOB))
        yield bob_a.wait(2)
        self.assertEqual(bob_a.seqs, [first, second])

    @inlineCallbacks
    def test_a_dropped_publish_is_read_from_the_store(self) -> Any:
        bob = yield self.b.login(BOB, "b1")
        dropping(self.a).drop.add(self.store.seq + 2)
        seqs = [self.send(self.a, user_mailbox(BOB)) for _ in range(3)]
        yield bob.wait(3)
        self.assertEqual(bob.seqs, seqs)
        self.assertEqual(self.b.bus.chains.fills, 1)

    @inlineCallbacks
    def test_published_while_the_subscriber_was_away_arrives_after_reconnecting(self) -> Any:
        """Redis cuts B's subscription off; the one message published meanwhile has no
        later one to show the gap: B's reconciliation after resubscribing finds it."""
        bob = yield self.b.login(BOB, "b1")
        first = self.send(self.a, user_mailbox(BOB))
        yield bob.wait(1)
        host = self.b.bus.subscriptions.proto.transport.getHost()
        redis_command(b"CLIENT", b"KILL", b"ADDR", f"{host.host}:{host.port}".encode())
        yield sleep(0.05)
        lost = self.send(self.a, user_mailbox(BOB))
        # Well before the periodic reconciliation (5 s): the one after reconnecting.
        yield bob.wait(2, timeout=2)
        self.assertEqual(bob.seqs, [first, lost])
        self.assertGreaterEqual(self.b.bus.subscriptions.connections, 2)

    @inlineCallbacks
    def test_publishes_while_the_publisher_was_cut_off_go_out_on_reconnect(self) -> Any:
        bob = yield self.b.login(BOB, "b1")
        first = self.send(self.a, user_mailbox(BOB))
        yield bob.wait(1)
        host = self.a.bus.publisher.transport.getHost()
        redis_command(b"CLIENT", b"KILL", b"ADDR", f"{host.host}:{host.port}".encode())
        yield sleep(0.05)
        later = [self.send(self.a, user_mailbox(BOB)) for _ in range(3)]
        yield bob.wait(4, timeout=2)  # before any reconciliation (5 s)
        self.assertEqual(bob.seqs, [first, *later])
        self.assertEqual(self.store.reads, 0)

    @inlineCallbacks
    def test_a_kick_is_in_force_before_the_next_message(self) -> Any:
        """Alice (on A) kicks bob; the kick's publish is lost; her next message still
        reaches carol on B and not bob: B re-reads the members before applying it."""
        for uid in (ALICE, BOB, CAROL):
            self.store.room_members.setdefault(7, {})[uid] = "member"
        yield self.a.login(ALICE, "a1")
        bob = yield self.b.login(BOB, "b1")
        carol = yield self.b.login(CAROL, "c1")
        box = room_mailbox(7)
        before = self.send(self.a, box)
        yield gatherResults([bob.wait(1), carol.wait(1)])
        link = self.store.change_member(7, BOB, joined=False)
        dropping(self.a).drop.add(link.seq)
        self.a.bus.membership_changed(link, 7, BOB, False)
        after = self.send(self.a, box)
        yield carol.wait(2)
        self.assertEqual(carol.seqs, [before, after])
        self.assertEqual(bob.seqs, [before])
        self.assertNotIn(BOB, self.b.rooms.members[7])

    @inlineCallbacks
    def test_kick_announced_on_the_bus_reloads_members(self) -> Any:
        """Dave (no device on B) is kicked on A: B's member list follows the kick
        before the next message is delivered, without reading any gap."""
        dave = 4
        for uid in (ALICE, CAROL, dave):
            self.store.room_members.setdefault(8, {})[uid] = "member"
        yield self.a.login(ALICE, "a1")
        carol = yield self.b.login(CAROL, "c1")
        self.assertIn(dave, self.b.rooms.members[8])
        link = self.store.change_member(8, dave, joined=False)
        self.a.bus.membership_changed(link, 8, dave, False)
        seen: list[bool] = []
        real = self.b.local.connections

        def connections(box: str) -> Any:
            seen.append(dave in self.b.rooms.members[8])
            return real(box)

        self.b.local.connections = connections  # type: ignore[method-assign]
        after = self.send(self.a, room_mailbox(8))
        yield carol.wait(1)
        self.assertEqual(carol.seqs, [after])
        self.assertEqual(seen, [False], "the message went out before the kick was known")
        self.assertEqual(self.store.reads, 0, "the link arrived: no gap to read")

    @inlineCallbacks
    def test_a_join_elsewhere_subscribes_the_users_devices_here(self) -> Any:
        """Bob joins a room on A while his other device is on B: B subscribes the room
        for him, and what is sent to it right after the join (before B's subscription
        is confirmed) reaches his device there too."""
        self.store.room_members[9] = {ALICE: "owner"}
        yield self.a.login(ALICE, "a1")
        yield self.a.login(BOB, "b1")
        bob_b = yield self.b.login(BOB, "b2")
        box = room_mailbox(9)
        link = self.store.change_member(9, BOB, joined=True)
        yield self.a.rooms.reload(9)  # as the avatar's rooms.joined would
        self.a.bus.membership_changed(link, 9, BOB, True)
        sent = [self.send(self.a, box) for _ in range(3)]
        yield bob_b.wait(3)
        self.assertEqual(bob_b.seqs, sent)
        self.assertIn(9, self.b.rooms.of_user[BOB])
        self.assertTrue(self.b.bus.chains.is_started(box))

    @inlineCallbacks
    def test_logout_unsubscribes_when_no_local_device_needs_it(self) -> Any:
        bob = yield self.b.login(BOB, "b1")
        bob2 = yield self.b.login(BOB, "b2")
        box = user_mailbox(BOB)
        self.b.logout(BOB, bob)
        self.assertIn(box, self.b.bus.chains)
        self.b.logout(BOB, bob2)
        self.assertNotIn(box, self.b.bus.chains)
        self.assertNotIn(self.b.bus.channel(box), self.b.bus.subscriptions.wanted)


class RedisDownTests(unittest.TestCase):
    """No Redis at all: a login waits `ATTACH_TIMEOUT`, then goes on (its backlog and
    the store still have every message) instead of hanging."""

    def test_attach_goes_on_without_confirmation(self) -> Any:
        from twisted.internet.testing import MemoryReactorClock

        from shtalk.server.cluster.bus import ATTACH_TIMEOUT

        store = ChainStore()
        # Connections that never complete, on a reactor of the test's own: nothing is
        # left trying to reach a Redis once the test is over.
        clock = MemoryReactorClock()
        p = Process(store, random_prefix(), "node-x")
        p.bus = RedisBus(p.local, store, p.rooms, clock, clock,  # type: ignore[arg-type]
                         "redis://127.0.0.1:1/0", "x:", "node-x", 0.05, 5.0)
        p.bus.startService()
        self.addCleanup(p.bus.stopService)
        box = user_mailbox(BOB)
        store.commit(box, ALICE, "a1")
        d = p.bus.attach(BOB)
        clock.advance(ATTACH_TIMEOUT - 0.1)
        self.assertNoResult(d)
        clock.advance(0.2)
        self.successResultOf(d)
        self.assertEqual(p.bus.chains.started(), {box: 1})
