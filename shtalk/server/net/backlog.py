"""Backlog then live: what a device missed, in order, before anything new.

From the login on, the connection holds live message pushes; once the login's reply is
written, the store's backlog for the device is replayed, then the held pushes it did
not contain, then ``backlog_done``, so the device sees every message exactly once and
in order.  Last come ``presence`` pushes for its contacts, so the client can show at
once who is there.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger

from shtalk.server.chat import pushes
from shtalk.server.chat.audience import Audience
from shtalk.server.chat.users import Users
from shtalk.server.iserver import IChatUser

log = Logger()


class Replaying(Protocol):
    """The connection, as the replay sees it."""

    def send_bytes(self, data: bytes) -> None: ...

    def release_held(self) -> list[tuple[int, bytes]]:
        """Stop holding live pushes; return those held (seq, line)."""


class Backlog:
    def __init__(self, users: Users, audience: Audience) -> None:
        self.users = users
        self.audience = audience

    @inlineCallbacks
    def replay(self, conn: Replaying, avatar: IChatUser) -> Any:
        try:
            messages = yield avatar.pending()
            # Each push names its sender, which the client checks against the envelope:
            # a sender this process has not met since it started is not in its cache.
            yield self.users.learn_names({m.sender_id for m in messages})
        except Exception:
            log.failure("loading the backlog failed")
            messages = []
        name = self.users.name
        me, device = avatar.user.id, avatar.device_id
        sent: set[int] = set()
        for m in messages:
            env = m.envelope_for(me, device)
            if env is None:
                continue
            conn.send_bytes(pushes.message(m, env, name(m.sender_id)))
            sent.add(m.seq)
        for seq, line in conn.release_held():
            if seq not in sent:
                conn.send_bytes(line)
        conn.send_bytes(pushes.backlog_done(len(sent)))
        try:
            lines = yield self.audience.presence_snapshot(me)
        except Exception as e:  # best effort (e.g. shutting down): the live pushes go on
            log.warn("presence after the backlog not sent ({error})", error=type(e).__name__)
            lines = []
        for line in lines:
            conn.send_bytes(line)
