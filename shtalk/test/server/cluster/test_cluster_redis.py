"""Two processes' control and presence in one test process, on the real Redis.

Each `Node` is what one server process builds (command connection, control channel and
listener, presence with its cluster relay, heartbeats), under a random prefix per test
so that parallel runs never meet; the prefix's keys are deleted afterwards.  Skipped
when no Redis answers on 127.0.0.1:6379, failed then if SHTALK_REQUIRE_REDIS=1.
"""

from __future__ import annotations

import os
import random
import secrets
import socket
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks, succeed
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from shtalk.server.chat.audience import Audience
from shtalk.server.chat.fanout import FanOutCache
from shtalk.server.chat.presence import Presence
from shtalk.server.chat.rooms import Rooms
from shtalk.server.chat.users import Users
from shtalk.server.cluster import parts, redisconn
from shtalk.server.cluster.control import ControlChannel, ControlListener, control_key
from shtalk.server.cluster.nodes import NodeWatch
from shtalk.server.cluster.presence import ClusterRelay, presence_handlers
from shtalk.server.config.cluster import ClusterSection
from shtalk.server.store.memory import MemoryStore

URL = "redis://127.0.0.1:6379/0"
STORAGE_KEY = secrets.token_bytes(32)
KEY = control_key(STORAGE_KEY)


def need_redis(test: TestCase) -> None:
    try:
        socket.create_connection(("127.0.0.1", 6379), timeout=1).close()
        return
    except OSError:
        why = "no Redis on 127.0.0.1:6379"
    if os.environ.get("SHTALK_REQUIRE_REDIS") == "1":
        test.fail(f"{why}, and SHTALK_REQUIRE_REDIS=1 requires it")
    raise SkipTest(f"{why} (start redis-server; CI sets SHTALK_REQUIRE_REDIS=1)")


class Mind:
    device_id = "d"
    device_label = ""

    def __init__(self, presence: Presence) -> None:
        self.presence = presence
        self.lines: list[bytes] = []
        self.revoked: Deferred[str] = Deferred()

    def send_bytes(self, data: bytes) -> None:
        self.lines.append(data)

    def deliver(self, seq: int, line: bytes) -> None:
        self.lines.append(line)

    def session_revoked(self, reason: str) -> None:
        self.presence.detach(self)  # type: ignore[arg-type]
        self.revoked.callback(reason)


class Node:
    """One server process's cluster parts."""

    def __init__(self, name: str, settings: ClusterSection) -> None:
        self.name = name
        self.redis = redisconn.commands(URL, timeout=2.0)
        self.control = ControlChannel(self.redis, settings.prefix, name, KEY, reactor)
        self.relay = ClusterRelay(self.redis, self.control, settings.prefix, reactor)
        self.presence = Presence(FanOutCache(), self.relay)
        self.listener = ControlListener(
            self.control, presence_handlers(self.presence), URL, reactor, reactor, settings
        )
        self.online: list[int] = []
        self.offline: list[int] = []
        self.died: list[str] = []
        self.watch = NodeWatch(
            self.redis, self.relay, self.presence, settings, reactor,
            on_online=self.online.append, on_offline=self.offline.append,
            on_peer_died=[self.died.append],
        )

    def attach(self, uid: int, device: str, family: str = "") -> tuple[Mind, Deferred[bool]]:
        mind = Mind(self.presence)
        first = self.presence.attach(uid, device, mind)  # type: ignore[arg-type]
        if family:
            self.presence.bind_family(mind, family)  # type: ignore[arg-type]
        return mind, first

    def last_gone(self, mind: Mind) -> Deferred[bool]:
        departure = self.presence.detach(mind)  # type: ignore[arg-type]
        assert departure is not None
        return departure.last_anywhere


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


@inlineCallbacks
def until(check: Callable[[], bool], within: float, step: float = 0.02) -> Any:
    """Wait for a condition reached through Redis (another connection's delivery)."""
    waited = 0.0
    while not check():
        if waited >= within:
            return False
        yield sleep(step)
        waited += step
    return True


class ClusterTestCase(TestCase):
    timeout = 30
    settings: ClusterSection

    def setUp(self) -> Any:
        need_redis(self)
        self.prefix = f"shtalk-test:{secrets.token_hex(6)}:"
        self.settings = ClusterSection(
            redis_url=URL, prefix=self.prefix, heartbeat_interval=0.2, node_timeout=0.6
        )
        self.nodes: list[Node] = []
        self.nodes_redis: list[Any] = []
        self.addCleanup(self._cleanup)

    def node(self, name: str, listen: bool = True, watch: bool = False) -> Any:
        node = Node(name, self.settings)
        self.nodes.append(node)
        if listen:
            node.listener.startService()
        if watch:
            node.watch.startService()
        if not listen:
            return succeed(node)
        ready = until(lambda: node.listener.subscriber.ready, 5)
        return ready.addCallback(lambda _: node)

    @inlineCallbacks
    def _cleanup(self) -> Any:
        for node in self.nodes:
            if node.watch.running:
                yield node.watch.stopService()
            if node.listener.running:
                yield node.listener.stopService()
        connections = [node.redis for node in self.nodes] + self.nodes_redis
        if connections:
            keys = yield connections[0].keys(self.prefix + "*")
            if keys:
                yield connections[0].delete(*keys)
        for redis in connections:
            redis.disconnect()


class ControlAcrossProcessesTests(ClusterTestCase):
    @inlineCallbacks
    def test_a_revocation_on_one_process_ends_the_session_on_the_other(self) -> Any:
        a = yield self.node("a")
        b = yield self.node("b")
        kept, _ = b.attach(1, "d1", "F1")
        ended, _ = b.attach(1, "d2", "F2")
        a.presence.revoke_families(["F2"], "this session was logged out elsewhere")
        reason = yield ended.revoked
        self.assertEqual(reason, "this session was logged out elsewhere")
        self.assertFalse(kept.revoked.called)
        self.assertEqual(list(b.presence.families), ["F1"])

    @inlineCallbacks
    def test_user_and_device_revocations_and_lines_reach_the_other_process(self) -> Any:
        a = yield self.node("a")
        b = yield self.node("b")
        phone, _ = b.attach(5, "phone")
        laptop, _ = b.attach(5, "laptop")
        a.presence.send_to_users([5, 6], b'{"type":"presence"}\n')
        a.presence.revoke_device(5, "phone", "this device was removed from the account")
        reason = yield phone.revoked
        self.assertEqual(reason, "this device was removed from the account")
        self.assertEqual(laptop.lines, [b'{"type":"presence"}\n'])
        a.presence.revoke_user(5, "this account was suspended")
        reason = yield laptop.revoked
        self.assertEqual(reason, "this account was suspended")
        self.assertFalse(b.presence.is_online(5))

    @inlineCallbacks
    def test_a_process_applies_its_own_events_once(self) -> Any:
        a = yield self.node("a")
        b = yield self.node("b")
        mind, _ = a.attach(3, "d")
        b_mind, _ = b.attach(3, "e")
        a.presence.send_to_users([3], b"once\n")
        yield until(lambda: b_mind.lines == [b"once\n"], 5)
        yield sleep(0.1)  # a's own copy came back from Redis by now, and was skipped
        self.assertEqual((mind.lines, b_mind.lines), ([b"once\n"], [b"once\n"]))
        self.assertEqual(a.listener.applied, 0)

    @inlineCallbacks
    def test_an_event_from_someone_without_the_key_is_refused(self) -> Any:
        a = yield self.node("a")
        b = yield self.node("b")
        mind, _ = b.attach(9, "d")
        forger = ControlChannel(a.redis, self.prefix, "a", control_key(b"x" * 32), reactor)
        forger.publish("presence.revoke_user", {"user": 9, "reason": "forged"})
        a.presence.send_to_users([9], b"genuine\n")  # published after the forged one
        yield until(lambda: mind.lines == [b"genuine\n"], 5)
        self.assertFalse(mind.revoked.called)
        self.assertEqual(b.listener.rejected, 1)

    @inlineCallbacks
    def test_after_the_subscription_comes_back_the_resubscribed_hooks_run(self) -> Any:
        a = yield self.node("a")
        hooks: list[str] = []
        a.listener.on_resubscribed.append(lambda: hooks.append("caught up"))
        a.listener.subscriber.drop_connection()
        came_back = yield until(lambda: a.listener.subscriber.confirmations == 2, 10)
        self.assertTrue(came_back)
        self.assertEqual(hooks, ["caught up"])


class PresenceAcrossProcessesTests(ClusterTestCase):
    @inlineCallbacks
    def test_a_device_on_each_process_online_once_offline_once(self) -> Any:
        a = yield self.node("a", listen=False)
        b = yield self.node("b", listen=False)
        on_a, first_a = a.attach(7, "laptop")
        on_b, first_b = b.attach(7, "phone")
        firsts = yield DeferredList([first_a, first_b])
        self.assertEqual(sorted(ok for _, ok in firsts), [False, True])  # whichever came first
        seen = yield b.presence.online_among([7, 8])
        self.assertEqual(seen, {7})
        devices = yield a.presence.devices_online_anywhere(7)
        self.assertEqual(devices, {"laptop", "phone"})
        gone_a = yield a.last_gone(on_a)
        self.assertFalse(gone_a)
        seen = yield a.presence.online_among([7])
        self.assertEqual(seen, {7})
        gone_b = yield b.last_gone(on_b)
        self.assertTrue(gone_b)
        seen = yield a.presence.online_among([7])
        self.assertEqual(seen, set())

    @inlineCallbacks
    def test_simultaneous_arrivals_and_departures_count_once(self) -> Any:
        a = yield self.node("a", listen=False)
        b = yield self.node("b", listen=False)
        for uid in range(100, 150):
            (ma, da), (mb, db) = a.attach(uid, "x"), b.attach(uid, "y")
            ups = yield DeferredList([da, db])
            self.assertEqual(sum(ok for _, ok in ups), 1, uid)
            downs = yield DeferredList([a.last_gone(ma), b.last_gone(mb)])
            self.assertEqual(sum(ok for _, ok in downs), 1, uid)

    @inlineCallbacks
    def test_random_arrivals_and_departures_on_three_processes_announce_consistently(
        self,
    ) -> Any:
        """Seeded random batches of concurrent attaches and detaches on three processes:
        after each batch, every user's announcements (online minus offline) say exactly
        whether any of their devices is connected anywhere."""
        nodes = []
        for name in ("a", "b", "c"):
            nodes.append((yield self.node(name, listen=False)))
        rng = random.Random(1414)
        connected: dict[tuple[int, int, str], list[Mind]] = {}
        balance = {uid: 0 for uid in range(5)}
        for _ in range(150):
            pending: list[tuple[int, int, Deferred[bool]]] = []
            for _ in range(rng.randint(1, 8)):
                n, uid, dev = rng.randrange(3), rng.randrange(5), rng.choice("pq")
                minds = connected.setdefault((n, uid, dev), [])
                if minds and rng.random() < 0.6:
                    pending.append((uid, -1, nodes[n].last_gone(minds.pop())))
                else:
                    mind, first = nodes[n].attach(uid, dev)
                    minds.append(mind)
                    pending.append((uid, +1, first))
            results = yield DeferredList([d for _, _, d in pending])
            for (uid, sign, _), (_, told) in zip(pending, results, strict=True):
                balance[uid] += sign if told else 0
            for uid in balance:
                anywhere = any(m for (_, u, _), m in connected.items() if u == uid)
                self.assertEqual(balance[uid], int(anywhere), (uid, balance))

    @inlineCallbacks
    def test_a_dead_process_is_cleared_by_one_survivor_and_its_users_go_offline(self) -> Any:
        a = yield self.node("a", listen=False, watch=True)
        b = yield self.node("b", listen=False, watch=True)
        c = yield self.node("c", listen=False, watch=True)
        yield until(lambda: min(n.watch.beats for n in (a, b, c)) >= 1, 5)
        _, only_on_a = a.attach(20, "d")
        _, both_a = a.attach(21, "d")
        _, both_b = b.attach(21, "e")
        yield DeferredList([only_on_a, both_a, both_b])
        a.watch._loop.stop()  # a stops beating as a killed process would; its state stays
        started = reactor.seconds()
        cleared = yield until(lambda: b.offline + c.offline == [20], 5)
        took = reactor.seconds() - started
        self.assertTrue(cleared, (b.offline, c.offline))
        # Its key expires after node_timeout; a survivor's next beat clears it (the rest
        # of the bound is room for a loaded machine).
        self.assertLess(took, self.settings.node_timeout + 5 * self.settings.heartbeat_interval)
        self.assertEqual(sorted(b.died + c.died), ["a"])
        yield sleep(3 * self.settings.heartbeat_interval)
        self.assertEqual(b.offline + c.offline, [20])  # once, by one survivor
        seen = yield b.presence.online_among([20, 21])
        self.assertEqual(seen, {21})
        devices = yield b.presence.devices_online_anywhere(21)
        self.assertEqual(devices, {"e"})

        # a was only paused: it finds itself cleared and puts its devices back.
        a.watch._loop.start(self.settings.heartbeat_interval)
        back = yield until(lambda: a.online == [20], 5)
        self.assertTrue(back, a.online)
        seen = yield b.presence.online_among([20])
        self.assertEqual(seen, {20})

    @inlineCallbacks
    def test_a_restarted_process_clears_what_its_predecessor_left(self) -> Any:
        old = yield self.node("n1", listen=False)
        _, first = old.attach(30, "d")
        yield first
        new = yield self.node("n1", listen=False, watch=True)
        yield until(lambda: new.offline == [30], 5)
        self.assertEqual(new.offline, [30])
        seen = yield new.presence.online_among([30])
        self.assertEqual(seen, set())

    @inlineCallbacks
    def test_what_redis_lost_comes_back_and_what_it_missed_goes(self) -> Any:
        a = yield self.node("a", listen=False, watch=True)
        b = yield self.node("b", listen=False)
        yield until(lambda: a.watch.beats >= 1, 5)
        _, first = a.attach(60, "d")
        yield first
        # Redis restarted without its data: a finds its registry entry gone.
        yield a.redis.delete(a.relay.key(60), self.prefix + "nodes")
        back = yield until(lambda: a.online == [60], 5)
        self.assertTrue(back)
        seen = yield b.presence.online_among([60])
        self.assertEqual(seen, {60})
        # A departure Redis never heard of (it was away): the next resync drops it.
        yield a.redis.hset(a.relay.key(61), "a|old", "1")
        yield a.redis.sadd(a.relay.node_users, "61")
        a.watch._stale = True  # as after a beat that failed
        yield until(lambda: a.offline == [61], 5)
        self.assertEqual(a.offline, [61])
        seen = yield b.presence.online_among([60, 61])
        self.assertEqual(seen, {60})

    @inlineCallbacks
    def test_a_clean_stop_is_noticed_at_the_next_beat(self) -> Any:
        # A long timeout: noticed well before the key would have expired.
        self.settings = ClusterSection(
            redis_url=URL, prefix=self.prefix, heartbeat_interval=0.2, node_timeout=10.0
        )
        a = yield self.node("a", listen=False, watch=True)
        b = yield self.node("b", listen=False, watch=True)
        _, first = a.attach(40, "d")
        yield first
        yield until(lambda: a.watch.beats >= 1, 5)
        yield a.watch.stopService()
        started = reactor.seconds()
        yield until(lambda: b.offline == [40], 5)
        self.assertEqual(b.offline, [40])
        self.assertLess(reactor.seconds() - started, self.settings.node_timeout / 2)


class Process:
    """A process's chat parts as compose connects them in cluster mode (`parts`)."""

    def __init__(self, name: str, settings: ClusterSection, store: MemoryStore) -> None:
        named = ClusterSection(
            redis_url=settings.redis_url, prefix=settings.prefix, node_name=name,
            heartbeat_interval=settings.heartbeat_interval, node_timeout=settings.node_timeout,
        )
        self.links = parts.links(named, STORAGE_KEY, reactor)
        fanout = FanOutCache()
        self.users = Users(store, self.links.control)
        self.rooms = Rooms(store, self.users, fanout, self.links.control)
        self.presence = Presence(fanout, self.links.relay)
        self.audience = Audience(store, self.presence, self.rooms, self.users)
        self.died: list[str] = []
        self.services = parts.services(
            self.links, named, reactor, reactor, store, self.presence, self.users,
            self.rooms, self.audience, on_peer_died=[self.died.append],
        )
        self.listener, self.watch = self.services

    @inlineCallbacks
    def login(self, user_id: int, device: str) -> Any:
        """What the realm does: load the caches, attach, announce if first anywhere."""
        yield self.rooms.load_user(user_id)
        mind = Mind(self.presence)
        first = yield self.presence.attach(user_id, device, mind)  # type: ignore[arg-type]
        if first:
            yield self.audience.announce_presence(user_id, True)
        return mind


class AudienceAcrossProcessesTests(ClusterTestCase):
    @inlineCallbacks
    def process(self, name: str) -> Any:
        p = Process(name, self.settings, self.store)
        self.processes.append(p)
        for service in p.services:
            service.startService()
        yield until(lambda: p.listener.subscriber.ready and p.watch.beats > 0, 5)
        return p

    @inlineCallbacks
    def test_roommates_see_a_user_online_once_and_offline_when_their_process_dies(self) -> Any:
        self.store = MemoryStore(reactor)
        self.processes: list[Process] = []
        self.addCleanup(self._stop_processes)
        store = self.store
        alice = yield store.create_user("alice", "alice", "a@x.org", b"h", "active")
        carol = yield store.create_user("carol", "carol", "c@x.org", b"h", "active")
        room = yield store.create_room("r", "r", carol.id, False)
        yield store.add_member(room.id, alice.id, "member")
        a = yield self.process("a")
        b = yield self.process("b")
        watcher = yield a.login(carol.id, "c1")
        yield b.login(alice.id, "phone")
        online = b'{"type":"presence","user":"alice","status":"online"}'
        yield until(lambda: len(watcher.lines) >= 1, 5)
        yield a.login(alice.id, "laptop")  # second device, other process: no news
        snapshot = yield a.audience.presence_snapshot(carol.id)
        self.assertEqual([line.strip() for line in snapshot], [online])

        b.watch._loop.stop()  # b is killed: alice keeps her laptop on a
        yield until(lambda: a.died == ["b"], 5)
        self.assertEqual(a.died, ["b"])
        yield sleep(0.2)
        self.assertEqual([line.strip() for line in watcher.lines], [online])

        # Now alice's last device goes: offline, once.
        [(_, laptop)] = list(a.presence.minds_of(alice.id))
        gone = a.presence.detach(laptop)
        assert gone is not None
        last = yield gone.last_anywhere
        self.assertTrue(last)
        yield a.audience.announce_presence(alice.id, False)
        self.assertEqual(
            [line.strip() for line in watcher.lines],
            [online, b'{"type":"presence","user":"alice","status":"offline"}'],
        )

    @inlineCallbacks
    def test_a_dead_process_s_users_are_announced_offline_by_the_survivor(self) -> Any:
        self.store = MemoryStore(reactor)
        self.processes = []
        self.addCleanup(self._stop_processes)
        store = self.store
        alice = yield store.create_user("alice", "alice", "a@x.org", b"h", "active")
        carol = yield store.create_user("carol", "carol", "c@x.org", b"h", "active")
        room = yield store.create_room("r", "r", carol.id, False)
        yield store.add_member(room.id, alice.id, "member")
        a = yield self.process("a")
        b = yield self.process("b")
        watcher = yield a.login(carol.id, "c1")
        yield b.login(alice.id, "phone")
        yield until(lambda: len(watcher.lines) >= 1, 5)
        b.watch._loop.stop()
        killed = reactor.seconds()
        offline = b'{"type":"presence","user":"alice","status":"offline"}'
        yield until(lambda: len(watcher.lines) >= 2, 5)
        self.assertEqual(watcher.lines[-1].strip(), offline)
        self.assertLess(
            reactor.seconds() - killed,
            self.settings.node_timeout + 3 * self.settings.heartbeat_interval,
        )
        snapshot = yield a.audience.presence_snapshot(carol.id)
        self.assertEqual(snapshot, [])

    @inlineCallbacks
    def _stop_processes(self) -> Any:
        for p in self.processes:
            for service in reversed(p.services):
                if service.running:
                    yield service.stopService()
            self.nodes_redis.append(p.links.redis)
