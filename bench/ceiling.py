"""The ceiling: the least a Twisted TLS broadcast server can do per message.

``python -m bench.ceiling --data-dir D [--port 0]`` listens on 127.0.0.1 with the same TLS
set-up as shtalk (the certificate, key and policy of shtalk's data directory ``D``, via
`shtalk.server.datadir.DataDir.tls_server_options`), sets ``TCP_NODELAY`` like shtalk, and
for each line received:

* a line starting with ``{"type":"send"`` is written, unchanged, to every *other*
  connection, and the sender gets the constant reply ``{"ok":true}``;
* any other line (the load generator's ``ack`` batches) gets ``{"ok":true}``.

No JSON parsing (one prefix comparison), no storage, no authentication, no rooms: every
connection is in the one room. Whatever shtalk does per message on top of this is the
price of its protocol, storage and routing; `bench.fanout` reports shtalk's throughput as
a fraction of this server's, measured in the same run.

It prints ``ceiling listening on 127.0.0.1:PORT`` once listening and runs until killed.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from twisted.internet import endpoints
from twisted.internet.protocol import Factory
from twisted.protocols.basic import LineOnlyReceiver

from shtalk.server.datadir import DataDir

SEND_PREFIX = b'{"type":"send"'
OK = b'{"ok":true}\n'


class Broadcast(LineOnlyReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1 << 20
    factory: BroadcastFactory

    def connectionMade(self) -> None:
        nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if nodelay is not None:
            with contextlib.suppress(Exception):
                nodelay(True)
        self.factory.clients.add(self)

    def connectionLost(self, reason: object = None) -> None:
        self.factory.clients.discard(self)

    def lineReceived(self, line: bytes) -> None:
        if line.startswith(SEND_PREFIX):
            data = line + b"\n"
            for client in self.factory.clients:
                if client is not self:
                    client.transport.write(data)  # type: ignore[union-attr]
            self.factory.delivered += len(self.factory.clients) - 1
        self.transport.write(OK)  # type: ignore[union-attr]


class BroadcastFactory(Factory):
    protocol = Broadcast  # type: ignore[assignment]

    def __init__(self) -> None:
        self.clients: set[Broadcast] = set()
        self.delivered = 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True,
                        help="a shtalk data directory (its certificate and key are used)")
    parser.add_argument("--port", type=int, default=0, help="TCP port; 0 picks a free one")
    args = parser.parse_args(argv)

    from twisted.internet import reactor

    options = DataDir(args.data_dir).tls_server_options()
    endpoint = endpoints.SSL4ServerEndpoint(  # type: ignore[no-untyped-call]
        reactor, args.port, options, interface="127.0.0.1"
    )

    def listening(port: object) -> None:
        host = port.getHost()  # type: ignore[attr-defined]
        sys.stdout.write(f"ceiling listening on {host.host}:{host.port}\n")
        sys.stdout.flush()

    def failed(failure: object) -> None:
        sys.stderr.write(f"ceiling: cannot listen: {failure}\n")
        reactor.stop()  # type: ignore[attr-defined]

    d = endpoint.listen(BroadcastFactory())
    d.addCallbacks(listening, failed)
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
