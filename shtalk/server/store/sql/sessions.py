"""Sessions: one refresh-token family per login, rotated on every refresh.

Refresh tokens are stored only as hashes and kept after use, so a replayed token is
recognised as reuse (and revokes its family) rather than as unknown.  Every claim is
one guarded statement whose answer says who won (``INSERT ... ON CONFLICT DO NOTHING
RETURNING``, ``UPDATE ... WHERE NOT used RETURNING``): of two rotations of a token, on
any process, exactly one wins, and no statement runs after a failed one.
"""

from __future__ import annotations

from shtalk.server.eserver import Conflict, TokenReuse, TokenRevoked, TokenUnknown
from shtalk.server.store.records import Session
from shtalk.server.store.sql.common import Conn, KeepWrites


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
    # A used token is reuse even if the replayed copy is by now expired.  Exactly one
    # rotation wins, whoever runs it: the guarded UPDATE says which.
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
