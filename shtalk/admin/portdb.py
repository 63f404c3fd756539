"""``shtalk-admin port-db``: copy an SQLite data directory's database into PostgreSQL.

Why a copy and not a dump: the two schemas differ in types (0/1 against booleans, the
seqs' sequence), and what a device has pending must stay pending in the same order.
So every table is read from SQLite (opened read-only, the server stopped) and written
with ``COPY`` into PostgreSQL in ONE transaction: seqs, chains (``prev_seq``, mailbox
heads) and cursors kept as they are, then the sequences set past every id ever handed
out (SQLite's AUTOINCREMENT never reuses one; neither may PostgreSQL).  Envelopes and
the monitoring flags' evidence stay sealed as they are (same storage key, same
associated data); an address still in clear (a database from before sealing) is
sealed on the way.  A target that already holds accounts, messages or flags is
refused: port-db never merges.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from typing import Any, TextIO

import psycopg

from shtalk.server.datadir import DataDir
from shtalk.server.store import schema as sqlite_schema
from shtalk.server.store.flags import COLUMNS as FLAG_COLUMNS
from shtalk.server.store.pg import schema as pg_schema
from shtalk.server.store.pg.conn import PgConn
from shtalk.server.store.pg.store import connect, redact
from shtalk.server.store.sealing import EmailSeal

#: (table, columns, boolean columns, order): copied in this order (foreign keys).
TABLES: list[tuple[str, tuple[str, ...], frozenset[str], str]] = [
    ("users", ("id", "name", "key", "email", "email_hash", "pw_hash", "status", "created"),
     frozenset(), "id"),
    ("devices", ("user_id", "device_id", "label", "created"), frozenset(), "user_id"),
    ("sessions", ("family", "user_id", "device_id", "expires", "revoked"),
     frozenset({"revoked"}), "family"),
    ("refresh_tokens", ("hash", "family", "expires", "used"), frozenset({"used"}), "hash"),
    ("rooms", ("id", "name", "key", "owner_id", "invite_only", "created"),
     frozenset({"invite_only"}), "id"),
    ("members", ("room_id", "user_id", "role", "joined"), frozenset(), "room_id"),
    ("invites", ("room_id", "user_id", "by_id", "created"), frozenset(), "room_id"),
    ("dm_partners", ("user_id", "partner_id", "wrote"), frozenset({"wrote"}), "user_id"),
    ("messages", ("seq", "mailbox", "sender_id", "sender_device", "client_id", "ts",
                  "expires_at", "target", "for_all", "nonce", "body", "prev_seq"),
     frozenset({"for_all"}), "seq"),
    ("message_devices", ("seq", "user_id", "device_id"), frozenset(), "seq"),
    ("cursors", ("user_id", "device_id", "mailbox", "acked_seq"), frozenset(), "user_id"),
    ("mailbox_heads", ("mailbox", "seq"), frozenset(), "mailbox"),
    ("client_ids", ("sender_id", "sender_device", "client_id", "seqs", "created"),
     frozenset(), "created"),
    ("device_bundles", ("user_id", "device_id", "bundle", "updated"), frozenset(), "user_id"),
    ("one_time_keys", ("user_id", "device_id", "kind", "key_id", "key", "claimed"),
     frozenset(), "user_id"),
    ("email_codes", ("user_id", "purpose", "code_hash", "expires", "attempts", "sent"),
     frozenset(), "user_id"),
    ("totp", ("user_id", "sealed", "enabled", "last_step", "created"),
     frozenset({"enabled"}), "user_id"),
    ("recovery_codes", ("user_id", "code_hash"), frozenset(), "user_id"),
    ("monitor_flags", ("id", *FLAG_COLUMNS), frozenset(), "id"),
]  # fmt: skip

#: Rows between two progress lines.
PROGRESS_EVERY = 50_000


class PortError(Exception):
    """Why the copy was refused or failed; one line for the operator."""


def _source(datadir: DataDir) -> sqlite3.Connection:
    path = str(datadir.db_path)
    if not os.path.exists(path):
        raise PortError(f"{path}: no database to copy")
    sqlite_schema.check_database_file(path)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    version = sqlite_schema.inspect_database(conn, path)
    if version != sqlite_schema.schema_version():
        conn.close()
        raise PortError(
            f"{path}: schema version {version}, not {sqlite_schema.schema_version()}; start "
            "this shtalk on it once (it migrates the file), stop it, then copy"
        )
    return conn


def _rows(
    src: sqlite3.Connection, table: str, columns: tuple[str, ...], bools: frozenset[str],
    order: str, emails: EmailSeal,
) -> Iterator[tuple[Any, ...]]:
    # Table and column names come from TABLES, never from input.
    cur = src.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {order}")  # noqa: S608
    flags = [c in bools for c in columns]
    email_at = columns.index("email") if table == "users" else -1
    for row in cur:
        out: list[Any] = [bool(v) if flag else v for v, flag in zip(row, flags, strict=True)]
        if email_at >= 0 and isinstance(out[email_at], str):
            clear = str(out[email_at])  # from before sealing: sealed now, never in clear
            out[email_at] = emails.seal(str(out[2]), clear) if clear else b""
            out[email_at + 1] = emails.index(clear) if clear else None
        yield tuple(out)


def _top(src: sqlite3.Connection, name: str, column: str, table: str) -> int:
    """The highest id ever handed out (AUTOINCREMENT's memory, or what is stored)."""
    row = src.execute("SELECT seq FROM sqlite_sequence WHERE name = ?", (name,)).fetchone()
    stored = src.execute(f"SELECT COALESCE(MAX({column}), 0) FROM {table}").fetchone()  # noqa: S608
    return max(int(row[0]) if row else 0, int(stored[0]))


def port(data_dir: str, url: str, out: TextIO) -> int:
    """Copy; return the number of rows copied.  Raises PortError."""
    datadir = DataDir(data_dir)
    emails = EmailSeal(datadir.storage_key())
    src = _source(datadir)
    where = redact(url)
    try:
        with connect(url) as dst:
            pg_schema.migrate(PgConn(dst), where)
            total = _copy(src, dst, where, emails, out)
    except psycopg.Error as e:
        raise PortError(f"{where}: {' '.join(str(e).split())[:300]}") from None
    finally:
        src.close()
    return total


def _copy(
    src: sqlite3.Connection, dst: Any, where: str, emails: EmailSeal, out: TextIO
) -> int:
    total = 0
    with dst.transaction():
        # Nobody else writes while we copy (a server started too early waits).
        dst.execute("LOCK TABLE users, rooms, messages IN EXCLUSIVE MODE")
        busy = dst.execute(
            "SELECT EXISTS (SELECT 1 FROM users) OR EXISTS (SELECT 1 FROM rooms)"
            " OR EXISTS (SELECT 1 FROM messages) OR EXISTS (SELECT 1 FROM mailbox_heads)"
            " OR EXISTS (SELECT 1 FROM monitor_flags)"
        ).fetchone()[0]
        if busy:
            raise PortError(f"{where}: the database already holds data; port-db copies only "
                            "into an empty one (a new database or schema)")
        for table, columns, bools, order in TABLES:
            expected = int(src.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])  # noqa: S608
            done = 0
            with dst.cursor().copy(
                f"COPY {table} ({', '.join(columns)}) FROM STDIN"
            ) as copy:
                for row in _rows(src, table, columns, bools, order, emails):
                    copy.write_row(row)
                    done += 1
                    if done % PROGRESS_EVERY == 0:
                        print(f"  {table}: {done}/{expected}", file=out, flush=True)
            print(f"{table}: {done} rows", file=out, flush=True)
            total += done
        for sequence, value in (
            ("pg_get_serial_sequence('users', 'id')", _top(src, "users", "id", "users")),
            ("pg_get_serial_sequence('rooms', 'id')", _top(src, "rooms", "id", "rooms")),
            ("'message_seq'", _top(src, "messages", "seq", "messages")),
            ("pg_get_serial_sequence('monitor_flags', 'id')",
             _top(src, "monitor_flags", "id", "monitor_flags")),
        ):
            if value > 0:
                dst.execute(f"SELECT setval({sequence}, %s)", (value,))
        # A head never lags the chain it heads (they were kept in the same transaction
        # on SQLite; this only guards a hand-edited file).
        dst.execute(
            "INSERT INTO mailbox_heads (mailbox, seq) SELECT mailbox, MAX(seq) FROM messages"
            " GROUP BY mailbox ON CONFLICT (mailbox) DO UPDATE SET seq ="
            " GREATEST(mailbox_heads.seq, excluded.seq)"
        )
    print(f"copied {total} rows into {where}", file=out, flush=True)
    return total
