"""Email verification: a new account is ``pending`` until the mailed code comes back.

Unknown user and wrong code give the same reply after the same work (the code check
runs against account id 0, which never exists, when there is no pending account of
that name), and every failure goes to the throttle.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from shtalk.server.accounts import totp
from shtalk.server.accounts.gates import NO_ACCOUNT, account_key
from shtalk.server.accounts.mailcodes import VERIFY, MailedCodes
from shtalk.server.accounts.shared import AccountPart, Shared
from shtalk.server.store.records import User

log = Logger()

class EmailVerification(AccountPart):
    def __init__(self, shared: Shared, mailed: MailedCodes) -> None:
        super().__init__(shared)
        self.mailed = mailed

    def start(self, user: User) -> Any:
        """A fresh code for a new account (no resend interval: it is the first)."""
        return self.mailed.issue(user, VERIFY, resend_interval=0.0)

    @inlineCallbacks
    def verify_email(
        self, owner: str, address: str, username: str, code: str, captcha: dict[str, Any] | None
    ) -> Any:
        key = account_key(username)
        yield self.gates.gate(owner, key, address, captcha)
        user = yield self.store.user_by_key(key)
        uid = user.id if user is not None and user.status == "pending" else NO_ACCOUNT
        outcome = yield self.codes.check_email_code(
            uid, VERIFY, totp.code_hash(code), self.clock.seconds(), self.s.email_code_attempts
        )
        self.mailed.settle(outcome, key, address, "email verification", "resend_verification")
        log.info("email verified; account active", user_id=uid)
        return {"user": user.name, "status": "active"}

    @inlineCallbacks
    def resend(self, username: str) -> Any:
        user = yield self.store.user_by_key(account_key(username))
        if user is not None and user.status == "pending":
            yield self.mailed.issue(user, VERIFY)
        return {"sent": True}
