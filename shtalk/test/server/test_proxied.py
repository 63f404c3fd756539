# mypy: disallow-untyped-calls=False
# (trial's TestCase and Twisted's TLS protocol are untyped; strict otherwise.)
"""The PROXY header below TLS (shtalk.server.net.proxied), with the listener's own layers.

The stack is the one ``twistd shtalk --proxy-protocol`` listens with: the header layer
under `AdmittedTLSFactory` under the chat factory, over a StringTransport whose peer
is the proxy; the client is a real pyOpenSSL connection on memory BIOs (test_admission's
`Link`).  What is checked is what a client behind the proxy, or someone going around
it, would see: the server counting and limiting by the client's address, never the
proxy's, and a connection without a believed header going nowhere.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from OpenSSL import SSL
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionAborted
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from shtalk.server.config.core import networks
from shtalk.server.net.admission import AdmittedTLSFactory, PendingHandshakes
from shtalk.server.net.proxied import REPORT_EVERY, ProxyHeaderFactory
from shtalk.server.net.proxyproto import v2_header
from shtalk.test.server.test_admission import OPTIONS, Link
from shtalk.testing import build_server

PROXY = "127.0.0.1"
TRUSTED = networks("127.0.0.1, ::1")


class ProxiedLink(Link):
    """A client behind the proxy: the proxy's header first, then the client's TLS."""

    def __init__(self, factory: Any, client: str | None, proxy: str = PROXY,
                 header: bytes | None = None) -> None:
        super().__init__(factory, proxy)
        if header is None:
            host = "::1" if client and ":" in client else "127.0.0.1"
            header = v2_header((client, 40000) if client else None, (host, 6697))
        self.header = header

    def send_header(self) -> None:
        self.server.dataReceived(self.header)

    @property
    def tls(self) -> Any:
        return self.server.wrappedProtocol

    @property
    def app(self) -> Any:
        return self.tls.wrappedProtocol

    def lost(self) -> None:
        self.server.connectionLost(Failure(ConnectionAborted()))


def shake(link: ProxiedLink, clock: Clock, turns: int = 20) -> None:
    for _ in range(turns):
        link.client_step()
        clock.advance(0)
        link.server_step()
        if link.handshaken and link.tls._handshakeDone:
            return
    raise AssertionError("the handshake did not finish")


class Peer(Protocol):
    """Records the address it was connected with."""

    def connectionMade(self) -> None:
        self.peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.host = self.transport.getHost()  # type: ignore[union-attr]


class HeaderTests(unittest.TestCase):
    def make(self, trusted: Any = TRUSTED, **kw: Any
             ) -> tuple[ProxyHeaderFactory, PendingHandshakes, Clock]:
        clock = Clock()
        admission = PendingHandshakes(clock, **kw)
        tls = AdmittedTLSFactory(OPTIONS, Factory.forProtocol(Peer), admission, clock)
        return ProxyHeaderFactory(tls, trusted, clock, timeout=10.0), admission, clock

    def test_layers_above_see_the_client_address_from_the_header(self) -> None:
        factory, admission, clock = self.make()
        link = ProxiedLink(factory, "203.0.113.7")
        self.assertIsNone(link.tls)  # nothing above is built before the header
        self.assertEqual(admission.pending, {})
        link.send_header()
        self.assertEqual(list(admission.pending), [link.tls])
        self.assertEqual(link.tls.address, "203.0.113.7")
        shake(link, clock)
        self.assertEqual(link.app.peer, IPv4Address("TCP", "203.0.113.7", 40000))
        self.assertEqual(link.app.host, IPv4Address("TCP", "127.0.0.1", 6697))
        self.assertEqual(admission.pending, {})

    def test_header_and_client_hello_in_one_segment_and_a_header_in_pieces(self) -> None:
        factory, _, clock = self.make()
        together = ProxiedLink(factory, "2001:db8::5")
        with contextlib.suppress(SSL.WantReadError):
            together.client.do_handshake()  # writes the ClientHello
        together.server.dataReceived(together.header + together.client.bio_read(65536))
        self.assertTrue(together.wrote())  # the ClientHello was answered at once
        self.assertEqual(together.tls.getPeer(), IPv6Address("TCP", "2001:db8::5", 40000))
        pieces = ProxiedLink(factory, "198.51.100.9")
        for i in range(len(pieces.header)):
            self.assertIsNone(pieces.tls)
            pieces.server.dataReceived(pieces.header[i : i + 1])
        shake(pieces, clock)
        self.assertEqual(pieces.app.peer.host, "198.51.100.9")

    def test_an_ipv4_client_of_a_dual_stack_proxy_is_an_ipv4_client(self) -> None:
        factory, _, clock = self.make()
        link = ProxiedLink(factory, "::ffff:203.0.113.7")
        link.send_header()
        shake(link, clock)
        self.assertEqual(link.app.peer, IPv4Address("TCP", "203.0.113.7", 40000))

    def test_a_local_header_leaves_the_proxy_address(self) -> None:
        factory, _, clock = self.make()
        link = ProxiedLink(factory, None)
        link.send_header()
        shake(link, clock)
        self.assertEqual(link.app.peer.host, PROXY)

    def test_tls_without_a_header_is_aborted_and_builds_nothing(self) -> None:
        factory, admission, _ = self.make()
        link = ProxiedLink(factory, "203.0.113.7")
        link.client_step()  # a ClientHello straight away
        self.assertTrue(link.aborted)
        self.assertFalse(link.wrote())
        self.assertIsNone(link.tls)
        self.assertEqual((admission.pending, factory.protocols), ({}, {}))
        link.lost()
        self.assertEqual(factory.refusals, 1)

    def test_a_header_from_an_untrusted_peer_is_not_believed(self) -> None:
        factory, admission, _ = self.make()
        link = ProxiedLink(factory, "203.0.113.7", proxy="192.0.2.50")
        self.assertTrue(link.aborted)  # at accept, before a byte
        link.send_header()
        self.assertIsNone(link.tls)
        self.assertEqual(admission.pending, {})
        # An IPv4-mapped address of a trusted proxy is that proxy.
        mapped = ProxiedLink(factory, "203.0.113.8", proxy="::ffff:127.0.0.1")
        self.assertFalse(mapped.aborted)

    def test_no_header_in_time_is_aborted_and_a_slow_one_waits(self) -> None:
        factory, _, clock = self.make()
        silent = ProxiedLink(factory, "203.0.113.7")
        partial = ProxiedLink(factory, "203.0.113.8")
        partial.server.dataReceived(partial.header[:10])
        clock.advance(9.9)
        self.assertFalse(silent.aborted or partial.aborted)
        partial.server.dataReceived(partial.header[10:])
        clock.advance(0.2)
        self.assertTrue(silent.aborted)
        self.assertFalse(partial.aborted)  # its header came: the TLS deadline runs from then
        clock.advance(9.6)
        self.assertFalse(partial.aborted)
        clock.advance(0.3)
        self.assertTrue(partial.aborted)  # ... and no handshake came

    def test_pending_handshakes_are_bounded_per_client_not_per_proxy(self) -> None:
        factory, admission, _ = self.make(max_per_address=2)
        links = [ProxiedLink(factory, f"203.0.113.{i}") for i in range(1, 6)]
        crowd = [ProxiedLink(factory, "198.51.100.1") for _ in range(3)]
        for link in (*links, *crowd):
            link.send_header()
        # Under the proxy's address all eight would share one bound of 2.
        self.assertEqual([x.aborted for x in (*links, *crowd)], [False] * 5 + [True, False, False])
        self.assertEqual(len(admission.pending), 7)
        self.assertEqual(admission.dropped["address"], 1)

    def test_refusals_are_logged_once_then_summed_up(self) -> None:
        events: list[dict[str, Any]] = []
        observer: Any = events.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        factory, _, clock = self.make()
        for _ in range(3):
            ProxiedLink(factory, "203.0.113.7").client_step()
        [first] = [e for e in events if e.get("event") == "proxy.refused"]
        self.assertIn("127.0.0.1", formatEvent(first))
        self.assertIn("did not start with a PROXY protocol header", formatEvent(first))
        clock.advance(REPORT_EVERY)
        ProxiedLink(factory, "203.0.113.7", proxy="192.0.2.50")
        second = [e for e in events if e.get("event") == "proxy.refused"][1]
        self.assertEqual(second["unreported"], 2)
        self.assertIn("not a trusted proxy", formatEvent(second))
        self.assertIn("and 2 more", formatEvent(second))
        self.assertNotIn("more", formatEvent(first))
        self.assertEqual(factory.refusals, 4)


class ChatBehindProxyTests(unittest.TestCase):
    """The chat protocol's own per-address cap, behind one proxy."""

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        async def go() -> None:
            self.parts = await build_server(self.mktemp(), max_per_address=1)

        return Deferred.fromCoroutine(go())

    def tearDown(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self.parts.close())

    def connect(self, factory: ProxyHeaderFactory, client: str) -> ProxiedLink:
        link = ProxiedLink(factory, client)
        link.send_header()
        shake(link, self.parts.clock)
        self.parts.clock.advance(0)
        link.server_step()
        link.client_step()
        return link

    def test_the_cap_per_address_counts_clients_not_the_proxy(self) -> None:
        clock = self.parts.clock
        tls = AdmittedTLSFactory(OPTIONS, self.parts.factory, PendingHandshakes(clock), clock)
        factory = ProxyHeaderFactory(tls, TRUSTED, clock)
        a = self.connect(factory, "203.0.113.1")
        b = self.connect(factory, "203.0.113.2")
        self.assertEqual((a.received, b.received), (b"", b""))
        self.assertEqual(a.app.peer, "203.0.113.1")
        self.assertEqual(self.parts.factory.counts.local, {"203.0.113.1": 1, "203.0.113.2": 1})
        again = self.connect(factory, "203.0.113.1")
        error = json.loads(again.received.splitlines()[0])
        self.assertEqual(error["error"]["code"], "too_many_connections")
        self.assertFalse(a.tls.disconnecting or b.tls.disconnecting)
        for link in (a, b, again):
            link.lost()
        self.assertEqual(self.parts.factory.counts.local, {})


class Recorder(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.lost = False

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True


class RelayTests(unittest.TestCase):
    def test_bytes_each_way_and_the_close_reach_the_other_side(self) -> None:
        factory = ProxyHeaderFactory(Factory.forProtocol(Recorder), TRUSTED, Clock())
        transport = StringTransport(peerAddress=IPv4Address("TCP", PROXY, 1))
        proto: Any = factory.buildProtocol(transport.getPeer())
        proto.makeConnection(transport)
        proto.dataReceived(v2_header(("192.0.2.1", 2)) + b"after")
        proto.dataReceived(b" and more")
        inner = proto.wrappedProtocol
        self.assertEqual(inner.data, b"after and more")
        inner.transport.write(b"out")
        inner.transport.pauseProducing()
        self.assertEqual((transport.value(), transport.producerState), (b"out", "paused"))
        self.assertEqual(list(factory.protocols), [proto])
        proto.connectionLost(Failure(ConnectionAborted()))
        self.assertTrue(inner.lost)
        self.assertEqual(factory.protocols, {})
        self.assertIsNone(proto.wrappedProtocol)
