"""Error codes of the wire protocol; every refusal a client can see is listed here."""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    # Framing and schema: the connection stays usable after all of these but LINE_TOO_LONG.
    BAD_JSON = "bad_json"
    NOT_AN_OBJECT = "not_an_object"
    UNKNOWN_TYPE = "unknown_type"
    MISSING_FIELD = "missing_field"
    BAD_FIELD = "bad_field"
    LINE_TOO_LONG = "line_too_long"
    # Session state.
    HELLO_REQUIRED = "hello_required"
    UNSUPPORTED_VERSION = "unsupported_version"
    NOT_AUTHENTICATED = "not_authenticated"
    ALREADY_AUTHENTICATED = "already_authenticated"
    # Accounts and tokens.
    BAD_USERNAME = "bad_username"
    USERNAME_TAKEN = "username_taken"
    WEAK_PASSWORD = "weak_password"
    PASSWORD_TOO_LONG = "password_too_long"
    BAD_EMAIL = "bad_email"
    INVALID_CREDENTIALS = "invalid_credentials"
    INVALID_TOKEN = "invalid_token"
    TOKEN_EXPIRED = "token_expired"
    TOKEN_REVOKED = "token_revoked"
    # Account security (email verification, CAPTCHA, TOTP, throttling).
    EMAIL_NOT_VERIFIED = "email_not_verified"
    INVALID_CODE = "invalid_code"
    CAPTCHA_REQUIRED = "captcha_required"
    CAPTCHA_FAILED = "captcha_failed"
    OTP_REQUIRED = "otp_required"
    TOTP_ENABLED = "totp_enabled"
    TOTP_NOT_ENABLED = "totp_not_enabled"
    # Rooms and routing.
    NO_SUCH_USER = "no_such_user"
    NO_SUCH_ROOM = "no_such_room"
    NO_SUCH_DEVICE = "no_such_device"
    ROOM_EXISTS = "room_exists"
    NOT_A_MEMBER = "not_a_member"
    ALREADY_MEMBER = "already_member"
    INVITE_REQUIRED = "invite_required"
    FORBIDDEN = "forbidden"
    ENVELOPE_TOO_LARGE = "envelope_too_large"
    # Server side.
    TOO_MANY_CONNECTIONS = "too_many_connections"
    TIMEOUT = "timeout"
    RATE_LIMITED = "rate_limited"
    INTERNAL_ERROR = "internal_error"


_CODES = {c.value: c for c in ErrorCode}


def code_of(text: str) -> ErrorCode | str:
    """The member for a code read off the wire; a code this side does not know (from a
    newer peer) stays the string it was."""
    return _CODES.get(text, text)


class ProtocolError(Exception):
    """A refusal that goes back to the peer as ``{"ok": false, "error": ...}``.

    ``message`` is sent to the peer, so it must never contain secrets or
    echo back what the peer sent beyond field names.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        request_id: str | int | None = None,
        **extra: object,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.extra = extra
