"""Limits asked before a request runs: the rate limiter's buckets and the failure throttle.

The throttle is asked first so that one refusal names the later of the two waits (a
retry after ``retry_after`` then finds both open).  A connection refused with
``rate_limited`` more than ``[ratelimit] disconnect_after`` times within a minute is
closed: that is no longer a person retrying.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from shtalk.collaborators import collaborators
from shtalk.server.accounts.gates import UNAVAILABLE, Gates, account_key
from shtalk.server.accounts.throttle import Verdict
from shtalk.server.chat.naming import user_key
from shtalk.server.eserver import Throttled
from shtalk.server.ops.ratelimit import REQUEST_ACTIONS, RateLimiter
from shtalk.wire.errors import ProtocolError
from shtalk.wire.frames import Request

#: Requests that pass the failure throttle (Gates.gate), i.e. wait while it says so.
THROTTLED = frozenset({
    "register", "login", "verify_email", "password_reset_request", "password_reset",
    "password_change", "totp_confirm", "totp_disable", "totp_recovery_codes",
})


def _account_of(username: object) -> str | None:
    """The rate-limit account key of a username in a pre-login request (None: none)."""
    if not isinstance(username, str):
        return None
    try:
        return "n:" + user_key(username)[1]
    except ProtocolError:
        return "n:" + username[:64].lower()


def _wait(verdict: Verdict) -> float:
    if verdict.unavailable:  # the buckets need not be asked: refused anyway
        raise Throttled(UNAVAILABLE, retry_after=math.ceil(verdict.retry_after))
    return float(verdict.retry_after)


@collaborators
class RequestLimits:
    limiter: RateLimiter | None  # None: not rate limited
    gates: Gates | None  # None: no failure throttle
    clock: IReactorTime

    def check(self, request: Request, user: Any, peer: str, peer_key: str) -> Deferred[None] | None:
        """Raises `RateLimited`, or returns a pending check (a shared backend), or None
        when the request may run at once.  ``user``: the logged-in account, or None."""
        limiter = self.limiter
        if limiter is None:
            return None
        action = REQUEST_ACTIONS.get(request.type)
        if action is None:
            return None
        if user is not None:
            account: str | None = str(user.id)
        else:
            account = _account_of(request.args.get("username"))
        gates = self.gates
        if gates is None or request.type not in THROTTLED:
            return limiter.check(action, account, peer_key)
        # The throttle answers first (from Redis in a cluster): its wait decides how the
        # buckets are asked.
        held = self._throttled_for(gates, request, user, peer)
        return held.addCallback(lambda wait: limiter.check(action, account, peer_key, wait))

    @staticmethod
    def _throttled_for(gates: Gates, request: Request, user: Any, peer: str) -> Deferred[float]:
        """Seconds the failure throttle will make this request wait (0: none)."""
        if user is not None:
            account: str | None = user.key
        elif request.type == "register":
            account = None
        else:
            account = account_key(request.args["username"])
        d = gates.throttle.check(account, peer)
        return d.addCallback(_wait)

    def pay_register(self, username: str, peer_key: str) -> Deferred[None] | None:
        """One ``register`` token (per name tried and per address) for a new attempt."""
        if self.limiter is None:
            return None
        return self.limiter.check("register", "n:" + account_key(username), peer_key)

    def too_many(self, refused_at: deque[float]) -> bool:
        """Count one ``rate_limited`` refusal; True when the connection should close."""
        now = self.clock.seconds()
        refused_at.append(now)
        while refused_at and refused_at[0] < now - 60.0:
            refused_at.popleft()
        limiter = self.limiter
        return limiter is not None and len(refused_at) > limiter.config.disconnect_after
