"""Rooms, their members and invites, and the direct-message partners of each user.

Joining a room gives the member's devices a cursor in it, from the head of its chain
on (late joiners get no history); leaving drops those cursors and sweeps what only
they held back.  A membership change takes its place in the room mailbox's chain (the
connection's `Dialect`: on PostgreSQL under the mailbox's lock), so every process
applies a kick before any message committed after it.
"""

from __future__ import annotations

from typing import Any, cast

from shtalk.server.eserver import Conflict
from shtalk.server.store.mailbox import room_mailbox
from shtalk.server.store.records import ChainLink, Member, Room
from shtalk.server.store.sql import messages
from shtalk.server.store.sql.common import Conn, exists
from shtalk.server.store.sql.dialect import Chain, dialect

ROOM = "SELECT r.id, r.name, r.key, r.owner_id, r.invite_only, r.created FROM rooms r"


def _chain(conn: Conn) -> Chain:
    return dialect(conn).chain or cast(Chain, messages)


def room(row: Any) -> Room:
    return Room(int(row[0]), row[1], row[2], int(row[3]), bool(row[4]), float(row[5]))


def create_room(
    conn: Conn, name: str, key: str, owner_id: int, invite_only: bool, now: float
) -> Room:
    row = conn.execute(
        "INSERT INTO rooms (name, key, owner_id, invite_only, created)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING RETURNING id",
        (name, key, owner_id, bool(invite_only), now),
    ).fetchone()
    if row is None:
        raise Conflict(f"room name {key!r} is taken")
    room_id = int(row[0])
    conn.execute(
        "INSERT INTO members (room_id, user_id, role, joined) VALUES (?, ?, 'owner', ?)",
        (room_id, owner_id, now),
    )
    _chain(conn).add_cursors(conn, owner_id, room_mailbox(room_id))
    return Room(room_id, name, key, owner_id, invite_only, now)


def room_by_key(conn: Conn, key: str) -> Room | None:
    row = conn.execute(ROOM + " WHERE r.key = ?", (key,)).fetchone()
    return None if row is None else room(row)


def rooms_visible_to(conn: Conn, user_id: int) -> list[tuple[Room, int, bool]]:
    rows = conn.execute(
        "SELECT r.id, r.name, r.key, r.owner_id, r.invite_only, r.created,"
        " (SELECT COUNT(*) FROM members n WHERE n.room_id = r.id),"
        " EXISTS (SELECT 1 FROM members j WHERE j.room_id = r.id AND j.user_id = ?)"
        " FROM rooms r"
        " WHERE NOT r.invite_only"
        " OR EXISTS (SELECT 1 FROM members j WHERE j.room_id = r.id AND j.user_id = ?)"
        " OR EXISTS (SELECT 1 FROM invites i WHERE i.room_id = r.id AND i.user_id = ?)"
        " ORDER BY r.key",
        (user_id, user_id, user_id),
    )
    return [(room(r), int(r[6]), bool(r[7])) for r in rows]


def rooms_of(conn: Conn, user_id: int) -> list[Room]:
    rows = conn.execute(
        ROOM + " JOIN members m ON m.room_id = r.id WHERE m.user_id = ? ORDER BY r.key",
        (user_id,),
    )
    return [room(r) for r in rows]


def members(conn: Conn, room_id: int) -> list[Member]:
    rows = conn.execute(
        "SELECT m.user_id, u.name, m.role FROM members m JOIN users u ON u.id = m.user_id"
        " WHERE m.room_id = ? ORDER BY u.key",
        (room_id,),
    )
    return [Member(int(r[0]), r[1], r[2]) for r in rows]


def add_member(conn: Conn, room_id: int, user_id: int, role: str, now: float) -> ChainLink:
    chain = _chain(conn)
    changed = chain.link(conn, room_mailbox(room_id))
    conn.execute(
        "INSERT INTO members (room_id, user_id, role, joined) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (room_id, user_id) DO NOTHING",
        (room_id, user_id, role, now),
    )
    chain.add_cursors(conn, user_id, room_mailbox(room_id))  # late joiners get no history
    return changed


def remove_member(conn: Conn, room_id: int, user_id: int) -> ChainLink:
    chain = _chain(conn)
    changed = chain.link(conn, room_mailbox(room_id))
    conn.execute("DELETE FROM members WHERE room_id = ? AND user_id = ?", (room_id, user_id))
    conn.execute("DELETE FROM invites WHERE room_id = ? AND user_id = ?", (room_id, user_id))
    # Messages only they were still holding back can go now.
    chain.drop_cursors(conn, user_id, room_mailbox(room_id), changed.seq)
    return changed


def set_role(conn: Conn, room_id: int, user_id: int, role: str) -> None:
    conn.execute(
        "UPDATE members SET role = ? WHERE room_id = ? AND user_id = ?", (role, room_id, user_id)
    )


def member_since(conn: Conn, room_id: int, user_id: int) -> float | None:
    row = conn.execute("SELECT joined FROM members WHERE room_id = ? AND user_id = ?",
                       (room_id, user_id)).fetchone()
    return None if row is None else float(row[0])


def add_invite(conn: Conn, room_id: int, user_id: int, by_id: int, now: float) -> None:
    conn.execute(
        "INSERT INTO invites (room_id, user_id, by_id, created) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (room_id, user_id) DO NOTHING",
        (room_id, user_id, by_id, now),
    )


def has_invite(conn: Conn, room_id: int, user_id: int) -> bool:
    return exists(
        conn, "SELECT 1 FROM invites WHERE room_id = ? AND user_id = ?", room_id, user_id
    )


def dm_partners(conn: Conn, user_id: int) -> list[int]:
    rows = conn.execute(
        "SELECT partner_id FROM dm_partners WHERE user_id = ? ORDER BY partner_id", (user_id,)
    )
    return [int(r[0]) for r in rows]


def presence_readers(conn: Conn, user_id: int) -> list[int]:
    """Whom ``user_id`` has written to directly: they may see ``user_id``'s presence."""
    rows = conn.execute(
        "SELECT partner_id FROM dm_partners WHERE user_id = ? AND wrote", (user_id,)
    )
    return [int(r[0]) for r in rows]


def presence_subjects(conn: Conn, user_id: int) -> list[int]:
    """Who has written to ``user_id`` directly: ``user_id`` may see their presence."""
    rows = conn.execute(
        "SELECT user_id FROM dm_partners WHERE partner_id = ? AND wrote", (user_id,)
    )
    return [int(r[0]) for r in rows]


def has_written(conn: Conn, writer_id: int, reader_id: int) -> bool:
    return exists(
        conn, "SELECT 1 FROM dm_partners WHERE user_id = ? AND partner_id = ? AND wrote",
        writer_id, reader_id,
    )
