"""What the SQL modules share: the connection types, chunking, and the keep-writes refusal."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any, Protocol, TypeVar

#: A connection of SQLite alone (its files, pragmas, checkpoints).
SQLiteConn = sqlite3.Connection


class Cursor(Protocol):
    """What the shared SQL reads of a statement's answer, on either engine."""

    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...

    def __iter__(self) -> Iterator[Any]: ...


class Conn(Protocol):
    """A connection as the shared SQL uses it: sqlite3's, or PostgreSQL's
    (`shtalk.server.store.pg.conn.PgConn`); ``?`` placeholders on both."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Any, /) -> Cursor: ...

T = TypeVar("T")
#: Bound on host parameters per statement (SQLite's limit is far higher).
CHUNK = 500


class KeepWrites(Exception):
    """Raised by an op to fail its Deferred with ``error`` yet keep its writes.

    Token reuse must revoke the family AND report TokenReuse; a plain raise
    would roll the revocation back with the op's savepoint.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def marks(n: int) -> str:
    return ",".join("?" * n)


def exists(conn: Conn, sql: str, *params: object) -> bool:
    return conn.execute(sql, params).fetchone() is not None


def top_seq(conn: Conn) -> int:
    """New cursors start here: after every message stored so far."""
    return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM messages").fetchone()[0])
