"""twisted.cred checkers for shtalk: passwords (bcrypt, then TOTP) and access tokens.

What each returns as the avatar id, and how the realm reads it: shtalk.server.cred.realm.
Their refusals are cred's ``UnauthorizedLogin`` and the kinds in shtalk.server.iserver
(`OtpRequired`, `AccountNotActive`, `AccessRefused`), which the login flow turns into
wire errors.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any

from twisted.cred import error as cred_error
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ICredentials, IUsernamePassword
from twisted.internet.defer import Deferred, inlineCallbacks
from zope.interface import Attribute, implementer

from shtalk.collaborators import collaborators
from shtalk.server.cred.passwords import PasswordHasher
from shtalk.server.cred.tokens import TokenError, TokenIssuer
from shtalk.server.eserver import (
    AccessExpired,
    AccessInvalid,
    AccessRevoked,
    AccountNotActive,
    OtpRequired,
)
from shtalk.server.iserver import IStore
from shtalk.wire.errors import ErrorCode
from shtalk.wire.names import NameError_, normalise_username


class Factor(enum.Enum):
    """What the second factor says of a login whose password was checked."""

    NONE = "none"  # no TOTP enrolled: the password is enough
    OK = "ok"
    MISSING = "missing"  # TOTP enrolled, no code given
    WRONG = "wrong"


class IAccessToken(ICredentials):
    token = Attribute("The access JWT as sent by the client.")


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


@implementer(ICredentialsChecker)
@collaborators
class BcryptChecker:
    credentialInterfaces = (IUsernamePassword,)

    store: IStore
    hasher: PasswordHasher
    # (user id, code) -> Factor; None: passwords only.
    second_factor: Callable[[int, str | None], Deferred[Factor]] | None = None

    @inlineCallbacks
    def requestAvatarId(self, credentials: Any) -> Any:
        try:
            _, key = normalise_username(credentials.username)
        except NameError_:
            key = None
        user = (yield self.store.user_by_key(key)) if key is not None else None
        ok = yield self.hasher.check(credentials.password, user.pw_hash if user else None)
        factor = Factor.NONE
        if self.second_factor is not None:
            # Always asked (for account 0 after a failure): the same work either way.
            uid = user.id if ok and user is not None else 0
            factor = yield self.second_factor(uid, getattr(credentials, "otp", None))
        if not ok or user is None or factor is Factor.WRONG:
            # Same reply and same work for unknown user, wrong password and wrong code.
            raise cred_error.UnauthorizedLogin("invalid username or password")
        if factor is Factor.MISSING:
            raise OtpRequired("a TOTP or recovery code is needed")
        if user.status != "active":
            raise AccountNotActive(user.status)
        return str(user.id).encode("ascii")


@implementer(ICredentialsChecker)
@collaborators
class AccessTokenChecker:
    credentialInterfaces = (IAccessToken,)

    store: IStore
    issuer: TokenIssuer
    now: Callable[[], float]

    @inlineCallbacks
    def requestAvatarId(self, credentials: Any) -> Any:
        try:
            claims = self.issuer.verify_access(credentials.token, self.now())
        except TokenError as e:
            if e.code is ErrorCode.TOKEN_EXPIRED:
                raise AccessExpired(e.message) from None
            raise AccessInvalid(e.message) from None
        session = yield self.store.session(claims.family)
        if session is None or session.revoked or session.user_id != claims.user_id:
            raise AccessRevoked("this session was logged out; log in again")
        if session.device_id != claims.device_id:
            # A session is one login of one device: a token naming another is not ours.
            raise AccessInvalid("the access token names another device")
        user = yield self.store.user_by_id(claims.user_id)
        if user is None or user.status != "active":
            raise AccessRevoked("this account is not active")
        return f"{claims.user_id}/{claims.device_id}/{claims.family}".encode()
