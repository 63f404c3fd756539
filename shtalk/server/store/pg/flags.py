"""The monitoring's flags on PostgreSQL: `IFlagStore` for the processes of a cluster.

The rows and their sealing are those of SQLite (`shtalk.server.store.flags`: the same
`FlagSeal`, so ``shtalk-admin port-db`` copies the sealed evidence as it is), and so
are the statements that load and delete them; only a save differs.  Each call
is one op of the PostgreSQL store's lanes (a save or a delete in the writer's group
commit, a load on a reader), so no SQL runs on the reactor thread.

What differs from SQLite is the ids, since several processes write: AUTOINCREMENT
never hands out an id stored explicitly (an import of ``flags.json`` keeps its ids),
an identity sequence does.  So a save under an id the sequence has not reached moves
it past that id (``setval``).  That read-then-set may race with another process's
insert, and an import may come after the sequence handed its ids out; neither may
cost a flag, so a new flag that meets a taken id takes the next one (``ON CONFLICT DO
NOTHING``, again), and a save under a given id updates only the same flag (what never
changes once raised: kind, subject, signal, first) or else is stored under a new id,
which the returned id tells.
"""

from __future__ import annotations

from typing import Any

from shtalk.server.store.flags import COLUMNS, SQLiteFlagStore
from shtalk.server.store.pg.store import PostgresStore

_COLS = ", ".join(COLUMNS)
_MARKS = ", ".join(["?"] * len(COLUMNS))
_INSERT = (
    f"INSERT INTO monitor_flags ({_COLS}) VALUES ({_MARKS})"  # noqa: S608
    " ON CONFLICT (id) DO NOTHING RETURNING id"
)
_SAME = " AND ".join(f"monitor_flags.{c} = excluded.{c}"
                     for c in ("kind", "subject", "signal", "first"))
_UPSERT = (
    f"INSERT INTO monitor_flags (id, {_COLS}) VALUES (?, {_MARKS})"  # noqa: S608
    " ON CONFLICT (id) DO UPDATE SET " + ", ".join(f"{c} = excluded.{c}" for c in COLUMNS)
    + f" WHERE {_SAME} RETURNING id"
)
_SEQ = "pg_get_serial_sequence('monitor_flags', 'id')::regclass"
#: The sequence moved up to an id, never back (unless another process moved it between
#: this statement's read and its write: then a later insert only tries once more).
_PAST = (
    f"SELECT setval({_SEQ}, ?) WHERE COALESCE(pg_sequence_last_value({_SEQ}), 0) < ?"
)


def save(conn: Any, flag_id: int, row: tuple[Any, ...]) -> int:
    """Insert (``flag_id`` 0: a new id) or update; a given id not stored yet is inserted
    under that id (an import), one holding another flag gets a new id."""
    if flag_id != 0:
        conn.execute(_PAST, (flag_id, flag_id))
        if conn.execute(_UPSERT, (flag_id, *row)).fetchone() is not None:
            return flag_id
    # Each try takes a new value of the sequence: this ends once it is past the ids
    # stored without it (at once, unless a setval raced with an insert).
    while True:
        found = conn.execute(_INSERT, row).fetchone()
        if found is not None:
            return int(found[0])


class PostgresFlagStore(SQLiteFlagStore):
    """`IFlagStore` on the PostgreSQL store's lanes (``PostgresFlagStore(store,
    storage_key)``: the data directory's storage key, as for the store itself)."""

    store: PostgresStore
    _save = staticmethod(save)

    def __init__(self, store: PostgresStore, storage_key: bytes) -> None:
        super().__init__(store, storage_key)
