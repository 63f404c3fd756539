"""twisted.cred for shtalk: checkers for passwords and access tokens, and the realm.

Protocol actions call the avatar; remote events call the mind (the
connection), as in twisted.words.  The avatar id names the principal: the
password checker returns ``b"<user id>"`` (the device is the one the login
request names, which the mind carries), the token checker returns
``b"<user id>/<device>/<session family>"`` because the token binds all three.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword
from twisted.cred.portal import IRealm
from twisted.internet.defer import Deferred, inlineCallbacks
from zope.interface import Attribute, Interface, implementer

from shtalk.server.cred.passwords import PasswordHasher
from shtalk.server.cred.tokens import TokenError, TokenIssuer
from shtalk.server.iserver import IStore
from shtalk.wire.errors import ErrorCode
from shtalk.wire.names import NameError_, normalise_username

if TYPE_CHECKING:
    from shtalk.server.chat.service import ChatService


class IAccessToken(ICredentials):
    token = Attribute("The access JWT as sent by the client.")


class IChatUser(Interface):
    """The avatar: one authenticated device's perspective on the chat service."""


class IChatMind(Interface):
    """The connection, receiving remote events."""

    def send_bytes(data: bytes) -> None:
        """Write one already-encoded line."""

    def deliver(seq: int, line: bytes) -> None:
        """A message push; the mind may hold it while it replays the backlog."""

    def session_revoked(reason: str) -> None:
        """The session ended elsewhere (logout, device removed): drop authentication."""


@implementer(IUsernamePassword)
class PasswordCredentials:
    def __init__(self, username: str, password: str, otp: str | None = None) -> None:
        self.username = username
        self.password = password
        self.otp = otp  # TOTP or recovery code, for accounts with TOTP enabled

    def checkPassword(self, password: bytes) -> bool:  # pragma: no cover - bcrypt only
        raise NotImplementedError("shtalk checks passwords with bcrypt hashes only")


@implementer(IAccessToken)
class AccessTokenCredentials:
    def __init__(self, token: str) -> None:
        self.token = token


class TokenRefused(cred_error.UnauthorizedLogin):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class OtpRequired(cred_error.UnauthorizedLogin):
    """The password was right; the account has TOTP and no code was given."""


class AccountNotActive(cred_error.UnauthorizedLogin):
    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


@implementer(ICredentialsChecker)
class BcryptChecker:
    credentialInterfaces = (IUsernamePassword,)

    def __init__(
        self,
        store: IStore,
        hasher: PasswordHasher,
        second_factor: Callable[[int, str | None], Deferred[str]] | None = None,
    ) -> None:
        self.store = store
        self.hasher = hasher
        # AccountSecurity.second_factor: "none" | "ok" | "missing" | "wrong".
        self.second_factor = second_factor

    @inlineCallbacks
    def requestAvatarId(self, credentials: Any) -> Any:
        try:
            _, key = normalise_username(credentials.username)
        except NameError_:
            key = None
        user = (yield self.store.user_by_key(key)) if key is not None else None
        ok = yield self.hasher.check(credentials.password, user.pw_hash if user else None)
        factor = "none"
        if self.second_factor is not None:
            # Always asked (for account 0 after a failure): the same work either way.
            uid = user.id if ok and user is not None else 0
            factor = yield self.second_factor(uid, getattr(credentials, "otp", None))
        if not ok or user is None or factor == "wrong":
            # Same reply and same work for unknown user, wrong password and wrong code.
            raise cred_error.UnauthorizedLogin("invalid username or password")
        if factor == "missing":
            raise OtpRequired("a TOTP or recovery code is needed")
        if user.status != "active":
            raise AccountNotActive(user.status)
        return str(user.id).encode("ascii")


@implementer(ICredentialsChecker)
class AccessTokenChecker:
    credentialInterfaces = (IAccessToken,)

    def __init__(self, store: IStore, issuer: TokenIssuer, now: Callable[[], float]) -> None:
        self.store = store
        self.issuer = issuer
        self.now = now

    @inlineCallbacks
    def requestAvatarId(self, credentials: Any) -> Any:
        try:
            claims = self.issuer.verify_access(credentials.token, self.now())
        except TokenError as e:
            raise TokenRefused(e.code, e.message) from None
        session = yield self.store.session(claims.family)
        if session is None or session.revoked or session.user_id != claims.user_id:
            raise TokenRefused(ErrorCode.TOKEN_REVOKED, "this session was logged out; log in again")
        if session.device_id != claims.device_id:
            # A session is one login of one device: a token naming another is not ours.
            raise TokenRefused(ErrorCode.INVALID_TOKEN, "the access token names another device")
        user = yield self.store.user_by_id(claims.user_id)
        if user is None or user.status != "active":
            raise TokenRefused(ErrorCode.TOKEN_REVOKED, "this account is not active")
        return f"{claims.user_id}/{claims.device_id}/{claims.family}".encode()


@implementer(IRealm)
class ChatRealm:
    """Hands out a ChatUser bound to the connecting device (the mind says which)."""

    def __init__(self, service: ChatService) -> None:
        self.service = service

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: Any
    ) -> Deferred[tuple[Any, object, Callable[[], None]]]:
        if IChatUser not in interfaces:
            raise NotImplementedError("shtalk only hands out IChatUser avatars")
        assert isinstance(avatarId, bytes)
        uid, _, rest = avatarId.decode("ascii").partition("/")
        device, _, family = rest.partition("/")
        return self.service.avatar_for(int(uid), device or None, family or None, mind)
