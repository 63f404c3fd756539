"""The failure throttle in Redis: every process of a cluster counts the same failures.

Same rules as the memory `AuthThrottle` (`decide` is shared); what differs is where the
failures live.  Each key (``h:<address>``, ``a:<name>``) is a sorted set of failure times
under ``<prefix>throttle:``, trimmed to the window and to ``max_failures_per_hour``
entries, expiring a window after its last failure; a demanded CAPTCHA is a key
``<prefix>throttle:force:<key>`` holding its end and expiring then.  A check and a
failure are one Lua script each, so two processes never interleave inside one.

Times are the reactor clock's (as in memory), so processes must keep their clocks in
sync (NTP; the tokens' expiry already needs it).  Redis expires the keys for memory's
sake only: the window is applied on the stored times.

**Redis down or slow** (no answer within ``timeout``): a check fails *closed*: the
attempt is refused with ``retry_after = unavailable_wait``, since letting it through
would give an attacker unthrottled guesses for as long as Redis is away (and taking
Redis away may be their doing).  Failures and successes that could not be recorded are
logged and lost.
"""

from __future__ import annotations

import secrets
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from shtalk.server.accounts.throttle import (
    WINDOW,
    KeyFailures,
    Verdict,
    address_key,
    decide,
    throttle_keys,
)
from shtalk.server.config import ThrottleSection
from shtalk.server.ishared import IAuthThrottle
from shtalk.server.ops.redislink import RedisLink, Script

log = Logger()

CHECK = Script("""
local now = tonumber(ARGV[1])
local cutoff = string.format('%.17g', now - tonumber(ARGV[2]))
local cap = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local out = {}
for i = 1, n do
  local k = KEYS[i]
  redis.call('ZREMRANGEBYSCORE', k, '-inf', cutoff)
  local c = redis.call('ZCARD', k)
  local last, oldest = '', ''
  if c > 0 then
    last = redis.call('ZRANGE', k, -1, -1, 'WITHSCORES')[2]
    if c >= cap then oldest = redis.call('ZRANGE', k, -cap, -cap, 'WITHSCORES')[2] end
  end
  out[#out + 1] = c
  out[#out + 1] = last
  out[#out + 1] = oldest
end
local forced = 0
for i = n + 1, #KEYS do
  local untl = redis.call('GET', KEYS[i])
  if untl then
    if tonumber(untl) > now then forced = 1 else redis.call('DEL', KEYS[i]) end
  end
end
out[#out + 1] = forced
return out
""")

FAILED = Script("""
local cutoff = string.format('%.17g', tonumber(ARGV[1]) - tonumber(ARGV[2]))
local cap = tonumber(ARGV[3])
for i = 1, #KEYS do
  local k = KEYS[i]
  redis.call('ZADD', k, ARGV[1], ARGV[4])
  redis.call('ZREMRANGEBYSCORE', k, '-inf', cutoff)
  redis.call('ZREMRANGEBYRANK', k, 0, -(cap + 1))
  redis.call('PEXPIRE', k, ARGV[5])
end
return 1
""")

#: Seconds a refused attempt is told to wait while Redis does not answer.
UNAVAILABLE_WAIT = 10.0
#: Seconds between two warnings that Redis did not answer (a flood must not fill the log).
WARN_EVERY = 60.0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@implementer(IAuthThrottle)
class RedisThrottle:
    """`IAuthThrottle` shared through Redis (see the module doc)."""

    def __init__(
        self, link: RedisLink, clock: IReactorTime, section: ThrottleSection | None = None,
        window: float = WINDOW, unavailable_wait: float = UNAVAILABLE_WAIT,
    ) -> None:
        self.link = link
        self.clock = clock
        self.s = section or ThrottleSection()
        self.window = window
        self.unavailable_wait = unavailable_wait
        self.unavailable = 0  # checks refused because Redis did not answer
        self._warned_at: float | None = None

    def _key(self, key: str) -> str:
        return self.link.key("throttle", key)

    def _force_key(self, key: str) -> str:
        return self.link.key("throttle", "force", key)

    def _ttl_ms(self, seconds: float) -> int:
        return int(seconds * 1000) + 1000

    # -- before and after an attempt ------------------------------------------------------
    def check(self, account: str | None, address: str) -> Deferred[Verdict]:
        now = self.clock.seconds()
        keys = throttle_keys(account, address)
        d = self._stats(keys, now, forced=True)

        def verdict(found: tuple[list[KeyFailures], bool]) -> Verdict:
            return decide(self.s, now, found[0], found[1], self.window)

        def closed(failure: Failure) -> Verdict:
            self.unavailable += 1
            self._warn(failure, "refusing attempts on secrets until it answers")
            return Verdict(self.unavailable_wait, False, unavailable=True)

        return d.addCallbacks(verdict, closed)

    @inlineCallbacks
    def _stats(self, keys: list[str], now: float, forced: bool) -> Any:
        full = [self._key(k) for k in keys]
        if forced:
            full += [self._force_key(k) for k in keys]
        reply = yield self.link.run(
            CHECK, full,
            [repr(now), repr(self.window), self.s.max_failures_per_hour, len(keys)],
        )
        found = []
        for i, key in enumerate(keys):
            count, last, oldest = reply[3 * i: 3 * i + 3]
            n = int(count)
            if n:
                o = _text(oldest)
                found.append(KeyFailures(key, n, float(_text(last)), float(o) if o else None))
        return found, int(reply[-1]) == 1

    def failed(self, account: str | None, address: str) -> Deferred[None]:
        now = self.clock.seconds()
        keys = [self._key(k) for k in throttle_keys(account, address)]
        d = self.link.run(FAILED, keys, [
            repr(now), repr(self.window), self.s.max_failures_per_hour,
            f"{now!r}:{secrets.token_hex(8)}", self._ttl_ms(self.window),
        ])
        return self._recorded(d, "a failed attempt was not counted")

    def succeeded(self, account: str | None) -> Deferred[None]:
        if account is None:
            return succeed(None)
        d = self.link.command("DEL", self._key("a:" + account))
        return self._recorded(d, "a success did not clear the account's failures")

    def require_captcha(
        self, *, account: str | None = None, address: str | None = None, seconds: float = WINDOW
    ) -> Deferred[None]:
        until = repr(self.clock.seconds() + seconds)
        keys = []
        if account is not None:
            keys.append("a:" + account)
        if address is not None:
            keys.append("h:" + address_key(address))
        d = self._set_all(keys, until, seconds)
        return self._recorded(d, "a CAPTCHA demand was not recorded")

    @inlineCallbacks
    def _set_all(self, keys: list[str], until: str, seconds: float) -> Any:
        for key in keys:
            yield self.link.command("SET", self._force_key(key), until, "PX",
                                    self._ttl_ms(seconds))

    def failures(self, account: str | None = None, address: str | None = None) -> Deferred[int]:
        key = "a:" + account if account is not None else "h:" + address_key(address or "")
        d = self._stats([key], self.clock.seconds(), forced=False)
        return d.addCallback(lambda found: found[0][0].count if found[0] else 0)

    def prune(self) -> None:
        """Nothing to do: Redis expires the keys."""

    # -----------------------------------------------------------------------------------
    def _recorded(self, d: Deferred[Any], what: str) -> Deferred[None]:
        def done(_: object) -> None:
            return None

        def lost(failure: Failure) -> None:
            self._warn(failure, what)

        return d.addCallbacks(done, lost)

    def _warn(self, failure: Failure, what: str) -> None:
        now = self.clock.seconds()
        if self._warned_at is not None and now - self._warned_at < WARN_EVERY:
            return
        self._warned_at = now
        log.warn("failure throttle: Redis did not answer ({reason}); {what}",
                 reason=(failure.getErrorMessage() or type(failure.value).__name__)[:200],
                 what=what, event="throttle.redis_unavailable")
