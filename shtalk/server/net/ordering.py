"""The order a connection's requests run in: as sent, except that consecutive sends,
acks and pings overlap.

So ``register`` then ``login`` pasted together behave as typed, while the message path
stays pipelined (the store keeps the overlapping ones in order).  A request that waits
for its turn waits on a Deferred of the ones before it; the one that runs is given by
the connection (``run``), and its Deferred must always succeed (errors were replied).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred, gatherResults

from shtalk.wire.frames import Request

PIPELINED = frozenset({"send", "ack", "ping"})


def _after(d: Deferred[None]) -> Deferred[None]:
    """A Deferred that fires when ``d`` does, without taking its result."""
    out: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        out.callback(None)
        return result

    d.addBoth(fire)
    return out


class RequestOrder:
    __slots__ = ("_inflight", "_serial")

    def __init__(self) -> None:
        self._serial: Deferred[None] | None = None  # the last request not pipelined
        self._inflight: set[Deferred[None]] = set()  # pipelined ones since

    def schedule(self, request: Request, run: Callable[[Request], Deferred[None]]) -> None:
        pipelined = request.type in PIPELINED
        if pipelined:
            serial = self._serial
            gate = _after(serial) if serial is not None and not serial.called else None
        else:
            gate = self._all_done()
        done = run(request) if gate is None else gate.addCallback(lambda _: run(request))
        if pipelined:
            self._inflight.add(done)
            done.addCallback(self._untrack, done)
        else:
            self._serial = done
            self._inflight.clear()
            done.addCallback(self._serial_finished, done)

    def wait_for(self, d: Deferred[Any]) -> None:
        """Requests scheduled from now on wait for ``d`` too (as for a request that is
        not pipelined), whatever it fires with."""
        gate = _after(d)
        pending = self._all_done()
        if pending is not None:
            gate = gatherResults([pending, gate]).addCallback(lambda _: None)
        self._serial = gate
        self._inflight.clear()
        gate.addCallback(self._serial_finished, gate)

    def _all_done(self) -> Deferred[None] | None:
        pending = [d for d in self._inflight if not d.called]
        if self._serial is not None and not self._serial.called:
            pending.append(self._serial)
        if not pending:
            return None
        return gatherResults([_after(d) for d in pending]).addCallback(lambda _: None)

    def _untrack(self, _: object, done: Deferred[None]) -> None:
        self._inflight.discard(done)

    def _serial_finished(self, _: object, done: Deferred[None]) -> None:
        if self._serial is done:
            self._serial = None
