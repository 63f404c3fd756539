"""ICodeStore in memory: emailed codes, TOTP and recovery codes on `Tables`.

Why: account security's unit tests (and the handlers') need the same rules as the
SQLite tables — a code used once, counted wrong attempts, a resend interval, TOTP
steps accepted in increasing order only — answered at once.  The rules follow
``shtalk.server.store.sql.security`` line for line.
"""

from __future__ import annotations

import dataclasses
import hmac

from zope.interface import implementer

from shtalk.server.eserver import StoreError
from shtalk.server.iserver import ICodeStore
from shtalk.server.store.memtables import CodeRow, Tables, TotpRow, answered
from shtalk.server.store.records import CODE_NONE, CODE_OK, CODE_WRONG, TotpRecord


@implementer(ICodeStore)
class MemoryCodeStore:
    def __init__(self, tables: Tables) -> None:
        self.tables = tables

    @answered
    def put_email_code(
        self, user_id: int, purpose: str, code_hash: bytes, expires: float, now: float,
        min_interval: float,
    ) -> bool:
        t = self.tables
        old = t.email_codes.get((user_id, purpose))
        if old is not None and now - old.sent < min_interval:
            return False
        t.need_user(user_id)
        t.email_codes[(user_id, purpose)] = CodeRow(code_hash, expires, 0, now)
        return True

    def _check(
        self, user_id: int, purpose: str, code_hash: bytes, now: float, max_attempts: int
    ) -> str:
        t = self.tables
        row = t.email_codes.get((user_id, purpose))
        if row is None or row.expires <= now or row.attempts >= max_attempts:
            return CODE_NONE
        if not hmac.compare_digest(row.code_hash, code_hash):
            row.attempts += 1  # `sent` stays: a wrong guess does not skip the resend wait
            return CODE_WRONG
        # Single use: the code goes, but `sent` must keep limiting mails.
        row.expires, row.code_hash = 0, b""
        user = t.users.get(user_id)
        if purpose == "verify" and user is not None and user.status == "pending":
            t.users[user_id] = dataclasses.replace(user, status="active")
        return CODE_OK

    @answered
    def check_email_code(
        self, user_id: int, purpose: str, code_hash: bytes, now: float, max_attempts: int
    ) -> str:
        return self._check(user_id, purpose, code_hash, now, max_attempts)

    @answered
    def reset_with_code(
        self, user_id: int, code_hash: bytes, now: float, max_attempts: int, pw_hash: bytes
    ) -> tuple[str, list[str]]:
        outcome = self._check(user_id, "reset", code_hash, now, max_attempts)
        if outcome != CODE_OK:
            return outcome, []
        return outcome, self._set_password(user_id, pw_hash)

    def _set_password(self, user_id: int, pw_hash: bytes) -> list[str]:
        t = self.tables
        user = t.users.get(user_id)
        if user is not None:
            t.users[user_id] = dataclasses.replace(user, pw_hash=pw_hash)
        return t.revoke_sessions(user_id)

    @answered
    def set_password(self, user_id: int, pw_hash: bytes) -> list[str]:
        return self._set_password(user_id, pw_hash)

    @answered
    def purge_pending(self, cutoff: float) -> int:
        t = self.tables
        gone = [u.id for u in t.users.values() if u.status == "pending" and u.created < cutoff]
        if any(r.owner_id in gone for r in t.rooms.values()):
            raise StoreError("FOREIGN KEY constraint failed")  # as SQLite: rooms.owner_id
        for user_id in gone:
            t.drop_user(user_id)
        return len(gone)

    @answered
    def totp(self, user_id: int) -> TotpRecord | None:
        row = self.tables.totp.get(user_id)
        return None if row is None else TotpRecord(user_id, row.sealed, row.enabled,
                                                   row.last_step)

    @answered
    def put_pending_totp(self, user_id: int, sealed: bytes, now: float) -> bool:
        t = self.tables
        row = t.totp.get(user_id)
        if row is not None and row.enabled:
            return False
        t.need_user(user_id)
        t.totp[user_id] = TotpRow(sealed, False, 0, now)
        return True

    @answered
    def enable_totp(self, user_id: int, step: int, code_hashes: list[bytes]) -> bool:
        t = self.tables
        row = t.totp.get(user_id)
        if row is None or row.enabled or row.last_step >= step:
            return False
        row.enabled, row.last_step = True, step
        t.recovery[user_id] = set(code_hashes)
        return True

    @answered
    def replace_recovery(self, user_id: int, code_hashes: list[bytes]) -> None:
        t = self.tables
        if code_hashes:
            t.need_user(user_id)
        t.recovery[user_id] = set(code_hashes)

    @answered
    def accept_step(self, user_id: int, step: int) -> bool:
        row = self.tables.totp.get(user_id)
        if row is None or not row.enabled or row.last_step >= step:
            return False
        row.last_step = step
        return True

    @answered
    def use_recovery(self, user_id: int, code_hash: bytes) -> bool:
        codes = self.tables.recovery.get(user_id, set())
        if code_hash not in codes:
            return False
        codes.discard(code_hash)
        return True

    @answered
    def disable_totp(self, user_id: int) -> None:
        self.tables.totp.pop(user_id, None)
        self.tables.recovery.pop(user_id, None)

    @answered
    def recovery_left(self, user_id: int) -> int:
        return len(self.tables.recovery.get(user_id, ()))
