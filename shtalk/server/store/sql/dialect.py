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
from typing import Any, Protocol

from shtalk.server.store.records import ChainLink
from shtalk.server.store.sql.common import chunks, marks

#: The store-wide locks (`Dialect.try_lock`) of the work one process at a time does.
LOCK_PURGE = ":purge"
LOCK_PURGE_PENDING = ":purge:pending"
LOCK_SWEEP = ":sweep"


class Chain(Protocol):
    """How a mailbox's chain takes a change that is not a message, and how readers
    join and leave it (a module of these functions: SQLite's `shtalk.server.store.sql.
    messages`, PostgreSQL's under the heads' locks)."""

    def link(self, conn: Any, mailbox: str) -> ChainLink: ...

    def add_cursors(self, conn: Any, user_id: int, mailbox: str) -> None: ...

    def drop_cursors(self, conn: Any, user_id: int, mailbox: str, upto: int) -> None: ...


class Dialect:
    """SQLite's (one writer, one process); `dialect` finds a connection's."""

    #: The chain steps; None: the shared module's own (SQLite's).
    chain: Chain | None = None
    #: Appended to a SELECT whose rows must stay as read until the transaction ends
    #: (SQLite's one writer holds the whole database already).
    for_update = ""
    #: Whether takers of one-time keys skip the rows others are taking (PostgreSQL's
    #: ``FOR UPDATE SKIP LOCKED``) rather than look again after losing one.
    skip_locked = False
    #: The column naming a row of a table without a key of one column.
    row_id = "rowid"

    def try_lock(self, conn: Any, use: str) -> bool:
        """Whether this transaction may do the store-wide work ``use`` (one process at
        a time; SQLite's store has one)."""
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
