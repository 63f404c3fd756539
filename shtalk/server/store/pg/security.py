"""The account-security tables on PostgreSQL: emailed codes, TOTP, recovery codes.

Why every check is one guarded statement: processes check codes concurrently, and a
single-use code must succeed once.  The statement that consumes a code is the one that
finds it (``UPDATE ... WHERE code_hash = ... RETURNING``); a wrong guess is counted by
an UPDATE guarded the same way.  Same functions as `shtalk.server.store.sql.security`.
"""

from __future__ import annotations

from typing import Any

from shtalk.server.store.pg.schema import LOCK_PURGE, try_lock
from shtalk.server.store.records import CODE_NONE, CODE_OK, CODE_WRONG, TotpRecord

Conn = Any


def put_email_code(
    conn: Conn, user_id: int, purpose: str, code_hash: bytes, expires: float, now: float,
    min_interval: float,
) -> bool:
    """Store a new code (replacing the old one) unless one was sent too recently."""
    row = conn.execute(
        "INSERT INTO email_codes (user_id, purpose, code_hash, expires, attempts, sent)"
        " VALUES (?, ?, ?, ?, 0, ?) ON CONFLICT (user_id, purpose) DO UPDATE SET"
        " code_hash = excluded.code_hash, expires = excluded.expires, attempts = 0,"
        " sent = excluded.sent WHERE email_codes.sent <= ? RETURNING 1",
        (user_id, purpose, code_hash, expires, now, now - min_interval),
    ).fetchone()
    return row is not None


def check_email_code(
    conn: Conn, user_id: int, purpose: str, code_hash: bytes, now: float, max_attempts: int
) -> str:
    # Single use: the code goes, but `sent` must keep limiting mails, so expire it instead.
    used = conn.execute(
        "UPDATE email_codes SET expires = 0, code_hash = ''::bytea"
        " WHERE user_id = ? AND purpose = ? AND code_hash = ? AND expires > ?"
        " AND attempts < ? RETURNING 1",
        (user_id, purpose, code_hash, now, max_attempts),
    ).fetchone()
    if used is None:
        # The row's `sent` stays, so a failed guess cannot skip the resend wait.
        counted = conn.execute(
            "UPDATE email_codes SET attempts = attempts + 1"
            " WHERE user_id = ? AND purpose = ? AND expires > ? AND attempts < ?"
            " RETURNING 1",
            (user_id, purpose, now, max_attempts),
        ).fetchone()
        return CODE_NONE if counted is None else CODE_WRONG
    if purpose == "verify":
        conn.execute(
            "UPDATE users SET status = 'active' WHERE id = ? AND status = 'pending'",
            (user_id,),
        )
    return CODE_OK


def reset_with_code(
    conn: Conn, user_id: int, code_hash: bytes, now: float, max_attempts: int, pw_hash: bytes
) -> tuple[str, list[str]]:
    outcome = check_email_code(conn, user_id, "reset", code_hash, now, max_attempts)
    if outcome != CODE_OK:
        return outcome, []
    return outcome, set_password(conn, user_id, pw_hash)


def set_password(conn: Conn, user_id: int, pw_hash: bytes) -> list[str]:
    """New password hash; every live session revoked; their families returned."""
    conn.execute("UPDATE users SET pw_hash = ? WHERE id = ?", (pw_hash, user_id))
    rows = conn.execute(
        "UPDATE sessions SET revoked = true WHERE user_id = ? AND NOT revoked"
        " RETURNING family",
        (user_id,),
    )
    return sorted(str(r[0]) for r in rows)


def purge_pending(conn: Conn, cutoff: float) -> int:
    if not try_lock(conn, LOCK_PURGE + ":pending"):
        return 0
    cur = conn.execute(
        "DELETE FROM users WHERE status = 'pending' AND created < ?", (cutoff,)
    )
    return int(cur.rowcount)


def totp(conn: Conn, user_id: int) -> TotpRecord | None:
    row = conn.execute(
        "SELECT sealed, enabled, last_step FROM totp WHERE user_id = ?", (user_id,)
    ).fetchone()
    if row is None:
        return None
    return TotpRecord(user_id, bytes(row[0]), bool(row[1]), int(row[2]))


def put_pending_totp(conn: Conn, user_id: int, sealed: bytes, now: float) -> bool:
    """A new, not yet confirmed secret; False if TOTP is already enabled."""
    row = conn.execute(
        "INSERT INTO totp (user_id, sealed, enabled, last_step, created)"
        " VALUES (?, ?, false, 0, ?)"
        " ON CONFLICT (user_id) DO UPDATE SET sealed = excluded.sealed, enabled = false,"
        " last_step = 0, created = excluded.created WHERE NOT totp.enabled RETURNING 1",
        (user_id, sealed, now),
    ).fetchone()
    return row is not None


def enable_totp(conn: Conn, user_id: int, step: int, code_hashes: list[bytes]) -> bool:
    row = conn.execute(
        "UPDATE totp SET enabled = true, last_step = ? WHERE user_id = ? AND NOT enabled"
        " AND last_step < ? RETURNING 1",
        (step, user_id, step),
    ).fetchone()
    if row is None:
        return False
    replace_recovery(conn, user_id, code_hashes)
    return True


def replace_recovery(conn: Conn, user_id: int, code_hashes: list[bytes]) -> None:
    conn.execute("DELETE FROM recovery_codes WHERE user_id = ?", (user_id,))
    if code_hashes:
        conn.execute(
            "INSERT INTO recovery_codes (user_id, code_hash)"
            " SELECT ?, unnest(?::bytea[]) ON CONFLICT DO NOTHING",
            (user_id, code_hashes),
        )


def accept_step(conn: Conn, user_id: int, step: int) -> bool:
    """Record ``step`` as used; False if it (or a later one) was accepted before."""
    row = conn.execute(
        "UPDATE totp SET last_step = ? WHERE user_id = ? AND enabled AND last_step < ?"
        " RETURNING 1",
        (step, user_id, step),
    ).fetchone()
    return row is not None


def use_recovery(conn: Conn, user_id: int, code_hash: bytes) -> bool:
    row = conn.execute(
        "DELETE FROM recovery_codes WHERE user_id = ? AND code_hash = ? RETURNING 1",
        (user_id, code_hash),
    ).fetchone()
    return row is not None


def disable_totp(conn: Conn, user_id: int) -> None:
    conn.execute("DELETE FROM totp WHERE user_id = ?", (user_id,))
    conn.execute("DELETE FROM recovery_codes WHERE user_id = ?", (user_id,))


def recovery_left(conn: Conn, user_id: int) -> int:
    row = conn.execute(
        "SELECT count(*) FROM recovery_codes WHERE user_id = ?", (user_id,)
    ).fetchone()
    return int(row[0])
