"""The database file and the connections to it: private modes, pragmas, checkpoints.

Why these settings: WAL lets readers read while the one writer writes; ``synchronous =
FULL`` makes a commit durable before a send is acknowledged; ``secure_delete`` zeroes
what is deleted (envelopes acknowledged, emails of deleted accounts); readers are
``query_only`` so a bug cannot write past the group commit; the file and its WAL are
0600 from the first byte, since SQLite would create them 0644.
"""

from __future__ import annotations

import os
import sqlite3

from shtalk.server.store.schema import check_database_file
from shtalk.server.store.sql.common import SQLiteConn as Conn
from shtalk.sqlitefiles import tighten_modes


def setup_writer(conn: Conn) -> None:
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA secure_delete = ON")


def connect_writer(path: str) -> Conn:
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, cached_statements=256
    )
    setup_writer(conn)
    return conn


def setup_reader(conn: Conn) -> None:
    conn.execute("PRAGMA busy_timeout = 10000")
    conn.execute("PRAGMA query_only = ON")


def checkpoint(conn: Conn) -> None:
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def prepare_file(path: str) -> None:
    """Refuse a bad file; create a missing one 0600 before SQLite can (0644)."""
    check_database_file(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        tighten_modes(path)
    else:
        os.close(fd)
