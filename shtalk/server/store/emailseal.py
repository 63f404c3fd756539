"""Email addresses at rest: sealed like envelopes, found through a keyed hash.

An address is personal data that the server needs only to send a mail, so the users
table holds it sealed (AES-256-GCM, random nonce, the account's canonical name as
associated data: a sealed address moved to another row does not open) and, for
look-ups, ``email_hash`` = HMAC-SHA256 of the case-folded address.  Both keys come from
the data directory's storage key through HKDF with labels of their own, so a stolen
database alone gives neither the addresses nor a way to test guesses against the hashes.

`seal_clear_emails` is the migration of rows written before sealing (schema 4): it runs
once when the store opens, in one transaction.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import sqlite3

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_SEAL_LABEL = b"shtalk email seal v1"
_INDEX_LABEL = b"shtalk email index v1"
_VERSION = b"\x01"


def _derive(storage_key: bytes, label: bytes) -> bytes:
    return HKDF(hashes.SHA256(), 32, salt=None, info=label).derive(storage_key)


class EmailSeal:
    def __init__(self, storage_key: bytes) -> None:
        self._aead = AESGCM(_derive(storage_key, _SEAL_LABEL))
        self._index = _derive(storage_key, _INDEX_LABEL)

    @staticmethod
    def _ad(user_key: str) -> bytes:
        return _SEAL_LABEL + b"\x00" + user_key.encode("utf-8")

    def seal(self, user_key: str, email: str) -> bytes:
        nonce = os.urandom(12)
        return _VERSION + nonce + self._aead.encrypt(nonce, email.encode(), self._ad(user_key))

    def open(self, user_key: str, sealed: bytes) -> str | None:
        """The address, or None for a blob that is not one of ours for this account."""
        if len(sealed) < 29 or sealed[:1] != _VERSION:
            return None
        try:
            plain = self._aead.decrypt(sealed[1:13], sealed[13:], self._ad(user_key))
        except InvalidTag:
            return None
        return plain.decode("utf-8", "replace")

    def index(self, email: str) -> bytes:
        """The look-up key of an address (case-insensitive, like people treat them)."""
        return hmac.new(self._index, email.casefold().encode(), hashlib.sha256).digest()


def seal_clear_emails(conn: sqlite3.Connection, seal: EmailSeal) -> int:
    """Seal every address still stored in clear (one IMMEDIATE transaction)."""
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
