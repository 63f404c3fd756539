"""The in-memory store: the shared IStore contract, plus what is its own (answers at
once, no thread, no file)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from shtalk.server.store.memory import MemoryStore
from shtalk.test.store_contract import NOW, StoreContract, StoreHelpers


class MemoryTestBase(StoreHelpers, TestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)

    async def open_store(self) -> MemoryStore:
        store = MemoryStore(clock=self.clock)
        await store.open()
        self.addCleanup(store.close)
        return store


class MemoryContractTests(StoreContract, MemoryTestBase):
    """Everything an IStore promises, in memory."""
