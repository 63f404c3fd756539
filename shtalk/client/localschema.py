"""The local store's file: creation with safe permissions, pragmas and tables.

Split out of ``localstore.py`` so that module holds the cryptography and the API,
and this one everything SQLite-shaped.  Everything here runs in the store's
database thread (never on the reactor thread).

Why the tables look like this (see docs/SECURITY.md, "Client local store"):

* ``header``: the KDF parameters, the salt and the wrapped data key.  The only
  rows that are not sealed under the data key (they are what unlocks it).
* ``kv``: sealed key/value state by ``kind``.  The row key is an HMAC of
  (kind, key) so contact names and device ids do not show in the file; the
  plain key travels inside the sealed value.
* ``history``: message history.  Clear columns are only what ordering, paging
  and expiry need (``ts``, ``expires_at``) plus keyed hashes of the message id
  (uniqueness) and of the conversation (filtering).  Everything else (id,
  conversation, sender, device, body) is in ``body``; the delivery state is
  sealed apart in ``state`` so a state change does not re-seal the body.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3

#: Bumped when the layout changes; open() refuses a file of another format.
FORMAT = 1
SUFFIXES = ("", "-wal", "-shm")

_DDL = (
    """CREATE TABLE IF NOT EXISTS header (
        name  TEXT PRIMARY KEY,
        value BLOB NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS kv (
        kind  TEXT NOT NULL,
        hkey  BLOB NOT NULL,
        value BLOB NOT NULL,
        PRIMARY KEY (kind, hkey)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS history (
        seq        INTEGER PRIMARY KEY,
        hid        BLOB NOT NULL UNIQUE,
        hconv      BLOB NOT NULL,
        ts         INTEGER NOT NULL,
        expires_at REAL,
        body       BLOB NOT NULL,
        state      BLOB NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS history_conv ON history (hconv, ts, seq)",
    "CREATE INDEX IF NOT EXISTS history_ts ON history (ts, seq)",
    "CREATE INDEX IF NOT EXISTS history_expiry ON history (expires_at)"
    " WHERE expires_at IS NOT NULL",
)


class LocalStoreError(Exception):
    """Base of the local store's errors."""


def create_files(path: str) -> None:
    """Create the database file (and its -wal/-shm) 0600 before SQLite opens them.

    SQLite would create the file with the umask's mode (often 0644); it gives
    -wal/-shm the main file's mode, but we create them too so no window exists.
    O_EXCL: ``create`` never takes over an existing file.  A leftover -wal/-shm
    without its database belongs to a store that no longer exists: removed.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise LocalStoreError(
            f"{path}: already exists; open it, or move it away to create a new store"
        ) from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask did
    finally:
        os.close(fd)
    for suffix in SUFFIXES[1:]:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)
        fd = os.open(path + suffix, flags, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)


def remove_files(path: str) -> None:
    """Undo a failed ``create`` (the files are ours and hold no passphrase-wrapped key)."""
    for suffix in SUFFIXES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path + suffix)


def check_files(path: str) -> None:
    """Refuse a missing or non-regular file; tighten loose permissions to 0600."""
    if not os.path.lexists(path):
        raise LocalStoreError(f"{path}: no such store; create it first")
    if os.path.islink(path) or not os.path.isfile(path):
        raise LocalStoreError(f"{path}: not a regular file")
    for suffix in SUFFIXES:
        try:
            mode = os.stat(path + suffix).st_mode
        except FileNotFoundError:
            continue
        if mode & 0o077:
            os.chmod(path + suffix, 0o600)


def setup_connection(conn: sqlite3.Connection) -> None:
    """Pragmas for every connection (there is only one).

    WAL + synchronous=FULL: a committed transaction survives a power cut, so a
    ratchet state saved with its message is never lost.  secure_delete: deleted
    rows (purged disappearing messages, old sessions) are overwritten with
    zeros instead of lingering in free pages.  temp_store=MEMORY: no temporary
    files (none should hold anything useful, but none is simpler).
    """
    conn.execute("PRAGMA busy_timeout = 10000")
    mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
    if mode is None or str(mode[0]).lower() != "wal":
        raise LocalStoreError("this file system does not support SQLite's WAL mode")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("PRAGMA secure_delete = ON")
    conn.execute("PRAGMA temp_store = MEMORY")
    # A reset WAL is truncated, not left at its high-water mark full of old pages.
    conn.execute("PRAGMA journal_size_limit = 0")


def create_schema(conn: sqlite3.Connection, header: dict[str, bytes]) -> None:
    """Tables and the header, in one transaction (a half-made store cannot exist)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _DDL:
            conn.execute(statement)
        rows = [("format", str(FORMAT).encode()), *header.items()]
        conn.executemany("INSERT INTO header (name, value) VALUES (?, ?)", rows)
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def read_header(conn: sqlite3.Connection, path: str) -> dict[str, bytes]:
    """The header rows; a clear error if this is not a local store we can read."""
    try:
        rows = conn.execute("SELECT name, value FROM header").fetchall()
    except sqlite3.DatabaseError as e:
        raise LocalStoreError(f"{path}: not a shtalk local store ({e})") from e
    header = {str(name): bytes(value) for name, value in rows}
    fmt = header.get("format")
    if fmt is None:
        raise LocalStoreError(f"{path}: not a shtalk local store (no format)")
    if fmt != str(FORMAT).encode():
        raise LocalStoreError(
            f"{path}: store format {fmt.decode(errors='replace')} is not {FORMAT};"
            " a newer shtalk made it"
        )
    return header


def write_header(conn: sqlite3.Connection, header: dict[str, bytes]) -> None:
    """Replace header rows in ONE transaction, then checkpoint.

    The checkpoint (TRUNCATE) removes the previous wrapped key from the WAL: after
    a passphrase change, the old passphrase must not unlock a copy left behind.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(
            "INSERT OR REPLACE INTO header (name, value) VALUES (?, ?)", list(header.items())
        )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    checkpoint(conn)


def checkpoint(conn: sqlite3.Connection) -> None:
    """Move the WAL into the database and truncate it: old page images go away."""
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
