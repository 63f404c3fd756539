"""The monitoring's CAPTCHA demands in Redis: raised by one process, asked by every one.

The demands are one sorted set, ``<prefix>captcha:demands``: a member per subject
(``a:<user id>``, ``h:<address>``) whose score is when the demand lapses (reactor
seconds, as in memory); the set itself expires with its last member.  Solving a CAPTCHA
on any process removes the member.

Each process keeps the set as it last read it (`accounts`, `addresses`), because the
``send`` path must not wait for Redis on every message: ``current()`` reads the set
again (every gate on a secret does that first, so a login always sees the demands of
every process), and `refresh_every` seconds `start` reads it too, so a demand raised
elsewhere reaches a logged-in sender within that time (the control channel, where
there is one, can call ``current()`` at once).  The set is small: a member per flag.

Redis down: the process goes on with the demands it knows and its own new ones (those
stay its own: the monitor raises them again if the behaviour goes on), and logs it.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from shtalk.server.accounts.gates import DEMAND_TTL
from shtalk.server.ishared import ICaptchaDemands
from shtalk.server.ops.redislink import RedisLink, Script

log = Logger()

READ = Script("""
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
return redis.call('ZRANGE', KEYS[1], 0, tonumber(ARGV[2]) - 1, 'WITHSCORES')
""")

ADD = Script("""
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
local last = tonumber(redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')[2])
local ms = math.ceil((last - tonumber(ARGV[3])) * 1000)
redis.call('PEXPIRE', KEYS[1], math.max(1000, ms))
return 1
""")

#: Demands read at most (flags are few; a flood of them must not flood the processes).
MAX_DEMANDS = 10_000
#: Seconds between two warnings that Redis did not answer.
WARN_EVERY = 60.0


def _all(writes: list[Deferred[None]]) -> Deferred[None]:
    return gatherResults(writes).addCallback(lambda _: None)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@implementer(ICaptchaDemands)
class RedisCaptchaDemands:
    """`ICaptchaDemands` shared through Redis (see the module doc)."""

    def __init__(
        self, link: RedisLink, clock: IReactorTime, ttl: float = DEMAND_TTL,
        refresh_every: float = 1.0,
    ) -> None:
        self.link = link
        self.clock = clock
        self.ttl = ttl
        self.refresh_every = refresh_every
        self.key = link.key("captcha", "demands")
        self.accounts: dict[int, float] = {}
        self.addresses: dict[str, float] = {}
        # Per read in flight: the changes made meanwhile, applied again on its answer.
        self._reads: list[list[tuple[str, float]]] = []
        self._timer: IDelayedCall | None = None
        self._running = False
        self._warned_at: float | None = None

    def now(self) -> float:
        return self.clock.seconds()

    # -- changes ----------------------------------------------------------------------
    def require(
        self, account_id: int | None = None, address: str | None = None
    ) -> Deferred[None]:
        until = self.now() + self.ttl
        writes = []
        for member in self._members(account_id, address):
            self._apply(member, until)
            d = self.link.run(ADD, [self.key], [repr(until), member, repr(self.now())])
            writes.append(self._written(d, "a CAPTCHA demand stays in this process only"))
        return _all(writes)

    def satisfied(
        self, account_id: int | None = None, address: str | None = None
    ) -> Deferred[None]:
        writes = []
        for member in self._members(account_id, address):
            self._apply(member, -math.inf)
            d = self.link.command("ZREM", self.key, member)
            writes.append(
                self._written(d, "a solved CAPTCHA demand stays for other processes")
            )
        return _all(writes)

    def _written(self, d: Deferred[Any], what: str) -> Deferred[None]:
        def done(_: object) -> None:
            return None

        def lost(failure: Failure) -> None:
            self._unavailable(failure, what)

        return d.addCallbacks(done, lost)

    @staticmethod
    def _members(account_id: int | None, address: str | None) -> list[str]:
        members = []
        if account_id is not None:
            members.append(f"a:{account_id}")
        if address is not None:
            members.append(f"h:{address}")
        return members

    def _apply(self, member: str, until: float) -> None:
        for changes in self._reads:
            changes.append((member, until))
        kind, _, subject = member.partition(":")
        if kind == "a":
            if until == -math.inf:
                self.accounts.pop(int(subject), None)
            else:
                self.accounts[int(subject)] = until
        elif until == -math.inf:
            self.addresses.pop(subject, None)
        else:
            self.addresses[subject] = until

    # -- reading ----------------------------------------------------------------------
    @inlineCallbacks
    def current(self) -> Any:
        """Read every demand not lapsed (never fails: Redis down keeps what we know)."""
        changes: list[tuple[str, float]] = []
        self._reads.append(changes)
        try:
            reply = yield self.link.run(READ, [self.key], [repr(self.now()), MAX_DEMANDS])
        except Exception as e:
            self._warn(str(e) or type(e).__name__,
                       "going on with the CAPTCHA demands this process knows")
            return None
        finally:
            self._reads.remove(changes)
        accounts: dict[int, float] = {}
        addresses: dict[str, float] = {}
        for i in range(0, len(reply) - 1, 2):
            kind, _, subject = _text(reply[i]).partition(":")
            until = float(_text(reply[i + 1]))
            if kind == "a":
                try:
                    accounts[int(subject)] = until
                except ValueError:
                    continue
            elif kind == "h":
                addresses[subject] = until
        self.accounts, self.addresses = accounts, addresses
        for member, until in changes:
            self._apply(member, until)
        return None

    def __bool__(self) -> bool:
        return bool(self.accounts or self.addresses)

    # -- upkeep -----------------------------------------------------------------------
    def start(self) -> None:
        """Read the demands every ``refresh_every`` seconds until `stop`."""
        self._running = True
        self._schedule()

    def _schedule(self, _: object = None) -> None:
        if self._running and self._timer is None:
            self._timer = self.clock.callLater(self.refresh_every, self._tick)

    def _tick(self) -> Deferred[None]:
        self._timer = None
        d: Deferred[None] = self.current()
        return d.addBoth(self._schedule)

    def stop(self) -> None:
        self._running = False
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _unavailable(self, failure: Failure, what: str) -> None:
        self._warn(failure.getErrorMessage() or type(failure.value).__name__, what)

    def _warn(self, reason: str, what: str) -> None:
        now = self.clock.seconds()
        if self._warned_at is not None and now - self._warned_at < WARN_EVERY:
            return
        self._warned_at = now
        log.warn("CAPTCHA demands: Redis did not answer ({reason}); {what}",
                 reason=reason[:200],
                 what=what, event="demands.redis_unavailable")
