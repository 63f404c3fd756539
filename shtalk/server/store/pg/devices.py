"""Devices on PostgreSQL: what differs from SQLite's (`shtalk.server.store.sql.devices`).

Why: a new device must read each of its user's mailboxes from its head, and on
PostgreSQL other processes append meanwhile; so the heads are read under the mailboxes'
locks (no history, no gap), and the device is created or relabelled by ONE statement
(``INSERT ... ON CONFLICT DO UPDATE ... RETURNING``, whose ``xmax = 0`` says which).
The rest of the table's SQL is the shared module's.
"""

from __future__ import annotations

from typing import Any

from shtalk.server.store.mailbox import ROOM_PREFIX, user_mailbox
from shtalk.server.store.pg.messages import lock_heads
from shtalk.server.store.records import Device
from shtalk.server.store.sql.devices import devices, remove_device

__all__ = ["devices", "remove_device", "upsert_device"]

Conn = Any


def upsert_device(conn: Conn, user_id: int, device_id: str, label: str, now: float) -> Device:
    """Create or relabel in one statement; a new device reads each of its user's
    mailboxes from its head (read under the mailbox's lock: no history, no gap)."""
    row = conn.execute(
        "INSERT INTO devices (user_id, device_id, label, created) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (user_id, device_id) DO UPDATE SET label = excluded.label"
        " RETURNING created, xmax = 0",
        (user_id, device_id, label, now),
    ).fetchone()
    if not row[1]:
        return Device(user_id, device_id, label, float(row[0]))
    rooms = [ROOM_PREFIX + str(r[0]) for r in conn.execute(
        "SELECT room_id FROM members WHERE user_id = ?", (user_id,))]
    tops = lock_heads(conn, [user_mailbox(user_id), *rooms])
    boxes = sorted(tops)
    conn.execute(
        "INSERT INTO cursors (user_id, device_id, mailbox, acked_seq)"
        " SELECT ?, ?, b, s FROM unnest(?::text[], ?::bigint[]) AS v(b, s)"
        " ON CONFLICT DO NOTHING",
        (user_id, device_id, boxes, [tops[b] for b in boxes]),
    )
    return Device(user_id, device_id, label, now)
