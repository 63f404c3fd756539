# mypy: disallow-untyped-calls=False
# (trial's TestCase and Twisted's TLS protocol are untyped; strict otherwise.)
"""Admission before the TLS handshake (shtalk.server.net.admission), on a test clock.

Real TLS in memory: the server side is the listener's own `AdmittedTLSFactory` over a
StringTransport, the client a pyOpenSSL connection on memory BIOs, so a "ClientHello"
is a real one and a finished handshake is a real one.  The reactor's part (calling
``connectionLost`` after an abort) is done by the test.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import json
import weakref
from typing import Any

from OpenSSL import SSL
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from shtalk.server import tls
from shtalk.server.net.admission import AdmittedTLSFactory, PendingHandshakes
from shtalk.testing import build_server

KEY_PEM, CERT_PEM = tls.make_self_signed(["localhost"])
OPTIONS = tls.server_options(CERT_PEM, KEY_PEM)
_ports = itertools.count(40000)


class Link:
    """One TCP connection: a pyOpenSSL client and the server's TLS protocol."""

    def __init__(self, factory: AdmittedTLSFactory, host: str) -> None:
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, next(_ports)))
        self.server: Any = factory.buildProtocol(self.transport.getPeer())
        self.server.makeConnection(self.transport)
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_verify(SSL.VERIFY_NONE)
        self.client = SSL.Connection(ctx, None)
        self.client.set_connect_state()
        self.handshaken = False
        self.received = b""

    def client_step(self) -> None:
        """The client does what it can (ClientHello, Finished, app data) and sends it."""
        if not self.handshaken:
            try:
                self.client.do_handshake()
                self.handshaken = True
            except SSL.WantReadError:
                pass
        else:
            with contextlib.suppress(SSL.WantReadError, SSL.ZeroReturnError):
                self.received += self.client.recv(65536)
        try:
            data = self.client.bio_read(65536)
        except SSL.WantReadError:
            return
        self.server.dataReceived(data)

    def server_step(self) -> bool:
        """What the server wrote reaches the client; False if it wrote nothing."""
        data = self.transport.value()
        self.transport.clear()
        if not data:
            return False
        self.client.bio_write(data)
        return True

    def wrote(self) -> bool:
        return bool(self.transport.value())

    @property
    def aborted(self) -> bool:
        return bool(getattr(self.transport, "disconnected", False))

    @property
    def paused(self) -> bool:
        return self.transport.producerState == "paused"

    def lost(self) -> None:
        """What the reactor does after an abort."""
        self.server.connectionLost(Failure(ConnectionAborted()))


def one_turn(clock: Clock) -> None:
    """One reactor turn: the calls due when it starts (``Clock.advance(0)`` would also
    run those they schedule for "the next turn", as a real reactor does not)."""
    due: list[Any] = [c for c in clock.getDelayedCalls() if c.getTime() <= clock.seconds()]
    for call in due:
        clock.calls.remove(call)
        call.called = 1
        call.func(*call.args, **call.kw)


def handshake(link: Link, clock: Clock, turns: int = 20) -> None:
    for _ in range(turns):
        link.client_step()
        clock.advance(0)
        link.server_step()
        if link.handshaken and link.server._handshakeDone:
            return
    raise AssertionError("the handshake did not finish")


class App(Protocol):
    handshakes = 0

    def handshakeCompleted(self) -> None:
        App.handshakes += 1


class AdmissionTests(unittest.TestCase):
    def make(self, **kw: Any) -> tuple[AdmittedTLSFactory, PendingHandshakes, Clock]:
        clock = Clock()
        admission = PendingHandshakes(clock, **kw)
        factory = AdmittedTLSFactory(OPTIONS, Factory.forProtocol(App), admission, clock)
        return factory, admission, clock

    def test_silent_socket_is_aborted_at_the_deadline_from_accept(self) -> None:
        factory, admission, clock = self.make(timeout=10.0)
        silent = Link(factory, "192.0.2.1")
        clock.advance(5)
        later = Link(factory, "192.0.2.2")
        clock.advance(4.9)
        self.assertFalse(silent.aborted)
        clock.advance(0.2)
        self.assertTrue(silent.aborted)
        self.assertFalse(later.aborted)
        self.assertEqual(list(admission.pending), [later.server])
        clock.advance(5)
        self.assertTrue(later.aborted)
        self.assertEqual(admission.pending, {})
        self.assertEqual(admission.dropped["timeout"], 2)

    def test_a_line_written_before_the_handshake_follows_it(self) -> None:
        # The OpenSSL connection does not exist until the ClientHello: what the
        # application writes before then waits for the handshake, as with Twisted's.
        class Greeter(Protocol):
            def connectionMade(self) -> None:
                self.transport.write(b"welcome\n")  # type: ignore[union-attr]

        clock = Clock()
        factory = AdmittedTLSFactory(
            OPTIONS, Factory.forProtocol(Greeter), PendingHandshakes(clock), clock
        )
        link = Link(factory, "192.0.2.1")
        self.assertIsNone(link.server.getHandle())
        self.assertFalse(link.wrote())
        handshake(link, clock)
        clock.advance(0)
        link.server_step()
        link.client_step()
        self.assertEqual(link.received, b"welcome\n")

    def test_drops_are_summed_up_in_the_log_once_a_minute(self) -> None:
        events: list[dict[str, Any]] = []
        observer: Any = events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        factory, _, clock = self.make(timeout=10.0, max_per_address=2)
        for _ in range(5):
            Link(factory, "192.0.2.1")
        clock.advance(10)
        self.assertEqual([e for e in events if e.get("event") == "admission.dropped"], [])
        clock.advance(50)
        [event] = [e for e in events if e.get("event") == "admission.dropped"]
        self.assertEqual((event["count"], event["address"], event["timeout"]), (5, 3, 2))
        self.assertIn("5 sockets not past the TLS handshake", formatEvent(event))

    def test_a_finished_handshake_leaves_the_deadline_behind(self) -> None:
        factory, admission, clock = self.make(timeout=10.0)
        link = Link(factory, "192.0.2.1")
        handshake(link, clock)
        self.assertEqual(admission.pending, {})
        clock.advance(60)
        self.assertFalse(link.aborted)

    def test_oldest_goes_first_per_address_and_in_all(self) -> None:
        factory, admission, _ = self.make(max_pending=5, max_per_address=3)
        a = [Link(factory, "198.51.100.1") for _ in range(4)]
        self.assertEqual([x.aborted for x in a], [True, False, False, False])
        b = Link(factory, "198.51.100.2")
        c = Link(factory, "198.51.100.3")
        d = Link(factory, "198.51.100.4")  # sixth in all: a[1] is now the oldest
        self.assertEqual([x.aborted for x in (*a, b, c, d)],
                         [True, True, False, False, False, False, False])
        self.assertEqual(len(admission.pending), 5)
        self.assertEqual(admission.dropped, {"timeout": 0, "address": 1, "total": 1})
        # The newest of the crowded address still completes its handshake.
        handshake(a[3], Clock())
        self.assertEqual(len(admission.pending), 4)

    def test_ipv6_addresses_count_by_their_64(self) -> None:
        factory, _, _ = self.make(max_per_address=2)
        links = [Link(factory, f"2001:db8:1:2::{i}") for i in range(1, 4)]
        other = Link(factory, "2001:db8:1:3::1")
        self.assertEqual([x.aborted for x in (*links, other)], [True, False, False, False])

    def test_silent_sockets_hold_no_slot(self) -> None:
        factory, admission, clock = self.make(steps_per_turn=2)
        silent = [Link(factory, f"10.0.{i // 20}.{i % 20 + 1}") for i in range(500)]
        self.assertEqual(len(admission.pending), 500)
        link = Link(factory, "192.0.2.99")
        link.client_step()  # ClientHello: answered in this same turn
        self.assertTrue(link.wrote())
        handshake(link, clock)
        self.assertFalse(any(s.aborted or s.paused for s in silent))

    def test_a_burst_is_spread_over_reactor_turns(self) -> None:
        factory, admission, clock = self.make(steps_per_turn=2)
        links = [Link(factory, f"192.0.2.{i}") for i in range(1, 6)]
        for link in links:
            link.client_step()
        self.assertEqual([x.wrote() for x in links], [True, True, False, False, False])
        self.assertEqual([x.paused for x in links], [False, False, True, True, True])
        one_turn(clock)  # the next turn: two more get their slot
        self.assertEqual([x.wrote() for x in links], [True, True, True, True, False])
        self.assertEqual([x.paused for x in links], [False] * 4 + [True])
        links[4].lost()  # gone while waiting: its place in line goes too
        one_turn(clock)
        self.assertEqual(list(admission.waiting), [])
        for link in links[:4]:
            handshake(link, clock)
        self.assertEqual(admission.pending, {})

    def test_memory_is_returned_when_they_go(self) -> None:
        factory, admission, clock = self.make(timeout=10.0, max_pending=50, trim_after=50)
        trims: list[int] = []
        admission.heap_trim = trims.append  # glibc's malloc_trim, recorded instead
        links = []
        for i in range(60):  # ten more than max_pending: the ten oldest are dropped
            link = Link(factory, f"203.0.113.{i}")
            if i % 2:
                link.client_step()  # half of them sent a ClientHello, then stalled
            links.append(link)
            clock.advance(0.01)
        self.assertEqual(sum(x.aborted for x in links), 10)
        clock.advance(10)  # and the rest at their deadline
        self.assertTrue(all(x.aborted for x in links))
        refs = [weakref.ref(x.server) for x in links]
        refs += [weakref.ref(x.server.wrappedProtocol) for x in links]
        for link in links:
            link.lost()
        del links, link
        gc.collect()
        self.assertEqual([r for r in refs if r() is not None], [])
        self.assertEqual((admission.pending, admission.by_address, list(admission.waiting)),
                         ({}, {}, []))
        self.assertEqual(factory.protocols, {})
        # A wave of departures is followed by a trim of the C heap, once.
        clock.advance(1)
        self.assertEqual(trims, [0])


class ServerTests(unittest.TestCase):
    """The chat protocol behind the admission: deadlines and the cap after the handshake."""

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        async def go() -> None:
            self.parts = await build_server(self.mktemp(), max_per_address=1, pre_auth=5)

        return Deferred.fromCoroutine(go())

    def tearDown(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self.parts.close())

    def make(self, **kw: Any) -> AdmittedTLSFactory:
        clock = self.parts.clock
        admission = PendingHandshakes(clock, **kw)
        return AdmittedTLSFactory(OPTIONS, self.parts.factory, admission, clock)

    def test_pre_auth_deadline_aborts_a_socket_still_handshaking(self) -> None:
        # Even with a handshake deadline longer than the pre-auth one, a socket that
        # never finishes its handshake is closed: Twisted alone would wait forever.
        factory = self.make(timeout=60.0)
        link = Link(factory, "192.0.2.1")
        link.client_step()
        self.parts.clock.advance(5.1)
        self.assertTrue(link.aborted)

    def test_the_cap_per_address_counts_connections_past_the_handshake(self) -> None:
        factory = self.make()
        first = Link(factory, "192.0.2.7")
        handshake(first, self.parts.clock)
        second = Link(factory, "192.0.2.7")
        handshake(second, self.parts.clock)
        self.parts.clock.advance(0)  # the TLS layer's write buffer
        second.server_step()
        second.client_step()
        error = json.loads(second.received.splitlines()[0])
        self.assertEqual(error["error"]["code"], "too_many_connections")
        self.assertTrue(second.server.disconnecting)  # closing: TLS close_notify sent
        self.assertFalse(first.server.disconnecting)
