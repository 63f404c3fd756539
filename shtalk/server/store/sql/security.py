"""The account-security tables: emailed codes, TOTP enrolment, recovery codes.

Secrets never reach these tables in clear: emailed and recovery codes arrive as
SHA-256 hashes, the TOTP secret as an AES-GCM sealed blob (``shtalk.server.accounts.totp``).
Every check that consumes something (a code, a TOTP step) is one guarded statement
(the condition in its WHERE, the answer in its RETURNING or row count), so two
concurrent attempts with the same code cannot both succeed, even where writers run side
by side (several processes on PostgreSQL); a refusal is decided from that answer, never
by running a statement after a failed one (PostgreSQL would abort the transaction).
"""

from __future__ import annotations

from shtalk.server.store.records import CODE_NONE, CODE_OK, CODE_WRONG, TotpRecord
from shtalk.server.store.sql.common import Conn
from shtalk.server.store.sql.dialect import LOCK_PURGE_PENDING, dialect


def put_email_code(
    conn: Conn, user_id: int, purpose: str, code_hash: bytes, expires: float, now: float,
    min_interval: float,
) -> bool:
    """Store a new code (replacing the old one) unless one was sent too recently.

    One guarded upsert (the interval in its WHERE): two concurrent requests cannot
    both pass the interval and both send a mail.
    """
    stored = conn.execute(
        "INSERT INTO email_codes (user_id, purpose, code_hash, expires, attempts, sent)"
        " VALUES (?, ?, ?, ?, 0, ?) ON CONFLICT (user_id, purpose) DO UPDATE SET"
        " code_hash = excluded.code_hash, expires = excluded.expires, attempts = 0,"
        " sent = excluded.sent WHERE excluded.sent - email_codes.sent >= ? RETURNING 1",
        (user_id, purpose, code_hash, expires, now, min_interval),
    ).fetchone()
    return stored is not None


def check_email_code(
    conn: Conn, user_id: int, purpose: str, code_hash: bytes, now: float, max_attempts: int
) -> str:
    """Use the code: CODE_OK once, CODE_WRONG while guesses are left, else CODE_NONE.

    Each outcome is decided by ONE guarded UPDATE whose WHERE holds the whole condition
    (live, attempts left, and for CODE_OK the hash), so of concurrent uses of a code only
    one consumes it and concurrent wrong guesses cannot exceed ``max_attempts``, even
    where writers run side by side.  The database compares the hash, as it does for
    refresh tokens and recovery codes: it is the SHA-256 of a 140-bit random code, so
    the comparison's timing tells a guesser nothing.
    """
    # Single use: the code goes, but `sent` must keep limiting mails, so expire it instead.
    used = conn.execute(
        "UPDATE email_codes SET expires = 0, code_hash = ? WHERE user_id = ? AND purpose = ?"
        " AND code_hash = ? AND expires > ? AND attempts < ? RETURNING 1",
        (b"", user_id, purpose, code_hash, now, max_attempts),
    ).fetchone()
    if used is not None:
        if purpose == "verify":
            conn.execute(
                "UPDATE users SET status = 'active' WHERE id = ? AND status = 'pending'",
                (user_id,),
            )
        return CODE_OK
    # The row's `sent` stays, so a failed guess cannot be used to skip the resend wait.
    wrong = conn.execute(
        "UPDATE email_codes SET attempts = attempts + 1 WHERE user_id = ? AND purpose = ?"
        " AND expires > ? AND attempts < ? RETURNING 1",
        (user_id, purpose, now, max_attempts),
    ).fetchone()
    return CODE_NONE if wrong is None else CODE_WRONG


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
        "UPDATE sessions SET revoked = true WHERE user_id = ? AND NOT revoked RETURNING family",
        (user_id,),
    ).fetchall()
    return sorted(str(r[0]) for r in rows)


def purge_pending(conn: Conn, cutoff: float) -> int:
    if not dialect(conn).try_lock(conn, LOCK_PURGE_PENDING):
        return 0  # another process is purging them
    cur = conn.execute("DELETE FROM users WHERE status = 'pending' AND created < ?", (cutoff,))
    return int(cur.rowcount)


def totp(conn: Conn, user_id: int) -> TotpRecord | None:
    row = conn.execute(
        "SELECT sealed, enabled, last_step FROM totp WHERE user_id = ?", (user_id,)
    ).fetchone()
    if row is None:
        return None
    return TotpRecord(user_id, bytes(row[0]), bool(row[1]), int(row[2]))


def put_pending_totp(conn: Conn, user_id: int, sealed: bytes, now: float) -> bool:
    """A new, not yet confirmed secret; False if TOTP is already enabled.

    One guarded upsert: a concurrent enable is never overwritten by a pending secret.
    """
    stored = conn.execute(
        "INSERT INTO totp (user_id, sealed, enabled, last_step, created)"
        " VALUES (?, ?, false, 0, ?)"
        " ON CONFLICT (user_id) DO UPDATE SET sealed = excluded.sealed, enabled = false,"
        " last_step = 0, created = excluded.created WHERE NOT totp.enabled RETURNING 1",
        (user_id, sealed, now),
    ).fetchone()
    return stored is not None


def enable_totp(conn: Conn, user_id: int, step: int, code_hashes: list[bytes]) -> bool:
    cur = conn.execute(
        "UPDATE totp SET enabled = true, last_step = ? WHERE user_id = ? AND NOT enabled"
        " AND last_step < ?",
        (step, user_id, step),
    )
    if cur.rowcount != 1:
        return False
    replace_recovery(conn, user_id, code_hashes)
    return True


def replace_recovery(conn: Conn, user_id: int, code_hashes: list[bytes]) -> None:
    conn.execute("DELETE FROM recovery_codes WHERE user_id = ?", (user_id,))
    if code_hashes:
        conn.executemany(
            "INSERT INTO recovery_codes (user_id, code_hash) VALUES (?, ?)"
            " ON CONFLICT DO NOTHING",
            [(user_id, h) for h in code_hashes],
        )


def accept_step(conn: Conn, user_id: int, step: int) -> bool:
    """Record ``step`` as used; False if it (or a later one) was accepted before."""
    cur = conn.execute(
        "UPDATE totp SET last_step = ? WHERE user_id = ? AND enabled AND last_step < ?",
        (step, user_id, step),
    )
    return cur.rowcount == 1


def use_recovery(conn: Conn, user_id: int, code_hash: bytes) -> bool:
    cur = conn.execute(
        "DELETE FROM recovery_codes WHERE user_id = ? AND code_hash = ?", (user_id, code_hash)
    )
    return cur.rowcount == 1


def disable_totp(conn: Conn, user_id: int) -> None:
    conn.execute("DELETE FROM totp WHERE user_id = ?", (user_id,))
    conn.execute("DELETE FROM recovery_codes WHERE user_id = ?", (user_id,))


def recovery_left(conn: Conn, user_id: int) -> int:
    row = conn.execute(
        "SELECT count(*) FROM recovery_codes WHERE user_id = ?", (user_id,)
    ).fetchone()
    return int(row[0])
