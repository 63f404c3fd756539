"""The devices table: a device is created with a cursor in every mailbox its user reads.

`upsert_device` is SQLite's (one writer: the top seq is the head of every mailbox);
PostgreSQL's reads each mailbox's head under its lock (`shtalk.server.store.pg.devices`).
"""

from __future__ import annotations

from shtalk.server.eserver import StoreError
from shtalk.server.store.mailbox import ROOM_PREFIX, user_mailbox
from shtalk.server.store.records import Device
from shtalk.server.store.sql.common import Conn, top_seq


def upsert_device(conn: Conn, user_id: int, device_id: str, label: str, now: float) -> Device:
    """The device, created (with its cursors) unless it exists; its label updated.

    Creation is ONE guarded statement (``INSERT ... ON CONFLICT DO NOTHING RETURNING``):
    of two concurrent logins of a new device one inserts it and its cursors, the other
    finds it, where a read then an insert let both insert and one fail.  A device removed
    between the insert and the read is created again.
    """
    for _ in range(3):
        created = conn.execute(
            "INSERT INTO devices (user_id, device_id, label, created) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (user_id, device_id) DO NOTHING RETURNING created",
            (user_id, device_id, label, now),
        ).fetchall()
        if created:
            _add_cursors(conn, user_id, device_id)
            return Device(user_id, device_id, label, now)
        row = conn.execute(
            "SELECT label, created FROM devices WHERE user_id = ? AND device_id = ?",
            (user_id, device_id),
        ).fetchone()
        if row is None:
            continue
        if row[0] != label:
            conn.execute(
                "UPDATE devices SET label = ? WHERE user_id = ? AND device_id = ?",
                (label, user_id, device_id),
            )
        return Device(user_id, device_id, label, float(row[1]))
    raise StoreError("device removed while being registered")


def _add_cursors(conn: Conn, user_id: int, device_id: str) -> None:
    # A new device starts after everything already stored: it gets no history.
    top = top_seq(conn)
    conn.execute(
        "INSERT INTO cursors (user_id, device_id, mailbox, acked_seq) VALUES (?, ?, ?, ?)",
        (user_id, device_id, user_mailbox(user_id), top),
    )
    conn.execute(
        "INSERT INTO cursors (user_id, device_id, mailbox, acked_seq)"
        " SELECT ?, ?, ? || room_id, ? FROM members WHERE user_id = ?",
        (user_id, device_id, ROOM_PREFIX, top, user_id),
    )


def devices(conn: Conn, user_id: int) -> list[Device]:
    rows = conn.execute(
        "SELECT user_id, device_id, label, created FROM devices WHERE user_id = ?"
        " ORDER BY created, device_id",
        (user_id,),
    )
    return [Device(int(r[0]), r[1], r[2], float(r[3])) for r in rows]


def remove_device(conn: Conn, user_id: int, device_id: str) -> bool:
    """Its cursors, bundle and one-time keys go with it (foreign keys); its sessions
    are revoked (kept, so a replayed refresh token is still recognised)."""
    cur = conn.execute(
        "DELETE FROM devices WHERE user_id = ? AND device_id = ?", (user_id, device_id)
    )
    conn.execute(
        "UPDATE sessions SET revoked = true WHERE user_id = ? AND device_id = ?",
        (user_id, device_id),
    )
    return bool(cur.rowcount > 0)
