"""The prekey directory: run on the store's single writer, so a claim is atomic.

Bundles and one-time keys are opaque bytes to the server; clients verify the
identity-key signatures inside them.  A one-time key is handed out in the same
transaction that marks it claimed and blanks it, so two concurrent fetches can never
get the same one (the writer runs one transaction at a time), and its id stays
recorded so a client that re-publishes it cannot make it be handed out twice.
"""

from __future__ import annotations

from collections.abc import Sequence

from shtalk.server.store.records import ClaimedBundle, OneTimeKey
from shtalk.server.store.sql.common import Conn

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
        old = conn.execute(
            "SELECT bundle FROM device_bundles WHERE user_id = ? AND device_id = ?",
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
    conn.executemany(
        "INSERT INTO one_time_keys (user_id, device_id, kind, key_id, key) VALUES (?, ?, ?, ?, ?)"
        " ON CONFLICT DO NOTHING",
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
    out = []
    for dev, bundle in rows:
        claimed = []
        for kind in KINDS:
            row = conn.execute(
                "SELECT key_id, key FROM one_time_keys WHERE user_id = ? AND device_id = ?"
                " AND kind = ? AND claimed IS NULL ORDER BY key_id LIMIT 1",
                (user_id, dev, kind),
            ).fetchone()
            if row is None:
                continue
            conn.execute(
                "UPDATE one_time_keys SET claimed = ?, key = x'' WHERE user_id = ?"
                " AND device_id = ? AND kind = ? AND key_id = ?",
                (now, user_id, dev, kind, row[0]),
            )
            claimed.append(OneTimeKey(kind, int(row[0]), bytes(row[1])))
        out.append(ClaimedBundle(str(dev), bytes(bundle), tuple(claimed)))
    return out


def device_bundle(conn: Conn, user_id: int, device_id: str) -> bytes | None:
    row = conn.execute(
        "SELECT bundle FROM device_bundles WHERE user_id = ? AND device_id = ?",
        (user_id, device_id),
    ).fetchone()
    return None if row is None else bytes(row[0])
