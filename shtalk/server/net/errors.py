"""The wire code of each refusal: the server's domain errors mapped to the protocol's.

The chat, account and cred code raise `shtalk.server.eserver.Refused` kinds (and cred's
refusals); only here do they become ``{"ok": false, "error": {"code": ...}}``.  A
refusal without an entry is a bug: the peer gets ``internal_error`` and the operator
the traceback.
"""

from __future__ import annotations

from shtalk.server import eserver as e
from shtalk.wire.errors import ErrorCode, ProtocolError

CODES: dict[type[e.Refused], ErrorCode] = {
    e.BadRequest: ErrorCode.BAD_FIELD,
    e.MissingEnvelope: ErrorCode.MISSING_FIELD,
    e.EnvelopeTooLarge: ErrorCode.ENVELOPE_TOO_LARGE,
    e.UsernameTaken: ErrorCode.USERNAME_TAKEN,
    e.InvalidCredentials: ErrorCode.INVALID_CREDENTIALS,
    e.InvalidCode: ErrorCode.INVALID_CODE,
    e.CaptchaRequired: ErrorCode.CAPTCHA_REQUIRED,
    e.CaptchaFailed: ErrorCode.CAPTCHA_FAILED,
    e.Throttled: ErrorCode.RATE_LIMITED,
    e.TotpEnabled: ErrorCode.TOTP_ENABLED,
    e.TotpNotEnabled: ErrorCode.TOTP_NOT_ENABLED,
    e.NoSuchUser: ErrorCode.NO_SUCH_USER,
    e.NoSuchRoom: ErrorCode.NO_SUCH_ROOM,
    e.NoSuchDevice: ErrorCode.NO_SUCH_DEVICE,
    e.RoomExists: ErrorCode.ROOM_EXISTS,
    e.NotAMember: ErrorCode.NOT_A_MEMBER,
    e.AlreadyMember: ErrorCode.ALREADY_MEMBER,
    e.InviteRequired: ErrorCode.INVITE_REQUIRED,
    e.Forbidden: ErrorCode.FORBIDDEN,
    e.SessionEnded: ErrorCode.NOT_AUTHENTICATED,
}

#: Access-token refusals of the token checker.
ACCESS_CODES: dict[type[e.AccessRefused], ErrorCode] = {
    e.AccessInvalid: ErrorCode.INVALID_TOKEN,
    e.AccessExpired: ErrorCode.TOKEN_EXPIRED,
    e.AccessRevoked: ErrorCode.TOKEN_REVOKED,
}


def to_wire(error: object) -> ProtocolError | None:
    """The protocol error to send for ``error``; None if it is not a refusal (a bug)."""
    if isinstance(error, ProtocolError):
        return error
    if isinstance(error, e.Refused):
        code = CODES.get(type(error))
        if code is not None:
            return ProtocolError(code, error.message, **error.extra)
    return None
