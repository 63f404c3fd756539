"""The chat's place in the service tree: a timer that purges expired messages.

Messages past their sender's expiry or the retention limit are deleted every
``purge_interval`` seconds while the server runs (the store does the deleting, off the
reactor thread); the timer starts and stops with the tree, so nothing runs before
``startService``.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from shtalk.server.iserver import IStore
from shtalk.server.repeating import Repeating


class ChatService(Repeating):
    name = "chat"

    def __init__(self, store: IStore, clock: IReactorTime, purge_interval: float = 60.0) -> None:
        super().__init__(clock, purge_interval, self._purge, "purging expired messages failed")
        self.store = store
        self.clock = clock

    def _purge(self) -> Deferred[int]:
        return self.store.purge_expired(self.clock.seconds())
