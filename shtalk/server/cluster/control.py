"""The control channel: small events every server process of a cluster applies to itself.

One Redis pub/sub channel, ``{prefix}control``, to which every process is subscribed.
An event is a kind and a JSON payload: a revocation, a line for users' connections, a
cache invalidation, a CAPTCHA demand — whatever a component must tell its peers
(`IClusterControl.publish`).  The process that publishes has already applied it to
itself (no round trip); a receiver skips its own events and hands the others to its
handler table (kind -> function of the payload), built once everything exists
(`ControlListener`).  A kind without a handler is ignored: a newer peer may speak of
things this process does not know.

Events are authenticated: each carries an HMAC-SHA256, under a key derived from the
storage key every node already shares, over the node name, the time and the event, so
whoever can publish to the Redis but does not hold that key cannot end sessions or
write lines to users.  Events older than `MAX_AGE` are dropped (a replay of a recorded
one is stale by then).  Payloads never reach a log.

Redis does not keep what it publishes while a subscriber is away: after the
subscription comes back (`Subscriber` tells when it is confirmed) the listener calls its
``on_resubscribed`` hooks, e.g. `recheck_sessions`, which asks the store about every
session this process serves, so a revocation missed meanwhile still takes effect.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.interfaces import IReactorTCP, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from shtalk.server.cluster.redisconn import Subscriber
from shtalk.server.config.cluster import ClusterSection
from shtalk.server.ishared import IClusterControl

log = Logger()

MAX_AGE = 120.0
"""Seconds an event stays valid (allows for that much clock skew between hosts)."""

MAC_SIZE = 32

Handler = Callable[[dict[str, Any]], object]


def control_key(storage_key: bytes) -> bytes:
    """The control channel's MAC key, derived from the storage key (never used as is)."""
    return hmac.new(storage_key, b"shtalk cluster control v1", hashlib.sha256).digest()


class BadEvent(Exception):
    """An event that is not one of ours (bad MAC, malformed, stale)."""


@implementer(IClusterControl)
class ControlChannel:
    """Publishes this process's events and decodes its peers'."""

    def __init__(
        self, redis: Any, prefix: str, node: str, key: bytes, clock: IReactorTime
    ) -> None:
        self.redis = redis
        self.channel = prefix + "control"
        self.node = node
        self._key = key
        self.clock = clock
        self.published = 0
        self.failed = 0

    def __repr__(self) -> str:
        return f"<ControlChannel {self.channel} node={self.node}>"

    def encode(self, kind: str, payload: dict[str, Any]) -> bytes:
        body = json.dumps(
            {"n": self.node, "t": self.clock.seconds(), "k": kind, "p": payload},
            separators=(",", ":"),
        ).encode()
        return hmac.new(self._key, body, hashlib.sha256).digest() + body

    def decode(self, data: bytes) -> tuple[str, str, dict[str, Any]]:
        """(node, kind, payload) of a genuine, fresh event; BadEvent otherwise."""
        mac, body = data[:MAC_SIZE], data[MAC_SIZE:]
        if not hmac.compare_digest(mac, hmac.new(self._key, body, hashlib.sha256).digest()):
            raise BadEvent("bad MAC")
        try:
            event = json.loads(body)
            node, when, kind, payload = event["n"], event["t"], event["k"], event["p"]
        except (ValueError, KeyError, TypeError):
            raise BadEvent("malformed") from None
        if not (isinstance(node, str) and isinstance(kind, str) and isinstance(payload, dict)
                and isinstance(when, (int, float))):
            raise BadEvent("malformed")
        if abs(self.clock.seconds() - when) > MAX_AGE:
            raise BadEvent("stale")
        return node, kind, payload

    def publish(self, kind: str, payload: dict[str, Any]) -> None:
        """Tell every other process (best effort: Redis may be away; never raises)."""
        data = self.encode(kind, payload)
        try:
            d: Deferred[Any] = self.redis.publish(self.channel, data)
        except Exception as e:  # txredisapi raises ConnectionError at once when down
            self._failed(kind, e)
            return
        self.published += 1
        d.addErrback(self._failed_later, kind)

    def _failed_later(self, failure: Failure, kind: str) -> None:
        self._failed(kind, failure.value)

    def _failed(self, kind: str, error: BaseException | None) -> None:
        self.failed += 1
        log.warn("control event {kind} not published: {error}", kind=kind,
                 error=type(error).__name__)


class ControlListener(Service):
    """Receives the peers' events and applies them here through the handler table."""

    name = "cluster-control"

    def __init__(
        self,
        channel: ControlChannel,
        handlers: Mapping[str, Handler],
        url: str,
        clock: IReactorTime,
        reactor: IReactorTCP,
        settings: ClusterSection,
        on_resubscribed: Sequence[Callable[[], object]] = (),
    ) -> None:
        self.channel = channel
        self.handlers = dict(handlers)
        self.on_resubscribed = list(on_resubscribed)
        self.applied = 0
        self.rejected = 0
        self.subscriber = Subscriber(
            url, [channel.channel], self.received, self.subscribed, clock, reactor,
            ping_interval=settings.heartbeat_interval, timeout=settings.node_timeout,
        )

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.subscriber.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self.subscriber.stop()

    def subscribed(self) -> None:
        """The subscription is confirmed; after a reconnect, catch up on what was missed."""
        if self.subscriber.confirmations > 1:
            for hook in self.on_resubscribed:
                maybeDeferred(hook).addErrback(
                    lambda f: log.failure("catching up after resubscribing", f)
                )

    def received(self, channel: bytes, data: bytes) -> None:
        try:
            node, kind, payload = self.channel.decode(data)
        except BadEvent as e:
            self.rejected += 1
            log.warn("control event refused: {why}", why=str(e))
            return
        if node == self.channel.node:
            return  # applied when published
        handler = self.handlers.get(kind)
        if handler is None:
            return
        self.applied += 1
        maybeDeferred(handler, payload).addErrback(
            lambda f: log.failure("control event {kind} failed", f, kind=kind)
        )
