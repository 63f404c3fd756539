"""Which engine a connection is, for the SQL both engines share.

Why: the SQL of `shtalk.server.store.sql` runs on SQLite and, through
`shtalk.server.store.pg.conn.PgConn`, on PostgreSQL: the statements are written once,
with ``?`` placeholders, in the part of SQL both engines accept.  What really differs
is a few steps, asked of the connection's `Dialect`: how a mailbox's chain takes a new
link and its readers' cursors (SQLite's one writer against PostgreSQL's locked heads),
the store-wide locks of work one process at a time should do, and how a list of values
is matched, and the row locks that only PostgreSQL needs and spells.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from shtalk.server.store.records import ChainLink
from shtalk.server.store.sql import messages
from shtalk.server.store.sql.common import chunks, marks


class Dialect:
    """SQLite's steps (one writer, one process); `dialect` finds a connection's."""

    #: Appended to a SELECT whose rows must stay as read until the transaction ends
    #: (SQLite's one writer holds the whole database already).
    for_update = ""
    #: Whether takers of one-time keys skip the rows others are taking (PostgreSQL's
    #: ``FOR UPDATE SKIP LOCKED``) rather than look again after losing one.
    skip_locked = False

    def link(self, conn: Any, mailbox: str) -> ChainLink:
        """A seq for a change of ``mailbox`` that is not a message, in its chain."""
        return messages.link(conn, mailbox)

    def add_cursors(self, conn: Any, user_id: int, mailbox: str) -> None:
        """The user's devices read ``mailbox`` from its head on (no history)."""
        messages.add_cursors(conn, user_id, mailbox)

    def drop_cursors(self, conn: Any, user_id: int, mailbox: str, upto: int) -> None:
        """The user's devices stop reading ``mailbox``; what only they held back goes."""
        messages.drop_cursors(conn, user_id, mailbox, upto)

    def try_lock(self, conn: Any, use: str) -> bool:
        """Whether this transaction may do the store-wide work ``use`` (one process)."""
        return True

    def any_of(self, column: str, values: Sequence[Any]) -> Iterator[tuple[str, tuple[Any, ...]]]:
        """(condition, params) matching ``column`` to any of ``values``, in as many
        statements as the engine needs (none for no values)."""
        for chunk in chunks(values):
            yield f"{column} IN ({marks(len(chunk))})", tuple(chunk)


SQLITE = Dialect()


def dialect(conn: Any) -> Dialect:
    """The connection's dialect (a bare sqlite3 connection is SQLite)."""
    found: Dialect = getattr(conn, "dialect", SQLITE)
    return found
