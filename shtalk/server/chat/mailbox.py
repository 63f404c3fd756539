"""Mailbox names: where a stored message waits, ``u:<user id>`` or ``r:<room id>``.

The store keys messages and per-device cursors by these strings, the bus resolves them
to recipients; building and reading them here, and nowhere else, keeps the two forms
in step.  Plain functions of plain data: the store's threads call them too.
"""

from __future__ import annotations

from collections.abc import Iterable

USER = "u"
ROOM = "r"
#: What a room's mailbox is before its id, for SQL that builds it (``? || room_id``).
ROOM_PREFIX = ROOM + ":"


def _is_id(text: str) -> bool:
    return text.isascii() and text.isdigit()


def user_mailbox(user_id: int) -> str:
    """A user's own inbox: direct messages to any of their devices."""
    return f"u:{user_id}"


def room_mailbox(room_id: int) -> str:
    return f"r:{room_id}"


def parse(mailbox: str) -> tuple[str, int]:
    """(``USER`` or ``ROOM``, id); ValueError for anything else."""
    kind, sep, ident = mailbox.partition(":")
    if not sep or kind not in (USER, ROOM) or not _is_id(ident):
        raise ValueError(f"not a mailbox: {mailbox[:40]!r}")
    return kind, int(ident)


def user_of(mailbox: str) -> int | None:
    """The user id of a user mailbox; None for a room's (or anything else)."""
    if mailbox.startswith("u:") and _is_id(mailbox[2:]):
        return int(mailbox[2:])
    return None


def users_of(mailboxes: Iterable[str]) -> list[int]:
    """The user ids among ``mailboxes`` (a direct message's recipients), in order."""
    return [uid for uid in map(user_of, mailboxes) if uid is not None]
