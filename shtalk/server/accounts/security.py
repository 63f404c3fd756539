"""Account security: email verification and reset codes, CAPTCHA gates, TOTP, throttling.

One object (`AccountSecurity`, a service in the tree so its purge timer starts and stops
with the server) owns the parts and the rules; the protocol's handlers
(``shtalk.server.net.account``) only translate requests to calls and results to
replies.  The choices and their reasons are in docs/SECURITY.md, "Account security".

Rules kept everywhere here:

* Secrets (passwords, codes) never reach a log line or an error message.
* Unknown user, wrong password and wrong code give the same reply after the same work:
  lookups and code checks run against account id 0 (which never exists) when the
  account does not, and a bcrypt check runs against a dummy hash.
* Every failure of a secret goes to the throttle, keyed by the name tried and the
  address; every attempt first asks the throttle (and maybe for a CAPTCHA).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from shtalk.server.accounts import totp
from shtalk.server.accounts.captcha import CaptchaBook
from shtalk.server.accounts.mailer import Mailer
from shtalk.server.accounts.throttle import AuthThrottle, Verdict
from shtalk.server.config import AccountsSection, ThrottleSection
from shtalk.server.cred.passwords import PasswordHasher
from shtalk.server.store.records import CODE_OK, TotpRecord, User
from shtalk.wire.errors import ErrorCode, ProtocolError
from shtalk.wire.names import NameError_, normalise_username
from shtalk.wire.passwords import check_password_policy

log = Logger()

NO_ACCOUNT = 0
"""Stands in for a missing account so that the same queries run (ids start at 1)."""

PURGE_INTERVAL = 3600.0

# Second-factor outcomes for the password checker.
FACTOR_NONE = "none"  # no TOTP enrolled: the password is enough
FACTOR_OK = "ok"
FACTOR_MISSING = "missing"
FACTOR_WRONG = "wrong"


MAX_MISSES = 5
"""Wrong CAPTCHA answers one registration attempt includes (typos are not abuse)."""


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


def account_key(username: str) -> str:
    """The throttle's key for a name as typed: its canonical form, existing or not."""
    try:
        return normalise_username(username)[1]
    except NameError_:
        return username.casefold()[:64]


class AccountSecurity(Service):
    name = "security"

    def __init__(
        self,
        store: Any,
        hasher: PasswordHasher,
        mailer: Mailer,
        clock: IReactorTime,
        storage_key: bytes,
        accounts: AccountsSection | None = None,
        throttle: ThrottleSection | None = None,
        captcha_answers: str | None = None,
    ) -> None:
        self.store = store
        self.codes = store.codes
        self.hasher = hasher
        self.mailer = mailer
        self.clock = clock
        self.s = accounts or AccountsSection()
        self.captchas = CaptchaBook(clock, ttl=float(self.s.captcha_ttl))
        self.throttle = AuthThrottle(clock, throttle)
        self.box = totp.SecretBox(storage_key)
        self.captcha_answers = captcha_answers
        self.chat: Any = None  # the ChatService, for its caches and the monitoring seam
        self._purge: IDelayedCall | None = None

    def attach_chat(self, chat: Any) -> None:
        self.chat = chat

    def forget_user(self, key: str) -> None:
        """A cached account changed (status, password): drop it from the chat's cache."""
        if self.chat is not None:
            self.chat.forget_user(key)

    # -- life cycle ---------------------------------------------------------------------
    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._purge = self.clock.callLater(60.0, self._purge_now)

    def stopService(self) -> None:
        if self._purge is not None and self._purge.active():
            self._purge.cancel()
        self._purge = None
        super().stopService()  # type: ignore[no-untyped-call]

    def _purge_now(self) -> None:
        self.throttle.prune()
        self.mailer.sweep()  # outbox files whose codes expired (also those of a past run)
        d = self.purge_pending()
        d.addErrback(lambda f: log.failure("purging unverified accounts failed", f))
        if self.running:
            self._purge = self.clock.callLater(PURGE_INTERVAL, self._purge_now)

    @inlineCallbacks
    def purge_pending(self) -> Any:
        n = yield self.codes.purge_pending(self.clock.seconds() - self.s.pending_purge_after)
        if n:
            log.info("deleted {n} accounts whose email was never verified", n=n)
        return n

    # -- CAPTCHA and throttle gates -------------------------------------------------------
    def new_captcha(self, owner: str, kind: str = "art") -> dict[str, Any]:
        if kind == "words" and not self.s.captcha_words:
            raise ProtocolError(
                ErrorCode.BAD_FIELD,
                'this server offers only the drawn CAPTCHA ([accounts] captcha_words = false)',
            )
        challenge = self.captchas.issue(owner, kind)
        if self.captcha_answers:
            # Test hook (SHTALK_TEST_CAPTCHA_ANSWERS): system tests read answers here.
            with open(self.captcha_answers, "a", encoding="ascii") as f:
                f.write(f"{challenge['id']} {self.captchas.answer_for_tests(challenge['id'])}\n")
        return challenge

    def _captcha(self, owner: str, captcha: dict[str, Any] | None) -> None:
        if captcha is None:
            raise ProtocolError(
                ErrorCode.CAPTCHA_REQUIRED,
                "solve the CAPTCHA in this error and send the request again with "
                '"captcha": {"id": ..., "answer": ...}',
                captcha=self.new_captcha(owner),
            )
        kind = self.captchas.kind_of(captcha)  # a wrong answer gets one of the same kind
        if not self.captchas.check(owner, captcha):
            raise ProtocolError(
                ErrorCode.CAPTCHA_FAILED,
                "wrong, expired or already used CAPTCHA answer; try the new one in this error",
                captcha=self.new_captcha(owner, kind),
            )

    @staticmethod
    def _refuse_while_throttled(verdict: Verdict) -> None:
        if verdict.wait:
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                "too many failed attempts; wait before trying again",
                retry_after=math.ceil(verdict.retry_after),
            )

    def gate(
        self,
        owner: str,
        account: str | None,
        address: str,
        captcha: dict[str, Any] | None,
        always_captcha: bool = False,
        user_id: int | None = None,
    ) -> None:
        """Before an attempt: refuse while throttled; demand a CAPTCHA when due (the
        throttle's counts, ``always_captcha``, or the monitoring's demands)."""
        verdict = self.throttle.check(account, address)
        self._refuse_while_throttled(verdict)
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
        verdict = self.throttle.check(None, address)
        self._refuse_while_throttled(verdict)
        monitor = self._monitor_demands(None, None, address)
        if not attempt.paid:
            yield pay()
            attempt.paid, attempt.misses = True, 0
        if verdict.captcha or self.s.require_captcha or monitor:
            kind = self.captchas.kind_of(captcha)
            try:
                self._captcha(owner, captcha)
            except ProtocolError as e:
                if e.code is ErrorCode.CAPTCHA_FAILED:
                    attempt.missed(kind)
                raise
            self._monitor_satisfied(monitor)

    def monitor_gate(
        self, owner: str, user_id: int, address: str, captcha: dict[str, Any] | None
    ) -> None:
        """For a logged-in request (``send``): a CAPTCHA if the monitoring demands one of
        this account or address (``ChatService.require_captcha``), cleared once solved."""
        demands = self._monitor_demands(None, user_id, address)
        if demands:
            self._captcha(owner, captcha)
            self._monitor_satisfied(demands)

    def _monitor_demands(
        self, account: str | None, user_id: int | None, address: str
    ) -> list[tuple[set[Any], Any]]:
        """Entries of ``ChatService.require_captcha`` (the monitoring's seam) that apply."""
        chat = self.chat
        if chat is None:
            return []
        found: list[tuple[set[Any], Any]] = []
        addresses: set[Any] = getattr(chat, "captcha_required_addresses", set())
        if address in addresses:
            found.append((addresses, address))
        accounts: set[Any] = getattr(chat, "captcha_required_accounts", set())
        for uid in list(accounts):
            name = chat.names.get(uid)
            if uid == user_id or (
                account is not None and name is not None and account_key(name) == account
            ):
                found.append((accounts, uid))
        return found

    @staticmethod
    def _monitor_satisfied(demands: list[tuple[set[Any], Any]]) -> None:
        for subjects, subject in demands:
            subjects.discard(subject)

    def failed(self, account: str | None, address: str, what: str) -> None:
        self.throttle.failed(account, address)
        log.info("failed {what} attempt", what=what)

    # -- email verification ---------------------------------------------------------------
    @inlineCallbacks
    def start_verification(self, user: User) -> Any:
        """Store a fresh code and mail it; the mail is sent in the background."""
        code = totp.new_email_code()
        now = self.clock.seconds()
        stored = yield self.codes.put_email_code(
            user.id, "verify", totp.code_hash(code), now + self.s.email_code_ttl, now, 0.0
        )
        if stored:
            self._mail(user, code, "verify")

    def _mail(self, user: User, code: str, purpose: str) -> None:
        minutes = max(1, self.s.email_code_ttl // 60)
        if purpose == "verify":
            subject = "Your shtalk verification code"
            intro = f'the code to verify the email address of the shtalk account "{user.name}" is'
            outro = (
                "If you did not create this account, ignore this mail: an account that is "
                "never verified is deleted."
            )
        else:
            subject = "Your shtalk password reset code"
            intro = f'the code to set a new password for the shtalk account "{user.name}" is'
            outro = (
                "If you did not ask for it, ignore this mail: your password stays as it is. "
                "Every session of the account is logged out when the password changes."
            )
        body = (
            f"Hello {user.name},\n\n{intro}:\n\n    {code}\n\n"
            f"It works once and only for the next {minutes} minutes.\n\n{outro}\n"
        )
        d = self.store.email_of(user.id)

        def send(to: str | None) -> Any:
            if to is None:
                log.warn("no email address to mail to", user_id=user.id)
                return None
            return self.mailer.send(to, subject, body, purpose)

        d.addCallback(send)
        d.addErrback(lambda f: log.failure("mail delivery crashed", f))

    @inlineCallbacks
    def verify_email(
        self, owner: str, address: str, username: str, code: str, captcha: dict[str, Any] | None
    ) -> Any:
        key = account_key(username)
        self.gate(owner, key, address, captcha)
        user = yield self.store.user_by_key(key)
        uid = user.id if user is not None and user.status == "pending" else NO_ACCOUNT
        outcome = yield self.codes.check_email_code(
            uid, "verify", totp.code_hash(code), self.clock.seconds(), self.s.email_code_attempts
        )
        if outcome != CODE_OK:
            self.failed(key, address, "email verification")
            raise ProtocolError(
                ErrorCode.INVALID_CODE,
                "wrong, expired or already used code; resend_verification mails a new one",
            )
        self.throttle.succeeded(key)
        self.forget_user(key)
        log.info("email verified; account active", user_id=uid)
        return {"user": user.name, "status": "active"}

    @inlineCallbacks
    def resend_verification(self, username: str) -> Any:
        key = account_key(username)
        user = yield self.store.user_by_key(key)
        if user is not None and user.status == "pending":
            yield self._new_code(user, "verify")
        return {"sent": True}

    @inlineCallbacks
    def _new_code(self, user: User, purpose: str) -> Any:
        code = totp.new_email_code()
        now = self.clock.seconds()
        stored = yield self.codes.put_email_code(
            user.id, purpose, totp.code_hash(code), now + self.s.email_code_ttl, now,
            float(self.s.resend_interval),
        )
        if stored:
            self._mail(user, code, purpose)

    # -- passwords --------------------------------------------------------------------------
    @inlineCallbacks
    def reset_request(
        self, owner: str, address: str, username: str, captcha: dict[str, Any] | None
    ) -> Any:
        key = account_key(username)
        self.gate(owner, key, address, captcha, always_captcha=self.s.require_captcha)
        user = yield self.store.user_by_key(key)
        if user is not None and user.status == "active":
            yield self._new_code(user, "reset")
        return {"sent": True}

    @inlineCallbacks
    def reset_password(
        self, owner: str, address: str, username: str, code: str, new_password: str,
        captcha: dict[str, Any] | None,
    ) -> Any:
        """Returns (reply, families revoked)."""
        key = account_key(username)
        self.gate(owner, key, address, captcha)
        check_password_policy(new_password, username, self.s.min_password_length)
        user = yield self.store.user_by_key(key)
        pw_hash = yield self.hasher.hash(new_password)
        uid = user.id if user is not None and user.status == "active" else NO_ACCOUNT
        outcome, families = yield self.codes.reset_with_code(
            uid, totp.code_hash(code), self.clock.seconds(), self.s.email_code_attempts, pw_hash
        )
        if outcome != CODE_OK:
            self.failed(key, address, "password reset")
            raise ProtocolError(
                ErrorCode.INVALID_CODE,
                "wrong, expired or already used code; password_reset_request mails a new one",
            )
        self.throttle.succeeded(key)
        self.forget_user(key)
        log.info("password reset by email code; every session revoked", user_id=uid)
        return {"user": user.name}, families

    @inlineCallbacks
    def change_password(
        self, owner: str, address: str, user_id: int, password: str, new_password: str,
        captcha: dict[str, Any] | None,
    ) -> Any:
        """Returns the families revoked."""
        user: User = yield self.store.user_by_id(user_id)
        self.gate(owner, user.key, address, captcha, user_id=user.id)
        ok = yield self.hasher.check(password, user.pw_hash)
        if not ok:
            self.failed(user.key, address, "password change")
            raise ProtocolError(ErrorCode.INVALID_CREDENTIALS, "the current password is wrong")
        check_password_policy(new_password, user.name, self.s.min_password_length)
        pw_hash = yield self.hasher.hash(new_password)
        families = yield self.codes.set_password(user.id, pw_hash)
        self.throttle.succeeded(user.key)
        self.forget_user(user.key)
        log.info("password changed; every session revoked", user_id=user.id)
        return families

    # -- TOTP -------------------------------------------------------------------------------
    @inlineCallbacks
    def totp_enroll(self, user_id: int) -> Any:
        user: User = yield self.store.user_by_id(user_id)
        secret = totp.new_secret()
        ok = yield self.codes.put_pending_totp(
            user.id, self.box.seal(user.id, secret), self.clock.seconds()
        )
        if not ok:
            raise ProtocolError(
                ErrorCode.TOTP_ENABLED, "TOTP is already enabled; totp_disable it first"
            )
        return {
            "secret": secret,
            "uri": totp.provisioning_uri(secret, user.name, self.s.totp_issuer),
            "digits": totp.DIGITS,
            "period": totp.STEP,
            "algorithm": "SHA1",
        }

    @inlineCallbacks
    def totp_confirm(self, owner: str, address: str, user_id: int, code: str) -> Any:
        user: User = yield self.store.user_by_id(user_id)
        self.gate(owner, user.key, address, None, user_id=user.id)
        rec: TotpRecord | None = yield self.codes.totp(user.id)
        if rec is None or rec.enabled:
            raise ProtocolError(
                ErrorCode.TOTP_NOT_ENABLED, "no TOTP enrolment is waiting; totp_enroll first"
            )
        secret = self.box.open(user.id, rec.sealed)
        step = (
            totp.match_step(secret, code, self.clock.seconds(), rec.last_step)
            if secret is not None
            else None
        )
        if step is None:
            self.failed(user.key, address, "TOTP confirmation")
            raise ProtocolError(ErrorCode.INVALID_CODE, "wrong code; check the device's clock")
        codes = totp.new_recovery_codes()
        ok = yield self.codes.enable_totp(user.id, step, [totp.code_hash(c) for c in codes])
        if not ok:
            raise ProtocolError(ErrorCode.INVALID_CODE, "that code was used already")
        log.info("TOTP enabled", user_id=user.id)
        return {"enabled": True, "recovery_codes": codes}

    @inlineCallbacks
    def second_factor(self, user_id: int, code: str | None) -> Any:
        """For the password checker (which passes NO_ACCOUNT after a wrong password, so
        the same queries run): FACTOR_NONE, FACTOR_OK, FACTOR_MISSING or FACTOR_WRONG."""
        rec: TotpRecord | None = yield self.codes.totp(user_id)
        if rec is None or not rec.enabled:
            return FACTOR_NONE
        if not code:
            return FACTOR_MISSING
        ok = yield self._check_code(rec, code)
        return FACTOR_OK if ok else FACTOR_WRONG

    @inlineCallbacks
    def _check_code(self, rec: TotpRecord, code: str) -> Any:
        """A TOTP code (6 digits; its step recorded so it never works again) or a recovery
        code (deleted when used)."""
        if totp.is_totp_code(code):
            secret = self.box.open(rec.user_id, rec.sealed)
            if secret is None:
                log.error("a TOTP secret failed to open (wrong storage key?)")
                return False
            step = totp.match_step(secret, code, self.clock.seconds(), rec.last_step)
            if step is None:
                return False
            accepted = yield self.codes.accept_step(rec.user_id, step)
            return bool(accepted)
        used = yield self.codes.use_recovery(rec.user_id, totp.code_hash(code))
        if used:
            log.info("recovery code used", user_id=rec.user_id)
        return bool(used)

    @inlineCallbacks
    def _password_and_code(
        self, owner: str, address: str, user_id: int, password: str, code: str,
        captcha: dict[str, Any] | None, what: str,
    ) -> Any:
        user: User = yield self.store.user_by_id(user_id)
        self.gate(owner, user.key, address, captcha, user_id=user.id)
        pw_ok = yield self.hasher.check(password, user.pw_hash)
        rec: TotpRecord | None = yield self.codes.totp(user.id)
        enabled = rec is not None and rec.enabled
        code_ok = False
        if pw_ok and enabled:
            assert rec is not None
            code_ok = yield self._check_code(rec, code)
        if pw_ok and not enabled:
            raise ProtocolError(ErrorCode.TOTP_NOT_ENABLED, "TOTP is not enabled")
        if not (pw_ok and code_ok):
            self.failed(user.key, address, what)
            raise ProtocolError(ErrorCode.INVALID_CREDENTIALS, "wrong password or code")
        self.throttle.succeeded(user.key)
        return user

    @inlineCallbacks
    def totp_disable(
        self, owner: str, address: str, user_id: int, password: str, code: str,
        captcha: dict[str, Any] | None,
    ) -> Any:
        user = yield self._password_and_code(
            owner, address, user_id, password, code, captcha, "TOTP disable"
        )
        yield self.codes.disable_totp(user.id)
        log.info("TOTP disabled", user_id=user.id)
        return {"enabled": False}

    @inlineCallbacks
    def new_recovery_codes(
        self, owner: str, address: str, user_id: int, password: str, code: str,
        captcha: dict[str, Any] | None,
    ) -> Any:
        user = yield self._password_and_code(
            owner, address, user_id, password, code, captcha, "recovery codes"
        )
        codes = totp.new_recovery_codes()
        yield self.codes.replace_recovery(user.id, [totp.code_hash(c) for c in codes])
        return {"recovery_codes": codes}


def make_account_security(
    config: Any, datadir: Any, store: Any, hasher: PasswordHasher, chat: Any, clock: Any
) -> AccountSecurity:
    """The wiring ``make_chat_service`` does: mailer from ``[smtp]`` (outbox if no host),
    the pending status for new accounts, the monitoring seam."""
    import os

    from twisted.internet import reactor

    from shtalk.server.accounts.mailer import make_mailer
    from shtalk.server.config import SmtpSection

    accounts = config.section(AccountsSection)
    mailer = make_mailer(config.section(SmtpSection), datadir.outbox_dir, clock, reactor,
                         keep_for=float(accounts.email_code_ttl))
    answers = os.environ.get("SHTALK_TEST_CAPTCHA_ANSWERS") or None
    if answers:
        log.warn("INSECURE test hook: CAPTCHA answers are written to {path}", path=answers)
    security = AccountSecurity(
        store, hasher, mailer, clock, datadir.storage_key(), accounts,
        config.section(ThrottleSection), captcha_answers=answers,
    )
    security.attach_chat(chat)
    chat.new_account_status = "pending" if accounts.require_email_verification else "active"
    return security
