"""The monitoring's flags kept by an IFlagStore: memory, the file, SQLite; the monitor on
SQLite; a flags.json moved into the database."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from shtalk.server.config import MonitorSection
from shtalk.server.ops.flagstore import FileFlagStore, MemoryFlagStore, import_flags_file
from shtalk.server.ops.monitor import Monitor
from shtalk.server.store.flags import SQLiteFlagStore
from shtalk.server.store.sqlite import SQLiteStore
from shtalk.test.server.flag_contract import FlagStoreContract, flag

KEY = bytes(range(32))


class MemoryFlagStoreTests(FlagStoreContract, TestCase):
    async def make_flags(self) -> Any:
        self.store = MemoryFlagStore()
        return self.store

    async def reopen(self) -> Any:
        return self.store


class FileFlagStoreTests(FlagStoreContract, TestCase):
    async def make_flags(self) -> Any:
        os.makedirs(self.mktemp())
        self.path = Path(self.mktemp()) / "flags.json"
        self.path.parent.mkdir()
        return FileFlagStore(self.path)

    async def reopen(self) -> Any:
        self.assertEqual(self.path.stat().st_mode & 0o777, 0o600)
        return FileFlagStore(self.path)


class SQLiteFlagStoreTests(FlagStoreContract, TestCase):
    async def open(self, key: bytes = KEY) -> SQLiteStore:
        store = SQLiteStore(self.path, key, clock=Clock())
        await store.open()
        self.addCleanup(store.close)
        return store

    async def make_flags(self) -> Any:
        os.makedirs(self.mktemp())
        self.path = os.path.join(self.mktemp(), "shtalk.sqlite3")
        os.makedirs(os.path.dirname(self.path))
        return SQLiteFlagStore(await self.open(), KEY)

    async def reopen(self) -> Any:
        return SQLiteFlagStore(await self.open(), KEY)

    async def test_evidence_is_sealed_at_rest(self) -> None:
        flags = await self.make_flags()
        secret = flag()
        secret.evidence = [{"plaintext": "MARKER-" * 8}]
        secret.id = await flags.save_flag(secret)
        await flags.store.close()
        for name in os.listdir(os.path.dirname(self.path)):
            with open(os.path.join(os.path.dirname(self.path), name), "rb") as f:
                data = f.read()
            self.assertNotIn(b"MARKER-", data, name)
            self.assertNotIn(b"plaintext", data, name)
        [back] = await (await self.reopen()).load_flags()
        self.assertEqual(back, secret)

    async def test_evidence_opens_only_with_the_key_and_on_its_row(self) -> None:
        flags = await self.make_flags()
        a, b = flag("1"), flag("2")
        a.id = await flags.save_flag(a)
        b.id = await flags.save_flag(b)
        await flags.store.close()
        import sqlite3

        conn = sqlite3.connect(self.path)
        with conn:  # b's evidence copied onto a's row does not open there
            conn.execute("UPDATE monitor_flags SET evidence ="
                         " (SELECT evidence FROM monitor_flags WHERE id = ?) WHERE id = ?",
                         (b.id, a.id))
        conn.close()
        got = await (await self.reopen()).load_flags()
        self.assertEqual([(f.subject, f.evidence) for f in got], [("1", []), ("2", b.evidence)])
        other = SQLiteFlagStore(await self.open(), bytes(32))
        self.assertEqual([f.evidence for f in await other.load_flags()], [[], []])


class MonitorOnTheDatabaseTests(TestCase):
    async def test_flags_raised_cleared_and_read_again(self) -> None:
        path = os.path.join(self.mktemp(), "shtalk.sqlite3")
        os.makedirs(os.path.dirname(path))
        store = SQLiteStore(path, KEY, clock=Clock())
        await store.open()
        self.addCleanup(store.close)
        clock = Clock()
        m = Monitor(MonitorSection(send_rate=1), clock, SQLiteFlagStore(store, KEY))
        await m.loaded
        m.sent(1, "a", 0.0, [], [1])
        m.sent(1, "a", 0.0, [], [1])
        m.sent(2, "b", 0.0, [], [1])
        m.sent(2, "b", 0.0, [], [1])
        m.sent(2, "b", 0.0, [], [1])  # an update of the open flag, queued behind its insert
        await m.refresh()
        self.assertEqual(sorted(f.subject for f in m.open_flags()), ["1", "2"])
        first = min(f.id for f in m.open_flags())
        # Another process (another monitor on the same table) sees them, clears one.
        other = Monitor(MonitorSection(), clock, SQLiteFlagStore(store, KEY))
        await other.loaded
        self.assertEqual(len(other.open_flags()), 2)
        self.assertEqual(len(other.flags), 2)  # the update did not insert a second row
        raised = other.raise_flag("address", "198.51.100.60", "198.51.100.60",
                                  "registrations", "many", 9)
        self.assertEqual(raised.id, 0)  # being stored
        self.assertIs(await other.stored(raised), raised)
        self.assertGreater(raised.id, first)
        other.clear(raised.id)
        other.clear(first)
        await other.refresh()  # after its save
        await m.refresh()
        self.assertEqual([f.subject for f in m.open_flags()],
                         [f.subject for f in other.open_flags()])
        self.assertEqual(len(m.open_flags()), 1)

    async def test_flags_json_moves_into_the_database(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        legacy = directory / "flags.json"
        clock = Clock()
        old = Monitor(MonitorSection(send_rate=1), clock, legacy)
        old.sent(1, "a", 0.0, [], [1])
        old.sent(1, "a", 0.0, [], [1])
        [before] = old.open_flags()
        store = SQLiteStore(str(directory / "shtalk.sqlite3"), KEY, clock=Clock())
        await store.open()
        self.addCleanup(store.close)
        flags = SQLiteFlagStore(store, KEY)
        self.assertEqual(await import_flags_file(legacy, flags), 1)
        self.assertFalse(legacy.exists())
        self.assertTrue((directory / "flags.json.imported").exists())
        self.assertEqual(await import_flags_file(legacy, flags), 0)  # once
        m = Monitor(MonitorSection(), clock, flags)
        await m.loaded
        self.assertEqual(m.open_flags(), [before])
