"""A new password: reset with a mailed code, or changed with the current one.

Either way every session of the account is revoked (the store returns their families,
and the connection layer logs their live connections out), and the cached account is
dropped.  Unknown user and wrong code give the same reply after the same work: the
bcrypt hash of the new password is computed before the code is checked, and the check
runs against account id 0 when there is no active account of that name.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from shtalk.server.accounts import totp
from shtalk.server.accounts.gates import NO_ACCOUNT, account_key
from shtalk.server.accounts.mailcodes import RESET, MailedCodes
from shtalk.server.accounts.shared import AccountPart, Shared
from shtalk.server.eserver import InvalidCredentials
from shtalk.server.store.records import User
from shtalk.wire.passwords import check_password_policy

log = Logger()


class NewPassword(AccountPart):
    def __init__(self, shared: Shared, mailed: MailedCodes) -> None:
        super().__init__(shared)
        self.mailed = mailed

    @inlineCallbacks
    def reset_request(
        self, owner: str, address: str, username: str, captcha: dict[str, Any] | None
    ) -> Any:
        key = account_key(username)
        yield self.gates.gate(owner, key, address, captcha, always_captcha=self.s.require_captcha)
        user = yield self.store.user_by_key(key)
        if user is not None and user.status == "active":
            yield self.mailed.issue(user, RESET)
        return {"sent": True}

    @inlineCallbacks
    def reset(
        self, owner: str, address: str, username: str, code: str, new_password: str,
        captcha: dict[str, Any] | None,
    ) -> Any:
        """Returns (reply, families revoked)."""
        key = account_key(username)
        yield self.gates.gate(owner, key, address, captcha)
        check_password_policy(new_password, username, self.s.min_password_length)
        user = yield self.store.user_by_key(key)
        pw_hash = yield self.hasher.hash(new_password)
        uid = user.id if user is not None and user.status == "active" else NO_ACCOUNT
        outcome, families = yield self.codes.reset_with_code(
            uid, totp.code_hash(code), self.clock.seconds(), self.s.email_code_attempts, pw_hash
        )
        self.mailed.settle(outcome, key, address, "password reset", "password_reset_request")
        log.info("password reset by email code; every session revoked", user_id=uid)
        return {"user": user.name}, families

    @inlineCallbacks
    def change(
        self, owner: str, address: str, user_id: int, password: str, new_password: str,
        captcha: dict[str, Any] | None,
    ) -> Any:
        """Returns the families revoked."""
        user: User = yield self.store.user_by_id(user_id)
        yield self.gates.gate(owner, user.key, address, captcha, user_id=user.id)
        ok = yield self.hasher.check(password, user.pw_hash)
        if not ok:
            yield self.gates.failed(user.key, address, "password change")
            raise InvalidCredentials("the current password is wrong")
        check_password_policy(new_password, user.name, self.s.min_password_length)
        pw_hash = yield self.hasher.hash(new_password)
        families = yield self.codes.set_password(user.id, pw_hash)
        yield self.gates.succeeded(user.key)
        self.users.forget(user.key)
        log.info("password changed; every session revoked", user_id=user.id)
        return families
