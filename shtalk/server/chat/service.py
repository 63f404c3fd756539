"""The chat's place in the service tree: a timer that purges expired messages.

Messages past their sender's expiry or the retention limit are deleted every
``purge_interval`` seconds while the server runs (the store does the deleting, off the
reactor thread); the timer starts and stops with the tree, so nothing runs before
``startService``.
"""

from __future__ import annotations

from twisted.application.service import Service
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from shtalk.server.iserver import IStore

log = Logger()


class ChatService(Service):
    name = "chat"

    def __init__(self, store: IStore, clock: IReactorTime, purge_interval: float = 60.0) -> None:
        self.store = store
        self.clock = clock
        self.purge_interval = purge_interval
        self._purge: IDelayedCall | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._schedule_purge()

    def stopService(self) -> None:
        if self._purge is not None and self._purge.active():
            self._purge.cancel()
        self._purge = None
        super().stopService()  # type: ignore[no-untyped-call]

    def _schedule_purge(self) -> None:
        def purge() -> None:
            d = self.store.purge_expired(self.clock.seconds())
            d.addErrback(lambda f: log.failure("purging expired messages failed", f))
            d.addBoth(lambda _: self._schedule_purge() if self.running else None)

        self._purge = self.clock.callLater(self.purge_interval, purge)
