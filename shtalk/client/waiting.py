"""Requests waiting for an authenticated connection, each until its own deadline.

A part of ServerSession apart because its rule is simple and easy to get wrong: a
waiting request fails with `RequestTimeout` at its deadline, or goes out (with what is
left of its time) once a connection is authenticated, or fails with the reason the
session stopped; cancelling it forgets it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from shtalk.client.errors import RequestTimeout
from shtalk.wire.records import ClientRequest


@dataclass
class Waiting:
    request: ClientRequest
    done: Deferred[dict[str, Any]]
    deadline: float
    limit: float
    timer: IDelayedCall


class WaitingRequests:
    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._waiting: list[Waiting] = []

    def wait(self, request: ClientRequest, deadline: float,
             limit: float) -> Deferred[dict[str, Any]]:
        """A Deferred for ``request``'s reply, once `take` hands it to a connection."""

        def cancel(d: Deferred[dict[str, Any]]) -> None:
            self._drop(d)

        d: Deferred[dict[str, Any]] = Deferred(cancel)
        timer = self.clock.callLater(max(0.0, deadline - self.clock.seconds()),
                                     self._expired, d, request.NAME, limit)
        self._waiting.append(Waiting(request, d, deadline, limit, timer))
        return d

    def take(self) -> list[Waiting]:
        """Every waiting request, in order, its timer stopped: the caller sends them."""
        waiting, self._waiting = self._waiting, []
        for w in waiting:
            if w.timer.active():
                w.timer.cancel()
        return waiting

    def fail_all(self, error: Exception) -> None:
        for w in self.take():
            w.done.errback(error)

    def _drop(self, d: Deferred[dict[str, Any]]) -> None:
        for w in self._waiting:
            if w.done is d:
                self._waiting.remove(w)
                if w.timer.active():
                    w.timer.cancel()
                return

    def _expired(self, d: Deferred[dict[str, Any]], rtype: str, limit: float) -> None:
        self._drop(d)
        d.errback(RequestTimeout(
            f"no authenticated connection within {limit:g} s; {rtype!r} was not sent"))
