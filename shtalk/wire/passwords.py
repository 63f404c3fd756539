"""The password policy, shared by the server (which enforces it) and the client (which
checks first, so a person hears what is wrong before anything is sent).

Length and the common-password list only (ASVS 6.2); no composition rules.  Each refusal
names its own reason; no message ever contains the password.
"""

from __future__ import annotations

import re
from functools import lru_cache
from importlib import resources

from shtalk.wire.errors import ErrorCode, ProtocolError

BCRYPT_MAX_BYTES = 72
DEFAULT_MIN_LENGTH = 12

_TRAILER = re.compile(r"[\d\W_]+\Z")
_REPEATED = re.compile(r"(.+?)\1+")


@lru_cache(maxsize=1)
def common_passwords() -> frozenset[str]:
    text = resources.files("shtalk").joinpath("data/common-passwords.txt").read_text("utf-8")
    return frozenset(
        line.strip() for line in text.splitlines() if line and not line.startswith("#")
    )


def password_problem(
    password: str, username: str, min_length: int = DEFAULT_MIN_LENGTH
) -> tuple[ErrorCode, str] | None:
    """None if the policy accepts ``password``, else (code, what to do about it)."""
    size = len(password.encode("utf-8"))
    if size > BCRYPT_MAX_BYTES:
        return (
            ErrorCode.PASSWORD_TOO_LONG,
            f"the password is {size} bytes of UTF-8; at most {BCRYPT_MAX_BYTES} are allowed "
            "(bcrypt's limit; a longer one would be silently truncated elsewhere): use fewer "
            "or plainer characters",
        )
    if len(password) < min_length:
        return (
            ErrorCode.WEAK_PASSWORD,
            f"the password has {len(password)} characters; use at least {min_length} "
            "(a few unrelated words make a good one)",
        )
    folded = password.casefold()
    stripped = _TRAILER.sub("", folded)
    common = common_passwords()
    if folded in common or (len(stripped) >= 4 and stripped in common):
        return (
            ErrorCode.WEAK_PASSWORD,
            "that is one of the most common passwords (or one with digits or signs added): "
            "pick something others would not",
        )
    if len(set(folded)) <= 3 or _REPEATED.fullmatch(folded) is not None:
        return (
            ErrorCode.WEAK_PASSWORD,
            "the password repeats a few characters or a pattern: pick something less "
            "regular",
        )
    if username and len(folded.replace(username.casefold(), "")) < min_length // 2:
        return (
            ErrorCode.WEAK_PASSWORD,
            "the password is mostly the username: pick something that does not contain it",
        )
    return None


def check_password_policy(password: str, username: str, min_length: int) -> None:
    """Raise ProtocolError (``weak_password`` or ``password_too_long``) if refused."""
    problem = password_problem(password, username, min_length)
    if problem is not None:
        raise ProtocolError(*problem)
