"""The chat's place in the service tree: a timer that purges expired messages.

Messages past their sender's expiry or the retention limit are deleted every
``purge_interval`` seconds while the server runs (the store does the deleting, off the
reactor thread); the timer starts and stops with the tree, so nothing runs before
``startService``.
"""

from __future__ import annotations

from dataclasses import field

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from shtalk.collaborators import collaborators
from shtalk.server.iserver import IStore
from shtalk.server.repeating import Repeating


@collaborators
class ChatService(Service):
    name = "chat"

    store: IStore
    clock: IReactorTime
    purge_interval: float = 60.0
    _purge: Repeating | None = field(default=None, init=False)

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._purge = Repeating(
            self.clock, self.purge_interval, self._purge_now, "purging expired messages failed"
        )
        self._purge.start()

    def stopService(self) -> None:
        if self._purge is not None:
            self._purge.stop()
        self._purge = None
        super().stopService()  # type: ignore[no-untyped-call]

    def _purge_now(self) -> Deferred[int]:
        return self.store.purge_expired(self.clock.seconds())
