"""Upkeep on a timer: work that runs every so many seconds while its service runs.

The server's services each keep something tidy this way (expired messages, unverified
accounts, rate-limit buckets, monitoring flags).  Twisted's ``LoopingCall`` is close
but stops for good at the first failure and cannot wait longer before its first run
than between runs, so the services share this instead:

* the first run is ``first`` seconds after `start` (by default one ``interval``), so
  nothing runs while the service tree is still starting;
* the next run is scheduled when the last one is over (its Deferred, if any, fired),
  so runs never overlap however slow the store is;
* a failure is logged with ``what`` and the next run still comes;
* `stop` cancels what is scheduled, and nothing is scheduled after it.

It is a service of its own (as Twisted's ``TimerService``): a service whose job is its
upkeep (`ChatService`, `AccountSecurity`) is one, and starts and stops with the tree;
other owners call `start` and `stop`.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import Service
from twisted.internet.defer import maybeDeferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

log = Logger()


class Repeating(Service):
    def __init__(
        self,
        clock: IReactorTime,
        interval: float,
        work: Callable[[], object],
        what: str,
        first: float | None = None,
    ) -> None:
        self._timer_clock = clock
        self._interval = interval
        self._work = work
        self._what = what
        self._first = interval if first is None else first
        self._call: IDelayedCall | None = None
        self._repeating = False

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.start()

    def stopService(self) -> None:
        self.stop()
        super().stopService()  # type: ignore[no-untyped-call]

    def start(self) -> None:
        self._repeating = True
        self._call = self._timer_clock.callLater(self._first, self._run)

    def stop(self) -> None:
        self._repeating = False
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None

    def _run(self) -> None:
        self._call = None
        d = maybeDeferred(self._work)
        d.addErrback(lambda f: log.failure(self._what, f))
        d.addBoth(self._again)

    def _again(self, _: object) -> None:
        if self._repeating and self._call is None:
            self._call = self._timer_clock.callLater(self._interval, self._run)
