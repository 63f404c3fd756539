"""Authentication on a hello'd connection, cheapest first: ``resume`` with the access
token, then ``refresh`` (which rotates the tokens), then the password and ``login``.

A part of ServerSession (`shtalk.client.session`) apart because it is one job with its
own rules: which refusal means "try the next step", which means "ask the person", and
that tokens go to ``on_tokens`` (to be persisted) the moment they change.  It reads the
session's callbacks at the time (an application may swap ``ask_extra``); tokens and
passwords never reach a log or an exception message.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from twisted.internet.defer import CancelledError, Deferred, maybeDeferred
from twisted.logger import Logger

from shtalk.client.errors import OTP_REJECTED, AuthenticationFailed, ServerError
from shtalk.wire.errors import ErrorCode, ProtocolError
from shtalk.wire.records import ClientRequest
from shtalk.wire.requests import DeviceInfo, Login, Refresh, Resume

if TYPE_CHECKING:
    from shtalk.client.connection import ClientConnection

log = Logger()

EXTRA_CODES = frozenset({ErrorCode.OTP_REQUIRED, ErrorCode.CAPTCHA_REQUIRED,
                         ErrorCode.CAPTCHA_FAILED, OTP_REJECTED})
"""Login refusals that ask for more (answered by ``ask_extra`` when one is given)."""
_DEAD_ACCESS = (ErrorCode.TOKEN_EXPIRED, ErrorCode.INVALID_TOKEN)
_DEAD_REFRESH = (ErrorCode.INVALID_TOKEN, ErrorCode.TOKEN_REVOKED, ErrorCode.TOKEN_EXPIRED)


def call(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """``maybeDeferred`` for callbacks that may answer with a value or a Deferred."""
    return maybeDeferred(f, *args)


@dataclass
class Credentials:
    """What the session needs to (re)authenticate; the caller persists it (``on_tokens``).

    Tokens are kept out of ``repr`` so a logged or printed Credentials leaks nothing.
    """

    username: str
    device_id: str
    device_label: str = ""
    access_token: str | None = field(default=None, repr=False)
    refresh_token: str | None = field(default=None, repr=False)


R = TypeVar("R", bound=ClientRequest)


def amend(request: R, extra: Mapping[str, Any]) -> R:
    """``request`` with what a refusal asked for (``captcha``, ``otp``), checked here as
    the server will check it: a bad answer is the server's refusal, without the trip."""
    if not extra:
        return request
    try:
        return request.amended(extra)
    except ProtocolError as e:
        raise ServerError.refused_locally(e) from None


class Link(Protocol):
    """What the flow needs of its session (`shtalk.client.session.ServerSession`)."""

    credentials: Credentials
    ask_password: Callable[[], Any]
    ask_extra: Callable[[str, dict[str, Any]], Any] | None
    on_tokens: Callable[[Credentials], Any]
    max_password_attempts: int
    request_timeout: float

    def _ensure_connected(self) -> Deferred[ClientConnection]: ...

    def _authenticated(self, conn: ClientConnection, reply: dict[str, Any],
                       how: str) -> None: ...

    def _refused(self, message: str) -> None: ...


class Authenticator:
    def __init__(self, session: Link) -> None:
        self.session = session

    async def authenticate(self, conn: ClientConnection, *,
                           allow_resume: bool = True) -> ClientConnection:
        """resume -> refresh -> password; returns the (possibly new) connection."""
        s, creds = self.session, self.session.credentials
        if allow_resume and creds.access_token:
            try:
                reply = await conn.request(Resume(access_token=creds.access_token),
                                           timeout=s.request_timeout)
            except ServerError as e:
                if e.code == ErrorCode.TOKEN_REVOKED:
                    creds.access_token = creds.refresh_token = None
                    await self.persist_tokens()
                elif e.code in _DEAD_ACCESS:
                    creds.access_token = None
                else:
                    raise
            else:
                s._authenticated(conn, reply, "resumed")
                return conn
        if creds.refresh_token:
            try:
                reply = await conn.request(Refresh(refresh_token=creds.refresh_token),
                                           timeout=s.request_timeout)
            except ServerError as e:
                if e.code not in _DEAD_REFRESH:
                    raise
                creds.access_token = creds.refresh_token = None
                await self.persist_tokens()
            else:
                await self.take_tokens(reply)
                s._authenticated(conn, reply, "refreshed")
                return conn
        return await self.password_login(conn)

    async def password_login(self, conn: ClientConnection) -> ClientConnection:
        s = self.session
        for _ in range(s.max_password_attempts):
            try:
                password = str(await call(s.ask_password))
            except CancelledError:
                raise
            except Exception as e:
                raise AuthenticationFailed(f"no password given ({type(e).__name__})") from None
            if conn.closed:  # e.g. the server's pre-auth timeout while the person typed
                conn = await s._ensure_connected()
            try:
                await self.login_with_extras(conn, password, {})
            except ServerError as e:
                if e.code != ErrorCode.INVALID_CREDENTIALS:
                    raise
                s._refused("wrong username or password")
                continue
            return conn
        raise AuthenticationFailed(
            f"login as {s.credentials.username!r} failed {s.max_password_attempts} times")

    async def _login(self, conn: ClientConnection, password: str,
                     extra: Mapping[str, Any]) -> dict[str, Any]:
        s, creds = self.session, self.session.credentials
        device = DeviceInfo(id=creds.device_id, label=creds.device_label or None)
        request = amend(Login(username=creds.username, password=password, device=device), extra)
        reply = await conn.request(request, timeout=s.request_timeout)
        await self.take_tokens(reply)
        s._authenticated(conn, reply, "logged in")
        return reply

    async def login_with_extras(self, conn: ClientConnection, password: str,
                                extra: Mapping[str, Any]) -> dict[str, Any]:
        """A login that answers the server's follow-up questions (TOTP code, CAPTCHA)
        through ``ask_extra``; without it those refusals go to the caller."""
        s = self.session
        extra = dict(extra)
        for _ in range(s.max_password_attempts + 1):
            try:
                return await self._login(conn, password, extra)
            except ServerError as e:
                code = e.code
                if code == ErrorCode.INVALID_CREDENTIALS and "otp" in extra:
                    code = OTP_REJECTED
                if s.ask_extra is None or code not in EXTRA_CODES:
                    raise
                try:
                    more = await call(s.ask_extra, code, e.detail)
                except CancelledError:
                    raise
                except Exception as x:  # the person closed the prompt, like ask_password
                    raise AuthenticationFailed(
                        f"{code}: not answered ({type(x).__name__})") from None
                extra.update(more or {})
                if conn.closed:
                    conn = await s._ensure_connected()
        raise AuthenticationFailed("login refused; the extra steps did not succeed")

    async def take_tokens(self, reply: dict[str, Any]) -> None:
        creds = self.session.credentials
        access, refresh = reply.get("access_token"), reply.get("refresh_token")
        if isinstance(access, str):
            creds.access_token = access
        if isinstance(refresh, str):
            creds.refresh_token = refresh
        await self.persist_tokens()

    async def persist_tokens(self) -> None:
        try:
            await call(self.session.on_tokens, self.session.credentials)
        except Exception:
            # The message names no token: on_tokens failures are the caller's storage.
            log.failure("on_tokens failed; the new tokens may not be saved")
