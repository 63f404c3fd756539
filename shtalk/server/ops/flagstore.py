"""Where the monitoring's flags are kept, besides the database: memory, and the file.

`IFlagStore` has three methods (load all, save one, delete one) so that each backend is
small: the database ones are ``shtalk.server.store.flags`` (SQLite; PostgreSQL for a
cluster), `MemoryFlagStore` is for tests, and `FileFlagStore` is ``flags.json`` in the
data directory, the single process's store before the database had a table for them.
`import_flags_file` moves such a file into a database store once (renaming it so it is
not imported twice).

Every store keeps copies: a flag the monitor changes afterwards is not changed in the
store until it is saved again.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.logger import Logger
from zope.interface import implementer

from shtalk.server.ishared import IFlagStore
from shtalk.server.store.records import Flag

log = Logger()


@implementer(IFlagStore)
class MemoryFlagStore:
    def __init__(self) -> None:
        self.rows: dict[int, Flag] = {}
        self.next_id = 1

    def load_flags(self) -> Deferred[list[Flag]]:
        return succeed([copy.deepcopy(f) for _, f in sorted(self.rows.items())])

    def save_flag(self, flag: Flag) -> Deferred[int]:
        flag_id = flag.id or self.next_id
        self.next_id = max(self.next_id, flag_id + 1)
        stored = copy.deepcopy(flag)
        stored.id = flag_id
        self.rows[flag_id] = stored
        return succeed(flag_id)

    def delete_flag(self, flag_id: int) -> Deferred[None]:
        self.rows.pop(flag_id, None)
        return succeed(None)


def read_flags_file(path: Path) -> list[Flag]:
    """The flags of a ``flags.json``; none if it is missing.  Raises OSError, ValueError or
    TypeError on a file that cannot be read."""
    if not path.exists():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    return [Flag(**raw) for raw in data.get("flags", [])]


@implementer(IFlagStore)
class FileFlagStore(MemoryFlagStore):
    """``flags.json`` (0600), rewritten whole on every change (flags are few)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        try:
            for flag in read_flags_file(path):
                self.rows[flag.id] = flag
        except (OSError, ValueError, TypeError) as e:
            log.error("flags file unreadable ({what}); starting with no flags", what=str(e)[:100])
        self.next_id = max([0, *self.rows]) + 1

    def save_flag(self, flag: Flag) -> Deferred[int]:
        d = super().save_flag(flag)
        self._write()
        return d

    def delete_flag(self, flag_id: int) -> Deferred[None]:
        d = super().delete_flag(flag_id)
        self._write()
        return d

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump({"flags": [asdict(fl) for _, fl in sorted(self.rows.items())]}, f)
        os.replace(tmp, self.path)


@inlineCallbacks
def import_flags_file(path: Path, store: IFlagStore) -> Any:
    """Copy a ``flags.json`` into ``store`` (ids kept), then rename it ``.imported``;
    fires with how many flags were copied (0: no file)."""
    flags = read_flags_file(path)
    for flag in flags:
        yield store.save_flag(flag)
    if path.exists():
        os.replace(path, path.with_name(path.name + ".imported"))
        log.info("{count} monitoring flags imported from {path} into the database",
                 count=len(flags), path=str(path))
    return len(flags)
