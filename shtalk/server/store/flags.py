"""The monitoring's flags in the database: `IFlagStore` on SQLite, and the sealing of
their evidence that every database backend shares.

Why in the database: a cluster's processes must see one set of flags (a file in one
process's data directory is seen by that process only), and one process gets its
flags backed up with everything else.  A flag's evidence may quote a reported message
(what the reporter chose to reveal) and names reporters, so it is AES-256-GCM sealed
like the envelopes (`FlagSeal`: a key of its own derived from the storage key, the
flag's identity as associated data); the rest of a row is the metadata the monitor
already logs.

Each call is one op of the store's lanes (the writer's group commit, or a reader), so
no SQL runs on the reactor thread; the row is encoded and sealed on the reactor before
the op is queued, so the writer never reads a flag the monitor may be changing.
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from zope.interface import implementer

from shtalk.server.ishared import IFlagStore
from shtalk.server.store.records import Flag
from shtalk.server.store.sql.common import Conn, SQLiteConn

log = Logger()

_LABEL = b"shtalk flag evidence v1"
_VERSION = b"\x01"

#: A row's columns but the id, in the order `FlagSeal.row` gives them.
COLUMNS = ("kind", "subject", "label", "signal", "reason", "action", "count", "first",
           "last", "status", "evidence")


class FlagSeal:
    """Seals a flag's evidence; opens it only on the row it was sealed for."""

    def __init__(self, storage_key: bytes) -> None:
        key = HKDF(hashes.SHA256(), 32, salt=None, info=_LABEL).derive(storage_key)
        self._aead = AESGCM(key)

    @staticmethod
    def _ad(flag: Flag) -> bytes:
        # What a flag is (never changes once raised): evidence copied onto another
        # flag's row does not open there.
        return "\x00".join(
            [_LABEL.decode(), flag.kind, flag.subject, flag.signal, repr(float(flag.first))]
        ).encode()

    def row(self, flag: Flag) -> tuple[Any, ...]:
        """The columns of `COLUMNS`, evidence sealed."""
        nonce = os.urandom(12)
        plain = json.dumps(flag.evidence, separators=(",", ":")).encode()
        sealed = _VERSION + nonce + self._aead.encrypt(nonce, plain, self._ad(flag))
        return (flag.kind, flag.subject, flag.label, flag.signal, flag.reason, flag.action,
                int(flag.count), float(flag.first), float(flag.last), flag.status, sealed)

    def flag(self, flag_id: int, row: tuple[Any, ...]) -> Flag:
        """A row read back (`COLUMNS` order); evidence that does not open is left out
        (with an error in the log: a wrong storage key, or a row tampered with)."""
        values = dict(zip(COLUMNS, row, strict=True))
        sealed = bytes(values.pop("evidence"))
        flag = Flag(flag_id, **values)
        try:
            if sealed[:1] != _VERSION:
                raise InvalidTag()
            plain = self._aead.decrypt(sealed[1:13], sealed[13:], self._ad(flag))
            flag.evidence = list(json.loads(plain))
        except (InvalidTag, ValueError):
            log.error("flag {flag_id}: its evidence does not open (wrong storage key?)",
                      flag_id=flag_id)
        return flag


def load(conn: Conn) -> list[tuple[Any, ...]]:
    cols = ", ".join(COLUMNS)
    return list(conn.execute(f"SELECT id, {cols} FROM monitor_flags ORDER BY id"))  # noqa: S608


def save(conn: SQLiteConn, flag_id: int, row: tuple[Any, ...]) -> int:
    """Insert (``flag_id`` 0: a new id) or update; a given id not stored yet is inserted
    under that id (an import)."""
    cols = ", ".join(COLUMNS)
    marks = ", ".join("?" * len(COLUMNS))
    if flag_id == 0:
        cur = conn.execute(f"INSERT INTO monitor_flags ({cols}) VALUES ({marks})", row)  # noqa: S608
        return int(cur.lastrowid or 0)
    sets = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS)
    conn.execute(
        f"INSERT INTO monitor_flags (id, {cols}) VALUES (?, {marks})"  # noqa: S608
        f" ON CONFLICT (id) DO UPDATE SET {sets}",
        (flag_id, *row),
    )
    return flag_id


def delete(conn: Conn, flag_id: int) -> None:
    conn.execute("DELETE FROM monitor_flags WHERE id = ?", (flag_id,))


class _Lanes(Protocol):
    def run_read(self, fn: Any, *args: Any) -> Deferred[Any]: ...

    def run_write(self, fn: Any, *args: Any) -> Deferred[Any]: ...


@implementer(IFlagStore)
class SQLiteFlagStore:
    """`IFlagStore` on the SQLite store's lanes (``SQLiteFlagStore(store, storage_key)``).

    Another engine's flag store is this class with that engine's ``_load``, ``_save``
    and ``_delete`` (the rows and their sealing are the same)."""

    _load = staticmethod(load)
    _save = staticmethod(save)
    _delete = staticmethod(delete)

    def __init__(self, store: _Lanes, storage_key: bytes) -> None:
        self.store = store
        self.seal = FlagSeal(storage_key)

    def load_flags(self) -> Deferred[list[Flag]]:
        d: Deferred[list[tuple[Any, ...]]] = self.store.run_read(self._load)
        return d.addCallback(lambda rows: [self.seal.flag(int(r[0]), r[1:]) for r in rows])

    def save_flag(self, flag: Flag) -> Deferred[int]:
        # Sealed here, on the reactor: the op queued holds bytes the monitor cannot change.
        d: Deferred[int] = self.store.run_write(self._save, flag.id, self.seal.row(flag))
        return d

    def delete_flag(self, flag_id: int) -> Deferred[None]:
        d: Deferred[None] = self.store.run_write(self._delete, flag_id)
        return d
