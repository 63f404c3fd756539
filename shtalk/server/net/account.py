"""The account-security requests of the line protocol (a mixin of ShtalkServerProtocol).

Kept apart from ``protocol.py`` so that file stays about framing, state and dispatch:
these handlers translate requests into `AccountSecurity` calls and take care of what
only the connection layer can do (its CAPTCHA token, its address, logging out the
live connections of revoked sessions, rebinding this connection to a fresh session
after a password change).
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IDelayedCall
from twisted.python.failure import Failure

from shtalk.server.accounts.security import AccountSecurity, RegisterAttempt, account_key
from shtalk.wire.errors import ErrorCode, ProtocolError
from shtalk.wire.frames import Request

if TYPE_CHECKING:
    from shtalk.server.chat.avatar import ChatUser


class AccountHandlers:
    """Needs, from the protocol: ``factory`` (with ``security``, ``chat``, ``sessions``),
    ``avatar``, ``family``, ``_peer``, ``_bind_family`` and ``session_revoked``."""

    factory: Any
    avatar: ChatUser | None
    family: str
    _peer: str
    _peer_key: str
    _deadline: IDelayedCall | None
    transport: Any
    _conn_token: str | None = None
    _register_attempt: RegisterAttempt | None = None

    def _bind_family(self, family: str) -> None:  # pragma: no cover - the protocol's
        raise NotImplementedError

    @property
    def conn_token(self) -> str:
        """An opaque, unguessable name of this connection (CAPTCHAs are bound to it)."""
        if self._conn_token is None:
            self._conn_token = secrets.token_hex(16)
        return self._conn_token

    def _security(self) -> AccountSecurity:
        sec = self.factory.security
        if sec is None:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, "account security is not configured")
        assert isinstance(sec, AccountSecurity)
        return sec

    def _uid(self) -> int:
        assert self.avatar is not None
        return int(self.avatar.user.id)

    def captcha_shown(self) -> None:
        """A person was just shown a CAPTCHA: solving it takes time, so an unauthenticated
        connection stays open at least as long as the challenge lives (the fixed
        pre-authentication deadline alone would close it under a person still typing,
        and the answer, bound to this connection, would be lost with it)."""
        sec, deadline = self.factory.security, self._deadline
        if sec is None or deadline is None or not deadline.active():
            return  # logged in (no deadline), or closing
        if getattr(self.transport, "disconnecting", False):
            return
        wanted = sec.s.captcha_ttl + 5.0
        now = getattr(deadline, "seconds", self.factory.clock.seconds)()  # the timer's time
        if deadline.getTime() - now < wanted:
            deadline.reset(wanted)

    # -- used by on_register / on_login in protocol.py ---------------------------------------
    @inlineCallbacks
    def _register(self, request: Request) -> Any:
        a = request.args
        chat = self.factory.chat
        # The cheap checks come first and cost no CAPTCHA and no registration attempt.
        yield chat.check_registration(a["username"], a["password"], a["email"])
        attempt = self._register_attempt
        if attempt is None:
            attempt = self._register_attempt = RegisterAttempt()
        pay = partial(self._pay_attempt, a["username"])
        sec = self.factory.security
        if sec is not None:
            yield sec.register_gate(self.conn_token, self._peer, a.get("captcha"), attempt, pay)
        elif not attempt.paid:
            yield pay()
        reply = yield chat.register(a["username"], a["password"], a["email"])
        attempt.used()
        if sec is not None and reply.get("status") == "pending":
            user = yield sec.store.user_by_key(account_key(reply["user"]))
            if user is not None:
                yield sec.start_verification(user)
        return reply

    def _pay_attempt(self, username: str) -> Deferred[None] | None:
        """One ``register`` token (per name tried and per address) for a new attempt."""
        limiter = self.factory.limiter
        if limiter is None:
            return None
        d: Deferred[None] | None = limiter.check(
            "register", "n:" + account_key(username), self._peer_key
        )
        return d

    def _login_gate(self, args: Mapping[str, Any]) -> str:
        key = account_key(args["username"])
        sec = self.factory.security
        if sec is not None:
            sec.gate(self.conn_token, key, self._peer, args.get("captcha"))
        return key

    def _login_refused(self, failure: Failure, key: str) -> Failure:
        sec = self.factory.security
        e = failure.value
        if (
            sec is not None
            and isinstance(e, ProtocolError)
            and e.code is ErrorCode.INVALID_CREDENTIALS
        ):
            sec.failed(key, self._peer, "login")
        return failure

    def _login_succeeded(self, key: str) -> None:
        sec = self.factory.security
        if sec is not None:
            sec.throttle.succeeded(key)

    def _revoke_families(self, families: list[str], reason: str, keep: object = None) -> None:
        for family in families:
            for proto in list(self.factory.sessions.pop(family, ())):
                if proto is not keep:
                    proto.session_revoked(reason)

    # -- handlers ------------------------------------------------------------------------------
    def on_captcha(self, request: Request) -> dict[str, Any]:
        challenge = self._security().new_captcha(self.conn_token, request.args.get("kind", "art"))
        self.captcha_shown()
        return {"captcha": challenge}

    def on_verify_email(self, request: Request) -> Deferred[Any]:
        a = request.args
        d: Deferred[Any] = self._security().verify_email(
            self.conn_token, self._peer, a["username"], a["code"], a.get("captcha")
        )
        return d

    def on_resend_verification(self, request: Request) -> Deferred[Any]:
        d: Deferred[Any] = self._security().resend_verification(request.args["username"])
        return d

    def on_password_reset_request(self, request: Request) -> Deferred[Any]:
        a = request.args
        d: Deferred[Any] = self._security().reset_request(
            self.conn_token, self._peer, a["username"], a.get("captcha")
        )
        return d

    @inlineCallbacks
    def on_password_reset(self, request: Request) -> Any:
        a = request.args
        reply, families = yield self._security().reset_password(
            self.conn_token, self._peer, a["username"], a["code"], a["new_password"],
            a.get("captcha"),
        )
        self._revoke_families(families, "the account's password was reset; log in again")
        return reply

    @inlineCallbacks
    def on_password_change(self, request: Request) -> Any:
        a = request.args
        uid = self._uid()
        families = yield self._security().change_password(
            self.conn_token, self._peer, uid, a["password"], a["new_password"], a.get("captcha")
        )
        self._revoke_families(
            families, "the account's password was changed; log in again", keep=self
        )
        # Every refresh token is dead, this connection's included: give it a new session.
        avatar = self.avatar
        if avatar is None:
            raise ProtocolError(ErrorCode.NOT_AUTHENTICATED, "logged out meanwhile")
        chat = self.factory.chat
        family, access, refresh = yield chat.start_session(uid, avatar.device_id)
        self._bind_family(family)
        return {
            "access_token": access,
            "refresh_token": refresh,
            "expires_in": chat.issuer.access_ttl,
            "sessions_revoked": len(families),
        }

    def on_totp_enroll(self, request: Request) -> Deferred[Any]:
        d: Deferred[Any] = self._security().totp_enroll(self._uid())
        return d

    def on_totp_confirm(self, request: Request) -> Deferred[Any]:
        d: Deferred[Any] = self._security().totp_confirm(
            self.conn_token, self._peer, self._uid(), request.args["code"]
        )
        return d

    def on_totp_disable(self, request: Request) -> Deferred[Any]:
        a = request.args
        d: Deferred[Any] = self._security().totp_disable(
            self.conn_token, self._peer, self._uid(), a["password"], a["code"], a.get("captcha")
        )
        return d

    def on_totp_recovery_codes(self, request: Request) -> Deferred[Any]:
        a = request.args
        d: Deferred[Any] = self._security().new_recovery_codes(
            self.conn_token, self._peer, self._uid(), a["password"], a["code"], a.get("captcha")
        )
        return d
