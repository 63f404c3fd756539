"""A TCP listening endpoint with SO_REUSEPORT: several processes on one host, one port.

Why: each ``twistd shtalk`` is one Python process (one core).  With SO_REUSEPORT every
process binds the same address and port, each gets a listening socket of its own, and
the kernel spreads new connections over them by a hash of the client's address and
port; a process that stops takes only its own queue with it.  Linux lets only sockets
of the same user share the port.  Connections still queued on a process that is killed
are reset unless ``net.ipv4.tcp_migrate_req=1`` (Linux 5.14 or later), which moves them
to a surviving listener.

Twisted's ``listenTCP`` cannot set the option before ``bind``, so the socket is made
here (SO_REUSEADDR as Twisted sets it, SO_REUSEPORT, bind, listen) and handed to the
reactor with ``adoptStreamPort``; the TLS and chat factories above are the same as
for the ordinary listener.
"""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet.abstract import isIPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from zope.interface import implementer

#: Whether this system has SO_REUSEPORT at all (Linux, the BSDs, macOS).
AVAILABLE = hasattr(socket, "SO_REUSEPORT")


@implementer(IStreamServerEndpoint)
class ReusePortEndpoint:
    """``TCP4ServerEndpoint``'s job (IPv6 too, as ``listenTCP``) with SO_REUSEPORT set."""

    def __init__(self, reactor: Any, port: int, backlog: int = 50, interface: str = "") -> None:
        self.reactor = reactor
        self.port = port
        self.backlog = backlog
        self.interface = interface

    def listen(self, protocolFactory: IProtocolFactory) -> Deferred[IListeningPort]:
        family = socket.AF_INET6 if isIPv6Address(self.interface) else socket.AF_INET
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as e:
            return fail(CannotListenError(self.interface, self.port, e))  # type: ignore[no-untyped-call]
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.interface, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            port = self.reactor.adoptStreamPort(sock.fileno(), family, protocolFactory)
        except OSError as e:
            return fail(CannotListenError(self.interface, self.port, e))  # type: ignore[no-untyped-call]
        finally:
            sock.close()  # the reactor holds its own duplicate of the descriptor
        return succeed(port)
