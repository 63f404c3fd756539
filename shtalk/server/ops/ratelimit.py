"""Token-bucket rate limiting per (action, account) and (action, address).

A request type maps to an action (`REQUEST_ACTIONS`); each action has a bucket per
account and one per client address (``[ratelimit]`` in the config: ``CAPACITY/SECONDS``,
a burst of CAPACITY refilled over SECONDS).  A request takes one token from both of its
buckets or from neither (all-or-nothing, so a refused request costs nothing); when one
is empty the request is refused with ``rate_limited`` and ``retry_after`` (seconds until
a token is back).

Backends: `MemoryBuckets` (one process; the default, synchronous, a few µs) and
`shtalk.server.ops.redisbackend.RedisBuckets` (one atomic Lua script per check, so several
server processes share each bucket).  `FallbackBuckets` wraps Redis: when Redis fails
or answers too slowly it logs a warning and answers from memory (limits become per
process, never an outage) until a probe finds Redis again.

The limiter is built over its backend by shtalk.server.compose (``[ratelimit] backend``).

`RateLimiter.check` returns ``None`` when the request may go on at once (memory), raises
`RateLimited` when it may not, or returns a Deferred (Redis) that fires with ``None`` or
fails with `RateLimited`.  The fast path creates no Deferred at all.
"""

from __future__ import annotations

import ipaddress
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import field
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from shtalk.collaborators import collaborators
from shtalk.server.config import RATE_ACTIONS, RateLimitSection
from shtalk.server.ops.limit import Limit
from shtalk.server.repeating import Repeating
from shtalk.wire.errors import ErrorCode, ProtocolError

log = Logger()

__all__ = [
    "REQUEST_ACTIONS", "Buckets", "FallbackBuckets", "Limit", "MemoryBuckets", "RateLimited",
    "RateLimiter", "address_key",
]

# Request type -> action.  The account-security requests that check a code,
# a CAPTCHA answer or a TOTP are "verify"; unknown types are not limited here.
REQUEST_ACTIONS: dict[str, str] = {
    # Each register request is a check (name, password, email); the "register" bucket
    # is taken once per registration attempt by the handler (shtalk.server.net.account).
    "register": "register_check",
    "login": "login",
    "resume": "login",
    "refresh": "login",
    "send": "send",
    "keys_fetch": "prekey_fetch",
    "room_join": "join",
    "report": "report",
    # Account security: codes, CAPTCHAs, TOTP, password reset and change.
    "verify_email": "verify",
    "resend_verification": "verify",
    "captcha": "verify",
    "password_reset_request": "verify",
    "password_reset": "verify",
    "password_change": "verify",
    "totp_enroll": "verify",
    "totp_confirm": "verify",
    "totp_disable": "verify",
    "totp_recovery_codes": "verify",
}


class RateLimited(ProtocolError):
    def __init__(self, action: str, retry_after: float, what: str = "") -> None:
        wait = max(1, math.ceil(retry_after))
        super().__init__(
            ErrorCode.RATE_LIMITED,
            f"{what or f'too many {action} requests'}; retry in {wait} s",
            retry_after=wait,
        )
        self.action = action
        self.retry_after = wait


class Buckets(Protocol):
    """A backend: take one token from every bucket, or from none.

    Returns 0.0 when taken, else the seconds until all buckets hold a token; either at
    once (a float) or later (a Deferred of one).
    """

    name: str

    def take(
        self, keys: Sequence[str], limits: Sequence[Limit], peek: bool = False
    ) -> float | Deferred[float]:
        """``peek``: only say how long until all buckets hold a token; take nothing."""


class MemoryBuckets:
    """Buckets in a dict: ``key -> [tokens, last refill time]``.  Swept of full buckets."""

    name = "memory"

    def __init__(self, clock: IReactorTime, max_keys: int = 200_000) -> None:
        self.clock = clock
        self.max_keys = max_keys
        self.buckets: dict[str, list[float]] = {}
        self._ttl: dict[str, float] = {}

    def take(self, keys: Sequence[str], limits: Sequence[Limit], peek: bool = False) -> float:
        now = self.clock.seconds()
        buckets = self.buckets
        states = []
        wait = 0.0
        for key, limit in zip(keys, limits, strict=True):
            state = buckets.get(key)
            if state is None:
                if len(buckets) >= self.max_keys:
                    self.sweep()
                state = buckets[key] = [limit.capacity, now]
                self._ttl[key] = limit.ttl
            else:
                tokens = state[0] + (now - state[1]) * limit.rate
                state[0] = tokens if tokens < limit.capacity else limit.capacity
                state[1] = now
            if state[0] < 1.0:
                wait = max(wait, (1.0 - state[0]) / limit.rate)
            states.append(state)
        if wait or peek:
            return wait
        for state in states:
            state[0] -= 1.0
        return 0.0

    def sweep(self) -> int:
        """Forget buckets that have refilled completely (they equal a new bucket)."""
        now = self.clock.seconds()
        full = [k for k, s in self.buckets.items() if now - s[1] >= self._ttl.get(k, 0.0)]
        for k in full:
            del self.buckets[k]
            self._ttl.pop(k, None)
        return len(full)


@collaborators
class FallbackBuckets:
    """Redis first; on an error or a slow answer, memory, with a warning, until Redis is back."""

    primary: Any
    fallback: MemoryBuckets
    clock: IReactorTime
    retry: float
    degraded: bool = field(default=False, init=False)
    degradations: int = field(default=0, init=False)
    _probe: Any = field(default=None, init=False)

    @property
    def name(self) -> str:
        return f"{self.primary.name}+memory" + (" (degraded)" if self.degraded else "")

    def take(
        self, keys: Sequence[str], limits: Sequence[Limit], peek: bool = False
    ) -> float | Deferred[float]:
        if self.degraded:
            return self.fallback.take(keys, limits, peek)
        d: Deferred[float] = self.primary.take(keys, limits, peek)

        def failed(failure: Any) -> float:
            self.degrade(failure.getErrorMessage() or type(failure.value).__name__)
            return self.fallback.take(keys, limits, peek)

        return d.addErrback(failed)

    def degrade(self, why: str) -> None:
        if self.degraded:
            return
        self.degraded = True
        self.degradations += 1
        log.warn(
            "rate limiting: Redis unavailable ({reason}); falling back to per-process "
            "memory buckets until it answers again",
            reason=why[:200],
            event="ratelimit.degraded",
        )
        self._schedule_probe()

    def _schedule_probe(self) -> None:
        self._probe = self.clock.callLater(self.retry, self._try_primary)

    def _try_primary(self) -> None:
        self._probe = None
        d: Deferred[Any] = self.primary.ping()

        def back(_: object) -> None:
            self.degraded = False
            log.info("rate limiting: Redis is back; buckets are shared again",
                     event="ratelimit.restored")

        def still_down(_: object) -> None:
            self._schedule_probe()

        d.addCallbacks(back, still_down)

    def close(self) -> None:
        if self._probe is not None and self._probe.active():
            self._probe.cancel()
        self._probe = None
        self.primary.close()


def address_key(host: str) -> str:
    """The bucket key of a client address: IPv4 as is, IPv6 by its /64 (one host's share)."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host
    if ip.version == 6:
        mapped = ip.ipv4_mapped  # type: ignore[union-attr]
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class RateLimiter:
    """The server's limiter: the config's buckets over one backend; counts refusals."""

    def __init__(
        self, config: RateLimitSection, clock: IReactorTime, backend: Any | None = None
    ) -> None:
        self.config = config
        self.clock = clock
        self.enabled = config.enabled
        self.backend: Any = backend if backend is not None else MemoryBuckets(clock)
        self.limits: dict[tuple[str, str], Limit | None] = {
            (action, scope): Limit.of(config.limit(action, scope))
            for action in RATE_ACTIONS
            for scope in ("account", "address")
        }
        self.hits: Counter[str] = Counter()
        self.checks = 0
        # Accounts the monitor throttled: account -> (factor, until).
        self.throttled: dict[str, tuple[float, float]] = {}
        self._sweeper: Repeating | None = None

    def start(self) -> None:
        if isinstance(self.backend, MemoryBuckets) or isinstance(
            getattr(self.backend, "fallback", None), MemoryBuckets
        ):
            self._sweeper = Repeating(self.clock, 60.0, self._sweep, "rate-limit sweep failed")
            self._sweeper.start()

    def _sweep(self) -> None:
        memory = self.backend if isinstance(self.backend, MemoryBuckets) else (
            self.backend.fallback
        )
        memory.sweep()
        now = self.clock.seconds()
        for account, (_, until) in list(self.throttled.items()):
            if until <= now:
                del self.throttled[account]

    def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.stop()
        self._sweeper = None
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def throttle(self, account: str, factor: float, seconds: float) -> None:
        """Shrink ``account``'s buckets to 1/factor for ``seconds`` (a monitor action)."""
        self.throttled[account] = (factor, self.clock.seconds() + seconds)

    def check(
        self, action: str, account: str | None, address: str | None, held: float = 0.0
    ) -> Deferred[None] | None:
        """Take a token for ``action`` from the account's and the address's bucket.

        ``held`` > 0: the request is refused anyway (the failure throttle makes it wait
        that long): take nothing, and refuse with the later of that wait and the
        buckets', so that retrying after ``retry_after`` finds both open."""
        if held > 0:
            return self._held(action, account, address, held)
        if not self.enabled:
            return None
        self.checks += 1
        keys, limits = self._buckets(action, account, address)
        if not keys:
            return None
        wait = self.backend.take(keys, limits)
        if isinstance(wait, Deferred):
            return wait.addCallback(self._decided, action)
        if wait:
            self.hits[action] += 1
            raise RateLimited(action, wait)
        return None

    def _held(
        self, action: str, account: str | None, address: str | None, held: float
    ) -> Deferred[None]:
        why = "too many failed attempts; wait before trying again"
        keys, limits = self._buckets(action, account, address) if self.enabled else ([], [])
        if not keys:
            raise RateLimited(action, held, why)
        wait = self.backend.take(keys, limits, peek=True)

        def refuse(bucket_wait: float) -> None:
            raise RateLimited(action, max(held, bucket_wait), why)

        if isinstance(wait, Deferred):
            return wait.addCallback(refuse)
        refuse(wait)
        raise AssertionError("unreachable")  # pragma: no cover

    def _buckets(
        self, action: str, account: str | None, address: str | None
    ) -> tuple[list[str], list[Limit]]:
        keys: list[str] = []
        limits: list[Limit] = []
        if account is not None:
            limit = self.limits[(action, "account")]
            if limit is not None:
                throttle = self.throttled.get(account) if self.throttled else None
                if throttle is not None:
                    if throttle[1] > self.clock.seconds():
                        limit = limit.scaled(throttle[0])
                        keys.append(f"{action}:t:{account}")
                    else:
                        del self.throttled[account]
                        keys.append(f"{action}:a:{account}")
                else:
                    keys.append(f"{action}:a:{account}")
                limits.append(limit)
        if address is not None:
            limit = self.limits[(action, "address")]
            if limit is not None:
                keys.append(f"{action}:ip:{address}")
                limits.append(limit)
        return keys, limits

    def _decided(self, wait: float, action: str) -> None:
        if wait:
            self.hits[action] += 1
            raise RateLimited(action, wait)
