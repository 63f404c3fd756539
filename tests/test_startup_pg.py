# mypy: disallow-untyped-calls=False
# (trial's TestCase is untyped; strict otherwise.)
"""Start-up with ``[store] url``: a database the server cannot use ends the process
with status 1 and one line on stderr (no password in it), before anything listens.

Skipped with the reason when PostgreSQL is not reachable (failed when
``SHTALK_REQUIRE_POSTGRES=1``).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import psycopg
from twisted.trial import unittest

from shtalk.server.store.pg.schema import schema_version
from shtalk.test.pgtest import fresh_schema
from tests.test_startup import TWISTD, env


class PostgresStartupTests(unittest.TestCase):
    def setUp(self) -> None:
        self.cwd = Path(self.mktemp()).absolute()
        self.cwd.mkdir()

    def start(self, url: str) -> subprocess.CompletedProcess[str]:
        (self.cwd / "pg.ini").write_text(f"[store]\nurl = {url}\n")
        return subprocess.run(
            [*TWISTD, "-n", "shtalk", "--data-dir", str(self.cwd / "data"), "--port", "0",
             "--config", "pg.ini"],
            cwd=self.cwd, env=env(), capture_output=True, text=True, timeout=60, check=False,
        )

    def assertOneLine(self, result: subprocess.CompletedProcess[str], *parts: str) -> None:
        self.assertNotEqual(result.returncode, 0, result)
        lines = result.stderr.splitlines()
        self.assertEqual(len(lines), 1, result.stderr)
        self.assertNotIn("Traceback", result.stderr + result.stdout)
        for part in parts:
            self.assertIn(part, lines[0])

    def test_a_database_of_a_newer_shtalk_is_refused(self) -> None:
        url = fresh_schema(self)
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("CREATE TABLE shtalk_schema (one BOOLEAN PRIMARY KEY DEFAULT true,"
                         " version INTEGER NOT NULL, compat INTEGER NOT NULL)")
            conn.execute("INSERT INTO shtalk_schema VALUES (true, %s, %s)",
                         (schema_version() + 3, schema_version() + 2))
        self.assertOneLine(self.start(url), "upgrade shtalk", "postgresql://postgres@")

    def test_unreachable_database_without_its_password(self) -> None:
        fresh_schema(self)  # skips (or fails) like the others when there is no PostgreSQL
        result = self.start("postgresql://shtalk:pw-s3cret@127.0.0.1:1/shtalk")
        self.assertOneLine(result, "postgresql://shtalk@127.0.0.1:1/shtalk")
        self.assertNotIn("pw-s3cret", result.stderr + result.stdout)
