"""The local store's file: permissions, pragmas, tables and the SQL operations.

``localstore.py`` keeps the public API, argument checks and threads; the keys and
the sealing are in ``localseal.py``.  Everything here runs in the store's database
thread.

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
import hmac
import os
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar, cast

from shtalk.client.errors import CorruptEntry, LocalStoreError, StoreClosed, WrongPassphrase
from shtalk.client.localseal import Keys, body_ad, kv_ad, lp, state_ad, unlp
from shtalk.sqlitefiles import SUFFIXES, tighten_modes

T = TypeVar("T")
Conn = sqlite3.Connection
Put = tuple[str, str, bytes | None]

#: Bumped when the layout changes; open() refuses a file of another format.
FORMAT = 1

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
    tighten_modes(path)


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


#: Delivery states of a history message.
STATES = frozenset({"sending", "sent", "failed", "received"})


@dataclass(frozen=True)
class HistoryMessage:
    id: str  # client-wide unique: "<sender>/<device>/<client_id>"
    conversation: str  # "user:<name>" or "room:<name>"
    sender: str  # user name ("" = me)
    sender_device: str
    ts: int  # milliseconds
    body: str
    expires_at: float | None
    state: str  # "sending" | "sent" | "failed" | "received"


# --- operations (run in the database thread) ---------------------------------


def transaction(conn: Conn, work: Callable[[], T]) -> T:
    conn.execute("BEGIN IMMEDIATE")
    try:
        result = work()
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return result


def put_kv(conn: Conn, keys: Keys, kind: str, key: str, value: bytes | None) -> None:
    hkey = keys.name_hash(b"kv", kind, key)
    if value is None:
        conn.execute("DELETE FROM kv WHERE kind = ? AND hkey = ?", (kind, hkey))
        return
    sealed = keys.seal(lp(key.encode("utf-8"), value), kv_ad(kind, hkey))
    conn.execute(
        "INSERT OR REPLACE INTO kv (kind, hkey, value) VALUES (?, ?, ?)", (kind, hkey, sealed)
    )


def kv_value(keys: Keys, kind: str, hkey: bytes, sealed: bytes) -> tuple[str, bytes]:
    plain = keys.unseal(sealed, kv_ad(kind, hkey), f"{kind} entry")
    try:
        raw_key, value = unlp(plain, 2)
        key = raw_key.decode("utf-8")
    except ValueError as e:
        raise CorruptEntry(f"{kind} entry: malformed ({e})") from e
    if not hmac.compare_digest(keys.name_hash(b"kv", kind, key), hkey):
        raise CorruptEntry(f"{kind} entry: stored under another key")
    return key, value


def insert_message(conn: Conn, keys: Keys, m: HistoryMessage) -> None:
    """INSERT OR IGNORE: a redelivered message (same id) keeps the first copy."""
    hid = keys.name_hash(b"history-id", m.id)
    hconv = keys.name_hash(b"conversation", m.conversation)
    fields = (m.id, m.conversation, m.sender, m.sender_device, m.body)
    body = keys.seal(
        lp(*(f.encode("utf-8") for f in fields)), body_ad(hid, hconv, m.ts, m.expires_at)
    )
    state = keys.seal(m.state.encode(), state_ad(hid))
    conn.execute(
        "INSERT OR IGNORE INTO history (hid, hconv, ts, expires_at, body, state)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (hid, hconv, m.ts, m.expires_at, body, state),
    )


def set_state(conn: Conn, keys: Keys, message_id: str, state: str) -> None:
    """Unknown ids are ignored: the message may have expired and been purged already."""
    hid = keys.name_hash(b"history-id", message_id)
    sealed = keys.seal(state.encode(), state_ad(hid))
    conn.execute("UPDATE history SET state = ? WHERE hid = ?", (sealed, hid))


def commit(
    conn: Conn,
    keys: Keys,
    puts: Sequence[Put],
    messages: Sequence[HistoryMessage],
    states: Sequence[tuple[str, str]],
) -> None:
    def work() -> None:
        for kind, key, value in puts:
            put_kv(conn, keys, kind, key, value)
        for m in messages:
            insert_message(conn, keys, m)
        for message_id, state in states:
            set_state(conn, keys, message_id, state)

    transaction(conn, work)


_COLUMNS = "hid, hconv, ts, expires_at, body, state"
_Row = tuple[bytes, bytes, int, float | None, bytes, bytes]


def row_message(keys: Keys, row: _Row) -> HistoryMessage:
    hid, hconv, ts, expires_at, body, state = row
    plain = keys.unseal(body, body_ad(hid, hconv, ts, expires_at), "history message")
    raw_state = keys.unseal(state, state_ad(hid), "history message state")
    try:
        mid, conv, sender, device, text = (b.decode("utf-8") for b in unlp(plain, 5))
        st = raw_state.decode("ascii")
    except ValueError as e:
        raise CorruptEntry(f"history message: malformed ({e})") from e
    if not hmac.compare_digest(keys.name_hash(b"history-id", mid), hid):
        raise CorruptEntry("history message: stored under another id")
    return HistoryMessage(mid, conv, sender, device, ts, text, expires_at, st)


def history(
    conn: Conn, keys: Keys, conversation: str, limit: int, before_ts: int | None
) -> list[HistoryMessage]:
    hconv = keys.name_hash(b"conversation", conversation)
    bound = (1 << 63) - 1 if before_ts is None else before_ts
    rows = conn.execute(
        f"SELECT {_COLUMNS} FROM history WHERE hconv = ? AND ts < ?"  # noqa: S608 (constant)
        " ORDER BY ts DESC, seq DESC LIMIT ?",
        (hconv, bound, limit),
    ).fetchall()
    return [row_message(keys, cast(_Row, r)) for r in reversed(rows)]


def search(
    conn: Conn, keys: Keys, text: str, conversation: str | None, limit: int
) -> list[HistoryMessage]:
    """Newest matches first while scanning, returned newest-last like history()."""
    needle = text.casefold()
    if conversation is None:
        cursor = conn.execute(
            f"SELECT {_COLUMNS} FROM history ORDER BY ts DESC, seq DESC"  # noqa: S608
        )
    else:
        hconv = keys.name_hash(b"conversation", conversation)
        cursor = conn.execute(
            f"SELECT {_COLUMNS} FROM history WHERE hconv = ?"  # noqa: S608
            " ORDER BY ts DESC, seq DESC",
            (hconv,),
        )
    found: list[HistoryMessage] = []
    for row in cursor:
        if len(found) >= limit:
            break
        m = row_message(keys, cast(_Row, row))
        if needle in m.body.casefold():
            found.append(m)
    cursor.close()
    found.reverse()
    return found


def purge(conn: Conn, now: float) -> int:
    def work() -> int:
        cur = conn.execute(
            "DELETE FROM history WHERE expires_at IS NOT NULL AND expires_at <= ?", (now,)
        )
        return cur.rowcount

    count = transaction(conn, work)
    if count:
        # secure_delete zeroed the rows in the database pages; the WAL still
        # holds their old page images until a checkpoint truncates it.
        checkpoint(conn)
    return count


def conversations(conn: Conn, keys: Keys) -> list[tuple[str, int, int]]:
    groups = conn.execute(
        "SELECT hconv, count(*), max(ts) FROM history GROUP BY hconv ORDER BY max(ts) DESC"
    ).fetchall()
    out: list[tuple[str, int, int]] = []
    for hconv, count, last in groups:
        row = conn.execute(
            f"SELECT {_COLUMNS} FROM history WHERE hconv = ? LIMIT 1",  # noqa: S608
            (hconv,),
        ).fetchone()
        out.append((row_message(keys, cast(_Row, row)).conversation, int(count), int(last)))
    return out


__all__ = [
    "STATES",
    "CorruptEntry",
    "HistoryMessage",
    "LocalStoreError",
    "StoreClosed",
    "WrongPassphrase",
]
