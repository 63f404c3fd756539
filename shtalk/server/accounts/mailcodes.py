"""One-time codes by email: the hash is stored, the code is mailed, in the background.

A code is 140 bits (shtalk.server.accounts.totp), works once, for ``email_code_ttl``
seconds and a bounded number of attempts; a new one replaces the last, at most every
``resend_interval`` seconds.  The mail says what the code is for and what to do if the
person did not ask for it; the code never reaches a log.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from shtalk.server.accounts import totp
from shtalk.server.accounts.mailer import Mailer
from shtalk.server.accounts.shared import AccountPart, Shared
from shtalk.server.eserver import InvalidCode
from shtalk.server.store.records import CODE_OK, User

log = Logger()

VERIFY = "verify"
RESET = "reset"


class MailedCodes(AccountPart):
    def __init__(self, shared: Shared, mailer: Mailer) -> None:
        super().__init__(shared)
        self.mailer = mailer

    @inlineCallbacks
    def issue(self, user: User, purpose: str, resend_interval: float | None = None) -> Any:
        """Store a fresh code (unless one was sent less than ``resend_interval`` seconds
        ago; None: the configured interval) and mail it."""
        code = totp.new_email_code()
        now = self.clock.seconds()
        interval = float(self.s.resend_interval) if resend_interval is None else resend_interval
        stored = yield self.codes.put_email_code(
            user.id, purpose, totp.code_hash(code), now + self.s.email_code_ttl, now, interval
        )
        if stored:
            self._mail(user, code, purpose)

    def settle(self, outcome: str, key: str, address: str, what: str, again: str) -> None:
        """The end of a check of a mailed code (``outcome`` from the code store): a wrong
        code is a failure at the gates, and the error names ``again``, the request that
        mails a new one; a right one clears the failures and drops the cached account,
        whose status or password it changed."""
        if outcome != CODE_OK:
            self.gates.failed(key, address, what)
            raise InvalidCode(f"wrong, expired or already used code; {again} mails a new one")
        self.gates.succeeded(key)
        self.users.forget(key)

    def _mail(self, user: User, code: str, purpose: str) -> None:
        minutes = max(1, self.s.email_code_ttl // 60)
        if purpose == VERIFY:
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
