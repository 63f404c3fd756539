"""The login flows: ``login`` (password), ``resume`` (access token), ``refresh`` (refresh
token), ``logout``.

Each runs twisted.cred's ``portal.login`` with the connection as the mind; cred's
refusals become wire errors here, with the same reply for an unknown user, a wrong
password and a wrong code.  A password login first passes the failure throttle and
maybe a CAPTCHA (shtalk.server.accounts.gates) and reports its failure to it.  After a
login, the connection is bound to its session family, and the backlog is replayed
right after the reply (shtalk.server.net.backlog).
"""

from __future__ import annotations

from typing import Any

from twisted.cred import error as cred_error
from twisted.cred.credentials import ICredentials
from twisted.cred.portal import Portal
from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure

from shtalk.collaborators import collaborators
from shtalk.server.accounts.gates import Gates, account_key
from shtalk.server.chat.presence import Presence
from shtalk.server.cred.checkers import AccessTokenCredentials, PasswordCredentials
from shtalk.server.cred.sessions import Sessions
from shtalk.server.eserver import (
    AccessRefused,
    AccountNotActive,
    OtpRequired,
    TokenReuse,
    TokenRevoked,
    TokenUnknown,
)
from shtalk.server.iserver import IChatUser
from shtalk.server.net.backlog import Backlog
from shtalk.server.net.connection import ShtalkServerProtocol as Conn
from shtalk.server.net.errors import ACCESS_CODES, to_wire
from shtalk.wire.errors import ErrorCode, ProtocolError
from shtalk.wire.frames import Request
from shtalk.wire.names import clean_label

log = Logger()


def tokens(sessions: Sessions, access: str, refresh: str) -> dict[str, Any]:
    """The fields of a reply that hands out a session's tokens."""
    return {"access_token": access, "refresh_token": refresh, "expires_in": sessions.access_ttl}


@collaborators
class LoginHandlers:
    portal: Portal
    sessions: Sessions
    presence: Presence
    gates: Gates
    backlog: Backlog

    @inlineCallbacks
    def on_login(self, conn: Conn, request: Request) -> Any:
        a = request.args
        key = account_key(a["username"])
        yield self.gates.gate(conn.conn_token, key, conn.peer, a.get("captcha"))
        conn.authenticating(a["device"]["id"], clean_label(a["device"].get("label") or ""))
        creds = PasswordCredentials(a["username"], a["password"], a.get("otp"))
        d = self._portal_login(conn, creds)
        d.addErrback(self._login_refused, key, conn.peer)
        avatar: IChatUser = yield d.addErrback(self._failed, conn)
        yield self.gates.succeeded(key)
        family, access, refresh = yield self.sessions.start(avatar.user.id, avatar.device_id)
        self._logged_in(conn, family)
        return {"user": avatar.user.name, "device": avatar.device_id,
                **tokens(self.sessions, access, refresh)}

    @inlineCallbacks
    def on_resume(self, conn: Conn, request: Request) -> Any:
        conn.authenticating()
        d = self._portal_login(conn, AccessTokenCredentials(request.args["access_token"]))
        avatar: IChatUser = yield d.addErrback(self._failed, conn)
        self._logged_in(conn, avatar.family)
        return {"user": avatar.user.name, "device": avatar.device_id}

    @inlineCallbacks
    def on_refresh(self, conn: Conn, request: Request) -> Any:
        conn.authenticating()
        try:
            _, access, refresh = yield self.sessions.refresh(request.args["refresh_token"])
        except TokenReuse as e:
            conn.auth_failed()
            log.warn("refresh token reuse: session family revoked")
            # Whoever holds the family's live connections may be the thief: drop them.
            self.presence.revoke_families(
                [e.family], "this session was revoked: its refresh token was reused"
            )
            raise ProtocolError(
                ErrorCode.TOKEN_REVOKED,
                "that refresh token was already used; every session of this login "
                "was revoked. Log in with your password",
            ) from None
        except TokenRevoked:
            conn.auth_failed()
            raise ProtocolError(
                ErrorCode.TOKEN_REVOKED, "this session was logged out; log in with your password"
            ) from None
        except TokenUnknown:
            conn.auth_failed()
            raise ProtocolError(
                ErrorCode.INVALID_TOKEN, "unknown or expired refresh token; log in again"
            ) from None
        except Exception:
            conn.auth_failed()
            raise
        d = self._portal_login(conn, AccessTokenCredentials(access))
        avatar: IChatUser = yield d.addErrback(self._failed, conn)
        self._logged_in(conn, avatar.family)
        return {"user": avatar.user.name, "device": avatar.device_id,
                **tokens(self.sessions, access, refresh)}

    @inlineCallbacks
    def on_logout(self, conn: Conn, request: Request) -> Any:
        family = conn.family
        yield conn.me.logout(family)
        # Every connection of this session family is logged out at once.
        self.presence.revoke_families(
            [family], "this session was logged out on another connection", keep=conn
        )
        conn.logged_out()
        return {}

    # -----------------------------------------------------------------------------------
    def _logged_in(self, conn: Conn, family: str) -> None:
        conn.bind_family(family)
        conn.after_reply(lambda: self._replay(conn))

    def _replay(self, conn: Conn) -> Any:
        avatar = conn.avatar
        if avatar is not None:
            return self.backlog.replay(conn, avatar)
        return None

    @staticmethod
    def _failed(failure: Failure, conn: Conn) -> Failure:
        conn.auth_failed()
        return failure

    def _login_refused(self, failure: Failure, key: str, peer: str) -> Any:
        """A wrong secret is counted before the refusal goes out (so a retry, on any
        process of a cluster, already finds it counted)."""
        e = to_wire(failure.value)
        if e is not None and e.code is ErrorCode.INVALID_CREDENTIALS:
            return self.gates.failed(key, peer, "login").addCallback(lambda _: failure)
        return failure

    @inlineCallbacks
    def _portal_login(self, conn: Conn, creds: ICredentials) -> Any:
        """portal.login, with cred's refusals turned into protocol errors."""
        try:
            _, avatar, logout = yield self.portal.login(creds, conn, IChatUser)
        except OtpRequired:
            raise ProtocolError(
                ErrorCode.OTP_REQUIRED,
                'this account has TOTP: send the login again with "otp" (a 6-digit code '
                "or a recovery code)",
            ) from None
        except AccountNotActive as e:
            if e.status == "pending":
                raise ProtocolError(
                    ErrorCode.EMAIL_NOT_VERIFIED,
                    "verify your email first: enter the mailed code (verify_email); "
                    "resend_verification mails a new one",
                ) from None
            raise ProtocolError(
                ErrorCode.INVALID_CREDENTIALS,
                f"this account is {e.status}; finish its set-up or ask the operator",
            ) from None
        except AccessRefused as e:
            raise ProtocolError(ACCESS_CODES[type(e)], e.message) from None
        except cred_error.UnauthorizedLogin:
            raise ProtocolError(
                ErrorCode.INVALID_CREDENTIALS, "invalid username or password"
            ) from None
        conn.authenticated(avatar, logout)
        return avatar
