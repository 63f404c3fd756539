"""A PostgreSQL schema of its own for each test (unit and system tests share this).

Why a schema per test: helpers and CI jobs share one PostgreSQL server; a random schema,
named in the URL's ``options`` (``search_path``), keeps each test's tables apart, and the
test's cleanup drops it.  Without a reachable server the test is skipped with the reason,
unless ``SHTALK_REQUIRE_POSTGRES=1`` (CI) makes that a failure.
"""

from __future__ import annotations

import os
import secrets
from urllib.parse import quote

from twisted.trial.unittest import SkipTest, TestCase

#: The server tests use; override with SHTALK_TEST_POSTGRES.
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/test"


def server_url() -> str:
    return os.environ.get("SHTALK_TEST_POSTGRES", DEFAULT_URL)


def required() -> bool:
    return os.environ.get("SHTALK_REQUIRE_POSTGRES") == "1"


def with_schema(url: str, schema: str) -> str:
    """``url`` with every connection's search_path set to ``schema``."""
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-c search_path={schema}')}"


def fresh_schema(test: TestCase) -> str:
    """A URL of a new, empty schema, dropped when ``test`` ends; skip (or fail when
    PostgreSQL is required) if the server cannot be reached."""
    import psycopg

    url = server_url()
    schema = "shtalk_test_" + secrets.token_hex(6)
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
    except psycopg.OperationalError as e:
        reason = f"PostgreSQL not reachable at {url}: {' '.join(str(e).split())[:160]}"
        if required():
            test.fail(reason + " (SHTALK_REQUIRE_POSTGRES=1)")
        raise SkipTest(reason) from None

    def drop() -> None:
        with psycopg.connect(url, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')

    test.addCleanup(drop)
    return with_schema(url, schema)
