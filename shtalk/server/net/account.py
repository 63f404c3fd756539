"""The account requests: registration, CAPTCHAs, email codes, passwords, TOTP.

These handlers translate requests into calls of the account-security parts
(shtalk.server.accounts) and take care of what only the connection layer can do: the
connection's CAPTCHA token and address, its registration attempt, logging out the
live connections of revoked sessions, and binding this connection to a fresh session
after a password change.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks

from shtalk.collaborators import collaborators
from shtalk.server.accounts.gates import account_key
from shtalk.server.accounts.security import AccountSecurity
from shtalk.server.chat.presence import Presence
from shtalk.server.cred.sessions import Sessions
from shtalk.server.eserver import SessionEnded
from shtalk.server.iserver import IStore
from shtalk.server.net.connection import ShtalkServerProtocol
from shtalk.server.net.limits import RequestLimits
from shtalk.server.net.login import tokens
from shtalk.wire.frames import Request

Conn = ShtalkServerProtocol


@collaborators
class AccountHandlers:
    store: IStore
    security: AccountSecurity
    sessions: Sessions
    presence: Presence
    limits: RequestLimits

    @inlineCallbacks
    def on_register(self, conn: Conn, request: Request) -> Any:
        a = request.args
        registration = self.security.registration
        # The cheap checks come first and cost no CAPTCHA and no registration attempt.
        yield registration.check(a["username"], a["password"], a["email"])
        attempt = conn.register_attempt
        pay = partial(self.limits.pay_register, a["username"], conn.peer_key)
        yield self.security.gates.register_gate(
            conn.conn_token, conn.peer, a.get("captcha"), attempt, pay
        )
        reply = yield registration.register(a["username"], a["password"], a["email"])
        attempt.used()
        if reply.get("status") == "pending":
            user = yield self.store.user_by_key(account_key(reply["user"]))
            if user is not None:
                yield self.security.verification.start(user)
        return reply

    def on_captcha(self, conn: Conn, request: Request) -> dict[str, Any]:
        gates = self.security.gates
        challenge = gates.new_captcha(conn.conn_token, request.args.get("kind", "art"))
        conn.captcha_shown()
        return {"captcha": challenge}

    def on_verify_email(self, conn: Conn, request: Request) -> Deferred[Any]:
        a = request.args
        return self.security.verification.verify_email(
            conn.conn_token, conn.peer, a["username"], a["code"], a.get("captcha")
        )

    def on_resend_verification(self, conn: Conn, request: Request) -> Deferred[Any]:
        return self.security.verification.resend(request.args["username"])

    def on_password_reset_request(self, conn: Conn, request: Request) -> Deferred[Any]:
        a = request.args
        return self.security.new_password.reset_request(
            conn.conn_token, conn.peer, a["username"], a.get("captcha")
        )

    @inlineCallbacks
    def on_password_reset(self, conn: Conn, request: Request) -> Any:
        a = request.args
        reply, families = yield self.security.new_password.reset(
            conn.conn_token, conn.peer, a["username"], a["code"], a["new_password"],
            a.get("captcha"),
        )
        self.presence.revoke_families(families, "the account's password was reset; log in again")
        return reply

    @inlineCallbacks
    def on_password_change(self, conn: Conn, request: Request) -> Any:
        a = request.args
        uid = conn.me.user.id
        families = yield self.security.new_password.change(
            conn.conn_token, conn.peer, uid, a["password"], a["new_password"], a.get("captcha")
        )
        self.presence.revoke_families(
            families, "the account's password was changed; log in again", keep=conn
        )
        # Every refresh token is dead, this connection's included: give it a new session.
        avatar = conn.avatar
        if avatar is None:
            raise SessionEnded("logged out meanwhile")
        family, access, refresh = yield self.sessions.start(uid, avatar.device_id)
        conn.bind_family(family)
        return {**tokens(self.sessions, access, refresh), "sessions_revoked": len(families)}

    def on_totp_enroll(self, conn: Conn, request: Request) -> Deferred[Any]:
        return self.security.two_factor.enroll(conn.me.user.id)

    def on_totp_confirm(self, conn: Conn, request: Request) -> Deferred[Any]:
        return self.security.two_factor.confirm(
            conn.conn_token, conn.peer, conn.me.user.id, request.args["code"]
        )

    def on_totp_disable(self, conn: Conn, request: Request) -> Deferred[Any]:
        a = request.args
        return self.security.two_factor.disable(
            conn.conn_token, conn.peer, conn.me.user.id, a["password"], a["code"],
            a.get("captcha"),
        )

    def on_totp_recovery_codes(self, conn: Conn, request: Request) -> Deferred[Any]:
        a = request.args
        return self.security.two_factor.new_recovery_codes(
            conn.conn_token, conn.peer, conn.me.user.id, a["password"], a["code"],
            a.get("captcha"),
        )
