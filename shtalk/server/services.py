"""The service tree's own nodes: its top (what the listener serves) and the store's life.

The store opens (migrations, WAL recovery) and the bcrypt pool starts in
``startService``; both stop last.  A store that cannot be opened stops the reactor
with the reason in the log: the server must not run on a database it cannot use.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from shtalk.server.cred.passwords import PasswordHasher
from shtalk.server.iserver import IStore
from shtalk.server.net.connection import ShtalkServerFactory

log = Logger()


class StoreService(Service):
    """Opens the store when the service tree starts and closes it last."""

    name = "store"

    def __init__(self, store: IStore, hasher: PasswordHasher) -> None:
        self.store = store
        self.hasher = hasher

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.hasher.start()
        d = self.store.open()
        d.addErrback(self._failed)

    def _failed(self, failure: Any) -> None:
        from twisted.internet import reactor

        log.failure("the database could not be opened", failure)
        reactor.stop()  # type: ignore[attr-defined]

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self.hasher.stop()
        return self.store.close()


class ChatServerService(MultiService):
    """The whole server minus its listener; ``factory`` is what the listener serves,
    ``startup_notes`` lines to show the operator once it listens (e.g. where mail goes)."""

    def __init__(
        self, factory: ShtalkServerFactory, store: IStore, startup_notes: Sequence[str] = ()
    ) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.factory = factory
        self.store = store
        self.startup_notes = list(startup_notes)
