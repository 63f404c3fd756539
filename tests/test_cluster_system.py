# mypy: disallow-untyped-calls=False
"""Two real ``twistd shtalk`` processes on one PostgreSQL and one Redis: one service.

What a user must not be able to tell: which process their peers are connected to.  A
direct or room message crosses processes; a kick on one is ordered before a later send on
the other; one ``client_id`` sent to both is stored once; a user with a device on each is
online once; a message the bus lost reaches its recipient anyway (from the store).
The failure tests (a process SIGKILLed, Redis restarted, both under load) are in
`tests.test_cluster_failover`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.trial import unittest

from tests.clusterkit import Cluster
from tests.harness import (
    Session,
    b64,
    fresh_client_id,
    fresh_name,
    register_and_login,
    sleep,
    wait_until,
)


def bodies(pushes: list[dict[str, Any]]) -> list[str]:
    from tests.harness import unb64

    return [unb64(p["envelope"]).decode() for p in pushes]


class ClusterTests(unittest.TestCase):
    """One two-process cluster per test class (trial has no setUpClass: the first test
    starts it, the last stops it)."""

    timeout = 90
    cluster: Cluster | None = None
    _left = 0

    def setUp(self) -> None:
        cls = type(self)
        if cls.cluster is None:
            cls._left = len([n for n in dir(cls) if n.startswith("test_")])
            cls.cluster = Cluster(2, test=self).start()
        self.addCleanup(self._done)

    def _done(self) -> None:
        cls = type(self)
        cls._left -= 1
        if cls._left <= 0 and cls.cluster is not None:
            cls.cluster.cleanup()
            cls.cluster = None

    @property
    def nodes(self) -> list[Any]:
        assert self.cluster is not None
        return self.cluster.servers

    @inlineCallbacks
    def on(self, node: int, user: str | None = None, device: str = "dev1",
           register: bool = True) -> Any:
        s = yield register_and_login(self.nodes[node], user, device, register=register)
        self.addCleanup(s.client.disconnect)
        return s

    @inlineCallbacks
    def test_direct_message_across_processes(self) -> Any:
        alice = yield self.on(0)
        bob = yield self.on(1)
        sent = yield alice.client.send_user(bob.user, b"hello from node0")
        push = yield bob.client.next_push("message", timeout=5)
        self.assertEqual(push["seq"], sent["seq"])
        self.assertEqual(bodies([push]), ["hello from node0"])
        self.assertEqual(push["from"], {"user": alice.user, "device": "dev1"})
        # And back, the other way.
        yield bob.client.send_user(alice.user, b"hello from node1")
        back = yield alice.client.next_push("message", timeout=5)
        self.assertEqual(bodies([back]), ["hello from node1"])

    @inlineCallbacks
    def test_pushes_name_senders_the_receiving_process_never_met(self) -> Any:
        """The client checks the sender the push names against the envelope's: a large
        message (read back from the store by the receiving process) and the backlog at a
        login name a sender who only ever was on the other process."""
        alice = yield self.on(0)
        bob = yield self.on(1)
        big = b"x" * 9000  # over the bus's inline limit: only its header crosses Redis
        yield alice.client.send_user(bob.user, big)
        push = yield bob.client.next_push("message", timeout=5)
        self.assertEqual(push["from"], {"user": alice.user, "device": "dev1"})
        self.assertEqual(bodies([push]), [big.decode()])
        carol = yield self.on(0)
        dave = yield self.on(0)
        yield dave.client.disconnect()
        yield carol.client.send_user(dave.user, b"while you were away")
        back = yield self.on(1, dave.user, "dev1", register=False)
        self.assertEqual([m["from"] for m in back.backlog],
                         [{"user": carol.user, "device": "dev1"}])

    @inlineCallbacks
    def test_room_messages_in_one_order_everywhere(self) -> Any:
        """Members on both processes, senders on both: every member sees every message
        once, and every member sees them in the same (seq) order."""
        owner = yield self.on(0)
        members: list[Session] = [owner]
        room = fresh_name("r")
        yield owner.client.ok("room_create", room=room)
        for i in range(3):
            s = yield self.on(i % 2)
            yield s.client.ok("room_join", room=room)
            members.append(s)
        yield sleep(0.3)
        for s in members:
            s.client.drain()
        sends = []
        for k in range(10):
            for i, s in enumerate(members):
                sends.append(s.client.send_room(room, f"{i}:{k}".encode()))
        yield gatherResults(sends)
        expected = 10 * (len(members) - 1)
        orders = []
        def arrived(client: Any) -> int:
            return len([p for p in client.pushes if p.get("type") == "message"])

        for s in members:
            yield wait_until(partial(lambda c: arrived(c) >= expected, s.client))
            got = s.client.drain("message")
            self.assertEqual(len(got), expected, f"{s.user} got {len(got)}")
            seqs = [p["seq"] for p in got]
            self.assertEqual(seqs, sorted(seqs), f"{s.user} saw them out of order")
            orders.append(seqs)
        everyone = sorted(set().union(*orders))
        for seqs in orders:
            self.assertTrue(set(seqs) <= set(everyone))

    @inlineCallbacks
    def test_kick_on_one_process_is_ordered_before_a_send_on_the_other(self) -> Any:
        owner = yield self.on(0)
        carol = yield self.on(1)  # the one kicked, on the other process
        bob = yield self.on(1)
        room = fresh_name("r")
        yield owner.client.ok("room_create", room=room)
        yield carol.client.ok("room_join", room=room)
        yield bob.client.ok("room_join", room=room)
        yield bob.client.send_room(room, b"before")
        got = yield carol.client.next_push("message", timeout=5)
        self.assertEqual(bodies([got]), ["before"])
        for _ in range(5):
            # The kick commits on node0; the send, on node1, starts after its reply.
            yield owner.client.ok("room_kick", room=room, user=carol.user)
            yield bob.client.send_room(room, b"after the kick")
            late = yield carol.client.settle(0.5, "message")
            self.assertEqual(late, [], "the kicked member got a message sent after the kick")
            yield carol.client.ok("room_join", room=room)
            yield bob.client.send_room(room, b"back in")
            back = yield carol.client.next_push("message", timeout=5)
            self.assertEqual(bodies([back]), ["back in"])

    @inlineCallbacks
    def test_one_client_id_sent_to_both_processes_is_stored_once(self) -> Any:
        alice0 = yield self.on(0)
        alice1 = yield self.on(1, alice0.user, "dev1", register=False)
        bob = yield self.on(0)
        for _ in range(5):
            cid = fresh_client_id()
            r0, r1 = yield gatherResults([
                alice0.client.ok("send", to={"user": bob.user}, envelope=b64(b"once"),
                                 client_id=cid),
                alice1.client.ok("send", to={"user": bob.user}, envelope=b64(b"once"),
                                 client_id=cid),
            ])
            self.assertEqual(sorted([r0["duplicate"], r1["duplicate"]]), [False, True])
            self.assertEqual(r0["seq"], r1["seq"])
            first = yield bob.client.next_push("message", timeout=5)
            self.assertEqual(first["client_id"], cid)
            more = yield bob.client.settle(0.3, "message")
            self.assertEqual(more, [], "stored (and delivered) twice")

    @inlineCallbacks
    def test_presence_with_a_device_on_each_process(self) -> Any:
        bob = yield self.on(0)
        alice_a = yield self.on(0, None, "laptop")
        yield alice_a.client.send_user(bob.user, b"hi")  # bob may now see alice's presence
        alice_b = yield self.on(1, alice_a.user, "phone", register=False)
        yield bob.client.settle(0.5)
        yield alice_a.client.disconnect()
        gone = yield bob.client.settle(1.0, "presence")
        self.assertEqual([p for p in gone if p["user"] == alice_a.user], [],
                         "alice went offline while her phone was still connected")
        yield alice_b.client.disconnect()
        off = yield bob.client.next_push("presence", timeout=5)
        self.assertEqual(off, {"type": "presence", "user": alice_a.user, "status": "offline"})
        again = yield self.on(1, alice_a.user, "phone", register=False)
        on = yield bob.client.next_push("presence", timeout=5)
        self.assertEqual(on, {"type": "presence", "user": again.user, "status": "online"})

    @inlineCallbacks
    def test_a_message_the_bus_dropped_is_delivered_from_the_store(self) -> Any:
        """Redis drops what it publishes while a subscriber is away: the receiving
        process finds the gap (the next message's prev_seq, or its reconciliation after
        reconnecting) and reads the missing message from the store, in order."""
        import socket

        alice = yield self.on(0)
        bob = yield self.on(1)
        yield alice.client.send_user(bob.user, b"warm-up")
        yield bob.client.next_push("message", timeout=5)
        assert self.cluster is not None
        with socket.create_connection(("127.0.0.1", self.cluster.redis.port)) as r:
            r.sendall(b"CLIENT KILL TYPE pubsub\r\n")
            r.recv(64)
        yield alice.client.send_user(bob.user, b"lost on the bus")
        yield sleep(0.2)
        yield alice.client.send_user(bob.user, b"next")
        first = yield bob.client.next_push("message", timeout=8)
        second = yield bob.client.next_push("message", timeout=8)
        self.assertEqual(bodies([first, second]), ["lost on the bus", "next"])


class ClusterBehindHAProxyTests(unittest.TestCase):
    """A real HAProxy (conf/haproxy.cfg) in front of the two processes of a cluster: the
    processes see each client's own address, and count it across the cluster."""

    timeout = 90

    @inlineCallbacks
    def test_real_addresses_counted_by_the_whole_cluster(self) -> Any:
        from tests.test_one_address_system import Front, HAProxy, can_bind, need_haproxy

        binary = need_haproxy(self)
        for source in ("127.0.0.2", "127.0.0.3"):
            if not can_bind(source):
                raise unittest.SkipTest(f"cannot bind {source}")
        cluster = Cluster(2, {"server": {"proxy_protocol": True,
                                         "max_connections_per_address": 1}}, test=self)
        self.addCleanup(cluster.cleanup)
        cluster.start()
        nodes = cluster.servers
        proxy = HAProxy(binary, cluster.base_dir, [s.port for s in nodes])
        self.addCleanup(proxy.stop)
        front: Any = Front("127.0.0.1", proxy.port, nodes[0].fingerprint, nodes)
        alice = yield register_and_login(front, source="127.0.0.2")
        self.addCleanup(alice.client.disconnect)
        bob = yield register_and_login(front, source="127.0.0.3")
        self.addCleanup(bob.client.disconnect)
        yield alice.client.send_user(bob.user, b"through the proxy")
        got = yield bob.client.next_push("message", timeout=5)
        self.assertEqual(bodies([got]), ["through the proxy"])
        # 127.0.0.2 has its one connection: more from it are refused by whichever
        # process HAProxy picks (leastconn spreads them), as the count is the cluster's
        # and by the client's own address, not the proxy's.
        from tests.harness import ConnectionClosed, connect_to

        for _ in range(3):
            client = yield connect_to(front.host, front.port, front.fingerprint,
                                      source="127.0.0.2")
            self.addCleanup(client.disconnect)
            with self.assertRaises(ConnectionClosed):
                yield client.ok("hello", version=1)
            [orphan] = client.orphans
            self.assertEqual(orphan["error"]["code"], "too_many_connections")
        # Neither process refused a PROXY header (health checks included).
        for node in nodes:
            self.assertNotIn("closed a connection from", node.log_text())
