"""Two servers as compose builds them, each with a RedisBus, over one store: a direct
message, a room message and a kick, from the request on one to the push on the other.

The test hands compose a RedisBus in place of its LocalBus: the bus alone, on one memory
store, without the control channel and shared presence of a real cluster (which
tests/test_cluster_system runs with real processes on PostgreSQL and Redis).
"""

from __future__ import annotations

import base64
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from shtalk.server import compose
from shtalk.server.chat.delivery import LocalBus
from shtalk.server.cluster.bus import RedisBus
from shtalk.server.store.memory import MemoryStore
from shtalk.test.server.cluster.processes import REDIS_URL, need_redis, random_prefix
from shtalk.testing import GOOD_PASSWORD, Peer, WallClock, build_server

BUSES: list[RedisBus] = []


class TwoServersTests(TestCase):
    timeout = 60

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        need_redis(self)
        prefix = random_prefix()
        self.store = MemoryStore(WallClock())
        store = self.store

        def make_bus(presence: Any, rooms: Any, users: Any, fanout: Any) -> RedisBus:
            local = LocalBus(presence, rooms, users, fanout)
            bus = RedisBus(local, store, rooms, reactor, reactor, REDIS_URL, prefix,
                           f"n{len(BUSES)}", gap_wait=0.05, reconcile_interval=5.0)
            BUSES.append(bus)
            bus.startService()
            return bus

        self.patch(compose, "LocalBus", make_bus)

        async def go() -> None:
            self.a = await build_server(self.mktemp(), store=store)
            self.b = await build_server(self.mktemp(), store=store)
            for bus in BUSES:
                await bus.when_connected()

        return Deferred.fromCoroutine(go())

    def tearDown(self) -> Deferred[None]:  # type: ignore[override]
        async def go() -> None:
            for bus in BUSES:
                await bus.stopService()
            BUSES.clear()
            await self.a.close()
            await self.b.close()
        return Deferred.fromCoroutine(go())

    async def account(self, parts: Any, name: str, device: str, host: str) -> Peer:
        peer = Peer(parts.factory, host)
        await peer.reply(peer.request("hello", version=1))
        await peer.reply(peer.request("register", username=name, password=GOOD_PASSWORD,
                                      email=f"{name}@example.org"))
        r = await peer.reply(peer.request("login", username=name, password=GOOD_PASSWORD,
                                          device={"id": device}))
        self.assertTrue(r["ok"], r)
        await peer.pushed("backlog_done")
        return peer

    async def test_direct_room_and_kick_across_servers(self) -> None:
        """Alice is on A, bob on B: her direct message and room message reach him; after
        she kicks him, her next room message does not, and her next direct one does."""
        alice = await self.account(self.a, "alice", "a1", "192.0.2.1")
        bob = await self.account(self.b, "bob", "b1", "192.0.2.2")
        env = base64.b64encode(b"hello").decode()
        r = await alice.reply(alice.request("send", to={"user": "bob"}, envelope=env,
                                            client_id="c1"))
        self.assertTrue(r["ok"], r)
        (m,) = await bob.pushed("message")
        self.assertEqual(m["from"]["user"], "alice")
        r = await alice.reply(alice.request("room_create", room="lobby"))
        self.assertTrue(r["ok"], r)
        r = await bob.reply(bob.request("room_join", room="lobby"))
        self.assertTrue(r["ok"], r)
        r = await alice.reply(alice.request("send", to={"room": "lobby"}, envelope=env,
                                            client_id="c2"))
        self.assertTrue(r["ok"], r)
        ms = await bob.pushed("message", 2)
        self.assertEqual(ms[1]["to"], {"room": "lobby"})
        r = await alice.reply(alice.request("room_kick", room="lobby", user="bob"))
        self.assertTrue(r["ok"], r)
        r = await alice.reply(alice.request("send", to={"room": "lobby"}, envelope=env,
                                            client_id="c3"))
        self.assertTrue(r["ok"], r)
        r = await alice.reply(alice.request("send", to={"user": "bob"}, envelope=env,
                                            client_id="c4"))
        ms = await bob.pushed("message", 3)
        self.assertEqual([x["client_id"] for x in ms], ["c1", "c2", "c4"])
