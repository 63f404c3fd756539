"""The two Redis connections of the bus: one subscribed to mailbox channels, one publishing.

Both are txredisapi protocols (its connection, AUTH/SELECT, reconnection with back-off)
on the hiredis reader; what runs once per message is written here and in
`shtalk.server.cluster.publisher`: a received message goes from the hiredis reply
straight to the bus, without txredisapi's reply queue, a Deferred or its string
conversion; SUBSCRIBE, UNSUBSCRIBE and a turn's publishes are written to the socket at
once (`write_now`).

Why the subscriptions are tracked channel by channel: txredisapi 1.6 matches a
multi-channel SUBSCRIBE's confirmations to the Deferreds of later commands (two in
flight, the second fires with the first's confirmation).  Here one SUBSCRIBE or
UNSUBSCRIBE is in flight at a time (what comes meanwhile is queued and sent as the next
one), and a channel counts as subscribed only once Redis's own confirmation for that
channel came back on the current connection.  A PING every ``keepalive`` seconds finds a
connection that died silently: without its answer by the next one, the connection is
aborted and txredisapi reconnects; every channel is then subscribed again and the bus is
told (`resubscribed`), so it can read what was published meanwhile from the store.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi  # type: ignore[import-untyped]
from twisted.internet import tcp
from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger

from shtalk.server.cluster.keepalive import Keepalive
from shtalk.tcp import set_nodelay

log = Logger()

PING = b"*1\r\n$4\r\nPING\r\n"


def write_now(transport: Any, data: bytes) -> None:
    """Write ``data`` to a plain TCP connection now if nothing written before it is still
    waiting: one system call, without registering for the reactor's write readiness and
    a turn through it (two epoll changes and a dispatch per write).  What the socket
    does not take goes to the transport's buffer, as everything does once something
    waits there, and on any other transport (a test's, TLS)."""
    t = transport
    if (
        isinstance(t, tcp.Connection) and t.connected and not t.disconnecting
        and not t.dataBuffer and not t._tempDataLen
    ):  # fmt: skip
        n = t.writeSomeData(data)
        if isinstance(n, int):
            if n >= len(data):
                return
            data = data[n:]
        # an error: the transport's own write finds it and closes the connection
    t.write(data)


def require_hiredis() -> None:
    """The bus's CPU budget assumes the C reply parser (~5x cheaper per message)."""
    if txredisapi.hiredis is None or not issubclass(
        txredisapi.SubscriberProtocol, txredisapi.HiredisProtocol
    ):
        raise RuntimeError("the Redis bus needs hiredis (pip install hiredis)")


class RedisAddress:
    """Where Redis is, from ``redis://[:password@]host:port/db``; the password stays out
    of the repr."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        self.db = int(parts.path.strip("/") or 0)
        self.password = unquote(parts.password) if parts.password else None
        self.username = unquote(parts.username) if parts.username else None

    def __repr__(self) -> str:
        return f"<redis {self.host}:{self.port}/{self.db}>"


class _Factory(txredisapi.RedisFactory):  # type: ignore[misc]
    """One connection, handed to ``owner`` each time it is ready (again)."""

    initialDelay = 0.2  # Redis restarted: back within a second, not txredisapi's 1-10 s
    maxDelay = 2.0

    def __init__(self, owner: Any, protocol: type, address: RedisAddress) -> None:
        super().__init__(
            None, address.db, 1, isLazy=True, password=address.password,
            username=address.username, convertNumbers=False,
        )  # fmt: skip
        self.owner = owner
        self.protocol = protocol

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)
        p.owner = self.owner
        p.whenConnected().addCallback(self.owner.connected)
        return p


def connect(
    reactor: IReactorTCP, address: RedisAddress, owner: Any, protocol: type
) -> _Factory:
    factory = _Factory(owner, protocol, address)
    factory.startConnecting(TCP4ClientEndpoint(reactor, address.host, address.port, timeout=5))
    return factory


class WhenConnected:
    """Who waits for a connection to be up (tests, start-up checks): fired together."""

    def __init__(self) -> None:
        self._waiting: list[Deferred[None]] = []

    def wait(self, up: bool) -> Deferred[None]:
        if up:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d

    def fire(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)


class NoDelay:
    """TCP_NODELAY on a Redis connection: the publisher's replies are off, so no answer
    carries the acknowledgement Nagle's algorithm waits for before sending the next small
    write; each publish then waited for Redis's delayed ACK (13 ms more at p50 for the
    second process's recipients at 500 messages/s, bench.cluster)."""

    transport: Any

    def connectionMade(self) -> Any:
        set_nodelay(self.transport)
        return super().connectionMade()  # type: ignore[misc]


class BusSubscriber(NoDelay, txredisapi.SubscriberProtocol):  # type: ignore[misc]
    owner: Subscriptions

    def dataReceived(self, data: bytes, unpause: bool = False) -> None:
        if not self._ready:  # AUTH / SELECT replies: txredisapi's own path
            super().dataReceived(data, unpause)
            return
        reader = self._reader
        reader.feed(data)
        owner = self.owner
        res = reader.gets()
        while res is not False:
            if type(res) is list and len(res) == 3:
                kind = res[0]
                if kind == b"message":
                    owner.message(res[1], res[2])
                elif kind == b"subscribe" or kind == b"unsubscribe":
                    owner.confirmed(kind, res[1])
                elif kind == b"pong":
                    owner.pong()
            elif res == b"PONG" or (type(res) is list and res and res[0] == b"pong"):
                owner.pong()
            elif isinstance(res, Exception):  # e.g. an ACL that forbids the channel
                log.warn("Redis refused a bus command: {error}", error=str(res)[:120])
            else:
                log.warn("unexpected reply on the bus subscription: {kind}",
                         kind=type(res).__name__)
            res = reader.gets()

    def connectionLost(self, why: Any) -> None:
        self.owner.lost(self)
        super().connectionLost(why)


class Subscriptions:
    """The subscribed channels, as Redis confirmed them (see the module's docstring)."""

    def __init__(
        self,
        clock: IReactorTime,
        on_message: Callable[[bytes, bytes], None],
        resubscribed: Callable[[], None],
        keepalive: float = 1.0,
    ) -> None:
        self.clock = clock
        self.message = on_message
        self._resubscribed = resubscribed
        self.keepalive = keepalive
        self.proto: Any = None
        self.wanted: set[bytes] = set()
        self.confirmed_channels: set[bytes] = set()
        self._waiters: dict[bytes, list[Deferred[None]]] = {}
        self._inflight: tuple[bytes, set[bytes]] | None = None
        self._to_sub: dict[bytes, None] = {}
        self._to_unsub: dict[bytes, None] = {}
        self._reconnected = False
        self._keepalive = Keepalive(clock, keepalive, self._ping, "bus subscriber")
        self.connections = 0
        self.stopped = False
        self._when = WhenConnected()

    def when_connected(self) -> Deferred[None]:
        return self._when.wait(self.proto is not None)

    # the bus's side ---------------------------------------------------------------------
    def add(self, channels: Iterable[bytes]) -> Deferred[Any]:
        """Subscribe; fires once Redis confirmed every one of ``channels``."""
        waits: list[Deferred[None]] = []
        for ch in channels:
            self.wanted.add(ch)
            self._to_unsub.pop(ch, None)
            inflight = self._inflight
            unsubscribing = inflight is not None and inflight[0] == b"unsubscribe" and (
                ch in inflight[1])
            if ch in self.confirmed_channels and not unsubscribing:
                continue
            if not (inflight is not None and inflight[0] == b"subscribe" and ch in inflight[1]):
                self._to_sub[ch] = None
            d: Deferred[None] = Deferred()
            self._waiters.setdefault(ch, []).append(d)
            waits.append(d)
        self._pump()
        if not waits:
            return succeed(None)
        return gatherResults(waits)

    def drop(self, channels: Iterable[bytes]) -> None:
        for ch in channels:
            self.wanted.discard(ch)
            self._to_sub.pop(ch, None)
            for d in self._waiters.pop(ch, ()):
                d.callback(None)  # nobody needs it any more
            self._to_unsub[ch] = None
        self._pump()

    # the connection's side --------------------------------------------------------------
    def connected(self, proto: Any) -> None:
        self.connections += 1
        # Channels to subscribe (again): what was published before they are confirmed
        # is read from the store once they are.
        self._reconnected = bool(self.wanted)
        self.proto = proto
        self.confirmed_channels.clear()
        self._inflight = None
        self._to_unsub.clear()
        self._to_sub = dict.fromkeys(sorted(self.wanted))
        self._keepalive.start(proto)
        self._pump()
        self._maybe_resubscribed()
        self._when.fire()

    def lost(self, proto: Any) -> None:
        if proto is not self.proto:
            return
        self.proto = None
        self.confirmed_channels.clear()
        self._inflight = None
        self._keepalive.stop()
        if not self.stopped:
            log.warn("the Redis bus subscription was lost; reconnecting")

    def confirmed(self, kind: bytes, channel: bytes) -> None:
        inflight = self._inflight
        if inflight is not None and inflight[0] == kind:
            inflight[1].discard(channel)
        if kind == b"subscribe":
            self.confirmed_channels.add(channel)
            for d in self._waiters.pop(channel, ()):
                d.callback(None)
        else:
            self.confirmed_channels.discard(channel)
        if inflight is not None and not inflight[1]:
            self._inflight = None
            self._pump()
            self._maybe_resubscribed()

    def pong(self) -> None:
        self._keepalive.answered()

    # ------------------------------------------------------------------------------------
    def _pump(self) -> None:
        """Send the next SUBSCRIBE or UNSUBSCRIBE if none is in flight."""
        proto = self.proto
        if proto is None or self._inflight is not None:
            return
        for kind, queue in ((b"subscribe", self._to_sub), (b"unsubscribe", self._to_unsub)):
            if queue:
                channels = list(queue)
                queue.clear()
                self._inflight = (kind, set(channels))
                # Now, not at the reactor's next write: a subscription counts from when
                # Redis has it, and publishes of this turn are flushed before that.
                write_now(proto.transport, proto._build_command(kind.upper(), *channels))
                return

    def _maybe_resubscribed(self) -> None:
        if self._reconnected and self._inflight is None and not self._to_sub:
            self._reconnected = False
            self._resubscribed()

    def _ping(self) -> None:
        self.proto.transport.write(PING)

    def stop(self) -> None:
        self.stopped = True
        self._keepalive.stop()
