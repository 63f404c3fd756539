"""The login flow waits for the bus: a device's mailboxes reach this process (a cluster:
Redis confirmed them) before the login is answered and its backlog read, and a
connection that goes is counted out again."""

from __future__ import annotations

from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.trial.unittest import TestCase

from shtalk.server import compose
from shtalk.server.chat.delivery import LocalBus
from shtalk.testing import GOOD_PASSWORD, Peer, ServerParts, build_server


class HeldBus(LocalBus):
    """A LocalBus whose attach fires when the test says so."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.pending: list[Deferred[None]] = []
        self.attached: list[int] = []
        self.asked: Deferred[None] = Deferred()  # fires at the first attach

    def attach(self, user_id: int) -> Deferred[None]:
        self.attached.append(user_id)
        d: Deferred[None] = Deferred()
        self.pending.append(d)
        if not self.asked.called:
            self.asked.callback(None)
        return d

    def detach(self, user_id: int) -> None:
        self.attached.remove(user_id)


class LoginAttachTests(TestCase):
    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        self.buses: list[HeldBus] = []

        def make(*args: Any) -> HeldBus:
            bus = HeldBus(*args)
            self.buses.append(bus)
            return bus

        self.patch(compose, "LocalBus", make)

        async def go() -> None:
            self.parts: ServerParts = await build_server(self.mktemp())

        return Deferred.fromCoroutine(go())

    def tearDown(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self.parts.close())

    async def test_login_answered_once_attached_and_detached_when_gone(self) -> None:
        (bus,) = self.buses
        peer = Peer(self.parts.factory)
        await peer.reply(peer.request("hello", version=1))
        r = await peer.reply(peer.request("register", username="ann", password=GOOD_PASSWORD,
                                          email="ann@example.org"))
        self.assertTrue(r["ok"], r)
        rid = peer.request("login", username="ann", password=GOOD_PASSWORD,
                           device={"id": "d1"})
        await bus.asked  # the password checked (in a thread), the realm attaches
        await deferLater(reactor, 0, lambda: None)  # the realm's call chain has run on
        self.assertIsNone(peer.find_reply(rid), "answered before the bus was attached")
        self.assertEqual(peer.pushes("backlog_done"), [])
        bus.pending[0].callback(None)
        r = await peer.reply(rid)
        self.assertTrue(r["ok"], r)
        await peer.pushed("backlog_done")
        self.assertEqual(len(bus.attached), 1)
        peer.transport.loseConnection()
        peer.proto.connectionLost(None)  # type: ignore[arg-type]
        self.assertEqual(bus.attached, [])
