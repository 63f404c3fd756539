"""The listener's bottom layer behind a proxy: the PROXY header, read before TLS.

Why: behind HAProxy in TCP mode with TLS passed through, the TCP peer is the proxy and
the client's address arrives in a PROXY protocol header ahead of the ClientHello.
Twisted's ``haproxy:`` endpoint wrapper reads the header from whatever its factory
decodes (inside TLS when wrapped around ``ssl:``), and connects its protocol at accept,
when only the proxy's address is known.  Here the layers above (the admitted TLS
layer, the chat protocol) are built only once the header has been read, with the
client's address as their peer, so everything that reads the peer at connect (the
pending-handshake bounds per address, the per-address cap, rate limits, audit lines,
the monitor) sees the client, and nothing is admitted under the proxy's address.

A connection is closed (aborted: there is no channel to say why) when its TCP peer is
not one of the trusted proxies (a header from anyone else would be a forged address),
when its first bytes are not a valid header, or when no header came within the
handshake deadline.  Such closes are logged once, then summed up at most once a
``REPORT_EVERY`` (a misbehaving peer must not fill the log).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.interfaces import IAddress, IDelayedCall, IProtocol, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from zope.interface import directlyProvides, providedBy

from shtalk.server.config.core import Network
from shtalk.server.net.proxyproto import ProxyHeaderError, parse

log = Logger()

#: A refusal is logged at once, then the following ones are summed up this often.
REPORT_EVERY = 60.0


def _address(host: str, port: int) -> IPv4Address | IPv6Address:
    """A header's address as Twisted's; an IPv4 client a dual-stack proxy wrote as
    ``::ffff:a.b.c.d`` is the IPv4 client it is."""
    if ":" in host:
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
        if mapped is None:
            return IPv6Address("TCP", host, port)
        host = str(mapped)
    return IPv4Address("TCP", host, port)


class ProxyHeaderProtocol(ProtocolWrapper):
    """One connection: the header first, then the layers above with the client's address.

    ``wrappedProtocol`` is None until the header was read; a ``ProtocolWrapper`` after
    that (the layers above use it as their transport).
    """

    factory: ProxyHeaderFactory
    wrappedProtocol: IProtocol | None  # type: ignore[assignment]

    def __init__(self, factory: ProxyHeaderFactory) -> None:
        super().__init__(factory, None)  # type: ignore[arg-type]
        self._buffer = b""
        self._peer: IAddress | None = None
        self._host: IAddress | None = None
        self._deadline: IDelayedCall | None = None
        self._refused = False

    def logPrefix(self) -> str:
        if self.wrappedProtocol is None:
            return "ProxyHeaderProtocol"
        return str(super().logPrefix())  # type: ignore[no-untyped-call]

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        Protocol.makeConnection(self, transport)  # type: ignore[no-untyped-call]

    def connectionMade(self) -> None:
        f = self.factory
        if not f.trusts(self.transport.getPeer()):  # type: ignore[union-attr]
            self._refuse("not a trusted proxy (trusted_proxies)")
            return
        self._deadline = f.clock.callLater(
            f.timeout, self._refuse, "no PROXY header in time (handshake_timeout)"
        )

    def dataReceived(self, data: bytes) -> None:
        inner = self.wrappedProtocol
        if inner is not None:
            inner.dataReceived(data)
            return
        if self._refused:
            return
        self._buffer += data
        try:
            header = parse(self._buffer)
        except ProxyHeaderError as e:
            self._refuse(str(e))
            return
        if header is None:
            return
        self._cancel_deadline()
        rest, self._buffer = self._buffer[header.length :], b""
        if header.source is not None and header.destination is not None:
            self._peer = _address(*header.source)
            self._host = _address(*header.destination)
        inner = self.factory.wrappedFactory.buildProtocol(self.getPeer())
        if inner is None:
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.wrappedProtocol = inner
        self.factory.registerProtocol(self)  # type: ignore[no-untyped-call]
        # From now on this layer only relays: bytes each way go straight through (a
        # bound method per direction instead of a call and a test per chunk).
        self.dataReceived = inner.dataReceived  # type: ignore[method-assign]
        self.write = self.transport.write  # type: ignore[method-assign,union-attr]
        inner.makeConnection(self)
        if rest and self.wrappedProtocol is not None:
            inner.dataReceived(rest)

    def getPeer(self) -> IAddress:
        """The client, as the header named it (the proxy until then, or for LOCAL)."""
        if self._peer is not None:
            return self._peer
        return self.transport.getPeer()  # type: ignore[union-attr]

    def getHost(self) -> IAddress:
        if self._host is not None:
            return self._host
        return self.transport.getHost()  # type: ignore[union-attr]

    def _refuse(self, why: str) -> None:
        self._cancel_deadline()
        self._refused = True
        self._buffer = b""
        self.factory.refused(self.transport.getPeer(), why)  # type: ignore[union-attr]
        self.transport.abortConnection()  # type: ignore[union-attr]

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._cancel_deadline()
        self._buffer = b""
        inner, self.wrappedProtocol = self.wrappedProtocol, None
        self.__dict__.pop("dataReceived", None)  # no cycle left through the bound methods
        self.__dict__.pop("write", None)
        if inner is not None:
            self.factory.unregisterProtocol(self)  # type: ignore[no-untyped-call]
            inner.connectionLost(reason)


class ProxyHeaderFactory(WrappingFactory):
    """Puts `ProxyHeaderProtocol` under ``wrappedFactory``'s protocols (see module doc)."""

    protocol = ProxyHeaderProtocol  # type: ignore[assignment]

    def __init__(
        self,
        wrappedFactory: Any,
        trusted: Iterable[Network],
        clock: IReactorTime,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(wrappedFactory)  # type: ignore[no-untyped-call]
        self.trusted = tuple(trusted)
        self.clock = clock
        self.timeout = timeout
        #: Connections closed without a believed header, since the start.
        self.refusals = 0
        self._quiet_until = 0.0
        self._unreported = 0

    def buildProtocol(self, addr: IAddress | None) -> ProxyHeaderProtocol:
        # The layers above are built once the header named the client.
        return ProxyHeaderProtocol(self)

    def trusts(self, peer: IAddress) -> bool:
        """Whether ``peer`` is a proxy whose headers are believed."""
        host = getattr(peer, "host", None)
        if not isinstance(peer, (IPv4Address, IPv6Address)) or not isinstance(host, str):
            return False
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.trusted)

    def refused(self, peer: IAddress, why: str) -> None:
        """Count a close; log it unless one was logged within `REPORT_EVERY`."""
        self.refusals += 1
        now = self.clock.seconds()
        if now < self._quiet_until:
            self._unreported += 1
            return
        more = self._unreported
        log.warn(
            "closed a connection from {address}: {why}{more}",
            event="proxy.refused", address=getattr(peer, "host", str(peer)), why=why,
            unreported=more, more=f" (and {more} more without a believed PROXY header "
            f"since the last such line)" if more else "",
        )
        self._unreported = 0
        self._quiet_until = now + REPORT_EVERY
