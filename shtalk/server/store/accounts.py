"""The account-security tables (schema migration 3): emailed codes, TOTP, recovery codes.

Kept out of ``store.py`` like ``prekeys.py``: the functions below run in the store's
threads (``SQLiteStore.run_read`` / ``run_write``; writes inside the group commit's
savepoint), `AccountStore` gives them typed, Deferred-returning names.

Secrets never reach this module in clear: emailed and recovery codes arrive as SHA-256
hashes, the TOTP secret as an AES-GCM sealed blob (``shtalk.server.accounts.totp``).  Every
check that consumes something (a code, a TOTP step) is one write op, so two concurrent
attempts with the same code cannot both succeed.
"""

from __future__ import annotations

import hmac
import sqlite3
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred

Conn = sqlite3.Connection


class _Lanes(Protocol):
    def run_read(self, fn: Any, *args: Any) -> Deferred[Any]: ...

    def run_write(self, fn: Any, *args: Any) -> Deferred[Any]: ...


@dataclass(frozen=True, slots=True)
class TotpRecord:
    user_id: int
    sealed: bytes
    enabled: bool
    last_step: int


# Outcomes of checking an emailed code.
CODE_OK = "ok"
CODE_WRONG = "wrong"  # counted; the code lives on until its attempts run out
CODE_NONE = "none"  # no live code (never sent, used, expired or out of attempts)


def _put_email_code(
    conn: Conn, user_id: int, purpose: str, code_hash: bytes, expires: float, now: float,
    min_interval: float,
) -> bool:
    """Store a new code (replacing the old one) unless one was sent too recently."""
    row = conn.execute(
        "SELECT sent FROM email_codes WHERE user_id = ? AND purpose = ?", (user_id, purpose)
    ).fetchone()
    if row is not None and now - float(row[0]) < min_interval:
        return False
    conn.execute(
        "INSERT INTO email_codes (user_id, purpose, code_hash, expires, attempts, sent)"
        " VALUES (?, ?, ?, ?, 0, ?) ON CONFLICT (user_id, purpose) DO UPDATE SET"
        " code_hash = excluded.code_hash, expires = excluded.expires, attempts = 0,"
        " sent = excluded.sent",
        (user_id, purpose, code_hash, expires, now),
    )
    return True


def _check_email_code(
    conn: Conn, user_id: int, purpose: str, code_hash: bytes, now: float, max_attempts: int
) -> str:
    row = conn.execute(
        "SELECT code_hash, expires, attempts FROM email_codes WHERE user_id = ? AND purpose = ?",
        (user_id, purpose),
    ).fetchone()
    if row is None or float(row[1]) <= now or int(row[2]) >= max_attempts:
        return CODE_NONE
    if not hmac.compare_digest(bytes(row[0]), code_hash):
        # The row's `sent` stays, so a failed guess cannot be used to skip the resend wait.
        conn.execute(
            "UPDATE email_codes SET attempts = attempts + 1 WHERE user_id = ? AND purpose = ?",
            (user_id, purpose),
        )
        return CODE_WRONG
    # Single use: the code goes, but `sent` must keep limiting mails, so expire it instead.
    conn.execute(
        "UPDATE email_codes SET expires = 0, code_hash = x'' WHERE user_id = ? AND purpose = ?",
        (user_id, purpose),
    )
    if purpose == "verify":
        conn.execute(
            "UPDATE users SET status = 'active' WHERE id = ? AND status = 'pending'", (user_id,)
        )
    return CODE_OK


def _reset_with_code(
    conn: Conn, user_id: int, code_hash: bytes, now: float, max_attempts: int, pw_hash: bytes
) -> tuple[str, list[str]]:
    outcome = _check_email_code(conn, user_id, "reset", code_hash, now, max_attempts)
    if outcome != CODE_OK:
        return outcome, []
    return outcome, _set_password(conn, user_id, pw_hash)


def _set_password(conn: Conn, user_id: int, pw_hash: bytes) -> list[str]:
    """New password hash; every session of the account revoked; their families returned."""
    families = [
        r[0]
        for r in conn.execute(
            "SELECT family FROM sessions WHERE user_id = ? AND revoked = 0", (user_id,)
        )
    ]
    conn.execute("UPDATE users SET pw_hash = ? WHERE id = ?", (pw_hash, user_id))
    conn.execute("UPDATE sessions SET revoked = 1 WHERE user_id = ?", (user_id,))
    return families


def _purge_pending(conn: Conn, cutoff: float) -> int:
    cur = conn.execute("DELETE FROM users WHERE status = 'pending' AND created < ?", (cutoff,))
    return int(cur.rowcount)


def _totp(conn: Conn, user_id: int) -> TotpRecord | None:
    row = conn.execute(
        "SELECT sealed, enabled, last_step FROM totp WHERE user_id = ?", (user_id,)
    ).fetchone()
    if row is None:
        return None
    return TotpRecord(user_id, bytes(row[0]), bool(row[1]), int(row[2]))


def _put_pending_totp(conn: Conn, user_id: int, sealed: bytes, now: float) -> bool:
    """A new, not yet confirmed secret; False if TOTP is already enabled."""
    row = conn.execute("SELECT enabled FROM totp WHERE user_id = ?", (user_id,)).fetchone()
    if row is not None and row[0]:
        return False
    conn.execute(
        "INSERT INTO totp (user_id, sealed, enabled, last_step, created) VALUES (?, ?, 0, 0, ?)"
        " ON CONFLICT (user_id) DO UPDATE SET sealed = excluded.sealed, enabled = 0,"
        " last_step = 0, created = excluded.created",
        (user_id, sealed, now),
    )
    return True


def _enable_totp(conn: Conn, user_id: int, step: int, code_hashes: list[bytes]) -> bool:
    cur = conn.execute(
        "UPDATE totp SET enabled = 1, last_step = ? WHERE user_id = ? AND enabled = 0"
        " AND last_step < ?",
        (step, user_id, step),
    )
    if cur.rowcount != 1:
        return False
    _replace_recovery(conn, user_id, code_hashes)
    return True


def _replace_recovery(conn: Conn, user_id: int, code_hashes: list[bytes]) -> None:
    conn.execute("DELETE FROM recovery_codes WHERE user_id = ?", (user_id,))
    conn.executemany(
        "INSERT INTO recovery_codes (user_id, code_hash) VALUES (?, ?)",
        [(user_id, h) for h in code_hashes],
    )


def _accept_step(conn: Conn, user_id: int, step: int) -> bool:
    """Record ``step`` as used; False if it (or a later one) was accepted before."""
    cur = conn.execute(
        "UPDATE totp SET last_step = ? WHERE user_id = ? AND enabled = 1 AND last_step < ?",
        (step, user_id, step),
    )
    return cur.rowcount == 1


def _use_recovery(conn: Conn, user_id: int, code_hash: bytes) -> bool:
    cur = conn.execute(
        "DELETE FROM recovery_codes WHERE user_id = ? AND code_hash = ?", (user_id, code_hash)
    )
    return cur.rowcount == 1


def _disable_totp(conn: Conn, user_id: int) -> None:
    conn.execute("DELETE FROM totp WHERE user_id = ?", (user_id,))
    conn.execute("DELETE FROM recovery_codes WHERE user_id = ?", (user_id,))


def _recovery_left(conn: Conn, user_id: int) -> int:
    row = conn.execute(
        "SELECT count(*) FROM recovery_codes WHERE user_id = ?", (user_id,)
    ).fetchone()
    return int(row[0])


class AccountStore:
    """Typed access to the account-security tables of a `SQLiteStore`."""

    def __init__(self, store: _Lanes) -> None:
        self.store = store

    def put_email_code(
        self, user_id: int, purpose: str, code_hash: bytes, expires: float, now: float,
        min_interval: float,
    ) -> Deferred[bool]:
        return self.store.run_write(
            _put_email_code, user_id, purpose, code_hash, expires, now, min_interval
        )

    def check_email_code(
        self, user_id: int, purpose: str, code_hash: bytes, now: float, max_attempts: int
    ) -> Deferred[str]:
        """CODE_OK (consumed; a "verify" code also activates the account), CODE_WRONG
        (attempt counted) or CODE_NONE."""
        return self.store.run_write(
            _check_email_code, user_id, purpose, code_hash, now, max_attempts
        )

    def reset_with_code(
        self, user_id: int, code_hash: bytes, now: float, max_attempts: int, pw_hash: bytes
    ) -> Deferred[tuple[str, list[str]]]:
        """Consume a "reset" code and set the password in one transaction."""
        return self.store.run_write(
            _reset_with_code, user_id, code_hash, now, max_attempts, pw_hash
        )

    def set_password(self, user_id: int, pw_hash: bytes) -> Deferred[list[str]]:
        return self.store.run_write(_set_password, user_id, pw_hash)

    def purge_pending(self, cutoff: float) -> Deferred[int]:
        return self.store.run_write(_purge_pending, cutoff)

    def totp(self, user_id: int) -> Deferred[TotpRecord | None]:
        return self.store.run_read(_totp, user_id)

    def put_pending_totp(self, user_id: int, sealed: bytes, now: float) -> Deferred[bool]:
        return self.store.run_write(_put_pending_totp, user_id, sealed, now)

    def enable_totp(self, user_id: int, step: int, code_hashes: list[bytes]) -> Deferred[bool]:
        return self.store.run_write(_enable_totp, user_id, step, code_hashes)

    def replace_recovery(self, user_id: int, code_hashes: list[bytes]) -> Deferred[None]:
        return self.store.run_write(_replace_recovery, user_id, code_hashes)

    def accept_step(self, user_id: int, step: int) -> Deferred[bool]:
        return self.store.run_write(_accept_step, user_id, step)

    def use_recovery(self, user_id: int, code_hash: bytes) -> Deferred[bool]:
        return self.store.run_write(_use_recovery, user_id, code_hash)

    def disable_totp(self, user_id: int) -> Deferred[None]:
        return self.store.run_write(_disable_totp, user_id)

    def recovery_left(self, user_id: int) -> Deferred[int]:
        return self.store.run_read(_recovery_left, user_id)
