"""The SQL of accounts, devices, sessions and rooms, and of cursors and sweeps.

Plain functions of a connection, run by `shtalk.server.store.sqlite.SQLiteStore` in its
threads (the writer's inside a savepoint); nothing here touches the reactor.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar, cast

from shtalk.server.chat.mailbox import ROOM_PREFIX, room_mailbox, user_mailbox
from shtalk.server.iserver import Conflict, TokenReuse, TokenRevoked, TokenUnknown
from shtalk.server.store.records import Device, Member, Room, Session, User

Conn = sqlite3.Connection
T = TypeVar("T")
#: Bound on host parameters per statement (SQLite's limit is far higher).
CHUNK = 500


class KeepWrites(Exception):
    """Raised by an op to fail its Deferred with ``error`` yet keep its writes.

    Token reuse must revoke the family AND report TokenReuse; a plain raise
    would roll the revocation back with the op's savepoint.
    """

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


def chunks(items: Sequence[T], size: int = CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def marks(n: int) -> str:
    return ",".join("?" * n)


def top_seq(conn: Conn) -> int:
    """New cursors start here: after every message stored so far."""
    return int(conn.execute("SELECT COALESCE(MAX(seq), 0) FROM messages").fetchone()[0])


SWEEP_SQL = """
DELETE FROM messages WHERE seq IN (
  SELECT m.seq FROM messages m
  WHERE m.mailbox = ? AND m.seq > ? AND m.seq <= ?
    AND NOT EXISTS (
      SELECT 1 FROM cursors c
      WHERE c.mailbox = m.mailbox AND c.acked_seq < m.seq
        AND NOT (c.user_id = m.sender_id AND c.device_id = m.sender_device)
        AND (m.for_all = 1 OR EXISTS (
          SELECT 1 FROM message_devices d
          WHERE d.seq = m.seq AND d.user_id = c.user_id AND d.device_id = c.device_id))))
"""


def sweep(conn: Conn, mailbox: str, lo: int, hi: int) -> int:
    """Delete messages of ``mailbox`` in (lo, hi] that no device still waits for.

    Only that range can have become deletable (it is what the cursor moved
    over), so an ack costs O(acked range), never a table scan.  The sending
    device and devices without an envelope do not hold a message back.
    """
    return int(conn.execute(SWEEP_SQL, (mailbox, lo, hi)).rowcount)


USER = "SELECT id, name, key, pw_hash, status, created FROM users"


def user(row: Any) -> User:
    return User(int(row[0]), row[1], row[2], bytes(row[3]), row[4], float(row[5]))


def room(row: Any) -> Room:
    return Room(int(row[0]), row[1], row[2], int(row[3]), bool(row[4]), float(row[5]))


def add_cursors(conn: Conn, user_id: int, mailbox: str) -> None:
    """Give each of the user's devices a cursor past everything stored so far."""
    conn.execute(
        "INSERT INTO cursors (user_id, device_id, mailbox, acked_seq)"
        " SELECT user_id, device_id, ?, ? FROM devices WHERE user_id = ?"
        " ON CONFLICT (user_id, device_id, mailbox) DO NOTHING",
        (mailbox, top_seq(conn), user_id),
    )


def execute(conn: Conn, sql: str, *params: object) -> None:
    conn.execute(sql, params)


def exists(conn: Conn, sql: str, *params: object) -> bool:
    return conn.execute(sql, params).fetchone() is not None


def create_user(
    conn: Conn, name: str, key: str, sealed_email: bytes, email_hash: bytes, pw_hash: bytes,
    status: str, now: float,
) -> User:
    try:
        cur = conn.execute(
            "INSERT INTO users (name, key, email, email_hash, pw_hash, status, created)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (name, key, sealed_email, email_hash, pw_hash, status, now),
        )
    except sqlite3.IntegrityError as e:
        raise Conflict(f"user name {key!r} is taken") from e
    return User(int(cast(int, cur.lastrowid)), name, key, pw_hash, status, now)


def sealed_email(conn: Conn, user_id: int) -> tuple[str, bytes] | None:
    row = conn.execute("SELECT key, email FROM users WHERE id = ?", (user_id,)).fetchone()
    if row is None or not isinstance(row[1], bytes):
        return None  # no such account, or a deleted one ('')
    return str(row[0]), bytes(row[1])


def one_user(conn: Conn, sql: str, param: object) -> User | None:
    row = conn.execute(sql, (param,)).fetchone()
    return None if row is None else user(row)


def users_by_ids(conn: Conn, ids: list[int]) -> dict[int, User]:
    out: dict[int, User] = {}
    for chunk in chunks(ids):
        sql = USER + f" WHERE id IN ({marks(len(chunk))})"
        for row in conn.execute(sql, tuple(chunk)):
            out[int(row[0])] = user(row)
    return out


def upsert_device(conn: Conn, user_id: int, device_id: str, label: str, now: float) -> Device:
    row = conn.execute(
        "SELECT label, created FROM devices WHERE user_id = ? AND device_id = ?",
        (user_id, device_id),
    ).fetchone()
    if row is not None:
        if row[0] != label:
            conn.execute(
                "UPDATE devices SET label = ? WHERE user_id = ? AND device_id = ?",
                (label, user_id, device_id),
            )
        return Device(user_id, device_id, label, float(row[1]))
    conn.execute(
        "INSERT INTO devices (user_id, device_id, label, created) VALUES (?, ?, ?, ?)",
        (user_id, device_id, label, now),
    )
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
    return Device(user_id, device_id, label, now)


def devices(conn: Conn, user_id: int) -> list[Device]:
    rows = conn.execute(
        "SELECT user_id, device_id, label, created FROM devices WHERE user_id = ?"
        " ORDER BY created, device_id",
        (user_id,),
    )
    return [Device(int(r[0]), r[1], r[2], float(r[3])) for r in rows]


def create_session(
    conn: Conn, family: str, user_id: int, device_id: str, refresh_hash: bytes, expires: float
) -> None:
    try:
        conn.execute(
            "INSERT INTO sessions (family, user_id, device_id, expires, revoked)"
            " VALUES (?, ?, ?, ?, 0)",
            (family, user_id, device_id, expires),
        )
        conn.execute(
            "INSERT INTO refresh_tokens (hash, family, expires, used) VALUES (?, ?, ?, 0)",
            (refresh_hash, family, expires),
        )
    except sqlite3.IntegrityError as e:
        taken = conn.execute(
            "SELECT 1 FROM sessions WHERE family = ?"
            " UNION ALL SELECT 1 FROM refresh_tokens WHERE hash = ?",
            (family, refresh_hash),
        ).fetchone()
        if taken:
            raise Conflict("session family or refresh token already exists") from e
        raise  # unknown user


def rotate_refresh(
    conn: Conn, old_hash: bytes, new_hash: bytes, new_expires: float, now: float
) -> Session:
    row = conn.execute(
        "SELECT t.family, t.expires, t.used, s.user_id, s.device_id, s.expires, s.revoked"
        " FROM refresh_tokens t JOIN sessions s ON s.family = t.family WHERE t.hash = ?",
        (old_hash,),
    ).fetchone()
    if row is None:
        raise TokenUnknown("unknown refresh token")
    family = row[0]
    if row[6]:
        raise TokenRevoked("the refresh token's session is revoked")
    # A used token is reuse even if the replayed copy is by now expired.  The
    # guarded UPDATE makes "exactly one rotation wins" hold without relying
    # on the single writer (a PostgreSQL backend would need it).
    won = not row[2] and (
        conn.execute(
            "UPDATE refresh_tokens SET used = 1 WHERE hash = ? AND used = 0", (old_hash,)
        ).rowcount
        == 1
    )
    if not won:
        conn.execute("UPDATE sessions SET revoked = 1 WHERE family = ?", (family,))
        raise KeepWrites(TokenReuse("refresh token reused: the session is revoked", family))
    if row[1] <= now or row[5] <= now:
        raise TokenUnknown("expired refresh token")  # the savepoint undoes "used = 1"
    try:
        conn.execute(
            "INSERT INTO refresh_tokens (hash, family, expires, used) VALUES (?, ?, ?, 0)",
            (new_hash, family, new_expires),
        )
    except sqlite3.IntegrityError as e:
        raise Conflict("new refresh token already exists") from e
    conn.execute("UPDATE sessions SET expires = ? WHERE family = ?", (new_expires, family))
    return Session(family, int(row[3]), row[4], new_expires, False)


def session(conn: Conn, family: str) -> Session | None:
    row = conn.execute(
        "SELECT family, user_id, device_id, expires, revoked FROM sessions WHERE family = ?",
        (family,),
    ).fetchone()
    return None if row is None else Session(row[0], int(row[1]), row[2], row[3], bool(row[4]))


def create_room(
    conn: Conn, name: str, key: str, owner_id: int, invite_only: bool, now: float
) -> Room:
    try:
        cur = conn.execute(
            "INSERT INTO rooms (name, key, owner_id, invite_only, created) VALUES (?, ?, ?, ?, ?)",
            (name, key, owner_id, int(invite_only), now),
        )
    except sqlite3.IntegrityError as e:
        if conn.execute("SELECT 1 FROM rooms WHERE key = ?", (key,)).fetchone():
            raise Conflict(f"room name {key!r} is taken") from e
        raise
    room_id = int(cast(int, cur.lastrowid))
    conn.execute(
        "INSERT INTO members (room_id, user_id, role, joined) VALUES (?, ?, 'owner', ?)",
        (room_id, owner_id, now),
    )
    add_cursors(conn, owner_id, room_mailbox(room_id))
    return Room(room_id, name, key, owner_id, invite_only, now)


def room_by_key(conn: Conn, key: str) -> Room | None:
    row = conn.execute(
        "SELECT r.id, r.name, r.key, r.owner_id, r.invite_only, r.created"
        " FROM rooms r WHERE r.key = ?",
        (key,),
    ).fetchone()
    return None if row is None else room(row)


def rooms_visible_to(conn: Conn, user_id: int) -> list[tuple[Room, int, bool]]:
    rows = conn.execute(
        "SELECT r.id, r.name, r.key, r.owner_id, r.invite_only, r.created,"
        " (SELECT COUNT(*) FROM members n WHERE n.room_id = r.id),"
        " EXISTS (SELECT 1 FROM members j WHERE j.room_id = r.id AND j.user_id = ?)"
        " FROM rooms r"
        " WHERE r.invite_only = 0"
        " OR EXISTS (SELECT 1 FROM members j WHERE j.room_id = r.id AND j.user_id = ?)"
        " OR EXISTS (SELECT 1 FROM invites i WHERE i.room_id = r.id AND i.user_id = ?)"
        " ORDER BY r.key",
        (user_id, user_id, user_id),
    )
    return [(room(r), int(r[6]), bool(r[7])) for r in rows]


def rooms_of(conn: Conn, user_id: int) -> list[Room]:
    rows = conn.execute(
        "SELECT r.id, r.name, r.key, r.owner_id, r.invite_only, r.created"
        " FROM rooms r JOIN members m ON m.room_id = r.id"
        " WHERE m.user_id = ? ORDER BY r.key",
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


def add_member(conn: Conn, room_id: int, user_id: int, role: str, now: float) -> None:
    conn.execute(
        "INSERT INTO members (room_id, user_id, role, joined) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (room_id, user_id) DO NOTHING",
        (room_id, user_id, role, now),
    )
    add_cursors(conn, user_id, room_mailbox(room_id))  # late joiners get no history


def remove_member(conn: Conn, room_id: int, user_id: int) -> None:
    mailbox = room_mailbox(room_id)
    conn.execute("DELETE FROM members WHERE room_id = ? AND user_id = ?", (room_id, user_id))
    conn.execute("DELETE FROM invites WHERE room_id = ? AND user_id = ?", (room_id, user_id))
    lowest = conn.execute(
        "SELECT MIN(acked_seq) FROM cursors WHERE user_id = ? AND mailbox = ?",
        (user_id, mailbox),
    ).fetchone()[0]
    conn.execute("DELETE FROM cursors WHERE user_id = ? AND mailbox = ?", (user_id, mailbox))
    if lowest is not None:
        # Messages only they were still holding back can go now.
        sweep(conn, mailbox, int(lowest), top_seq(conn))


def dm_partners(conn: Conn, user_id: int) -> list[int]:
    rows = conn.execute(
        "SELECT partner_id FROM dm_partners WHERE user_id = ? ORDER BY partner_id", (user_id,)
    )
    return [int(r[0]) for r in rows]


def presence_readers(conn: Conn, user_id: int) -> list[int]:
    """Whom ``user_id`` has written to directly: they may see ``user_id``'s presence."""
    rows = conn.execute(
        "SELECT partner_id FROM dm_partners WHERE user_id = ? AND wrote = 1", (user_id,)
    )
    return [int(r[0]) for r in rows]


def presence_subjects(conn: Conn, user_id: int) -> list[int]:
    """Who has written to ``user_id`` directly: ``user_id`` may see their presence."""
    rows = conn.execute(
        "SELECT user_id FROM dm_partners WHERE partner_id = ? AND wrote = 1", (user_id,)
    )
    return [int(r[0]) for r in rows]


def has_written(conn: Conn, writer_id: int, reader_id: int) -> bool:
    return exists(
        conn, "SELECT 1 FROM dm_partners WHERE user_id = ? AND partner_id = ? AND wrote = 1",
        writer_id, reader_id,
    )
