"""A ping on a Redis connection of the bus, so a dead one is noticed.

A connection that silently went away (a NAT or a firewall dropping it, a Redis that
stopped answering) would otherwise look alive for as long as nothing is written; each
of the bus's connections sends its own kind of ping every ``interval`` seconds, and one
not answered by the next is aborted, so it reconnects.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()


class Keepalive:
    def __init__(
        self, clock: IReactorTime, interval: float, send: Callable[[], None], what: str
    ) -> None:
        self.clock = clock
        self.interval = interval
        self.send = send  # writes the connection's ping
        self.what = what  # for the log line
        self.proto: Any = None
        self._call: IDelayedCall | None = None
        self._due = False

    def start(self, proto: Any) -> None:
        """A new connection: ping it (an earlier connection's pings stop)."""
        self.stop()
        self.proto = proto
        self._call = self.clock.callLater(self.interval, self._tick)

    def answered(self) -> None:
        self._due = False

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.proto = None
        self._due = False

    def _tick(self) -> None:
        self._call = None
        proto = self.proto
        if proto is None:
            return
        if self._due:
            log.warn("Redis did not answer the {what}'s ping: reconnecting", what=self.what)
            proto.transport.abortConnection()
            return
        self._due = True
        self.send()
        self._call = self.clock.callLater(self.interval, self._tick)
