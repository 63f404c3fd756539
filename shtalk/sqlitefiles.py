"""The files of one SQLite database in WAL mode, kept private: the server's store and
the client's local store hold secrets (sealed, but still nobody else's to read).

SQLite makes ``-wal`` and ``-shm`` beside the database with the umask's mode, and a
copy or another program may leave any of the three readable by others.
"""

from __future__ import annotations

import os

#: The database, its write-ahead log and the log's shared-memory index.
SUFFIXES = ("", "-wal", "-shm")


def tighten_modes(path: str) -> None:
    """Each of the database's files that exists becomes readable by its owner only (0600)."""
    for suffix in SUFFIXES:
        try:
            mode = os.stat(path + suffix).st_mode
        except FileNotFoundError:
            continue
        if mode & 0o077:
            os.chmod(path + suffix, 0o600)
