"""A PostgreSQL connection that runs the store's shared SQL, and its dialect.

Why a wrapper: the SQL of `shtalk.server.store.sql` is written once for both engines,
with SQLite's ``?`` placeholders; psycopg wants ``%s``.  `PgConn.execute` translates a
statement once (cached: the store's statements are a few hundred constants) and passes
everything else through to the psycopg connection.  A ``?`` in a statement is always
a placeholder (no statement of the store has one in a literal or an operator).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import lru_cache
from typing import Any, cast

from shtalk.server.store.pg import messages
from shtalk.server.store.pg.schema import try_lock
from shtalk.server.store.sql.dialect import Chain, Dialect


@lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled)."""
    return sql.replace("%", "%%").replace("?", "%s")


class PgDialect(Dialect):
    """Several processes write: chains and cursors under the mailbox heads' locks,
    store-wide work under advisory locks, a list bound as one array."""

    chain = cast(Chain, messages)
    for_update = " FOR UPDATE"
    skip_locked = True
    row_id = "ctid"

    def try_lock(self, conn: Any, use: str) -> bool:
        return try_lock(conn, use)

    def any_of(self, column: str, values: Sequence[Any]) -> Iterator[tuple[str, tuple[Any, ...]]]:
        if values:
            yield f"{column} = ANY(?)", (list(values),)


POSTGRES = PgDialect()


class PgConn:
    """A psycopg connection taking ``?`` placeholders; the rest passed through."""

    __slots__ = ("raw",)
    dialect = POSTGRES

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def execute(self, sql: str, params: Sequence[Any] | None = None) -> Any:
        if params is None:
            return self.raw.execute(sql)
        return self.raw.execute(translate(sql), params)

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> Any:
        cur = self.raw.cursor()
        cur.executemany(translate(sql), rows)
        return cur

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)

    def __repr__(self) -> str:
        return "<PgConn>"
