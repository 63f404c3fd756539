"""ICodeStore on either engine: the account-security SQL run through the store's lanes.

Why a part of its own: the tables of emailed codes, TOTP and recovery codes are used
only by account security (``shtalk.server.accounts.security``), so they are reached as
``store.codes`` rather than through the chat's IStore; each check that consumes
something is one op of the group commit, hence atomic.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, Protocol

from twisted.internet.defer import Deferred
from zope.interface import implementer

from shtalk.server.iserver import ICodeStore
from shtalk.server.store.records import TotpRecord
from shtalk.server.store.sql import security


class _Lanes(Protocol):
    def run_read(self, fn: Any, *args: Any) -> Deferred[Any]: ...

    def run_write(self, fn: Any, *args: Any) -> Deferred[Any]: ...


@implementer(ICodeStore)
class SQLiteCodeStore:
    """Both engines' (the SQL is one module, `shtalk.server.store.sql.security`)."""

    def __init__(self, store: _Lanes, sql: ModuleType = security) -> None:
        self.store = store
        self.sql: Any = sql

    def put_email_code(
        self, user_id: int, purpose: str, code_hash: bytes, expires: float, now: float,
        min_interval: float,
    ) -> Deferred[bool]:
        return self.store.run_write(
            self.sql.put_email_code, user_id, purpose, code_hash, expires, now, min_interval
        )

    def check_email_code(
        self, user_id: int, purpose: str, code_hash: bytes, now: float, max_attempts: int
    ) -> Deferred[str]:
        return self.store.run_write(
            self.sql.check_email_code, user_id, purpose, code_hash, now, max_attempts
        )

    def reset_with_code(
        self, user_id: int, code_hash: bytes, now: float, max_attempts: int, pw_hash: bytes
    ) -> Deferred[tuple[str, list[str]]]:
        return self.store.run_write(
            self.sql.reset_with_code, user_id, code_hash, now, max_attempts, pw_hash
        )

    def set_password(self, user_id: int, pw_hash: bytes) -> Deferred[list[str]]:
        return self.store.run_write(self.sql.set_password, user_id, pw_hash)

    def purge_pending(self, cutoff: float) -> Deferred[int]:
        return self.store.run_write(self.sql.purge_pending, cutoff)

    def totp(self, user_id: int) -> Deferred[TotpRecord | None]:
        return self.store.run_read(self.sql.totp, user_id)

    def put_pending_totp(self, user_id: int, sealed: bytes, now: float) -> Deferred[bool]:
        return self.store.run_write(self.sql.put_pending_totp, user_id, sealed, now)

    def enable_totp(self, user_id: int, step: int, code_hashes: list[bytes]) -> Deferred[bool]:
        return self.store.run_write(self.sql.enable_totp, user_id, step, code_hashes)

    def replace_recovery(self, user_id: int, code_hashes: list[bytes]) -> Deferred[None]:
        return self.store.run_write(self.sql.replace_recovery, user_id, code_hashes)

    def accept_step(self, user_id: int, step: int) -> Deferred[bool]:
        return self.store.run_write(self.sql.accept_step, user_id, step)

    def use_recovery(self, user_id: int, code_hash: bytes) -> Deferred[bool]:
        return self.store.run_write(self.sql.use_recovery, user_id, code_hash)

    def disable_totp(self, user_id: int) -> Deferred[None]:
        return self.store.run_write(self.sql.disable_totp, user_id)

    def recovery_left(self, user_id: int) -> Deferred[int]:
        return self.store.run_read(self.sql.recovery_left, user_id)
