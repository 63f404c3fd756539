"""The fan-out cache: per mailbox, every live connection of every recipient.

A room send is then one loop over a tuple.  The lists stay valid while nobody connects,
disconnects, joins or leaves: presence and the room caches call `changed` on each such
change (the list is rebuilt on the next send), and `connection_gone` also empties the
cache so no list keeps a closed connection alive.
"""

from __future__ import annotations

from typing import Any

#: Mailboxes kept at most; beyond, the cache starts over (idle rooms' lists go).
MAX_ENTRIES = 4096


class FanOutCache:
    __slots__ = ("entries", "version")

    def __init__(self) -> None:
        self.version = 0
        # mailbox -> (version when built, connections)
        self.entries: dict[str, tuple[int, tuple[Any, ...]]] = {}

    def changed(self) -> None:
        self.version += 1

    def connection_gone(self) -> None:
        self.version += 1
        self.entries.clear()

    def get(self, mailbox: str) -> tuple[Any, ...] | None:
        cached = self.entries.get(mailbox)
        if cached is not None and cached[0] == self.version:
            return cached[1]
        return None

    def put(self, mailbox: str, minds: tuple[Any, ...]) -> None:
        if len(self.entries) > MAX_ENTRIES:
            self.entries.clear()
        self.entries[mailbox] = (self.version, minds)
