"""What the bus tests share: a store of mailbox chains, and "processes" around one Redis.

`ChainStore` is the part of IStore the bus reads (heads, gaps, members, rooms), over
dicts, committing changes as the real stores do: one global sequence, each change with
the seq of its mailbox's previous one.  `Process` is one server process as compose
connects the chat side (presence, rooms, users, fan-out, LocalBus) with a RedisBus on
the real Redis; several share one ChainStore, as processes share PostgreSQL.
"""

from __future__ import annotations

import os
import secrets
import socket
import unittest
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed

from shtalk.server.chat.delivery import LocalBus
from shtalk.server.chat.fanout import FanOutCache
from shtalk.server.chat.presence import Presence
from shtalk.server.chat.rooms import Rooms
from shtalk.server.chat.users import Users
from shtalk.server.cluster.bus import RedisBus
from shtalk.server.store.mailbox import room_mailbox
from shtalk.server.store.records import ChainLink, Member, Room, StoredMessage, User

REDIS = ("127.0.0.1", 6379)
REDIS_URL = f"redis://{REDIS[0]}:{REDIS[1]}/0"


def need_redis(test: unittest.TestCase) -> None:
    try:
        socket.create_connection(REDIS, timeout=1).close()
    except OSError:
        why = f"Redis is not reachable at {REDIS[0]}:{REDIS[1]}"
        if os.environ.get("SHTALK_REQUIRE_REDIS") == "1":
            test.fail(f"{why}, and SHTALK_REQUIRE_REDIS=1 requires it")
        hint = "start redis-server; CI sets SHTALK_REQUIRE_REDIS=1"
        raise unittest.SkipTest(f"{why} ({hint})") from None


def redis_command(*args: bytes) -> bytes:
    """One command on a short-lived connection of its own (the raw reply)."""
    out = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
    with socket.create_connection(REDIS, timeout=2) as s:
        s.sendall(out)
        return s.recv(65536)


class ChainStore:
    """Mailbox chains, members and rooms, answers already fired (like MemoryStore)."""

    def __init__(self) -> None:
        self.seq = 0
        self.heads: dict[str, int] = {}
        self.messages: dict[str, list[StoredMessage]] = {}
        self.room_members: dict[int, dict[int, str]] = {}
        self.names: dict[int, str] = {}
        self.reads = 0  # messages_between calls
        self.hinted: list[tuple[str, int]] = []  # what the bus told `delivered`

    def delivered(self, mailbox: str, seq: int) -> None:
        self.hinted.append((mailbox, seq))

    def add_batch_listener(self, listener: object) -> None:
        """Answers already fired: no batches."""

    # writes, as a store commits them
    def _next(self, mailbox: str) -> tuple[int, int]:
        self.seq += 1
        prev, self.heads[mailbox] = self.heads.get(mailbox, 0), self.seq
        return self.seq, prev

    def commit(self, mailbox: str, sender: int, device: str, envelope: bytes = b"e",
               envelopes: dict[tuple[int, str], bytes] | None = None) -> StoredMessage:
        seq, prev = self._next(mailbox)
        m = StoredMessage(seq, mailbox, sender, device, f"c{seq}", 1000, None,
                          "room:r" if mailbox.startswith("r:") else "user:u",
                          envelope, envelopes or {}, prev)
        self.messages.setdefault(mailbox, []).append(m)
        return m

    def change_member(self, room_id: int, user_id: int, joined: bool) -> ChainLink:
        members = self.room_members.setdefault(room_id, {})
        if joined:
            members[user_id] = "member"
        else:
            members.pop(user_id, None)
        mailbox = room_mailbox(room_id)
        seq, prev = self._next(mailbox)
        return ChainLink(mailbox, seq, prev)

    # what the bus and the caches read
    def mailbox_heads(self, mailboxes: list[str]) -> Deferred[dict[str, int]]:
        return succeed({mb: self.heads.get(mb, 0) for mb in mailboxes})

    def messages_between(self, mailbox: str, after: int, upto: int) -> Deferred[Any]:
        self.reads += 1
        return succeed([m for m in self.messages.get(mailbox, []) if after < m.seq <= upto])

    def users_by_ids(self, user_ids: Any) -> Deferred[dict[int, User]]:
        return succeed({u: User(u, self.names.get(u, f"u{u}"), f"u{u}", b"", "active", 0.0)
                        for u in user_ids})

    def members(self, room_id: int) -> Deferred[list[Member]]:
        return succeed([Member(u, self.names.get(u, f"u{u}"), r)
                        for u, r in self.room_members.get(room_id, {}).items()])

    def rooms_of(self, user_id: int) -> Deferred[list[Room]]:
        return succeed([Room(rid, f"r{rid}", f"r{rid}", 0, False, 0.0)
                        for rid, ms in self.room_members.items() if user_id in ms])


class Mind:
    """A connection: records pushes; `wait(n)` fires once it holds n of them."""

    def __init__(self) -> None:
        self.seqs: list[int] = []
        self._waits: list[tuple[int, Deferred[None]]] = []

    def deliver(self, seq: int, line: bytes) -> None:
        self.seqs.append(seq)
        for n, d in list(self._waits):
            if len(self.seqs) >= n:
                self._waits.remove((n, d))
                d.callback(None)

    def send_bytes(self, data: bytes) -> None:
        pass

    def wait(self, n: int, timeout: float = 5.0) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if len(self.seqs) >= n:
            d.callback(None)
            return d
        self._waits.append((n, d))
        return d.addTimeout(timeout, reactor)


class Process:
    """One server process's chat side with a RedisBus (see the module's docstring)."""

    def __init__(self, store: ChainStore, prefix: str, node: str, bus_class: type = RedisBus,
                 gap_wait: float = 0.05, reconcile_interval: float = 5.0,
                 redis_url: str = REDIS_URL) -> None:
        self.store = store
        fanout = FanOutCache()
        self.users = Users(store)  # type: ignore[arg-type]
        self.rooms = Rooms(store, self.users, fanout)  # type: ignore[arg-type]
        self.presence = Presence(fanout)
        self.local = LocalBus(self.presence, self.rooms, self.users, fanout)
        self.bus: RedisBus = bus_class(
            self.local, store, self.rooms, reactor, reactor, redis_url, prefix, node,
            gap_wait, reconcile_interval,
        )

    def start(self) -> Deferred[Any]:
        self.bus.startService()
        return self.bus.when_connected()

    def stop(self) -> Deferred[Any]:
        return self.bus.stopService()

    @inlineCallbacks
    def login(self, user_id: int, device: str) -> Any:
        """The realm's order: rooms loaded, bus attached, then online."""
        mind = Mind()
        self.users.learn(user_id, self.store.names.get(user_id, f"u{user_id}"))
        yield self.rooms.load_user(user_id)
        yield self.bus.attach(user_id)
        self.presence.attach(user_id, device, mind)  # type: ignore[arg-type]
        return mind

    def logout(self, user_id: int, mind: Mind) -> None:
        self.bus.detach(user_id)
        self.presence.detach(mind)  # type: ignore[arg-type]


def random_prefix() -> str:
    return f"shtalk-test-{secrets.token_hex(6)}:"
