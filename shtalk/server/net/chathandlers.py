"""The chat requests: rooms, devices, keys, messages, acks, reports.

Each handler takes the connection and the request, and calls the connection's avatar
(shtalk.server.chat.avatar), which checks what the request means; what only the
connection layer can do is done here: the monitoring's CAPTCHA demand before a
flagged sender's next message, and back-pressure while the store's write queue is full.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred

from shtalk.server.accounts.gates import Gates
from shtalk.server.chat.naming import user_key
from shtalk.server.eserver import Forbidden
from shtalk.server.iserver import IStore
from shtalk.server.ishared import ICaptchaDemands
from shtalk.server.net.connection import ShtalkServerProtocol as Conn
from shtalk.server.ops.moderation import Moderation
from shtalk.server.ops.monitor import Monitor
from shtalk.wire.frames import Request


class ChatHandlers:
    def __init__(
        self,
        store: IStore,
        gates: Gates,
        demands: ICaptchaDemands,
        moderation: Moderation | None = None,
        monitor: Monitor | None = None,
    ) -> None:
        self.gates = gates
        self.demands = demands
        self.moderation = moderation  # None (with the monitor): reports are not taken
        self.monitor = monitor
        # The SQLite store reports a full write queue; other stores never fill.
        self._overloaded: Callable[[], bool] | None = getattr(store, "overloaded", None)
        self._drained: Callable[[], Deferred[None]] | None = getattr(store, "when_drained", None)

    def on_devices(self, conn: Conn, request: Request) -> Deferred[Any]:
        user = request.args.get("user")
        if user is not None:
            user_key(user)
        return conn.me.devices(user)

    def on_room_create(self, conn: Conn, request: Request) -> Deferred[Any]:
        a = request.args
        return conn.me.create_room(a["room"], bool(a.get("invite_only", False)))

    def on_room_join(self, conn: Conn, request: Request) -> Deferred[Any]:
        return conn.me.join(request.args["room"])

    def on_room_leave(self, conn: Conn, request: Request) -> Deferred[Any]:
        return conn.me.leave(request.args["room"])

    def on_room_invite(self, conn: Conn, request: Request) -> Deferred[Any]:
        return conn.me.invite(request.args["room"], request.args["user"])

    def on_room_kick(self, conn: Conn, request: Request) -> Deferred[Any]:
        return conn.me.kick(request.args["room"], request.args["user"])

    def on_room_role(self, conn: Conn, request: Request) -> Deferred[Any]:
        a = request.args
        return conn.me.set_role(a["room"], a["user"], a["role"])

    def on_room_list(self, conn: Conn, request: Request) -> Deferred[Any]:
        return conn.me.list_rooms()

    def on_room_members(self, conn: Conn, request: Request) -> Deferred[Any]:
        return conn.me.members(request.args["room"])

    def on_send(self, conn: Conn, request: Request) -> Deferred[Any]:
        a = request.args
        demands = self.demands
        if demands:
            # The monitoring flagged someone: a flagged sender proves to be a person
            # before the next message goes out (the CAPTCHA is in the error).
            self.gates.monitor_gate(conn.conn_token, conn.me.user.id, conn.peer, a.get("captcha"))
        d: Deferred[Any] = conn.me.send(
            a["to"], a.get("envelope"), a.get("envelopes"), a["client_id"], a.get("expires_in")
        )
        overloaded = self._overloaded
        if overloaded is not None and self._drained is not None and overloaded():
            # Stop reading this sender until the queue has gone into a transaction.
            conn.pause_until(self._drained)
        return d

    def on_ack(self, conn: Conn, request: Request) -> Deferred[Any]:
        return conn.me.ack(request.args["seqs"])

    def on_device_remove(self, conn: Conn, request: Request) -> Deferred[Any]:
        return conn.me.remove_device(request.args["device"])

    def on_keys_publish(self, conn: Conn, request: Request) -> Deferred[Any]:
        a = request.args
        return conn.me.publish_keys(
            a.get("bundle"), a.get("one_time") or [], bool(a.get("replace", False))
        )

    def on_keys_count(self, conn: Conn, request: Request) -> Deferred[Any]:
        return conn.me.key_counts()

    def on_keys_fetch(self, conn: Conn, request: Request) -> Deferred[Any]:
        a = request.args
        return conn.me.fetch_keys(a["user"], a.get("device"))

    def on_report(self, conn: Conn, request: Request) -> Deferred[Any]:
        a = request.args
        if self.moderation is None or self.monitor is None:
            raise Forbidden("reports are not taken by this server")
        return self.moderation.report(
            conn.me.user, self.monitor, a["user"], a["reason"], a.get("envelope"),
            a.get("plaintext"), conn.peer_key,
        )
