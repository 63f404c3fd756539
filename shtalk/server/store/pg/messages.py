"""Messages, cursors and mailbox chains on PostgreSQL, for several writer processes.

Why it looks like this:

* A run of appends is one claim, one lock, one ``COPY``: the client ids are claimed
  first (``INSERT ... ON CONFLICT DO NOTHING RETURNING``: a duplicate sent meanwhile to
  another process waits for that process's commit and then gets the ORIGINAL seqs),
  then the ``mailbox_heads`` rows of every mailbox the run writes to are locked ``FOR
  UPDATE`` in mailbox order (no deadlock between writers), then the seqs are taken from
  the one sequence.  Under those locks no other process can add to those mailboxes, so
  each message's ``prev_seq`` is the head it read and every chain is unbroken.
* Membership changes (`link`) and new cursors take the same lock: a kick is ordered
  before every message committed after it, and a new reader's cursor starts at the
  head of the mailbox, never behind a message still being committed elsewhere.
* Deleting what every reader acknowledged is a ranged sweep (as on SQLite); sweeps of
  the whole store and purges run in one process at a time (an advisory lock).

The reads (pending, between, heads, cursors) and the purge are SQLite's statements
(`shtalk.server.store.sql.messages`), run through `shtalk.server.store.pg.conn.PgConn`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from shtalk.server.store.pg.schema import LOCK_SWEEP, try_lock
from shtalk.server.store.records import AppendResult, ChainLink, StoredMessage
from shtalk.server.store.sealing import encode_envelopes
from shtalk.server.store.sql.messages import (
    NOT_HELD,
    Appending,
    Seal,
    between,
    cursor,
    heads,
    last_seq_by_mailbox,
    pending,
    place,
    purge_step,
    queued,
    stats,
    unswept,
    written_to,
)

__all__ = [
    "add_cursors", "append_many", "between", "cursor", "drop_cursors", "heads",
    "last_seq_by_mailbox", "link", "lock_heads", "move_cursors", "pending", "purge_step",
    "queued", "stats", "sweep", "sweep_all",
]  # fmt: skip

Conn = Any  # psycopg.Connection, in the writer thread or a reader of the pool


#: SQLite's sweep (`NOT_HELD`) of several mailboxes' ranges in one statement.  Rows
#: another transaction holds are skipped, not waited for: two processes sweep the same
#: acknowledged rows (each for its own readers' acks), and a sweep waiting on the other's
#: rows while that one waits on this one's `mailbox_heads` lock is a deadlock that
#: PostgreSQL breaks only after deadlock_timeout (a second of stalled writes).  What is
#: skipped is being deleted by the other; if that one rolls back, the start-up sweep or
#: the retention purge takes the row.
SWEEP_SQL = (
    "DELETE FROM messages WHERE seq IN (SELECT m.seq FROM messages m"  # noqa: S608
    " JOIN unnest(?::text[], ?::bigint[], ?::bigint[]) AS r(mailbox, lo, hi)"
    " ON m.mailbox = r.mailbox AND m.seq > r.lo AND m.seq <= r.hi"
    f" WHERE {NOT_HELD} FOR UPDATE OF m SKIP LOCKED)"
)

#: `SWEEP_SQL` for the rows just appended (by seq: index probes, no range join).
SWEEP_NEW_SQL = (
    "DELETE FROM messages WHERE seq IN (SELECT m.seq FROM messages m"  # noqa: S608
    f" WHERE m.seq = ANY(?::bigint[]) AND {NOT_HELD} FOR UPDATE OF m SKIP LOCKED)"
)


def sweep(conn: Conn, mailbox: str, lo: int, hi: int) -> int:
    """Delete messages of ``mailbox`` in (lo, hi] that no device still waits for."""
    return sweep_ranges(conn, {mailbox: (lo, hi)})


def sweep_ranges(conn: Conn, ranges: dict[str, tuple[int, int]]) -> int:
    """`sweep` of several mailboxes in one statement."""
    if not ranges:
        return 0
    boxes = sorted(ranges)
    cur = conn.execute(
        SWEEP_SQL,
        (boxes, [ranges[b][0] for b in boxes], [ranges[b][1] for b in boxes]),
    )
    return int(cur.rowcount)


# --- chains --------------------------------------------------------------------------


def lock_heads(conn: Conn, mailboxes: Iterable[str]) -> dict[str, int]:
    """Lock the heads of these mailboxes (in mailbox order) until the transaction ends;
    their seqs.  Nobody else adds to them meanwhile."""
    boxes = sorted(set(mailboxes))
    if not boxes:
        return {}
    # Inserted in mailbox order, or locked in that order by the no-op update.
    rows = conn.execute(
        "INSERT INTO mailbox_heads (mailbox, seq) SELECT unnest(?::text[]), 0"
        " ON CONFLICT (mailbox) DO UPDATE SET seq = mailbox_heads.seq RETURNING mailbox, seq",
        (boxes,),
    ).fetchall()
    return {mailbox: int(seq) for mailbox, seq in rows}


def set_heads(conn: Conn, moved: dict[str, int]) -> None:
    if moved:
        boxes = sorted(moved)
        conn.execute(
            "UPDATE mailbox_heads h SET seq = v.seq"
            " FROM unnest(?::text[], ?::bigint[]) AS v(mailbox, seq)"
            " WHERE h.mailbox = v.mailbox",
            (boxes, [moved[b] for b in boxes]),
        )


def take_seqs(conn: Conn, n: int) -> list[int]:
    rows = conn.execute("SELECT nextval('message_seq') FROM generate_series(1, ?)", (n,))
    return sorted(int(r[0]) for r in rows)


def link(conn: Conn, mailbox: str) -> ChainLink:
    """A seq for a change of ``mailbox`` that is not a message (a membership change),
    in its chain, under its lock."""
    prev = lock_heads(conn, [mailbox])[mailbox]
    (seq,) = take_seqs(conn, 1)
    set_heads(conn, {mailbox: seq})
    return ChainLink(mailbox, seq, prev)




# --- cursors ----------------------------------------------------------------------------


def add_cursors(conn: Conn, user_id: int, mailbox: str) -> None:
    """Each of the user's devices reads ``mailbox`` from its head on (no history)."""
    top = lock_heads(conn, [mailbox])[mailbox]
    conn.execute(
        "INSERT INTO cursors (user_id, device_id, mailbox, acked_seq)"
        " SELECT user_id, device_id, ?, ? FROM devices WHERE user_id = ?"
        " ON CONFLICT (user_id, device_id, mailbox) DO NOTHING",
        (mailbox, top, user_id),
    )


def drop_cursors(conn: Conn, user_id: int, mailbox: str, upto: int) -> None:
    """The user's devices stop reading ``mailbox``; what only they held back goes."""
    row = conn.execute(
        "WITH gone AS (DELETE FROM cursors WHERE user_id = ? AND mailbox = ?"
        " RETURNING acked_seq) SELECT MIN(acked_seq) FROM gone",
        (user_id, mailbox),
    ).fetchone()
    if row[0] is not None:
        sweep(conn, mailbox, int(row[0]), upto)


def move_cursors(conn: Conn, updates: list[tuple[int, int, str, str, int]]) -> None:
    """(seq, user, device, mailbox, seq) rows; a cursor never moves back."""
    conn.execute(
        "UPDATE cursors c SET acked_seq = v.seq"
        " FROM unnest(?::bigint[], ?::bigint[], ?::text[], ?::text[])"
        " AS v(seq, user_id, device_id, mailbox)"
        " WHERE c.user_id = v.user_id AND c.device_id = v.device_id"
        " AND c.mailbox = v.mailbox AND c.acked_seq < v.seq",
        ([u[0] for u in updates], [u[1] for u in updates], [u[2] for u in updates],
         [u[3] for u in updates]),
    )


# --- appends ----------------------------------------------------------------------------

COPY_MESSAGES = (
    "COPY messages (seq, mailbox, sender_id, sender_device, client_id, ts, expires_at,"
    " target, for_all, nonce, body, prev_seq) FROM STDIN (FORMAT BINARY)"
)
MESSAGE_TYPES = ["int8", "text", "int8", "text", "text", "int8", "float8", "text", "bool",
                 "bytea", "bytea", "int8"]  # fmt: skip

Key = tuple[int, str, str]


def _claim(
    conn: Conn, planned: dict[Key, str], now: float
) -> tuple[set[Key], dict[Key, tuple[int, ...]]]:
    """Claim the client ids (in key order) with the seqs planned for them; (claimed,
    seqs of those stored before, by this process or another)."""
    ordered = sorted(planned)
    rows = conn.execute(
        "INSERT INTO client_ids (sender_id, sender_device, client_id, seqs, created)"
        " SELECT a, b, c, s, ?"
        " FROM unnest(?::bigint[], ?::text[], ?::text[], ?::text[]) AS k(a, b, c, s)"
        " ON CONFLICT DO NOTHING RETURNING sender_id, sender_device, client_id",
        (now, [k[0] for k in ordered], [k[1] for k in ordered], [k[2] for k in ordered],
         [planned[k] for k in ordered]),
    ).fetchall()
    claimed = {(int(a), b, c) for a, b, c in rows}
    known: dict[Key, tuple[int, ...]] = {}
    rest = [k for k in ordered if k not in claimed]
    if rest:
        for a, b, c, seqs in conn.execute(
            "SELECT t.sender_id, t.sender_device, t.client_id, t.seqs FROM client_ids t"
            " JOIN unnest(?::bigint[], ?::text[], ?::text[]) AS k(a, b, c)"
            " ON t.sender_id = k.a AND t.sender_device = k.b AND t.client_id = k.c",
            ([k[0] for k in rest], [k[1] for k in rest], [k[2] for k in rest]),
        ):
            known[(int(a), b, c)] = tuple(int(x) for x in seqs.split(",") if x)
    return claimed, known


def append_many(
    conn: Conn,
    ops: Sequence[Appending],
    seal: Seal,
    seq_mailbox: dict[int, str],
) -> list[AppendResult]:
    """Store a run of appends: one lock, one claim, one COPY per table (writer thread).

    The heads are locked and the seqs taken BEFORE the claim, so the claim can record
    the seqs at once; a duplicate's seqs are simply never used (a gap in the sequence,
    not in any chain: chains link stored changes only).
    """
    keys = [(op.message.sender_id, op.message.sender_device, op.message.client_id)
            for op in ops]
    firsts: dict[Key, int] = {}
    for i, key in enumerate(keys):
        firsts.setdefault(key, i)
    chain = lock_heads(conn, (mb for i in firsts.values() for mb in ops[i].message.mailboxes))
    seqs_left = take_seqs(conn, sum(len(ops[i].message.mailboxes) for i in firsts.values()))
    planned: dict[Key, tuple[int, ...]] = {}
    for key, i in firsts.items():
        n = len(ops[i].message.mailboxes)
        planned[key], seqs_left = tuple(seqs_left[:n]), seqs_left[n:]
    claimed, known = _claim(
        conn, {k: ",".join(map(str, v)) for k, v in planned.items()}, max(op.now for op in ops)
    )
    rows: list[tuple[object, ...]] = []
    device_rows: list[tuple[int, int, str]] = []
    partners: set[tuple[int, int]] = set()
    wrote: set[tuple[int, int]] = set()
    moved: dict[str, int] = {}
    stored_by_op: dict[int, AppendResult] = {}
    for key, i in firsts.items():
        if key not in claimed:
            continue
        m = ops[i].message
        plain = encode_envelopes(m.envelope, m.envelopes)
        for_all = m.envelope is not None
        stored: list[StoredMessage] = []
        for mailbox, seq in zip(m.mailboxes, planned[key], strict=True):
            prev, chain[mailbox] = chain[mailbox], seq
            moved[mailbox] = seq
            stored.append(place(m, mailbox, seq, prev, plain, for_all, seal, rows, device_rows))
            seq_mailbox[seq] = mailbox
        known[key] = planned[key]
        for p in written_to(m):
            wrote.add((m.sender_id, p))
            partners.add((p, m.sender_id))
        stored_by_op[i] = AppendResult(planned[key], duplicate=False, messages=tuple(stored))
    if rows:
        with conn.cursor().copy(COPY_MESSAGES) as copy:
            copy.set_types(MESSAGE_TYPES)
            for row in rows:
                copy.write_row(row)
        set_heads(conn, moved)
    if device_rows:
        with conn.cursor().copy(
            "COPY message_devices (seq, user_id, device_id) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int8", "int8", "text"])
            for drow in device_rows:
                copy.write_row(drow)
    _partners(conn, sorted(wrote), sorted(partners - wrote))
    # Rows no other device reads (the sender's own inbox when it has one device) go.
    if rows:
        conn.execute(SWEEP_NEW_SQL, ([r[0] for r in rows],))
    return [
        stored_by_op[i] if i in stored_by_op else AppendResult(known[key], duplicate=True)
        for i, key in enumerate(keys)
    ]


def _partners(conn: Conn, wrote: list[tuple[int, int]], partners: list[tuple[int, int]]) -> None:
    """The sender has written to the recipient (which shows the sender's presence to
    them); the recipient is merely a partner of the sender."""
    if wrote:
        conn.execute(
            "INSERT INTO dm_partners (user_id, partner_id, wrote)"
            " SELECT a, b, true FROM unnest(?::bigint[], ?::bigint[]) AS v(a, b)"
            " ON CONFLICT (user_id, partner_id) DO UPDATE SET wrote = true"
            " WHERE NOT dm_partners.wrote",
            ([w[0] for w in wrote], [w[1] for w in wrote]),
        )
    if partners:
        conn.execute(
            "INSERT INTO dm_partners (user_id, partner_id)"
            " SELECT a, b FROM unnest(?::bigint[], ?::bigint[]) AS v(a, b)"
            " ON CONFLICT (user_id, partner_id) DO NOTHING",
            ([p[0] for p in partners], [p[1] for p in partners]),
        )


def sweep_all(conn: Conn) -> int:
    """Sweep every mailbox up to its furthest cursor (at start-up; one process at a
    time), in one statement."""
    if not try_lock(conn, LOCK_SWEEP):
        return 0
    return sweep_ranges(conn, unswept(conn))
