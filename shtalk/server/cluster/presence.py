"""Presence shared by the processes of a cluster: the relay `Presence` talks to.

Who is online lives in Redis as one hash per user, ``{prefix}presence:{uid}``, with a
field ``{node}|{device}`` for each device a process serves; a set per process,
``{prefix}node-users:{node}``, lists the users it has fields for, so that the survivor
of a dead process can clear them (`shtalk.server.cluster.nodes`).  Marking a device up
or down is one Lua script, atomic in Redis: of two processes that add a user's first
device, or remove their last one, at the same time, exactly one sees it, so a user
comes online once and goes offline once.

Revocations and lines for connections travel on the control channel; each peer applies
them to its own connections (`presence_handlers`).

When Redis does not answer (within ``timeout``) the relay answers from this process's
own view, as a single process would, and logs it; the heartbeat puts this process's
devices back once Redis answers again (`NodeWatch.resync`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from shtalk.server.chat.presence import Presence
from shtalk.server.cluster.control import ControlChannel, Handler
from shtalk.server.cluster.scripts import DEVICE_DOWN, DEVICE_UP, EXISTING
from shtalk.server.ishared import IPresenceRelay

log = Logger()


def field_of(node: str, device_id: str) -> str:
    return f"{node}|{device_id}"


@implementer(IPresenceRelay)
class ClusterRelay:
    def __init__(
        self, redis: Any, control: ControlChannel, prefix: str, clock: IReactorTime,
        timeout: float = 1.0,
    ) -> None:
        node = control.node
        if "|" in node:
            raise ValueError("a node name may not contain '|'")
        self.redis = redis
        self.control = control
        self.node = node
        self.clock = clock
        self.timeout = timeout
        self.presence_prefix = prefix + "presence:"
        self.node_users = f"{prefix}node-users:{node}"
        self.failures = 0

    def __repr__(self) -> str:
        return f"<ClusterRelay node={self.node}>"

    def key(self, user_id: int) -> str:
        return f"{self.presence_prefix}{user_id}"

    def _bounded(self, d: Deferred[Any], fallback: Any, what: str) -> Deferred[Any]:
        d.addTimeout(self.timeout, self.clock)

        def failed(failure: Any) -> Any:
            self.failures += 1
            log.warn("Redis presence {what} failed ({error}); answering from this process",
                     what=what, error=type(failure.value).__name__)
            return fallback

        return d.addErrback(failed)

    # who is online --------------------------------------------------------------------
    def device_up(self, user_id: int, device_id: str, first_here: bool) -> Deferred[bool]:
        d = DEVICE_UP.run(
            self.redis, [self.key(user_id), self.node_users],
            [field_of(self.node, device_id), int(self.clock.seconds()), user_id],
        )
        d.addCallback(lambda before: int(before) == 0)
        return self._bounded(d, first_here, "device up")

    def device_down(self, user_id: int, device_id: str, last_here: bool) -> Deferred[bool]:
        d = DEVICE_DOWN.run(
            self.redis, [self.key(user_id), self.node_users],
            [field_of(self.node, device_id), "1" if last_here else "0", user_id],
        )
        d.addCallback(lambda left: int(left) == 0)
        return self._bounded(d, last_here, "device down")

    def online_elsewhere(self, user_ids: Iterable[int]) -> Deferred[set[int]]:
        ids = list(user_ids)
        if not ids:
            return succeed(set())
        d = EXISTING.run(self.redis, [self.key(u) for u in ids], [])
        d.addCallback(lambda found: {ids[int(i) - 1] for i in found or ()})
        return self._bounded(d, set(), "look-up")

    @inlineCallbacks
    def _devices_elsewhere(self, user_id: int) -> Any:
        fields = yield self.redis.hkeys(self.key(user_id))
        mine = self.node + "|"
        return {
            f.partition("|")[2] for f in (_text(f) for f in fields or ()) if not f.startswith(mine)
        }

    def devices_elsewhere(self, user_id: int) -> Deferred[set[str]]:
        return self._bounded(self._devices_elsewhere(user_id), set(), "look-up")

    # what the peers apply -------------------------------------------------------------
    def send_to_users(self, user_ids: Iterable[int], line: bytes) -> None:
        ids = list(user_ids)
        if ids:
            self.control.publish("presence.line", {"users": ids, "line": line.decode()})

    def revoke_families(self, families: Iterable[str], reason: str) -> None:
        families = list(families)
        if families:
            self.control.publish(
                "presence.revoke_families", {"families": families, "reason": reason}
            )

    def revoke_device(self, user_id: int, device_id: str, reason: str) -> None:
        self.control.publish(
            "presence.revoke_device", {"user": user_id, "device": device_id, "reason": reason}
        )

    def revoke_user(self, user_id: int, reason: str) -> None:
        self.control.publish("presence.revoke_user", {"user": user_id, "reason": reason})


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def presence_handlers(presence: Presence) -> dict[str, Handler]:
    """What a peer's presence events do here: the same, to this process's connections."""

    def line(p: dict[str, Any]) -> None:
        presence.send_to_users_here([int(u) for u in p["users"]], str(p["line"]).encode())

    def families(p: dict[str, Any]) -> None:
        presence.revoke_families_here([str(f) for f in p["families"]], str(p["reason"]))

    def device(p: dict[str, Any]) -> None:
        presence.revoke_device_here(int(p["user"]), str(p["device"]), str(p["reason"]))

    def user(p: dict[str, Any]) -> None:
        presence.revoke_user_here(int(p["user"]), str(p["reason"]))

    return {
        "presence.line": line,
        "presence.revoke_families": families,
        "presence.revoke_device": device,
        "presence.revoke_user": user,
    }
