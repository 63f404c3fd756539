"""Session tokens: a short-lived ES256 access JWT and a rotating refresh token.

RFC 8725: the algorithm is pinned (ES256 only, never ``none`` and never an
HMAC family next to it), ``typ`` is checked (``at+jwt``, RFC 9068) so other
JWTs signed with the same key cannot be replayed as access tokens, and
``exp``/``iat``/``aud``/``iss``/``sub``/``jti`` are required.  Signatures are
low-S only (ECDSA's (r, n - s) twin is refused), a token may not live longer
than the configured lifetime, and its ``dev`` must be its session's device
(checked by ``auth.AccessTokenChecker`` against the stored session).  Revocation is
server-side: every access token names its session family, which ``logout``
or refresh-token reuse revokes at once.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import secrets
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shtalk.wire.errors import ErrorCode

INVALID, EXPIRED = ErrorCode.INVALID_TOKEN, ErrorCode.TOKEN_EXPIRED

ALGORITHM = "ES256"
TOKEN_TYPE = "at+jwt"  # noqa: S105 - a JWT typ, not a secret
AUDIENCE = "shtalk-access"
_REQUIRED = ["exp", "iat", "aud", "iss", "sub", "jti"]


#: The order of P-256: an ES256 signature (r, s) has a twin (r, n - s) that verifies too.
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_HALF_ORDER = P256_ORDER // 2


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _signature_of(token: str) -> bytes | None:
    """The raw ``r || s`` of a compact JWS, or None unless canonically encoded."""
    segment = token.rpartition(".")[2]
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (ValueError, binascii.Error):
        return None
    if _b64url(raw) != segment:
        return None  # another spelling of the same bytes: one token, one string
    return raw


def low_s(token: str) -> str:
    """The same token with its signature in low-S form (s <= n/2), as we issue them."""
    raw = _signature_of(token)
    assert raw is not None and len(raw) == 64
    s = int.from_bytes(raw[32:], "big")
    if s <= _HALF_ORDER:
        return token
    twin = raw[:32] + (P256_ORDER - s).to_bytes(32, "big")
    return token.rpartition(".")[0] + "." + _b64url(twin)


def is_low_s(token: str) -> bool:
    raw = _signature_of(token)
    return raw is not None and len(raw) == 64 and int.from_bytes(raw[32:], "big") <= _HALF_ORDER


class TokenError(Exception):
    """``code``: INVALID_TOKEN or TOKEN_EXPIRED (the checker tells the two apart)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class AccessClaims:
    user_id: int
    device_id: str
    family: str
    expires: int


def refresh_hash(token: str) -> bytes:
    """Refresh tokens carry 256 random bits, so a fast hash is enough at rest."""
    return hashlib.sha256(token.encode("utf-8")).digest()


def new_refresh_token() -> str:
    return "rt_" + secrets.token_urlsafe(32)


def new_family() -> str:
    return uuid.uuid4().hex


class TokenIssuer:
    def __init__(
        self,
        private_key_pem: bytes,
        issuer: str = "shtalk",
        access_ttl: int = 900,
        refresh_ttl: int = 30 * 24 * 3600,
    ) -> None:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != "secp256r1":
            raise ValueError("the JWT signing key must be an ECDSA P-256 private key")
        self._private = key
        self._public = key.public_key()
        der = self._public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.kid = hashlib.sha256(der).hexdigest()[:16]
        self.issuer = issuer
        self.access_ttl = access_ttl
        self.refresh_ttl = refresh_ttl

    def issue_access(self, user_id: int, device_id: str, family: str, now: float) -> str:
        iat = int(now)
        claims = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": str(user_id),
            "dev": device_id,
            "sid": family,
            "iat": iat,
            "exp": iat + self.access_ttl,
            "jti": secrets.token_urlsafe(12),
        }
        # OpenSSL's ECDSA gives either s; only the low one is ever issued (and accepted).
        return low_s(jwt.encode(
            claims, self._private, algorithm=ALGORITHM, headers={"typ": TOKEN_TYPE, "kid": self.kid}
        ))

    def verify_access(self, token: str, now: float) -> AccessClaims:
        """Raise TokenError for anything but a well-formed, live token of ours."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenError(INVALID, "the access token is malformed") from None
        if header.get("alg") != ALGORITHM or header.get("typ") != TOKEN_TYPE:
            raise TokenError(INVALID, "the access token is not one of ours")
        if header.get("kid") != self.kid:
            raise TokenError(INVALID, "the access token was signed with an unknown key")
        if not is_low_s(token):
            # The (r, n - s) twin of a valid token verifies as well: refuse every form but
            # the one we issue, so a token has exactly one spelling.
            raise TokenError(INVALID, "the access token's signature is not canonical")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                self._public,
                algorithms=[ALGORITHM],
                audience=AUDIENCE,
                issuer=self.issuer,
                # Times are checked below against our injected clock.
                options={"require": _REQUIRED, "verify_exp": False, "verify_iat": False},
                leeway=0,
            )
        except jwt.PyJWTError:
            raise TokenError(INVALID, "the access token did not verify") from None
        # Expiry against our injected clock, so tests can drive time.
        exp, iat = claims["exp"], claims["iat"]
        if not isinstance(exp, int) or not isinstance(iat, int) or iat > now + 60:
            raise TokenError(INVALID, "the access token has bad times")
        if not 0 < exp - iat <= self.access_ttl:
            # Whoever could sign a longer-lived token was not us; nor is a token issued
            # under a longer lifetime than the one configured now.
            raise TokenError(INVALID, "the access token lives longer than allowed")
        if exp <= now:
            raise TokenError(EXPIRED, "the access token expired; use the refresh token")
        try:
            uid = int(claims["sub"])
            dev = claims["dev"]
            sid = claims["sid"]
        except (KeyError, ValueError, TypeError):
            raise TokenError(INVALID, "the access token lacks its session") from None
        if not isinstance(dev, str) or not isinstance(sid, str):
            raise TokenError(INVALID, "the access token lacks its session")
        return AccessClaims(uid, dev, sid, exp)

    def public_key_pem(self) -> bytes:
        return self._public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
