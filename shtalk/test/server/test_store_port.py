"""``shtalk-admin port-db``: an SQLite data directory copied into PostgreSQL.

What a device had pending on SQLite must be pending on PostgreSQL, in the same order,
still decrypting with the data directory's key; new ids and seqs continue after the
old ones (flag ids too, the flags' evidence copied sealed); a target with data in it is
refused.
"""

from __future__ import annotations

import io
import sqlite3
from typing import Any

import psycopg
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from shtalk.admin import main as admin_main
from shtalk.admin import portdb
from shtalk.server.datadir import DataDir
from shtalk.server.store.flags import SQLiteFlagStore
from shtalk.server.store.pg.flags import PostgresFlagStore
from shtalk.server.store.pg.store import PostgresStore
from shtalk.server.store.sqlite import SQLiteStore
from shtalk.test.pgtest import fresh_schema
from shtalk.test.server.flag_contract import flag
from shtalk.test.server.store_contract import NOW, StoreHelpers, async_test, msg


class PortTests(StoreHelpers, TestCase):
    def setUp(self) -> None:
        self.url = fresh_schema(self)
        self.clock = Clock()
        self.clock.advance(NOW)
        self.datadir = DataDir(self.mktemp())
        self.datadir.ensure(tls_names=None)
        self.key = self.datadir.storage_key()

    async def fill_sqlite(self) -> dict[str, Any]:
        store = SQLiteStore(str(self.datadir.db_path), self.key, clock=self.clock,
                            sweep_interval=0, ack_delay=0)
        await store.open()
        alice = await self.user(store, "Alice", "a1", "a2")
        bob = await self.user(store, "Bob", "b1", "b2")
        carol = await self.user(store, "Carol", "c1")
        room = await store.create_room("Lobby", "lobby", alice.id, False)
        await store.add_member(room.id, bob.id, "member")
        await store.add_member(room.id, carol.id, "member")
        box = f"r:{room.id}"
        sent = [await store.append(msg((box,), alice, "a1", f"r{i}", envelope=b"room %d" % i))
                for i in range(30)]
        await store.remove_member(room.id, carol.id)
        await store.append(msg(
            (f"u:{bob.id}", f"u:{alice.id}"), alice, "a1", "dm", envelope=None,
            envelopes={(bob.id, "b1"): b"for b1", (bob.id, "b2"): b"for b2",
                       (alice.id, "a2"): b"for a2"}, target="user:bob"))
        await store.ack(bob.id, "b1", [sent[9].seqs[0]])
        devices = [(alice.id, "a1"), (alice.id, "a2"), (bob.id, "b1"), (bob.id, "b2"),
                   (carol.id, "c1")]
        before = {
            "pending": {d: await store.pending(*d) for d in devices},
            "heads": await store.mailbox_heads([box, f"u:{bob.id}", f"u:{alice.id}"]),
            "email": await store.email_of(alice.id),
            "users": (alice, bob, carol), "room": room,
        }
        await store.close()
        # An address from before sealing, still in clear.
        conn = sqlite3.connect(str(self.datadir.db_path))
        with conn:
            conn.execute("UPDATE users SET email = 'carol-clear@example.org', email_hash = NULL"
                         " WHERE id = ?", (carol.id,))
        conn.close()
        return before

    @async_test
    async def test_pending_survives_the_copy_in_order(self) -> None:
        before = await self.fill_sqlite()
        out = io.StringIO()
        copied = portdb.port(str(self.datadir.path), self.url, out)
        self.assertGreater(copied, 30)
        self.assertIn("messages: ", out.getvalue())
        store = PostgresStore(self.url, self.key, clock=self.clock, sweep_interval=0,
                              ack_delay=0)
        await store.open()
        self.addCleanup(store.close)
        for device, pending in before["pending"].items():
            self.assertEqual(await store.pending(*device), pending, device)
        alice, bob, carol = before["users"]
        self.assertEqual(len(before["pending"][(bob.id, "b1")]), 21)  # 30 - 10 acked + DM
        heads = before["heads"]
        self.assertEqual(await store.mailbox_heads(list(heads)), heads)
        self.assertEqual(await store.email_of(alice.id), before["email"])
        self.assertEqual(await store.user_by_key("bob"), bob)
        # The address in clear was sealed on the way.
        self.assertEqual(await store.email_of(carol.id), "carol-clear@example.org")
        with psycopg.connect(self.url) as conn:
            emails = [bytes(r[0]) for r in conn.execute("SELECT email FROM users")]
        self.assertFalse([e for e in emails if b"@example.org" in e])
        # Ids and seqs continue after every one handed out on SQLite.
        dave = await self.user(store, "Dave", "d1")
        self.assertGreater(dave.id, carol.id)
        box = f"r:{before['room'].id}"
        after = await store.append(msg((box,), alice, "a1", "new"))
        self.assertEqual(after.messages[0].prev_seq, heads[box])
        self.assertGreater(after.seqs[0], max(heads.values()))
        # The same client id as before the copy is still a duplicate.
        again = await store.append(msg((box,), alice, "a1", "r3"))
        self.assertTrue(again.duplicate)

    @async_test
    async def test_a_target_with_data_is_refused(self) -> None:
        await self.fill_sqlite()
        portdb.port(str(self.datadir.path), self.url, io.StringIO())
        out, err = io.StringIO(), io.StringIO()
        code = admin_main.main(
            ["port-db", "--from", str(self.datadir.path), "--to", self.url], out, err
        )
        self.assertEqual(code, 1)
        self.assertIn("already holds data", err.getvalue())
        self.assertEqual(len(err.getvalue().strip().splitlines()), 1)

    @async_test
    async def test_flags_come_along_sealed_as_they_are(self) -> None:
        store = SQLiteStore(str(self.datadir.db_path), self.key, clock=self.clock,
                            sweep_interval=0, ack_delay=0)
        await store.open()
        flags = SQLiteFlagStore(store, self.key)
        raised = [flag("7"), flag("8", "strangers"), flag("9", "reports")]
        raised[0].id = 4  # an id kept from flags.json
        for f in raised:
            f.id = await flags.save_flag(f)
        raised[1].status = "cleared"
        await flags.save_flag(raised[1])
        await flags.delete_flag(raised[2].id)  # its id is never handed out again
        before = await flags.load_flags()
        top = raised[2].id
        await store.close()
        with sqlite3.connect(str(self.datadir.db_path)) as conn:
            sealed = {r[0]: bytes(r[1]) for r in conn.execute(
                "SELECT id, evidence FROM monitor_flags")}
        conn.close()
        out = io.StringIO()
        portdb.port(str(self.datadir.path), self.url, out)
        self.assertIn("monitor_flags: 2 rows", out.getvalue())
        with psycopg.connect(self.url) as pg:
            copied = {r[0]: bytes(r[1]) for r in pg.execute(
                "SELECT id, evidence FROM monitor_flags")}
        self.assertEqual(copied, sealed)  # the same bytes: not opened on the way
        pg_store = PostgresStore(self.url, self.key, clock=self.clock, sweep_interval=0,
                                 ack_delay=0)
        await pg_store.open()
        self.addCleanup(pg_store.close)
        on_pg = PostgresFlagStore(pg_store, self.key)
        self.assertEqual(await on_pg.load_flags(), before)
        self.assertEqual([f.evidence for f in before], [raised[0].evidence] * 2)
        self.assertGreater(await on_pg.save_flag(flag("10")), top)
        # A target holding flags only is refused too: port-db never merges.
        with self.assertRaises(portdb.PortError) as e:
            portdb.port(str(self.datadir.path), self.url, io.StringIO())
        self.assertIn("already holds data", str(e.exception))
