"""Accounts, devices, the prekey directory and sessions on PostgreSQL.

Why every write is one guarded statement: several processes write at once, so a
SELECT-then-UPDATE could be interleaved with another process's (a one-time key handed
out twice, a refresh token rotated twice).  Each claim is an ``UPDATE ... RETURNING`` or
an ``INSERT ... ON CONFLICT`` whose answer says who won; a refusal is decided from that
answer, never by running a statement after a failed one (the transaction would be
aborted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shtalk.server.eserver import Conflict, TokenReuse, TokenRevoked, TokenUnknown
from shtalk.server.store.mailbox import ROOM_PREFIX, user_mailbox
from shtalk.server.store.pg.messages import lock_heads
from shtalk.server.store.records import ClaimedBundle, Device, OneTimeKey, Session, User
from shtalk.server.store.sql.common import KeepWrites
from shtalk.server.store.sql.prekeys import KINDS, MAX_ONE_TIME_KEYS

Conn = Any
USER = "SELECT id, name, key, pw_hash, status, created FROM users"


def user(row: Any) -> User:
    return User(int(row[0]), row[1], row[2], bytes(row[3]), row[4], float(row[5]))


# --- accounts ---------------------------------------------------------------------------


def create_user(
    conn: Conn, name: str, key: str, sealed_email: bytes, email_hash: bytes, pw_hash: bytes,
    status: str, now: float,
) -> User:
    row = conn.execute(
        "INSERT INTO users (name, key, email, email_hash, pw_hash, status, created)"
        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING RETURNING id",
        (name, key, sealed_email, email_hash, pw_hash, status, now),
    ).fetchone()
    if row is None:
        raise Conflict(f"user name {key!r} is taken")
    return User(int(row[0]), name, key, pw_hash, status, now)


def sealed_email(conn: Conn, user_id: int) -> tuple[str, bytes] | None:
    row = conn.execute("SELECT key, email FROM users WHERE id = ?", (user_id,)).fetchone()
    if row is None or not row[1]:
        return None  # no such account, or a deleted one
    return str(row[0]), bytes(row[1])


def user_by_key(conn: Conn, key: str) -> User | None:
    row = conn.execute(USER + " WHERE key = ?", (key,)).fetchone()
    return None if row is None else user(row)


def user_by_id(conn: Conn, user_id: int) -> User | None:
    row = conn.execute(USER + " WHERE id = ?", (user_id,)).fetchone()
    return None if row is None else user(row)


def users_by_ids(conn: Conn, ids: list[int]) -> dict[int, User]:
    return {int(r[0]): user(r) for r in conn.execute(USER + " WHERE id = ANY(?)", (ids,))}


def set_status(conn: Conn, user_id: int, status: str) -> bool:
    cur = conn.execute(
        "UPDATE users SET status = ? WHERE id = ? AND status != 'deleted'", (status, user_id)
    )
    if status != "active":
        conn.execute("UPDATE sessions SET revoked = true WHERE user_id = ?", (user_id,))
    return bool(cur.rowcount > 0)


def delete_account(conn: Conn, user_id: int, dummy_hash: bytes) -> bool:
    """Leave a tombstone: the name stays taken, everything else of the account goes."""
    cur = conn.execute(
        "UPDATE users SET status = 'deleted', email = '', email_hash = NULL, pw_hash = ?"
        " WHERE id = ?",
        (dummy_hash, user_id),
    )
    if cur.rowcount == 0:
        return False
    for sql, params in (
        ("UPDATE sessions SET revoked = true WHERE user_id = ?", (user_id,)),
        ("DELETE FROM devices WHERE user_id = ?", (user_id,)),
        ("DELETE FROM members WHERE user_id = ?", (user_id,)),
        ("DELETE FROM invites WHERE user_id = ?", (user_id,)),
        ("DELETE FROM dm_partners WHERE user_id = ? OR partner_id = ?", (user_id, user_id)),
        ("DELETE FROM messages WHERE mailbox = ?", (user_mailbox(user_id),)),
    ):
        conn.execute(sql, params)
    return True


# --- devices ----------------------------------------------------------------------------


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


def devices(conn: Conn, user_id: int) -> list[Device]:
    rows = conn.execute(
        "SELECT user_id, device_id, label, created FROM devices WHERE user_id = ?"
        " ORDER BY created, device_id",
        (user_id,),
    )
    return [Device(int(r[0]), r[1], r[2], float(r[3])) for r in rows]


def remove_device(conn: Conn, user_id: int, device_id: str) -> bool:
    cur = conn.execute(
        "DELETE FROM devices WHERE user_id = ? AND device_id = ?", (user_id, device_id)
    )
    conn.execute(
        "UPDATE sessions SET revoked = true WHERE user_id = ? AND device_id = ?",
        (user_id, device_id),
    )
    return bool(cur.rowcount > 0)


# --- the prekey directory -------------------------------------------------------------


def counts(conn: Conn, user_id: int, device_id: str) -> dict[str, int]:
    out = dict.fromkeys(KINDS, 0)
    for kind, n in conn.execute(
        "SELECT kind, COUNT(*) FROM one_time_keys WHERE user_id = ? AND device_id = ?"
        " AND claimed IS NULL GROUP BY kind",
        (user_id, device_id),
    ):
        out[str(kind)] = int(n)
    return out


def publish(
    conn: Conn, user_id: int, device_id: str, bundle: bytes | None,
    one_time: Sequence[OneTimeKey], now: float, replace: bool = False,
) -> tuple[dict[str, int], bool]:
    changed = False
    if replace:
        conn.execute(
            "DELETE FROM one_time_keys WHERE user_id = ? AND device_id = ?",
            (user_id, device_id),
        )
    if bundle is not None:
        # The old bundle, locked until the transaction ends.
        row = conn.execute(
            "SELECT bundle FROM device_bundles WHERE user_id = ? AND device_id = ?"
            " FOR UPDATE",
            (user_id, device_id),
        ).fetchone()
        conn.execute(
            "INSERT INTO device_bundles (user_id, device_id, bundle, updated)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (user_id, device_id) DO UPDATE"
            " SET bundle = excluded.bundle, updated = excluded.updated",
            (user_id, device_id, bundle, now),
        )
        changed = row is None or bytes(row[0]) != bundle
    have = counts(conn, user_id, device_id)
    rows = []
    for k in one_time:
        if have[k.kind] >= MAX_ONE_TIME_KEYS:
            continue
        have[k.kind] += 1
        rows.append((user_id, device_id, k.kind, k.key_id, k.key))
    if rows:
        conn.executemany(
            "INSERT INTO one_time_keys (user_id, device_id, kind, key_id, key)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            rows,
        )
    return counts(conn, user_id, device_id), changed or replace


CLAIM_SQL = """
WITH pick AS (
  SELECT key_id, key FROM one_time_keys
  WHERE user_id = ? AND device_id = ? AND kind = ? AND claimed IS NULL
  ORDER BY key_id LIMIT 1 FOR UPDATE SKIP LOCKED)
UPDATE one_time_keys o SET claimed = ?, key = ''::bytea FROM pick
WHERE o.user_id = ? AND o.device_id = ? AND o.kind = ? AND o.key_id = pick.key_id
  AND o.claimed IS NULL
RETURNING pick.key_id, pick.key
"""


def claim(conn: Conn, user_id: int, device_id: str | None, now: float) -> list[ClaimedBundle]:
    """Each one-time key is marked claimed by the statement that hands it out: two
    fetches (on any processes) never get the same one."""
    if device_id is None:
        rows = conn.execute(
            "SELECT device_id, bundle FROM device_bundles WHERE user_id = ? ORDER BY device_id",
            (user_id,),
        ).fetchall()
    else:
        rows = conn.execute(
            "SELECT device_id, bundle FROM device_bundles WHERE user_id = ? AND device_id = ?",
            (user_id, device_id),
        ).fetchall()
    out = []
    for dev, bundle in rows:
        claimed = []
        for kind in KINDS:
            row = conn.execute(
                CLAIM_SQL, (user_id, dev, kind, now, user_id, dev, kind)
            ).fetchone()
            if row is not None:
                claimed.append(OneTimeKey(kind, int(row[0]), bytes(row[1])))
        out.append(ClaimedBundle(str(dev), bytes(bundle), tuple(claimed)))
    return out


def device_bundle(conn: Conn, user_id: int, device_id: str) -> bytes | None:
    row = conn.execute(
        "SELECT bundle FROM device_bundles WHERE user_id = ? AND device_id = ?",
        (user_id, device_id),
    ).fetchone()
    return None if row is None else bytes(row[0])


# --- sessions ---------------------------------------------------------------------------


def create_session(
    conn: Conn, family: str, user_id: int, device_id: str, refresh_hash: bytes, expires: float
) -> None:
    made = conn.execute(
        "INSERT INTO sessions (family, user_id, device_id, expires, revoked)"
        " VALUES (?, ?, ?, ?, false) ON CONFLICT DO NOTHING RETURNING 1",
        (family, user_id, device_id, expires),
    ).fetchone()
    if made is not None:
        made = conn.execute(
            "INSERT INTO refresh_tokens (hash, family, expires, used)"
            " VALUES (?, ?, ?, false) ON CONFLICT DO NOTHING RETURNING 1",
            (refresh_hash, family, expires),
        ).fetchone()
    if made is None:  # the op's savepoint undoes the session row
        raise Conflict("session family or refresh token already exists")


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
    # Exactly one rotation wins, on any process: the guarded UPDATE says which.
    won = not row[2] and conn.execute(
        "UPDATE refresh_tokens SET used = true WHERE hash = ? AND NOT used RETURNING 1",
        (old_hash,),
    ).fetchone() is not None
    if not won:
        conn.execute("UPDATE sessions SET revoked = true WHERE family = ?", (family,))
        raise KeepWrites(TokenReuse("refresh token reused: the session is revoked", family))
    if row[1] <= now or row[5] <= now:
        raise TokenUnknown("expired refresh token")  # the savepoint undoes "used"
    if conn.execute(
        "INSERT INTO refresh_tokens (hash, family, expires, used) VALUES (?, ?, ?, false)"
        " ON CONFLICT DO NOTHING RETURNING 1",
        (new_hash, family, new_expires),
    ).fetchone() is None:
        raise Conflict("new refresh token already exists")
    conn.execute("UPDATE sessions SET expires = ? WHERE family = ?", (new_expires, family))
    return Session(family, int(row[3]), row[4], new_expires, False)


def session(conn: Conn, family: str) -> Session | None:
    row = conn.execute(
        "SELECT family, user_id, device_id, expires, revoked FROM sessions WHERE family = ?",
        (family,),
    ).fetchone()
    return None if row is None else Session(row[0], int(row[1]), row[2], row[3], bool(row[4]))


def revoke_session(conn: Conn, family: str) -> None:
    conn.execute("UPDATE sessions SET revoked = true WHERE family = ?", (family,))


def revoke_user_sessions(conn: Conn, user_id: int) -> None:
    conn.execute("UPDATE sessions SET revoked = true WHERE user_id = ?", (user_id,))
