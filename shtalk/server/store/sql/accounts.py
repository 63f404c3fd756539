"""The users table: accounts, their sealed email addresses, status and deletion.

Addresses arrive sealed (`shtalk.server.store.sealing.EmailSeal`); `seal_clear_emails`
seals the rows written before sealing existed, once, when the store opens.
"""

from __future__ import annotations

from typing import Any

from shtalk.server.eserver import Conflict
from shtalk.server.store.mailbox import user_mailbox
from shtalk.server.store.records import User
from shtalk.server.store.sealing import EmailSeal
from shtalk.server.store.sql.common import Conn, SQLiteConn
from shtalk.server.store.sql.dialect import dialect

USER = "SELECT id, name, key, pw_hash, status, created FROM users"


def user(row: Any) -> User:
    return User(int(row[0]), row[1], row[2], bytes(row[3]), row[4], float(row[5]))


def create_user(
    conn: Conn, name: str, key: str, sealed_email: bytes, email_hash: bytes, pw_hash: bytes,
    status: str, now: float,
) -> User:
    row = conn.execute(
        "INSERT INTO users (name, key, email, email_hash, pw_hash, status, created)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING RETURNING id",
        (name, key, sealed_email, email_hash, pw_hash, status, now),
    ).fetchone()
    if row is None:
        raise Conflict(f"user name {key!r} is taken")
    return User(int(row[0]), name, key, pw_hash, status, now)


def sealed_email(conn: Conn, user_id: int) -> tuple[str, bytes] | None:
    row = conn.execute("SELECT key, email FROM users WHERE id = ?", (user_id,)).fetchone()
    if row is None or not isinstance(row[1], bytes) or not row[1]:
        return None  # no such account, or a deleted one (empty)
    return str(row[0]), bytes(row[1])


def user_by_key(conn: Conn, key: str) -> User | None:
    row = conn.execute(USER + " WHERE key = ?", (key,)).fetchone()
    return None if row is None else user(row)


def user_by_id(conn: Conn, user_id: int) -> User | None:
    row = conn.execute(USER + " WHERE id = ?", (user_id,)).fetchone()
    return None if row is None else user(row)


def users_by_ids(conn: Conn, ids: list[int]) -> dict[int, User]:
    out: dict[int, User] = {}
    for matches, params in dialect(conn).any_of("id", ids):
        for row in conn.execute(USER + " WHERE " + matches, params):
            out[int(row[0])] = user(row)
    return out


def set_status(conn: Conn, user_id: int, status: str) -> bool:
    cur = conn.execute("UPDATE users SET status = ? WHERE id = ? AND status != 'deleted'",
                       (status, user_id))
    if status != "active":
        conn.execute("UPDATE sessions SET revoked = true WHERE user_id = ?", (user_id,))
    return bool(cur.rowcount > 0)


def delete_account(conn: Conn, user_id: int, dummy_hash: bytes) -> bool:
    """Leave a tombstone: the name stays taken, everything else of the account goes."""
    # The password hash is replaced by one of a random password (same cost), so a login
    # attempt on a deleted account costs the same work as any other and fails.
    cur = conn.execute(
        "UPDATE users SET status = 'deleted', email = '', email_hash = NULL, pw_hash = ?"
        " WHERE id = ?",
        (dummy_hash, user_id),
    )
    if cur.rowcount == 0:
        return False
    conn.execute("UPDATE sessions SET revoked = true WHERE user_id = ?", (user_id,))
    conn.execute("DELETE FROM devices WHERE user_id = ?", (user_id,))
    conn.execute("DELETE FROM members WHERE user_id = ?", (user_id,))
    conn.execute("DELETE FROM invites WHERE user_id = ?", (user_id,))
    conn.execute("DELETE FROM dm_partners WHERE user_id = ? OR partner_id = ?",
                 (user_id, user_id))
    conn.execute("DELETE FROM messages WHERE mailbox = ?", (user_mailbox(user_id),))
    return True


def seal_clear_emails(conn: SQLiteConn, seal: EmailSeal) -> int:
    """Seal every address still stored in clear (one IMMEDIATE transaction; SQLite
    only: PostgreSQL never held one)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        rows = conn.execute(
            "SELECT id, key, email FROM users WHERE typeof(email) = 'text' AND email != ''"
        ).fetchall()
        if rows:
            conn.executemany(
                "UPDATE users SET email = ?, email_hash = ? WHERE id = ?",
                [(seal.seal(str(key), str(email)), seal.index(str(email)), int(uid))
                 for uid, key, email in rows],
            )
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if rows:
        # The clear pages were zeroed (secure_delete); do not leave them in the WAL either.
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return len(rows)
