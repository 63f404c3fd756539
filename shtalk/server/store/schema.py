"""The SQLite schema of the store, its migrations, and the start-up file check.

The schema version lives in ``PRAGMA user_version``: version N means the
first N entries of ``MIGRATIONS`` have been applied.  A migration step is a
tuple of SQL statements; pending steps run in order in ONE transaction, so a
crash mid-upgrade leaves the old version intact.  ``PRAGMA application_id``
marks the file as ours, so an unrelated SQLite file is refused rather than
"migrated".

The SQL stays close to what PostgreSQL accepts (``ON CONFLICT DO NOTHING``,
foreign keys with cascades, no ``WITHOUT ROWID``) where that costs nothing.
"""

from __future__ import annotations

import os
import sqlite3
import stat

from shtalk.server.eserver import CorruptStore

#: "shtk": marks the database file as a shtalk store.
APPLICATION_ID = 0x7368746B

SQLITE_MAGIC = b"SQLite format 3\x00"

Migration = tuple[str, ...]

MIGRATIONS: list[Migration] = [
    # 1: initial schema.
    (
        """CREATE TABLE users (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            key TEXT NOT NULL UNIQUE,
            email TEXT NOT NULL,
            pw_hash BLOB NOT NULL,
            status TEXT NOT NULL,
            created REAL NOT NULL)""",
        """CREATE TABLE devices (
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            device_id TEXT NOT NULL,
            label TEXT NOT NULL,
            created REAL NOT NULL,
            PRIMARY KEY (user_id, device_id))""",
        # One row per login; refresh tokens are kept (hashed) after use so a
        # replayed token is recognised as reuse, not as unknown.
        """CREATE TABLE sessions (
            family TEXT PRIMARY KEY,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            device_id TEXT NOT NULL,
            expires REAL NOT NULL,
            revoked INTEGER NOT NULL DEFAULT 0)""",
        "CREATE INDEX sessions_user ON sessions(user_id)",
        """CREATE TABLE refresh_tokens (
            hash BLOB PRIMARY KEY,
            family TEXT NOT NULL REFERENCES sessions(family) ON DELETE CASCADE,
            expires REAL NOT NULL,
            used INTEGER NOT NULL DEFAULT 0)""",
        "CREATE INDEX refresh_tokens_family ON refresh_tokens(family)",
        """CREATE TABLE rooms (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            name TEXT NOT NULL,
            key TEXT NOT NULL UNIQUE,
            owner_id INTEGER NOT NULL REFERENCES users(id),
            invite_only INTEGER NOT NULL,
            created REAL NOT NULL)""",
        """CREATE TABLE members (
            room_id INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            role TEXT NOT NULL,
            joined REAL NOT NULL,
            PRIMARY KEY (room_id, user_id))""",
        "CREATE INDEX members_user ON members(user_id)",
        """CREATE TABLE invites (
            room_id INTEGER NOT NULL REFERENCES rooms(id) ON DELETE CASCADE,
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            by_id INTEGER NOT NULL,
            created REAL NOT NULL,
            PRIMARY KEY (room_id, user_id))""",
        "CREATE INDEX invites_user ON invites(user_id)",
        """CREATE TABLE dm_partners (
            user_id INTEGER NOT NULL,
            partner_id INTEGER NOT NULL,
            PRIMARY KEY (user_id, partner_id))""",
        # One row per sent message per mailbox ("r:<room>" / "u:<user>"),
        # whatever the number of recipients.  nonce+body: AES-256-GCM of the
        # envelope(s).  for_all=0: only the devices listed in message_devices
        # have an envelope.
        """CREATE TABLE messages (
            seq INTEGER PRIMARY KEY AUTOINCREMENT,
            mailbox TEXT NOT NULL,
            sender_id INTEGER NOT NULL,
            sender_device TEXT NOT NULL,
            client_id TEXT NOT NULL,
            ts INTEGER NOT NULL,
            expires_at REAL,
            target TEXT NOT NULL,
            for_all INTEGER NOT NULL,
            nonce BLOB NOT NULL,
            body BLOB NOT NULL)""",
        "CREATE INDEX messages_mailbox ON messages(mailbox, seq)",
        "CREATE INDEX messages_expiry ON messages(expires_at) WHERE expires_at IS NOT NULL",
        "CREATE INDEX messages_ts ON messages(ts)",
        """CREATE TABLE message_devices (
            seq INTEGER NOT NULL REFERENCES messages(seq) ON DELETE CASCADE,
            user_id INTEGER NOT NULL,
            device_id TEXT NOT NULL,
            PRIMARY KEY (seq, user_id, device_id))""",
        # A row per (device, mailbox it reads): the membership of devices in
        # mailboxes AND how far each has acknowledged.
        """CREATE TABLE cursors (
            user_id INTEGER NOT NULL,
            device_id TEXT NOT NULL,
            mailbox TEXT NOT NULL,
            acked_seq INTEGER NOT NULL,
            PRIMARY KEY (user_id, device_id, mailbox),
            FOREIGN KEY (user_id, device_id)
                REFERENCES devices(user_id, device_id) ON DELETE CASCADE)""",
        "CREATE INDEX cursors_mailbox ON cursors(mailbox, acked_seq)",
        # Outlives the messages: a retry after the ack still gets duplicate=True.
        """CREATE TABLE client_ids (
            sender_id INTEGER NOT NULL,
            sender_device TEXT NOT NULL,
            client_id TEXT NOT NULL,
            seqs TEXT NOT NULL,
            created REAL NOT NULL,
            PRIMARY KEY (sender_id, sender_device, client_id))""",
        "CREATE INDEX client_ids_created ON client_ids(created)",
    ),
    # 2: the prekey directory.  Bundles and one-time keys are opaque to the
    # server (signed by the device's identity key, checked by clients).
    (
        """CREATE TABLE device_bundles (
            user_id INTEGER NOT NULL,
            device_id TEXT NOT NULL,
            bundle BLOB NOT NULL,
            updated REAL NOT NULL,
            PRIMARY KEY (user_id, device_id),
            FOREIGN KEY (user_id, device_id)
                REFERENCES devices(user_id, device_id) ON DELETE CASCADE)""",
        """CREATE TABLE one_time_keys (
            user_id INTEGER NOT NULL,
            device_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            key_id INTEGER NOT NULL,
            key BLOB NOT NULL,
            -- Set (and the key blanked) when handed out; the row stays so the
            -- same id can never be published and handed out again.
            claimed REAL,
            PRIMARY KEY (user_id, device_id, kind, key_id),
            FOREIGN KEY (user_id, device_id)
                REFERENCES devices(user_id, device_id) ON DELETE CASCADE)""",
    ),
    # 3: account security (shtalk.server.store.sql.security).  Emailed codes and recovery
    # codes are stored only as SHA-256 hashes; the TOTP secret is AES-256-GCM sealed.
    (
        """CREATE TABLE email_codes (
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            purpose TEXT NOT NULL,
            code_hash BLOB NOT NULL,
            expires REAL NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            sent REAL NOT NULL,
            PRIMARY KEY (user_id, purpose))""",
        """CREATE TABLE totp (
            user_id INTEGER PRIMARY KEY REFERENCES users(id) ON DELETE CASCADE,
            sealed BLOB NOT NULL,
            enabled INTEGER NOT NULL DEFAULT 0,
            last_step INTEGER NOT NULL DEFAULT 0,
            created REAL NOT NULL)""",
        """CREATE TABLE recovery_codes (
            user_id INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
            code_hash BLOB NOT NULL,
            PRIMARY KEY (user_id, code_hash))""",
        "CREATE INDEX users_pending ON users(created) WHERE status = 'pending'",
    ),
    # 4: hardening after an outside audit.  dm_partners.wrote: user_id has written to
    # partner_id (only that shows user_id's presence to partner_id; rows from before
    # are 0, so presence between DM partners comes back with their next message).
    # users.email_hash: a keyed hash of the address, which is sealed in users.email
    # (sealing.EmailSeal; rows still in clear are sealed when the store opens).
    (
        "ALTER TABLE dm_partners ADD COLUMN wrote INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE users ADD COLUMN email_hash BLOB",
        "CREATE INDEX users_email_hash ON users(email_hash)",
    ),
    # 5: each mailbox's chain of changes (messages and membership changes): the seq of
    # its last change, and on each message the seq of the change before it.  Heads of
    # existing mailboxes start at their newest stored message.
    (
        "ALTER TABLE messages ADD COLUMN prev_seq INTEGER NOT NULL DEFAULT 0",
        "CREATE TABLE mailbox_heads (mailbox TEXT PRIMARY KEY, seq INTEGER NOT NULL)",
        "INSERT INTO mailbox_heads (mailbox, seq)"
        " SELECT mailbox, MAX(seq) FROM messages GROUP BY mailbox",
    ),
    # 6: the monitoring's flags (shtalk.server.store.flags), kept in a file before: the
    # evidence is AES-256-GCM sealed (it may quote a reported message).
    (
        """CREATE TABLE monitor_flags (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            subject TEXT NOT NULL,
            label TEXT NOT NULL,
            signal TEXT NOT NULL,
            reason TEXT NOT NULL,
            action TEXT NOT NULL,
            count INTEGER NOT NULL,
            first REAL NOT NULL,
            last REAL NOT NULL,
            status TEXT NOT NULL,
            evidence BLOB NOT NULL)""",
    ),
]


def schema_version() -> int:
    """The version this code writes (read at call time so tests can patch MIGRATIONS)."""
    return len(MIGRATIONS)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def inspect_database(conn: sqlite3.Connection, path: str) -> int:
    """Refuse a damaged, foreign or too-new database; return its schema version."""
    try:
        rows = conn.execute("PRAGMA quick_check").fetchall()
        if [tuple(r) for r in rows] != [("ok",)]:
            detail = _one_line(rows[0][0]) if rows else "no answer"
            raise CorruptStore(
                f"{path}: the database failed its integrity check ({detail[:200]}); "
                "restore it from a backup or move it away to start afresh"
            )
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        app = int(conn.execute("PRAGMA application_id").fetchone()[0])
        if app == 0 and version == 0:
            tables = int(conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0])
            if tables:
                raise CorruptStore(
                    f"{path}: an SQLite database of another program, not a shtalk store; "
                    "point shtalk at another data directory"
                )
        elif app != APPLICATION_ID:
            raise CorruptStore(
                f"{path}: an SQLite database of another program, not a shtalk store; "
                "point shtalk at another data directory"
            )
    except sqlite3.OperationalError as e:
        if "locked" in str(e) or "busy" in str(e):
            raise CorruptStore(
                f"{path}: the database is locked by another process; stop it and retry"
            ) from e
        raise CorruptStore(
            f"{path}: unreadable database ({_one_line(str(e))}); "
            "restore it from a backup or move it away to start afresh"
        ) from e
    except sqlite3.DatabaseError as e:
        raise CorruptStore(
            f"{path}: unreadable database ({_one_line(str(e))}); "
            "restore it from a backup or move it away to start afresh"
        ) from e
    if version > schema_version():
        raise CorruptStore(
            f"{path}: schema version {version} is newer than this shtalk supports "
            f"({schema_version()}); upgrade shtalk or restore an older backup"
        )
    return version


def check_database_file(path: str) -> None:
    """Synchronous start-up check, run before the reactor: fail early, in one line.

    A missing (or empty) file is fine: open() creates the schema.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise CorruptStore(f"{path}: cannot be read ({e.strerror}); check its permissions") from e
    if not stat.S_ISREG(st.st_mode):
        raise CorruptStore(f"{path}: not a regular file; move it away or use another directory")
    if st.st_size == 0:
        return
    try:
        with open(path, "rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except OSError as e:
        raise CorruptStore(f"{path}: cannot be read ({e.strerror}); check its permissions") from e
    if head != SQLITE_MAGIC:
        raise CorruptStore(
            f"{path}: not an SQLite database; restore it from a backup "
            "or move it away to start afresh"
        )
    try:
        conn = sqlite3.connect(path, isolation_level=None)
    except sqlite3.Error as e:
        raise CorruptStore(f"{path}: cannot be opened ({_one_line(str(e))}); check it") from e
    try:
        inspect_database(conn, path)
    finally:
        conn.close()


def migrate(conn: sqlite3.Connection, path: str) -> int:
    """Apply the pending steps in one IMMEDIATE transaction; return the new version."""
    target = schema_version()
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = inspect_database(conn, path)
        for step in MIGRATIONS[version:]:
            for statement in step:
                conn.execute(statement)
        if version != target:
            # PRAGMA values cannot be bound; both are ints we control.
            conn.execute(f"PRAGMA user_version = {int(target)}")
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return target
