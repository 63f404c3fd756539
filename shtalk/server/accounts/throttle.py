"""Throttling of failed authentication attempts: growing delays, then a CAPTCHA.

Not a generic rate limiter (that is ``shtalk.server.ops.ratelimit``): this counts *failures*
of secrets (password, TOTP or recovery code, emailed code) per account and per client
address over a sliding hour, and decides before each attempt whether it may go on:

* up to ``free_failures`` failures in the hour: no delay;
* then each further attempt must wait ``base_delay * 2**k`` seconds after the last
  failure (k = failures beyond the free ones), at most ``max_delay``;
* from ``captcha_after`` failures on an account (``address_captcha_after`` from one
  address) every attempt also needs a solved CAPTCHA;
* an account never lets more than ``max_failures_per_hour`` failures through in any
  hour (ASVS 4.0 2.2.1, NIST SP 800-63B 5.2.2); with the default delays it never gets
  near that.

Nothing here is permanent: records older than an hour fall away, so no one can lock
someone else out for longer than ``max_delay`` (plus solving a CAPTCHA).  A success
clears the account's record, not the address's (an attacker cannot launder an address by
logging in to an account of their own).  Account keys are the case-folded *names*
attempted, existing or not, so the throttle's answers reveal nothing about which
accounts exist.  IPv6 addresses count per /64 (one subscriber's usual allocation), keyed as
the rate limits key them (`shtalk.server.ops.ratelimit.address_key`).

`require_captcha` is the seam for the monitoring: it can demand a CAPTCHA for an account
or an address for a while, whatever the counts say.

Two implementations of `IAuthThrottle` share `decide` (the rules above): `AuthThrottle`
here (one process, the default) and `shtalk.server.accounts.redisthrottle.RedisThrottle`
(every process of a cluster counts the same failures, so spreading attempts over the
processes gains an attacker nothing).  Every method answers with a Deferred so callers
do not care which one they have.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from shtalk.server.config import ThrottleSection
from shtalk.server.ishared import IAuthThrottle
from shtalk.server.ops.ratelimit import address_key

__all__ = ["AuthThrottle", "KeyFailures", "Verdict", "address_key", "decide", "throttle_keys"]

WINDOW = 3600.0
MAX_KEYS = 200_000


@dataclass(frozen=True, slots=True)
class Verdict:
    """What an attempt may do now: wait ``retry_after`` seconds, and/or solve a CAPTCHA."""

    retry_after: float = 0.0
    captcha: bool = False
    #: The shared throttle did not answer: the attempt waits, whatever the counts.
    unavailable: bool = False

    @property
    def wait(self) -> bool:
        return self.retry_after > 0


@dataclass(frozen=True, slots=True)
class KeyFailures:
    """One key's failures in the window: how many, the last one's time, and (once there
    are ``max_failures_per_hour`` of them) the time of the oldest of that many."""

    key: str
    count: int
    last: float
    oldest_of_max: float | None = None


def throttle_keys(account: str | None, address: str) -> list[str]:
    """The keys an attempt counts under: its address (IPv6 by /64) and the name tried."""
    keys = ["h:" + address_key(address)]
    if account is not None:
        keys.append("a:" + account)
    return keys


def decide(
    s: ThrottleSection, now: float, found: Iterable[KeyFailures], forced: bool,
    window: float = WINDOW,
) -> Verdict:
    """The rules of the module doc, over the failures each key has in the window."""
    wait = 0.0
    captcha = forced
    for f in found:
        n = f.count
        if not n:
            continue
        is_account = f.key.startswith("a:")
        free = s.free_failures if is_account else s.address_free_failures
        if n >= free:
            delay = min(float(s.max_delay), s.base_delay * 2.0 ** (n - free))
            wait = max(wait, f.last + delay - now)
        if is_account and n >= s.max_failures_per_hour and f.oldest_of_max is not None:
            wait = max(wait, f.oldest_of_max + window - now)
        limit = s.captcha_after if is_account else s.address_captcha_after
        if n >= limit:
            captcha = True
    return Verdict(max(0.0, wait), captcha)


@implementer(IAuthThrottle)
class AuthThrottle:
    """The failure throttle of one process, in memory."""

    def __init__(
        self, clock: IReactorTime, section: ThrottleSection | None = None,
        window: float = WINDOW,
    ) -> None:
        self.clock = clock
        self.s = section or ThrottleSection()
        self.window = window
        self._failures: dict[str, deque[float]] = {}
        self._forced: dict[str, float] = {}

    # -- the monitoring's seam ----------------------------------------------------------
    def require_captcha(
        self, *, account: str | None = None, address: str | None = None, seconds: float = WINDOW
    ) -> Deferred[None]:
        """Demand a CAPTCHA for every attempt on ``account`` (a user key) and/or from
        ``address`` for ``seconds``."""
        until = self.clock.seconds() + seconds
        if account is not None:
            self._forced["a:" + account] = until
        if address is not None:
            self._forced["h:" + address_key(address)] = until
        return succeed(None)

    def _captcha_forced(self, account: str | None, address: str) -> bool:
        now = self.clock.seconds()
        for key in throttle_keys(account, address):
            until = self._forced.get(key)
            if until is not None:
                if until > now:
                    return True
                del self._forced[key]
        return False

    # -- before and after an attempt ------------------------------------------------------
    def check(self, account: str | None, address: str) -> Deferred[Verdict]:
        return succeed(self.check_now(account, address))

    def check_now(self, account: str | None, address: str) -> Verdict:
        now = self.clock.seconds()
        found = []
        cap = self.s.max_failures_per_hour
        for key in throttle_keys(account, address):
            times = self._recent(key, now)
            if times:
                oldest = times[-cap] if len(times) >= cap else None
                found.append(KeyFailures(key, len(times), times[-1], oldest))
        return decide(self.s, now, found, self._captcha_forced(account, address), self.window)

    def failed(self, account: str | None, address: str) -> Deferred[None]:
        now = self.clock.seconds()
        if len(self._failures) > MAX_KEYS:
            self.prune()
        for key in throttle_keys(account, address):
            times = self._failures.setdefault(key, deque(maxlen=self.s.max_failures_per_hour))
            times.append(now)
        return succeed(None)

    def succeeded(self, account: str | None) -> Deferred[None]:
        if account is not None:
            self._failures.pop("a:" + account, None)
        return succeed(None)

    def failures(self, account: str | None = None, address: str | None = None) -> Deferred[int]:
        """Failures in the window (for tests and the monitoring)."""
        key = "a:" + account if account is not None else "h:" + address_key(address or "")
        return succeed(len(self._recent(key, self.clock.seconds())))

    def prune(self) -> None:
        now = self.clock.seconds()
        for key in [k for k, t in self._failures.items() if not t or t[-1] <= now - self.window]:
            del self._failures[key]
        for key in [k for k, until in self._forced.items() if until <= now]:
            del self._forced[key]

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
        return times
