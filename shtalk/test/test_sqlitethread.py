"""SQLiteThread: one connection, jobs in order, errors as failures, a clean stop."""

from __future__ import annotations

import os
import sqlite3
import threading

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from shtalk.sqlitethread import SQLiteThread
from shtalk.testing import tempdir


class SQLiteThreadTests(TestCase):
    def setUp(self) -> None:
        self.path = os.path.join(tempdir(self), "t.sqlite3")
        self.connects = 0

    def connect(self) -> sqlite3.Connection:
        self.connects += 1
        return sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)

    async def test_jobs_run_in_order_off_the_reactor_thread(self) -> None:
        db = SQLiteThread(reactor, self.connect, "test-db")
        self.addCleanup(db.stop)
        main = threading.get_ident()
        await db.run(lambda c: c.execute("CREATE TABLE t (x INTEGER)"))
        ds = [db.run(lambda c, i: c.execute("INSERT INTO t VALUES (?)", (i,)), i)
              for i in range(50)]
        threads = await db.run(lambda c: threading.get_ident())
        for d in ds:
            await d
        rows = await db.run(lambda c: [r[0] for r in c.execute("SELECT x FROM t ORDER BY rowid")])
        self.assertEqual(rows, list(range(50)))
        self.assertNotEqual(threads, main)
        self.assertEqual(self.connects, 1)  # one connection for every job

    async def test_a_failing_job_fails_alone(self) -> None:
        db = SQLiteThread(reactor, self.connect, "test-db")
        self.addCleanup(db.stop)
        with self.assertRaises(sqlite3.OperationalError):
            await db.run(lambda c: c.execute("SELECT * FROM missing"))
        self.assertEqual(await db.run(lambda c: c.execute("SELECT 7").fetchone()[0]), 7)

    async def test_a_failed_connect_fails_the_job_and_is_retried(self) -> None:
        attempts = []

        def flaky() -> sqlite3.Connection:
            attempts.append(1)
            if len(attempts) == 1:
                raise sqlite3.OperationalError("unable to open database file")
            return self.connect()

        db = SQLiteThread(reactor, flaky, "test-db")
        self.addCleanup(db.stop)
        with self.assertRaises(sqlite3.OperationalError):
            await db.run(lambda c: 1)
        self.assertEqual(await db.run(lambda c: 2), 2)

    async def test_stop_finishes_queued_work_and_answers_every_caller(self) -> None:
        db = SQLiteThread(reactor, self.connect, "test-db")
        queued = db.run(lambda c: c.execute("SELECT 1").fetchone()[0])
        first, second = db.stop(), db.stop()
        self.assertEqual(await queued, 1)
        stopped = [first.called, second.called]
        await first
        await second
        self.assertTrue(first.called and second.called, stopped)
        self.assertTrue(db.stop().called)  # after the fact: at once
        with self.assertRaises(RuntimeError):
            await db.run(lambda c: 1)
