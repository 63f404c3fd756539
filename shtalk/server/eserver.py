"""The server's refusals, in one module (as twisted.words' ewords beside iwords).

What the store refuses (`StoreError` and its kinds), what a request can be refused for
in the server's own terms (`Refused` and its kinds) and what twisted.cred's checkers
refuse (`UnauthorizedLogin` kinds).  They carry the sentence the person will read, never
a wire code: the connection maps each kind to its code (``shtalk.server.net.errors``),
so the chat and account code does not speak the wire and one table shows every refusal.
"""

from __future__ import annotations

from typing import Any

from twisted.cred.error import UnauthorizedLogin


class StoreError(Exception):
    """Base of the store's expected refusals (not I/O failures)."""


class Conflict(StoreError):
    """A unique name (user, room) is taken."""


class TokenReuse(StoreError):
    """A rotated refresh token came back: its family is now revoked."""

    def __init__(self, message: str, family: str = "") -> None:
        super().__init__(message)
        self.family = family


class TokenRevoked(StoreError):
    """The refresh token's session was logged out or revoked after a reuse."""


class TokenUnknown(StoreError):
    """No such refresh token, or it expired, or its family is revoked."""


class StoreClosed(StoreError):
    """The store is not open (never opened, or closing)."""


class CorruptStore(StoreError):
    """The database file cannot be used (not SQLite, newer schema, failed check)."""


# --- refusals ------------------------------------------------------------------------------


class Refused(Exception):
    """A request refused for what it means (its shape was the wire's to check).

    ``message`` goes to the peer: it says what to do, never holds a secret, and echoes
    nothing the peer sent beyond names.  ``extra`` are further fields of the error
    (a new CAPTCHA, ``retry_after``)."""

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra


class BadRequest(Refused):
    """A field that is well-formed but cannot be used (not a recipient, a bad report)."""


class MissingEnvelope(Refused):
    """A send with neither a common envelope nor per-device ones."""


class EnvelopeTooLarge(Refused):
    """An envelope over this server's limit."""


class UsernameTaken(Refused):
    """The name (in its canonical form) belongs to an account."""


class InvalidCredentials(Refused):
    """A wrong password, code or account: the same refusal for each."""


class InvalidCode(Refused):
    """A wrong, expired or used email or TOTP code."""


class CaptchaRequired(Refused):
    """Solve the CAPTCHA in ``extra["captcha"]`` and send the request again."""


class CaptchaFailed(Refused):
    """A wrong, expired or used answer; ``extra["captcha"]`` is a new challenge."""


class Throttled(Refused):
    """Too many failures of a secret: wait ``extra["retry_after"]`` seconds."""


class TotpEnabled(Refused):
    """TOTP is on already (enrolling again needs it off first)."""


class TotpNotEnabled(Refused):
    """No TOTP to confirm, disable or use."""


class NoSuchUser(Refused):
    """No active account of that name."""


class NoSuchRoom(Refused):
    """No room of that name."""


class NoSuchDevice(Refused):
    """Not a device of that account (any more)."""


class RoomExists(Refused):
    """The room name is taken."""


class NotAMember(Refused):
    """The person (oneself or another) is not in the room."""


class AlreadyMember(Refused):
    """The person is in the room already."""


class InviteRequired(Refused):
    """The room is invite-only and no invitation is waiting."""


class Forbidden(Refused):
    """The role (or this server) does not allow it."""


class SessionEnded(Refused):
    """The session ended while the request ran (logged out elsewhere)."""


# Refusals of twisted.cred's checkers: portal.login fails with these (all are
# UnauthorizedLogin, so cred's own handling still applies).


class OtpRequired(UnauthorizedLogin):
    """The password was right; the account has TOTP and no code was given."""


class AccountNotActive(UnauthorizedLogin):
    """The password was right; the account is pending verification, suspended or deleted."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


class AccessRefused(UnauthorizedLogin):
    """An access token that cannot be used; ``message`` says why and what to do."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class AccessInvalid(AccessRefused):
    """Not a token of ours for this device: log in again."""


class AccessExpired(AccessRefused):
    """Our token, past its time: refresh."""


class AccessRevoked(AccessRefused):
    """The token's session was logged out or its account is no longer active."""
