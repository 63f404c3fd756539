"""The prekey directory: bundles and one-time keys.

Bundles and one-time keys are opaque bytes to the server; clients verify the
identity-key signatures inside them.  A one-time key is taken by ONE guarded statement
(``UPDATE ... WHERE claimed IS NULL ... RETURNING``), so two concurrent fetches can never
get the same one even where writers run side by side (a database other than this one
writer's SQLite, where a read then an unguarded write let both see the key free); its id
stays recorded so a client that re-publishes it cannot make it be handed out twice.
"""

from __future__ import annotations

from collections.abc import Sequence

from shtalk.server.store.records import ClaimedBundle, OneTimeKey
from shtalk.server.store.sql.common import Conn, exists
from shtalk.server.store.sql.dialect import dialect

KINDS = ("ec", "pq")
MAX_ONE_TIME_KEYS = 200  # per device and kind: bounds what one device can park on us


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
    conn: Conn,
    user_id: int,
    device_id: str,
    bundle: bytes | None,
    one_time: Sequence[OneTimeKey],
    now: float,
    replace: bool = False,
) -> tuple[dict[str, int], bool]:
    """Store the bundle and one-time keys; the counts left, and whether the bundle changed."""
    changed = False
    if replace:
        # A device that lost its keys and made new ones (same device id): the old
        # one-time keys belong to the old identity and would fail verification.
        conn.execute(
            "DELETE FROM one_time_keys WHERE user_id = ? AND device_id = ?", (user_id, device_id)
        )
    if bundle is not None:
        # The old bundle (locked until the transaction ends, where others write too).
        lock = dialect(conn).for_update
        old = conn.execute(
            f"SELECT bundle FROM device_bundles WHERE user_id = ? AND device_id = ?{lock}",  # noqa: S608
            (user_id, device_id),
        ).fetchone()
        changed = old is None or bytes(old[0]) != bundle
        conn.execute(
            "INSERT INTO device_bundles (user_id, device_id, bundle, updated) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (user_id, device_id) DO UPDATE SET bundle = excluded.bundle,"
            " updated = excluded.updated",
            (user_id, device_id, bundle, now),
        )
    have = counts(conn, user_id, device_id)
    rows = []
    for k in one_time:
        if have[k.kind] >= MAX_ONE_TIME_KEYS:
            continue
        have[k.kind] += 1
        rows.append((user_id, device_id, k.kind, k.key_id, k.key))
    # A re-published id is ignored: a key handed out once is never reused.
    if rows:
        conn.executemany(
            "INSERT INTO one_time_keys (user_id, device_id, kind, key_id, key)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            rows,
        )
    return counts(conn, user_id, device_id), changed or replace


def claim(conn: Conn, user_id: int, device_id: str | None, now: float) -> list[ClaimedBundle]:
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
    take = _take_skipping if dialect(conn).skip_locked else _take
    out = []
    for dev, bundle in rows:
        claimed = []
        for kind in KINDS:
            key = take(conn, user_id, str(dev), kind, now)
            if key is not None:
                claimed.append(key)
        out.append(ClaimedBundle(str(dev), bytes(bundle), tuple(claimed)))
    return out


def _take(conn: Conn, user_id: int, device_id: str, kind: str, now: float) -> OneTimeKey | None:
    """The lowest free key of ``kind``, marked claimed; None when none is left.

    The claim is decided by the UPDATE alone: its WHERE requires the row still free, so of
    two concurrent takers one gets the row and the other none.  The loser (possible only
    where writers overlap) looks again while free keys remain: each loss means another
    taker claimed a key, so the loop ends.
    """
    for _ in range(MAX_ONE_TIME_KEYS + 1):
        won = conn.execute(
            "UPDATE one_time_keys SET claimed = ? WHERE user_id = ? AND device_id = ?"
            " AND kind = ? AND claimed IS NULL AND key_id = (SELECT MIN(key_id)"
            " FROM one_time_keys WHERE user_id = ? AND device_id = ? AND kind = ?"
            " AND claimed IS NULL) RETURNING key_id, key",
            (now, user_id, device_id, kind, user_id, device_id, kind),
        ).fetchall()
        if won:
            key_id, key = won[0]
            # Only the winner reaches this row now; the key itself is not kept.
            conn.execute(
                "UPDATE one_time_keys SET key = x'' WHERE user_id = ? AND device_id = ?"
                " AND kind = ? AND key_id = ?",
                (user_id, device_id, kind, key_id),
            )
            return OneTimeKey(kind, int(key_id), bytes(key))
        if not exists(
            conn,
            "SELECT 1 FROM one_time_keys WHERE user_id = ? AND device_id = ? AND kind = ?"
            " AND claimed IS NULL",
            user_id, device_id, kind,
        ):
            return None
    return None


SKIP_LOCKED_SQL = """
WITH pick AS (
  SELECT key_id, key FROM one_time_keys
  WHERE user_id = ? AND device_id = ? AND kind = ? AND claimed IS NULL
  ORDER BY key_id LIMIT 1 FOR UPDATE SKIP LOCKED)
UPDATE one_time_keys o SET claimed = ?, key = ? FROM pick
WHERE o.user_id = ? AND o.device_id = ? AND o.kind = ? AND o.key_id = pick.key_id
  AND o.claimed IS NULL
RETURNING pick.key_id, pick.key
"""


def _take_skipping(
    conn: Conn, user_id: int, device_id: str, kind: str, now: float
) -> OneTimeKey | None:
    """`_take` in one statement, where takers run side by side (PostgreSQL): the lowest
    free key no other transaction is taking, claimed and blanked; None if there is none."""
    row = conn.execute(
        SKIP_LOCKED_SQL, (user_id, device_id, kind, now, b"", user_id, device_id, kind)
    ).fetchone()
    return None if row is None else OneTimeKey(kind, int(row[0]), bytes(row[1]))


def device_bundle(conn: Conn, user_id: int, device_id: str) -> bytes | None:
    row = conn.execute(
        "SELECT bundle FROM device_bundles WHERE user_id = ? AND device_id = ?",
        (user_id, device_id),
    ).fetchone()
    return None if row is None else bytes(row[0])
