"""Mailbox names as the store writes them: ``u:<user id>`` (an inbox), ``r:<room id>``.

Why one module: the names are stored in every message and cursor row, so the store
must build and parse them exactly one way; everything in ``shtalk.server.store``
goes through these helpers (the SQL binds `ROOM_PREFIX` rather than spelling it).
"""

from __future__ import annotations

USER_PREFIX = "u:"
ROOM_PREFIX = "r:"


def user_mailbox(user_id: int) -> str:
    """The inbox of a user: direct messages to (and copies from) that user."""
    return f"{USER_PREFIX}{user_id}"


def room_mailbox(room_id: int) -> str:
    return f"{ROOM_PREFIX}{room_id}"


def inbox_owner(mailbox: str) -> int | None:
    """The user whose inbox ``mailbox`` is; None for a room or a malformed name."""
    if mailbox.startswith(USER_PREFIX) and mailbox[2:].isdigit():
        return int(mailbox[2:])
    return None


def room_of(mailbox: str) -> int | None:
    """The room whose mailbox ``mailbox`` is; None for an inbox or a malformed name."""
    if mailbox.startswith(ROOM_PREFIX) and mailbox[2:].isdigit():
        return int(mailbox[2:])
    return None
