"""Messages and cursors: one row per sent message per mailbox, one cursor per
(device, mailbox it reads) saying how far that device has acknowledged.

Appends are stored in runs (`append_many`): one duplicate look-up, then one
``executemany`` per table for the whole run, with seqs assigned here (the writer is
the only one), so a send costs few statements and few GIL hand-offs in the writer.
A message is deleted by `sweep` once no device it is for still waits for it; only the
range a cursor moved over can have become deletable, so a sweep never scans a table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from shtalk.server.store.mailbox import inbox_owner
from shtalk.server.store.records import AppendResult, ChainLink, NewMessage, StoredMessage
from shtalk.server.store.sealing import encode_envelopes
from shtalk.server.store.sql.common import CHUNK, Conn, chunks, top_seq
from shtalk.server.store.sql.dialect import LOCK_PURGE, dialect

#: Seals a message's envelopes for one mailbox: (nonce, body).
Seal = Callable[[str, NewMessage, bytes], tuple[bytes, bytes]]


class Appending(Protocol):
    """An append waiting in the writer's queue."""

    message: NewMessage
    now: float


#: The message ``m`` no device waits for any more: every cursor of its mailbox is past
#: it, or is the sender's own device, or is one the message has no envelope for.
NOT_HELD = """NOT EXISTS (
    SELECT 1 FROM cursors c
    WHERE c.mailbox = m.mailbox AND c.acked_seq < m.seq
      AND NOT (c.user_id = m.sender_id AND c.device_id = m.sender_device)
      AND (m.for_all OR EXISTS (
        SELECT 1 FROM message_devices d
        WHERE d.seq = m.seq AND d.user_id = c.user_id AND d.device_id = c.device_id)))"""

SWEEP_SQL = (
    "DELETE FROM messages WHERE seq IN (SELECT m.seq FROM messages m"  # noqa: S608 (constants)
    f" WHERE m.mailbox = ? AND m.seq > ? AND m.seq <= ? AND {NOT_HELD})"
)


def sweep(conn: Conn, mailbox: str, lo: int, hi: int) -> int:
    """Delete messages of ``mailbox`` in (lo, hi] that no device still waits for.

    Only that range can have become deletable (it is what the cursor moved
    over), so an ack costs O(acked range), never a table scan.  The sending
    device and devices without an envelope do not hold a message back.
    """
    return int(conn.execute(SWEEP_SQL, (mailbox, lo, hi)).rowcount)


def add_cursors(conn: Conn, user_id: int, mailbox: str) -> None:
    """Give each of the user's devices a cursor past everything stored so far."""
    conn.execute(
        "INSERT INTO cursors (user_id, device_id, mailbox, acked_seq)"
        " SELECT user_id, device_id, ?, ? FROM devices WHERE user_id = ?"
        " ON CONFLICT (user_id, device_id, mailbox) DO NOTHING",
        (mailbox, top_seq(conn), user_id),
    )


def drop_cursors(conn: Conn, user_id: int, mailbox: str, upto: int) -> None:
    """The user's devices stop reading ``mailbox``; what only they held back (up to
    ``upto``, the seq of their leaving) goes."""
    lowest = conn.execute(
        "SELECT MIN(acked_seq) FROM cursors WHERE user_id = ? AND mailbox = ?",
        (user_id, mailbox),
    ).fetchone()[0]
    conn.execute("DELETE FROM cursors WHERE user_id = ? AND mailbox = ?", (user_id, mailbox))
    if lowest is not None:
        sweep(conn, mailbox, int(lowest), upto)


def cursor(conn: Conn, user_id: int, device_id: str, mailbox: str) -> int | None:
    """How far the device has acknowledged ``mailbox``; None if it does not read it."""
    row = conn.execute(
        "SELECT acked_seq FROM cursors WHERE user_id = ? AND device_id = ? AND mailbox = ?",
        (user_id, device_id, mailbox),
    ).fetchone()
    return None if row is None else int(row[0])


def move_cursors(conn: Conn, updates: list[tuple[int, int, str, str, int]]) -> None:
    """(seq, user, device, mailbox, seq) rows; never moves a cursor back (a cached
    position may be stale after a re-join)."""
    conn.executemany(
        "UPDATE cursors SET acked_seq = ?"
        " WHERE user_id = ? AND device_id = ? AND mailbox = ? AND acked_seq < ?",
        updates,
    )


def last_seq_by_mailbox(conn: Conn, seqs: Sequence[int]) -> Iterable[tuple[str, int]]:
    """(mailbox, highest of ``seqs`` stored in it), for seqs still stored."""
    for matches, params in dialect(conn).any_of("seq", seqs):
        sql = f"SELECT mailbox, MAX(seq) FROM messages WHERE {matches} GROUP BY mailbox"  # noqa: S608
        for mailbox, seq in conn.execute(sql, params).fetchall():
            yield mailbox, int(seq)


def heads(conn: Conn, mailboxes: Sequence[str]) -> dict[str, int]:
    """The seq of each mailbox's last change (0 if none)."""
    out = dict.fromkeys(mailboxes, 0)
    for matches, params in dialect(conn).any_of("mailbox", sorted(out)):
        sql = f"SELECT mailbox, seq FROM mailbox_heads WHERE {matches}"  # noqa: S608
        for mailbox, seq in conn.execute(sql, params):
            out[mailbox] = int(seq)
    return out


def set_heads(conn: Conn, new: dict[str, int]) -> None:
    """One upsert per mailbox changed (writer thread)."""
    conn.executemany(
        "INSERT INTO mailbox_heads (mailbox, seq) VALUES (?, ?)"
        " ON CONFLICT (mailbox) DO UPDATE SET seq = excluded.seq",
        list(new.items()),
    )


def link(conn: Conn, mailbox: str) -> ChainLink:
    """A seq (from the messages' own sequence) for a change of ``mailbox`` that is not
    a message: a membership change, ordered with the messages around it."""
    row = conn.execute(
        "UPDATE sqlite_sequence SET seq = seq + 1 WHERE name = 'messages' RETURNING seq"
    ).fetchone()
    if row is None:
        conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('messages', 1)")
        row = (1,)
    seq = int(row[0])
    prev = heads(conn, [mailbox])[mailbox]
    set_heads(conn, {mailbox: seq})
    return ChainLink(mailbox, seq, prev)


def between(
    conn: Conn, mailbox: str, after: int, upto: int, open_row: Callable[[Any], StoredMessage]
) -> list[StoredMessage]:
    rows = conn.execute(
        "SELECT seq, mailbox, sender_id, sender_device, client_id, ts, expires_at, target,"
        " nonce, body, prev_seq FROM messages WHERE mailbox = ? AND seq > ? AND seq <= ?"
        " ORDER BY seq",
        (mailbox, after, upto),
    ).fetchall()
    return [open_row(row) for row in rows]


def place(
    m: NewMessage, mailbox: str, seq: int, prev: int, plain: bytes, for_all: object, seal: Seal,
    rows: list[tuple[object, ...]], device_rows: list[tuple[int, int, str]],
) -> StoredMessage:
    """Add the row of ``m`` in ``mailbox`` (its envelopes sealed for that mailbox) and
    the rows of the devices it has an envelope for; return the message as stored."""
    nonce, body = seal(mailbox, m, plain)
    rows.append((
        seq, mailbox, m.sender_id, m.sender_device, m.client_id, m.ts,
        m.expires_at, m.target, for_all, nonce, body, prev,
    ))  # fmt: skip
    if not for_all and m.envelopes:
        device_rows.extend((seq, uid, dev) for uid, dev in m.envelopes)
    return StoredMessage(
        seq, mailbox, m.sender_id, m.sender_device, m.client_id, m.ts,
        m.expires_at, m.target, m.envelope, dict(m.envelopes), prev,
    )  # fmt: skip


def written_to(m: NewMessage) -> set[int]:
    """The users a direct message is written to, its sender aside (none for a room's)."""
    if not m.target.startswith("user:"):
        return set()
    return {p for p in map(inbox_owner, m.mailboxes) if p is not None and p != m.sender_id}


def append_many(
    conn: Conn,
    ops: Sequence[Appending],
    seal: Seal,
    seq_mailbox: dict[int, str],
) -> list[AppendResult]:
    """Store a run of appends with one statement per table (writer thread).

    ``seal`` encrypts a row's envelopes; ``seq_mailbox`` learns the mailbox of every
    new seq (acks then need no look-up).
    """
    keys = [(op.message.sender_id, op.message.sender_device, op.message.client_id)
            for op in ops]
    known: dict[tuple[int, str, str], tuple[int, ...]] = {}
    for chunk in chunks(keys, CHUNK // 3):
        sql = (
            f"WITH k(a, b, c) AS (VALUES {','.join(['(?,?,?)'] * len(chunk))})"  # noqa: S608
            " SELECT t.sender_id, t.sender_device, t.client_id, t.seqs"
            " FROM k JOIN client_ids t"
            " ON t.sender_id = k.a AND t.sender_device = k.b AND t.client_id = k.c"
        )
        for sid, sdev, cid, seqs_text in conn.execute(sql, [v for k in chunk for v in k]):
            known[(int(sid), sdev, cid)] = tuple(int(x) for x in seqs_text.split(",") if x)
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'messages'").fetchone()
    top = int(row[0]) if row is not None else 0
    chain = heads(conn, sorted({mb for op in ops for mb in op.message.mailboxes}))
    moved: dict[str, int] = {}
    rows: list[tuple[object, ...]] = []
    device_rows: list[tuple[int, int, str]] = []
    client_rows: list[tuple[object, ...]] = []
    partner_rows: list[tuple[int, int]] = []
    wrote_rows: list[tuple[int, int]] = []
    ranges: dict[str, tuple[int, int]] = {}
    results: list[AppendResult] = []
    for op, key in zip(ops, keys, strict=True):
        m = op.message
        earlier = known.get(key)
        if earlier is not None:
            results.append(AppendResult(earlier, duplicate=True))
            continue
        plain = encode_envelopes(m.envelope, m.envelopes)
        for_all = int(m.envelope is not None)
        seqs: list[int] = []
        stored: list[StoredMessage] = []
        for mailbox in m.mailboxes:
            top += 1
            seq = top
            prev = chain[mailbox]
            chain[mailbox] = moved[mailbox] = seq
            stored.append(place(m, mailbox, seq, prev, plain, for_all, seal, rows, device_rows))
            lo_hi = ranges.get(mailbox)
            ranges[mailbox] = (seq - 1, seq) if lo_hi is None else (lo_hi[0], seq)
            seq_mailbox[seq] = mailbox
            seqs.append(seq)
        known[key] = tuple(seqs)
        client_rows.append(
            (m.sender_id, m.sender_device, m.client_id, ",".join(map(str, seqs)), op.now)
        )
        partners = written_to(m)
        wrote_rows.extend((m.sender_id, p) for p in partners)
        partner_rows.extend((p, m.sender_id) for p in partners)
        results.append(AppendResult(tuple(seqs), duplicate=False, messages=tuple(stored)))
    if rows:
        conn.executemany(
            "INSERT INTO messages (seq, mailbox, sender_id, sender_device, client_id, ts,"
            " expires_at, target, for_all, nonce, body, prev_seq)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            rows,
        )
        set_heads(conn, moved)
    if device_rows:
        conn.executemany(
            "INSERT INTO message_devices (seq, user_id, device_id) VALUES (?, ?, ?)",
            device_rows,
        )
    if client_rows:
        conn.executemany(
            "INSERT INTO client_ids (sender_id, sender_device, client_id, seqs, created)"
            " VALUES (?, ?, ?, ?, ?)",
            client_rows,
        )
    if wrote_rows:
        # The sender has written to the recipient (which shows the sender's presence
        # to them); the recipient is merely a partner of the sender.
        conn.executemany(
            "INSERT INTO dm_partners (user_id, partner_id, wrote) VALUES (?, ?, 1)"
            " ON CONFLICT (user_id, partner_id) DO UPDATE SET wrote = 1"
            " WHERE dm_partners.wrote = 0",
            wrote_rows,
        )
    if partner_rows:
        conn.executemany(
            "INSERT INTO dm_partners (user_id, partner_id) VALUES (?, ?)"
            " ON CONFLICT (user_id, partner_id) DO NOTHING",
            partner_rows,
        )
    # Rows no other device reads (e.g. the sender's own inbox when it has one
    # device) are not kept; their seqs are still reported.
    for mailbox, (lo, hi) in ranges.items():
        sweep(conn, mailbox, lo, hi)
    return results


PENDING_SQL = """
SELECT m.seq, m.mailbox, m.sender_id, m.sender_device, m.client_id, m.ts,
       m.expires_at, m.target, m.nonce, m.body, m.prev_seq
FROM cursors c JOIN messages m ON m.mailbox = c.mailbox AND m.seq > c.acked_seq
WHERE c.user_id = ? AND c.device_id = ?
  AND NOT (m.sender_id = c.user_id AND m.sender_device = c.device_id)
  AND (m.expires_at IS NULL OR m.expires_at > ?)
  AND m.ts >= ?
  AND (m.for_all OR EXISTS (
    SELECT 1 FROM message_devices d
    WHERE d.seq = m.seq AND d.user_id = c.user_id AND d.device_id = c.device_id))
ORDER BY m.seq
"""


def pending(
    conn: Conn, user_id: int, device_id: str, now: float, cutoff_ms: int,
    open_row: Callable[[Any], StoredMessage],
) -> list[StoredMessage]:
    rows = conn.execute(PENDING_SQL, (user_id, device_id, now, cutoff_ms)).fetchall()
    return [open_row(row) for row in rows]


def unswept(conn: Conn) -> dict[str, tuple[int, int]]:
    """Per mailbox, the range (lo, hi] from its oldest message to its furthest cursor:
    all a sweep of the whole store has to look at."""
    rows = conn.execute(
        "SELECT m.mailbox, MIN(m.seq), (SELECT MAX(c.acked_seq) FROM cursors c"
        " WHERE c.mailbox = m.mailbox) FROM messages m GROUP BY m.mailbox"
    ).fetchall()
    return {
        mailbox: (int(lo) - 1, int(hi)) for mailbox, lo, hi in rows
        if hi is not None and hi >= lo
    }  # fmt: skip


def sweep_all(conn: Conn) -> int:
    """Sweep every mailbox over all it holds up to its furthest cursor (at start-up)."""
    return sum(sweep(conn, mailbox, lo, hi) for mailbox, (lo, hi) in unswept(conn).items())


def purge_step(
    conn: Conn, now: float, cutoff_ms: int, forget_before: float, limit: int
) -> tuple[int, bool]:
    """Delete up to ``limit`` rows of each kind; return (messages deleted, more left?).
    Another process purging meanwhile: nothing, none left (it does the work)."""
    d = dialect(conn)
    if not d.try_lock(conn, LOCK_PURGE):
        return 0, False
    expired = conn.execute(
        "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages"
        " WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?)",
        (now, limit),
    ).rowcount
    too_old = conn.execute(
        "DELETE FROM messages WHERE seq IN (SELECT seq FROM messages WHERE ts < ? LIMIT ?)",
        (cutoff_ms, limit),
    ).rowcount
    forgotten = conn.execute(
        f"DELETE FROM client_ids WHERE {d.row_id} IN"  # noqa: S608 (a constant)
        f" (SELECT {d.row_id} FROM client_ids WHERE created < ? LIMIT ?)",
        (forget_before, limit),
    ).rowcount
    # An expired family can no longer rotate; its hashes need not be kept.
    ended = conn.execute(
        "DELETE FROM sessions WHERE family IN"
        " (SELECT family FROM sessions WHERE expires <= ? LIMIT ?)",
        (now, limit),
    ).rowcount
    more = max(expired, too_old, forgotten, ended) >= limit
    return int(expired) + int(too_old), more


def queued(conn: Conn) -> int:
    """Messages stored and not yet acknowledged by every device they are for."""
    return int(conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0])


TABLES = (
    "users", "devices", "sessions", "refresh_tokens", "rooms", "members", "invites",
    "dm_partners", "messages", "message_devices", "cursors", "client_ids", "mailbox_heads",
)  # fmt: skip


def stats(conn: Conn) -> dict[str, int]:
    # Table names come from the constant above, never from input.
    return {
        t: int(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0])  # noqa: S608
        for t in TABLES
    }
