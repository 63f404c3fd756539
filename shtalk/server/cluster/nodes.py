"""Processes watching each other: heartbeats, and the survivor's clean-up of a dead one.

Every ``heartbeat_interval`` a process sets ``{prefix}node:{name}`` to expire after
``node_timeout`` and keeps its name in the registry ``{prefix}nodes``; in the same beat it
looks for registered processes whose key expired.  For each, one survivor (whoever
takes ``{prefix}reap:{name}`` with SET NX) removes the dead process's presence fields in
one script, announces offline the users left with no device anywhere, and calls the
``on_peer_died`` hooks (the bus reconciles its mailboxes; shared counts drop the dead
process's share).  With the defaults a killed process is cleared within
``node_timeout + heartbeat_interval`` (8 s).

At start, after a beat that could not reach Redis, and when it finds itself cleared (a
long pause, a Redis restart), a process replaces its presence fields with what it
serves now (`resync`): what an earlier process of the same name left, or a departure
Redis did not hear of, goes; what Redis lost comes back.  At a clean stop it deletes its
key, so the survivors clear it at their next beat.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, inlineCallbacks, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from shtalk.server.chat.presence import Presence
from shtalk.server.cluster.presence import ClusterRelay
from shtalk.server.cluster.scripts import DEAD_NODES, HEARTBEAT, REAP
from shtalk.server.config.cluster import ClusterSection

log = Logger()

UserHook = Callable[[int], object]


class NodeWatch(Service):
    name = "cluster-nodes"

    def __init__(
        self,
        redis: Any,
        relay: ClusterRelay,
        presence: Presence,
        settings: ClusterSection,
        clock: IReactorTime,
        on_online: UserHook,
        on_offline: UserHook,
        on_peer_died: Sequence[Callable[[str], object]] = (),
    ) -> None:
        self.redis = redis
        self.relay = relay
        self.presence = presence
        self.node = relay.node
        self.prefix = settings.prefix
        self.interval = settings.heartbeat_interval
        self.ttl_ms = int(settings.node_timeout * 1000)
        self.clock = clock
        self.on_online = on_online
        self.on_offline = on_offline
        self.on_peer_died = list(on_peer_died)
        self.nodes_key = self.prefix + "nodes"
        self.beats = 0
        self.reaped: list[str] = []  # peers this process cleared (for operators and tests)
        self._beating: Deferred[Any] | None = None
        self._stale = True  # our fields may be missing from Redis: put them back
        self._loop = LoopingCall(self.beat)
        self._loop.clock = clock

    def __repr__(self) -> str:
        return f"<NodeWatch node={self.node}>"

    def node_key(self, name: str) -> str:
        return f"{self.prefix}node:{name}"

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._loop.start(self.interval, now=True)  # the first beat resyncs

    @inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()  # type: ignore[no-untyped-call]
        if self._loop.running:
            self._loop.stop()
        if self._beating is not None:
            yield self._beating
        try:
            # The survivors clear this node at their next beat.
            yield self.redis.delete(self.node_key(self.node)).addTimeout(self.interval, self.clock)
        except Exception:
            log.warn("Redis: could not remove this node's heartbeat at stop")

    def beat(self) -> Deferred[Any]:
        """One heartbeat (never fails: a failed beat is logged and retried next time)."""
        self._beating = d = self._beat()
        d.addTimeout(self.interval * 2, self.clock)
        d.addErrback(self._missed)
        return d

    def _missed(self, failure: Any) -> None:
        self._stale = True
        log.warn("cluster heartbeat failed: {error}", error=type(failure.value).__name__)

    @inlineCallbacks
    def _beat(self) -> Any:
        was = yield HEARTBEAT.run(
            self.redis, [self.node_key(self.node), self.nodes_key],
            [self.node, self.ttl_ms, int(self.clock.seconds())],
        )
        if self.beats and not int(was):
            self._stale = True  # a survivor cleared this node, or Redis lost its data
        self.beats += 1
        if self._stale:
            self._stale = False
            yield self.resync()
        dead = yield DEAD_NODES.run(
            self.redis, [self.nodes_key], [self.prefix + "node:", self.node]
        )
        for name in dead or ():
            yield self.reap(_text(name))

    @inlineCallbacks
    def resync(self) -> Any:
        """Make Redis say what this process serves: its fields are replaced by one per
        device connected now.  Users that makes first online anywhere are announced
        online; users whose only fields were stale ones of this process (a departure
        Redis did not hear of, an earlier process of this name) are announced offline."""
        gone = yield REAP.run(
            self.redis, [f"{self.prefix}node-users:{self.node}", self.nodes_key],
            [self.prefix + "presence:", self.node],
        )
        emptied = {int(uid) for uid in gone or ()}
        for user_id, devices in list(self.presence.online.items()):
            for device_id in list(devices):
                first = yield self.relay.device_up(user_id, device_id, False)
                if first and user_id not in emptied:  # else: online all along
                    yield self._tell(self.on_online, user_id)
        for user_id in emptied:
            if not self.presence.is_online(user_id):
                yield self._tell(self.on_offline, user_id)
        yield HEARTBEAT.run(  # the registry entry the clean-up removed
            self.redis, [self.node_key(self.node), self.nodes_key],
            [self.node, self.ttl_ms, int(self.clock.seconds())],
        )

    @inlineCallbacks
    def _tell(self, hook: UserHook, user_id: int) -> Any:
        try:
            yield maybeDeferred(hook, user_id)
        except Exception:
            log.failure("announcing a user's presence after a cluster change")

    @inlineCallbacks
    def reap(self, name: str) -> Any:
        """Clear a dead peer, if this process wins the right to; True if it did."""
        won = yield self.redis.set(
            f"{self.prefix}reap:{name}", self.node, only_if_not_exists=True,
            pexpire=self.ttl_ms,
        )
        if not won:
            return False
        log.warn("cluster node {name} stopped beating; clearing its presence", name=name)
        yield self._clear(name)
        self.reaped.append(name)
        for hook in self.on_peer_died:
            try:
                yield maybeDeferred(hook, name)
            except Exception:
                log.failure("after cluster node {name} died", name=name)
        return True

    @inlineCallbacks
    def _clear(self, name: str) -> Any:
        gone = yield REAP.run(
            self.redis, [f"{self.prefix}node-users:{name}", self.nodes_key],
            [self.prefix + "presence:", name],
        )
        for uid in gone or ():
            user_id = int(uid)
            if not self.presence.is_online(user_id):  # else: here (resync marks it up)
                yield self._tell(self.on_offline, user_id)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
