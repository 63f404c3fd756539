"""What an attempt on a secret passes first: the failure throttle and the CAPTCHA.

Every request that checks a password or a code asks the throttle first (keyed by the
name tried and the address; it refuses while a delay runs and demands a CAPTCHA after
repeated failures) and reports each failure to it.  The monitoring may also demand a
CAPTCHA of an account or an address (`CaptchaDemands`; in a cluster
``shtalk.server.accounts.redisdemands``), cleared once one is solved or after a day.
CAPTCHAs are bound to the connection that was shown them (``owner``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from shtalk.collaborators import collaborators
from shtalk.server.accounts.captcha import CaptchaBook
from shtalk.server.accounts.throttle import Verdict
from shtalk.server.chat.users import Users
from shtalk.server.config import AccountsSection
from shtalk.server.eserver import BadRequest, CaptchaFailed, CaptchaRequired, Throttled
from shtalk.server.ishared import IAuthThrottle, ICaptchaDemands
from shtalk.wire.names import NameError_, normalise_username

log = Logger()

NO_ACCOUNT = 0
"""Stands in for a missing account so that the same queries run (ids start at 1)."""

MAX_MISSES = 5
"""Wrong CAPTCHA answers one registration attempt includes (typos are not abuse)."""

UNAVAILABLE = "the server cannot count failed attempts right now; try again shortly"
"""The refusal while the shared failure throttle does not answer (it fails closed)."""

DEMAND_TTL = 86400.0
"""Seconds a demand of the monitoring lasts if no CAPTCHA is solved (it is raised again
if the behaviour goes on)."""


def account_key(username: str) -> str:
    """The throttle's key for a name as typed: its canonical form, existing or not."""
    try:
        return normalise_username(username)[1]
    except NameError_:
        return username.casefold()[:64]


@dataclass
class RegisterAttempt:
    """A connection's registration attempt: paid for (one ``register`` token), and how
    many wrong CAPTCHA answers it has had.  Lives with the connection, like its CAPTCHAs."""

    paid: bool = False
    misses: int = 0

    def missed(self, kind: str) -> None:
        # A question in words is so much easier to guess: one miss ends the attempt.
        self.misses += MAX_MISSES if kind == "words" else 1
        if self.misses >= MAX_MISSES:
            self.paid = False

    def used(self) -> None:
        self.paid, self.misses = False, 0


@implementer(ICaptchaDemands)
class CaptchaDemands:
    """Accounts and addresses the monitoring flagged: each must solve a CAPTCHA at its
    next key interaction (login, register, password requests, and ``send`` for a
    session already logged in); an entry goes once a CAPTCHA is solved, or after
    ``ttl`` seconds (never without a clock).  One process's, in memory."""

    def __init__(self, clock: IReactorTime | None = None, ttl: float = DEMAND_TTL) -> None:
        self.clock = clock
        self.ttl = ttl
        #: subject -> until (reactor seconds)
        self.accounts: dict[int, float] = {}
        self.addresses: dict[str, float] = {}

    def now(self) -> float:
        return self.clock.seconds() if self.clock is not None else 0.0

    def _until(self) -> float:
        return self.now() + self.ttl if self.clock is not None else math.inf

    def require(
        self, account_id: int | None = None, address: str | None = None
    ) -> Deferred[None]:
        until = self._until()
        if account_id is not None:
            self.accounts[account_id] = until
        if address is not None:
            self.addresses[address] = until
        return succeed(None)

    def satisfied(
        self, account_id: int | None = None, address: str | None = None
    ) -> Deferred[None]:
        if account_id is not None:
            self.accounts.pop(account_id, None)
        if address is not None:
            self.addresses.pop(address, None)
        return succeed(None)

    def current(self) -> Deferred[None]:
        now = self.now()
        for uid in [k for k, until in self.accounts.items() if until <= now]:
            del self.accounts[uid]
        for address in [k for k, until in self.addresses.items() if until <= now]:
            del self.addresses[address]
        return succeed(None)

    def __bool__(self) -> bool:
        return bool(self.accounts or self.addresses)


Demand = tuple[str, Any]  # ("account", user id) or ("address", address)


@collaborators
class Gates:
    captchas: CaptchaBook
    throttle: IAuthThrottle
    demands: ICaptchaDemands
    users: Users
    settings: AccountsSection
    # Test hook (SHTALK_TEST_CAPTCHA_ANSWERS): system tests read answers there.
    captcha_answers: str | None = None

    # -- CAPTCHAs -----------------------------------------------------------------------
    def new_captcha(self, owner: str, kind: str = "art") -> dict[str, Any]:
        if kind == "words" and not self.settings.captcha_words:
            raise BadRequest(
                'this server offers only the drawn CAPTCHA ([accounts] captcha_words = false)'
            )
        challenge = self.captchas.issue(owner, kind)
        if self.captcha_answers:
            with open(self.captcha_answers, "a", encoding="ascii") as f:
                f.write(f"{challenge['id']} {self.captchas.answer_for_tests(challenge['id'])}\n")
        return challenge

    def _captcha(self, owner: str, captcha: dict[str, Any] | None) -> None:
        if captcha is None:
            raise CaptchaRequired(
                "solve the CAPTCHA in this error and send the request again with "
                '"captcha": {"id": ..., "answer": ...}',
                captcha=self.new_captcha(owner),
            )
        kind = self.captchas.kind_of(captcha)  # a wrong answer gets one of the same kind
        if not self.captchas.check(owner, captcha):
            raise CaptchaFailed(
                "wrong, expired or already used CAPTCHA answer; try the new one in this error",
                captcha=self.new_captcha(owner, kind),
            )

    # -- gates --------------------------------------------------------------------------
    @staticmethod
    def _refuse_while_throttled(verdict: Verdict) -> None:
        if verdict.unavailable:
            raise Throttled(UNAVAILABLE, retry_after=math.ceil(verdict.retry_after))
        if verdict.wait:
            raise Throttled(
                "too many failed attempts; wait before trying again",
                retry_after=math.ceil(verdict.retry_after),
            )

    @inlineCallbacks
    def gate(
        self,
        owner: str,
        account: str | None,
        address: str,
        captcha: dict[str, Any] | None,
        always_captcha: bool = False,
        user_id: int | None = None,
    ) -> Any:
        """Before an attempt: refuse while throttled; demand a CAPTCHA when due (the
        throttle's counts, ``always_captcha``, or the monitoring's demands)."""
        verdict = yield self.throttle.check(account, address)
        self._refuse_while_throttled(verdict)
        yield self.demands.current()
        monitor = self._monitor_demands(account, user_id, address)
        if verdict.captcha or always_captcha or monitor:
            self._captcha(owner, captcha)
            self._monitor_satisfied(monitor)

    @inlineCallbacks
    def register_gate(
        self,
        owner: str,
        address: str,
        captcha: dict[str, Any] | None,
        attempt: RegisterAttempt,
        pay: Callable[[], Deferred[None] | None],
    ) -> Any:
        """Before creating an account whose name and password passed their checks.

        One registration attempt (``pay``: a token of the ``register`` rate limit) covers
        showing a CAPTCHA and answering it: wrong answers get a new challenge for free,
        up to `MAX_MISSES` (a miss on a question in words counts as all of them, the
        question being so much easier to guess); after that the next challenge is a new
        attempt.  The attempt is used up once the account exists (``attempt.used()``).
        """
        verdict = yield self.throttle.check(None, address)
        self._refuse_while_throttled(verdict)
        yield self.demands.current()
        monitor = self._monitor_demands(None, None, address)
        if not attempt.paid:
            yield pay()
            attempt.paid, attempt.misses = True, 0
        if verdict.captcha or self.settings.require_captcha or monitor:
            kind = self.captchas.kind_of(captcha)
            try:
                self._captcha(owner, captcha)
            except CaptchaFailed:
                attempt.missed(kind)
                raise
            self._monitor_satisfied(monitor)

    def monitor_gate(
        self, owner: str, user_id: int, address: str, captcha: dict[str, Any] | None
    ) -> None:
        """For a logged-in request (``send``): a CAPTCHA if the monitoring demands one of
        this account or address, cleared once solved."""
        demands = self._monitor_demands(None, user_id, address)
        if demands:
            self._captcha(owner, captcha)
            self._monitor_satisfied(demands)

    def _monitor_demands(
        self, account: str | None, user_id: int | None, address: str
    ) -> list[Demand]:
        """The monitoring's demands that apply to this attempt."""
        found: list[Demand] = []
        now = self.demands.now()
        until = self.demands.addresses.get(address)
        if until is not None and until > now:
            found.append(("address", address))
        names = self.users.names
        for uid, until in list(self.demands.accounts.items()):
            if until <= now:
                continue
            name = names.get(uid)
            if uid == user_id or (
                account is not None and name is not None and account_key(name) == account
            ):
                found.append(("account", uid))
        return found

    def _monitor_satisfied(self, demands: list[Demand]) -> None:
        for kind, subject in demands:
            if kind == "account":
                self.demands.satisfied(account_id=subject)
            else:
                self.demands.satisfied(address=subject)

    def failed(self, account: str | None, address: str, what: str) -> Deferred[None]:
        """Count a failure (the Deferred fires once it is recorded; it never fails)."""
        log.info("failed {what} attempt", what=what)
        return self.throttle.failed(account, address).addErrback(_not_recorded)

    def succeeded(self, account: str | None) -> Deferred[None]:
        return self.throttle.succeeded(account).addErrback(_not_recorded)


def _not_recorded(failure: Failure) -> None:
    log.failure("the failure throttle did not record an attempt", failure)
