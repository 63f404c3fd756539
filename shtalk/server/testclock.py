"""A server clock that system tests can move forward, without waiting (tests only).

With ``SHTALK_TEST_CLOCK_FILE=<path>`` in its environment the server reads its time as the
reactor's time plus the number of seconds written in that file (re-read whenever the file
changes; missing or empty means 0), and warns at start-up.  Everything that asks the
server's clock -- rate-limit buckets, the throttle, CAPTCHA and code expiry, tokens, the
monitor's windows -- sees the shifted time, and runs its real logic on it; timers
(``callLater``) still run in real time.  The system tests play "ten minutes of a
classroom registering" this way in seconds.  Never set it on a real server: whoever
can write the file can expire tokens and refill every bucket.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

ENV = "SHTALK_TEST_CLOCK_FILE"


@implementer(IReactorTime)
class OffsetClock:
    """The reactor, with ``seconds()`` shifted by the offset in ``path``."""

    def __init__(self, reactor: Any, path: str) -> None:
        self._reactor = reactor
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self.offset = 0.0

    def seconds(self) -> float:
        try:
            st = os.stat(self.path)
        except OSError:
            self._stamp, self.offset = None, 0.0
        else:
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    with open(self.path, encoding="ascii") as f:
                        self.offset = float(f.read().strip() or 0)
                except (OSError, ValueError):
                    self.offset = 0.0
        return float(self._reactor.seconds()) + self.offset

    def __getattr__(self, name: str) -> Any:
        # callLater, getDelayedCalls, callFromThread, getThreadPool ...: the reactor's.
        return getattr(self._reactor, name)


def clock_from_environment(reactor: Any) -> Any:
    """``OffsetClock`` when the test hook is set, else the reactor itself."""
    path = os.environ.get(ENV)
    return OffsetClock(reactor, path) if path else reactor
