"""The two kinds of Redis connection a cluster process keeps, on the reactor.

Commands (``commands``): one txredisapi connection, lazy and reconnecting, answers as
text; with ``hiredis`` installed txredisapi parses replies with it.  Subscriptions
(`Subscriber`): a connection in subscribed mode, kept by a `ClientService` (reconnects
with back-off), that subscribes its channels on every (re)connection and tells its owner
once Redis confirmed them, so that whatever may have been missed while it was away can
be made up for.  A connection that stops answering (a half-open TCP connection to a
Redis that went away) is found by a PING every ``ping_interval`` and dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import unquote, urlsplit

import txredisapi  # type: ignore[import-untyped]
from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.internet.protocol import Factory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from shtalk.server.cluster.subscriptions import NoDelay
from shtalk.server.ops.redisbackend import parse_redis_url

log = Logger()


def credentials(url: str) -> tuple[str | None, str | None]:
    """(user, password) of redis://[user]:password@host... (None, None) without."""
    parts = urlsplit(url)
    if parts.password is None:
        return None, None
    return (unquote(parts.username) if parts.username else None), unquote(parts.password)


def commands(url: str, timeout: float) -> Any:
    """A lazy, reconnecting command connection (calls fail while it is down; a reply
    later than ``timeout`` drops the connection, which then reconnects)."""
    host, port, db = parse_redis_url(url)
    user, password = credentials(url)
    return txredisapi.lazyConnection(
        host, port, dbid=db, reconnect=True, connectTimeout=timeout, replyTimeout=timeout,
        convertNumbers=False, password=password, username=user,
    )


class _SubscriberProtocol(NoDelay, txredisapi.SubscriberProtocol):  # type: ignore[misc]
    owner: Subscriber

    def __init__(self, user: str | None, password: str | None) -> None:
        # Payloads stay bytes: what a peer signed is checked as sent.
        super().__init__(charset=None, convertNumbers=False, password=password, username=user)

    def connectionMade(self) -> Any:
        d = super().connectionMade()
        self.owner._connected(self)
        return d

    def messageReceived(self, pattern: Any, channel: Any, message: Any) -> None:
        self.owner.on_message(channel, message)

    def connectionLost(self, why: Any) -> None:
        super().connectionLost(why)
        self.owner._lost(self)


class _SubscriberFactory(Factory):
    """What txredisapi's protocol expects of its factory when AUTH or SELECT fails."""

    def stopTrying(self) -> None:
        return None  # the ClientService tries again, with back-off

    def connectionError(self, message: str) -> None:
        log.error("Redis subscription: {message}", message=message)


class Subscriber:
    """One subscribed connection to Redis, for a fixed set of channels."""

    def __init__(
        self,
        url: str,
        channels: Sequence[str],
        on_message: Callable[[bytes, bytes], None],
        on_ready: Callable[[], object],
        clock: IReactorTime,
        reactor: IReactorTCP,
        ping_interval: float,
        timeout: float,
    ) -> None:
        host, port, _ = parse_redis_url(url)  # channels are not per database
        self._credentials = credentials(url)
        self.channels = list(channels)
        self.on_message = on_message
        self.on_ready = on_ready
        self.clock = clock
        self.timeout = timeout
        self.protocol: _SubscriberProtocol | None = None
        self.ready = False
        self.confirmations = 0
        factory = _SubscriberFactory.forProtocol(self._build)
        endpoint = TCP4ClientEndpoint(reactor, host, port, timeout=max(1, int(timeout)))
        self.service = ClientService(
            endpoint, factory, retryPolicy=backoffPolicy(0.1, 5.0), clock=clock
        )
        self._pinger = LoopingCall(self._ping)
        self._pinger.clock = clock
        self._ping_interval = ping_interval

    def _build(self) -> _SubscriberProtocol:
        p = _SubscriberProtocol(*self._credentials)
        p.owner = self
        return p

    def start(self) -> None:
        self.service.startService()  # type: ignore[no-untyped-call]
        self._pinger.start(self._ping_interval, now=False)

    def stop(self) -> Deferred[None]:
        if self._pinger.running:
            self._pinger.stop()
        d: Deferred[None] = self.service.stopService()  # type: ignore[no-untyped-call]
        return d

    def whenReady(self) -> Deferred[Any]:
        """Fires once the first subscription was confirmed."""
        d: Deferred[Any] = self.service.whenConnected()
        return d

    def _connected(self, protocol: _SubscriberProtocol) -> None:
        self.protocol = protocol
        d = protocol.subscribe(self.channels)
        d.addCallback(self._confirmed, protocol)
        d.addErrback(lambda f: log.warn("Redis SUBSCRIBE failed: {e}", e=f.getErrorMessage()))

    def _confirmed(self, _: Any, protocol: _SubscriberProtocol) -> None:
        if protocol is not self.protocol:
            return
        self.ready = True
        self.confirmations += 1
        self.on_ready()

    def _lost(self, protocol: _SubscriberProtocol) -> None:
        if protocol is self.protocol:
            self.protocol = None
            self.ready = False

    def _ping(self) -> None:
        protocol = self.protocol
        if protocol is None or not self.ready:
            return
        d = protocol.ping()
        d.addTimeout(self.timeout, self.clock)

        def dead(_: Any) -> None:
            log.warn("Redis subscription did not answer a PING; reconnecting")
            if protocol.transport is not None:
                protocol.transport.abortConnection()

        d.addErrback(dead)

    def drop_connection(self) -> None:
        """Close the connection as a network failure would (tests; operators' tools)."""
        protocol = self.protocol
        if protocol is not None and protocol.transport is not None:
            protocol.transport.abortConnection()
