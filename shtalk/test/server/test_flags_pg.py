"""The monitoring's flags on PostgreSQL: the IFlagStore contract, the evidence sealed at
rest, and ids that two processes (two stores on one database) never hand out twice.

Each test gets a schema of its own (`shtalk.test.pgtest`); without PostgreSQL they skip
(and fail with SHTALK_REQUIRE_POSTGRES=1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
from twisted.internet.defer import gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from shtalk.server.config import MonitorSection
from shtalk.server.ops.flagstore import import_flags_file
from shtalk.server.ops.monitor import Monitor
from shtalk.server.store.pg import schema
from shtalk.server.store.pg.flags import PostgresFlagStore
from shtalk.server.store.pg.store import PostgresStore, check_database
from shtalk.test.pgtest import fresh_schema
from shtalk.test.server.flag_contract import FlagStoreContract, flag

KEY = bytes(range(32))


class PgFlagsBase(TestCase):
    def setUp(self) -> None:
        self.url = fresh_schema(self)

    async def open(self, key: bytes = KEY) -> PostgresFlagStore:
        """A flag store on a store of its own: another process, as far as the database
        can tell."""
        store = PostgresStore(self.url, key, clock=Clock(), sweep_interval=0, ack_delay=0)
        await store.open()
        self.addCleanup(store.close)
        return PostgresFlagStore(store, key)

    def sql(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.url, autocommit=True) as conn:
            cur = conn.execute(statement, params)
            return list(cur) if cur.description else []


class PostgresFlagStoreTests(FlagStoreContract, PgFlagsBase):
    async def make_flags(self) -> Any:
        return await self.open()

    async def reopen(self) -> Any:
        return await self.open()


class PgFlagSealTests(PgFlagsBase):
    async def test_evidence_is_sealed_at_rest(self) -> None:
        flags = await self.open()
        secret = flag()
        secret.evidence = [{"plaintext": "MARKER-" * 8}]
        secret.id = await flags.save_flag(secret)
        [row] = self.sql("SELECT * FROM monitor_flags")
        stored = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in row)
        self.assertNotIn(b"MARKER-", stored)
        self.assertNotIn(b"plaintext", stored)
        self.assertEqual(await (await self.open()).load_flags(), [secret])

    async def test_evidence_opens_only_with_the_key_and_on_its_row(self) -> None:
        flags = await self.open()
        a, b = flag("1"), flag("2")
        a.id = await flags.save_flag(a)
        b.id = await flags.save_flag(b)
        # b's evidence copied onto a's row does not open there.
        self.sql("UPDATE monitor_flags SET evidence ="
                 " (SELECT evidence FROM monitor_flags WHERE id = %s) WHERE id = %s", b.id, a.id)
        got = await (await self.open()).load_flags()
        self.assertEqual([(f.subject, f.evidence) for f in got], [("1", []), ("2", b.evidence)])
        other = await self.open(bytes(32))
        self.assertEqual([f.evidence for f in await other.load_flags()], [[], []])


class PgFlagIdTests(PgFlagsBase):
    async def test_imported_ids_are_never_handed_out_again(self) -> None:
        first, second = await self.open(), await self.open()
        kept = [flag(str(i)) for i in range(3)]
        for f, given in zip(kept, (5, 9, 7), strict=True):
            f.id = given  # ids kept (an import), out of order
            self.assertEqual(await first.save_flag(f), given)
        self.assertEqual(await second.save_flag(flag("new")), 10)
        self.assertEqual(await first.save_flag(flag("newer")), 11)

    async def test_no_flag_is_lost_when_imports_race_new_flags(self) -> None:
        """Two processes raise flags while one imports flags under ids the others may
        reach first: every flag is stored, under an id of its own."""
        first, second = await self.open(), await self.open()
        new = [flag(f"n{i}") for i in range(40)]
        imported = [flag(f"i{i}") for i in range(10)]
        for i, f in enumerate(imported):
            f.id = 5 + 3 * i  # in the range the new flags take
        ids = await gatherResults(
            [(first if i % 2 else second).save_flag(f) for i, f in enumerate(new)]
            + [second.save_flag(f) for f in imported]
        )
        self.assertEqual(len(set(ids)), 50)
        stored = {f.id: f.subject for f in await first.load_flags()}
        self.assertEqual(len(stored), 50)
        subjects = [f.subject for f in new + imported]
        self.assertEqual([stored[i] for i in ids], subjects)
        self.assertGreater(await second.save_flag(flag("after")), max(ids))

    async def test_a_given_id_holding_another_flag_is_not_overwritten(self) -> None:
        flags = await self.open()
        live = flag("live")
        live.id = await flags.save_flag(live)
        stale = flag("from an old flags.json")
        stale.id = live.id
        moved = await flags.save_flag(stale)
        self.assertNotEqual(moved, live.id)
        stale.id = moved
        self.assertEqual(await flags.load_flags(), [live, stale])
        stale.count = 99  # its updates now go to its new id
        self.assertEqual(await flags.save_flag(stale), moved)
        self.assertEqual(await flags.load_flags(), [live, stale])

    async def test_an_update_keeps_its_id_and_moves_nothing_back(self) -> None:
        flags = await self.open()
        a = flag()
        a.id = 50
        await flags.save_flag(a)
        b = flag("8")
        b.id = await flags.save_flag(b)
        self.assertEqual(b.id, 51)
        a.status = "cleared"
        self.assertEqual(await flags.save_flag(a), 50)  # an update below the sequence
        self.assertEqual(await flags.save_flag(flag("9")), 52)
        self.assertEqual([(f.id, f.status) for f in await flags.load_flags()],
                         [(50, "cleared"), (51, "open"), (52, "open")])

    async def test_a_sequence_behind_a_stored_id_still_gives_a_free_one(self) -> None:
        """A stored id the sequence was not moved past (another process's setval raced
        with this insert): the new flag takes the next free id, nothing is overwritten."""
        flags = await self.open()
        taken = flag("taken")
        taken.id = await flags.save_flag(taken)
        self.sql("SELECT setval(pg_get_serial_sequence('monitor_flags', 'id'), 1, false)")
        fresh = flag("fresh")
        fresh.id = await flags.save_flag(fresh)
        self.assertNotEqual(fresh.id, taken.id)
        self.assertEqual(await flags.load_flags(), sorted([taken, fresh], key=lambda f: f.id))


class PgFlagMigrationTests(PgFlagsBase):
    async def test_a_database_from_before_flags_gains_them_and_stays_usable(self) -> None:
        current = schema.MIGRATIONS
        self.patch(schema, "MIGRATIONS", current[:1])
        older = PostgresStore(self.url, KEY, clock=Clock(), sweep_interval=0, ack_delay=0)
        await older.open()
        user = await older.create_user("Alice", "alice", "a@example.org", b"h", "active")
        await older.close()
        self.patch(schema, "MIGRATIONS", current)
        flags = await self.open()
        self.assertEqual(await flags.load_flags(), [])
        self.assertEqual(await flags.save_flag(flag()), 1)
        self.assertEqual(await flags.store.user_by_key("alice"), user)
        self.assertEqual(self.sql("SELECT version FROM shtalk_schema"), [(len(current),)])
        # An added table: a process of the release before still opens the database.
        self.patch(schema, "MIGRATIONS", current[:1])
        self.assertEqual(check_database(self.url), len(current))
        still = PostgresStore(self.url, KEY, clock=Clock(), sweep_interval=0, ack_delay=0)
        await still.open()
        self.addCleanup(still.close)
        self.assertEqual(await still.user_by_key("alice"), user)


class PgMonitorTests(PgFlagsBase):
    async def test_two_monitors_share_the_flags(self) -> None:
        clock = Clock()
        m = Monitor(MonitorSection(send_rate=1), clock, await self.open())
        await m.loaded
        m.sent(1, "a", 0.0, [], [1])
        m.sent(1, "a", 0.0, [], [1])
        m.sent(1, "a", 0.0, [], [1])  # an update queued behind the insert
        await m.refresh()
        [raised] = m.open_flags()
        other = Monitor(MonitorSection(), clock, await self.open())
        await other.loaded
        self.assertEqual(other.open_flags(), [raised])
        other.clear(raised.id)
        await other.refresh()
        await m.refresh()
        self.assertEqual(m.open_flags(), [])

    async def test_flags_json_moves_in_with_its_ids(self) -> None:
        directory = Path(self.mktemp())
        directory.mkdir()
        legacy = directory / "flags.json"
        old = Monitor(MonitorSection(send_rate=1), Clock(), legacy)
        for user in (1, 2):
            old.sent(user, "x", 0.0, [], [1])
            old.sent(user, "x", 0.0, [], [1])
        before = old.open_flags()
        self.assertEqual(len(before), 2)
        old.clear(before[0].id)
        flags = await self.open()
        self.assertEqual(await import_flags_file(legacy, flags), 2)
        self.assertEqual(await flags.load_flags(), sorted(old.flags.values(),
                                                          key=lambda f: f.id))
        self.assertGreater(await flags.save_flag(flag()), max(f.id for f in before))
