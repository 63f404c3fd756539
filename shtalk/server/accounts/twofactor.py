"""TOTP (RFC 6238) as a second factor, with recovery codes.

Enrolment is two steps (a secret, then a code from the authenticator confirms it), so a
mistyped secret cannot lock anyone out; secrets are sealed at rest with the storage key
(shtalk.server.accounts.totp.SecretBox).  A code's time step is recorded when accepted,
so a code never works twice; a recovery code is deleted when used.  Turning TOTP off,
or new recovery codes, take the password and a current code.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from shtalk.server.accounts import totp
from shtalk.server.accounts.shared import AccountPart, Shared
from shtalk.server.cred.checkers import Factor
from shtalk.server.eserver import InvalidCode, InvalidCredentials, TotpEnabled, TotpNotEnabled
from shtalk.server.store.records import TotpRecord, User

log = Logger()


class TwoFactor(AccountPart):
    def __init__(self, shared: Shared, box: totp.SecretBox) -> None:
        super().__init__(shared)
        self.box = box

    @inlineCallbacks
    def enroll(self, user_id: int) -> Any:
        user: User = yield self.store.user_by_id(user_id)
        secret = totp.new_secret()
        ok = yield self.codes.put_pending_totp(
            user.id, self.box.seal(user.id, secret), self.clock.seconds()
        )
        if not ok:
            raise TotpEnabled("TOTP is already enabled; totp_disable it first")
        return {
            "secret": secret,
            "uri": totp.provisioning_uri(secret, user.name, self.s.totp_issuer),
            "digits": totp.DIGITS,
            "period": totp.STEP,
            "algorithm": "SHA1",
        }

    @inlineCallbacks
    def confirm(self, owner: str, address: str, user_id: int, code: str) -> Any:
        user: User = yield self.store.user_by_id(user_id)
        yield self.gates.gate(owner, user.key, address, None, user_id=user.id)
        rec: TotpRecord | None = yield self.codes.totp(user.id)
        if rec is None or rec.enabled:
            raise TotpNotEnabled("no TOTP enrolment is waiting; totp_enroll first")
        secret = self.box.open(user.id, rec.sealed)
        step = (
            totp.match_step(secret, code, self.clock.seconds(), rec.last_step)
            if secret is not None
            else None
        )
        if step is None:
            yield self.gates.failed(user.key, address, "TOTP confirmation")
            raise InvalidCode("wrong code; check the device's clock")
        codes = totp.new_recovery_codes()
        ok = yield self.codes.enable_totp(user.id, step, [totp.code_hash(c) for c in codes])
        if not ok:
            raise InvalidCode("that code was used already")
        log.info("TOTP enabled", user_id=user.id)
        return {"enabled": True, "recovery_codes": codes}

    @inlineCallbacks
    def second_factor(self, user_id: int, code: str | None) -> Any:
        """For the password checker, which passes account 0 after a wrong password so
        the same queries run: a `Factor`."""
        rec: TotpRecord | None = yield self.codes.totp(user_id)
        if rec is None or not rec.enabled:
            return Factor.NONE
        if not code:
            return Factor.MISSING
        ok = yield self._check_code(rec, code)
        return Factor.OK if ok else Factor.WRONG

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
        yield self.gates.gate(owner, user.key, address, captcha, user_id=user.id)
        pw_ok = yield self.hasher.check(password, user.pw_hash)
        rec: TotpRecord | None = yield self.codes.totp(user.id)
        enabled = rec is not None and rec.enabled
        code_ok = False
        if pw_ok and enabled:
            assert rec is not None
            code_ok = yield self._check_code(rec, code)
        if pw_ok and not enabled:
            raise TotpNotEnabled("TOTP is not enabled")
        if not (pw_ok and code_ok):
            yield self.gates.failed(user.key, address, what)
            raise InvalidCredentials("wrong password or code")
        yield self.gates.succeeded(user.key)
        return user

    @inlineCallbacks
    def disable(
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
