"""Names from requests to canonical keys, with protocol errors that state the rule."""

from __future__ import annotations

import unicodedata

from email_validator import EmailNotValidError, validate_email

from shtalk.wire.errors import ErrorCode, ProtocolError
from shtalk.wire.names import NameError_, normalise_room, normalise_username

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
    """One addr-spec (RFC 5322/6531, as email-validator reads it; no DNS look-up), in
    the ASCII form mail goes out in.  No lists, display names, quoted local parts,
    IP literals or control characters: the address ends up in a mail header."""
    if any(unicodedata.category(c).startswith("C") for c in email):
        raise ProtocolError(ErrorCode.BAD_EMAIL, "the email address contains control characters")
    if len(email) > _EMAIL_MAX:
        raise ProtocolError(ErrorCode.BAD_EMAIL, "that email address is too long")
    try:
        valid = validate_email(
            email, check_deliverability=False, allow_smtputf8=False, allow_quoted_local=False,
            allow_domain_literal=False, allow_display_name=False,
        )
    except EmailNotValidError:
        raise ProtocolError(
            ErrorCode.BAD_EMAIL,
            "give one email address like name@example.org (ASCII before the @, no lists)",
        ) from None
    return str(valid.ascii_email or valid.normalized)
