"""Names from requests to canonical keys, with protocol errors that state the rule."""

from __future__ import annotations

from shtalk.protocol.errors import ErrorCode, ProtocolError
from shtalk.protocol.names import NameError_, normalise_room, normalise_username

_EMAIL_MAX = 254


def user_key(raw: str) -> tuple[str, str]:
    try:
        return normalise_username(raw)
    except NameError_ as e:
        raise ProtocolError(ErrorCode.BAD_USERNAME, f"usernames are {e}") from None


def room_key(raw: str) -> tuple[str, str]:
    try:
        return normalise_room(raw)
    except NameError_ as e:
        raise ProtocolError(ErrorCode.BAD_FIELD, f"room names are {e}") from None


def check_email(email: str) -> str:
    local, at, domain = email.rpartition("@")
    if not at or not local or "." not in domain or any(c.isspace() for c in email):
        raise ProtocolError(ErrorCode.BAD_EMAIL, "give an email address like name@example.org")
    if len(email) > _EMAIL_MAX:
        raise ProtocolError(ErrorCode.BAD_EMAIL, "that email address is too long")
    return email
