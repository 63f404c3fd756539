"""The store on PostgreSQL: the IStore contract, and what only several writers show.

Each test gets a schema of its own (`shtalk.test.pgtest`); without PostgreSQL they skip.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from shtalk.server.store.pg.store import PostgresStore
from shtalk.test.pgtest import fresh_schema
from shtalk.test.server.store_contract import NOW, StoreContract, StoreHelpers

KEY = bytes(range(32))


class PgTestBase(StoreHelpers, TestCase):
    def setUp(self) -> None:
        self.url = fresh_schema(self)
        self.clock = Clock()
        self.clock.advance(NOW)

    async def open_store(self, key: bytes = KEY, **kwargs: Any) -> PostgresStore:
        kwargs.setdefault("sweep_interval", 0)
        kwargs.setdefault("ack_delay", 0)
        store = PostgresStore(self.url, key, clock=self.clock, **kwargs)
        await store.open()
        self.addCleanup(store.close)
        return store


class PgContractTests(StoreContract, PgTestBase):
    """Everything an IStore promises, on PostgreSQL."""
