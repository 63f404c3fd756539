"""What a process in cluster mode adds to the server, in the two steps wiring needs.

`links` comes first (the caches and `Presence` take its control channel and relay in
their constructors); `services` comes once presence, caches and audience exist (the
control listener's handler table and the heartbeat's announcements use them).  Both are
called only from ``shtalk.server.compose``.

Heartbeats, timeouts and the control events' timestamps run on the ``reactor`` (real
time), not on the server's clock: a test clock shifted in one process (or a manual
clock in unit tests) would make the peers see it as dead, or its events as stale.  Only
the session recheck compares with the server's clock, as the sessions were made on it.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.application.service import IService, Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from shtalk.server.accounts.redisdemands import RedisCaptchaDemands
from shtalk.server.accounts.redisthrottle import RedisThrottle
from shtalk.server.chat.audience import Audience
from shtalk.server.chat.presence import Presence
from shtalk.server.chat.rooms import Rooms
from shtalk.server.chat.users import Users
from shtalk.server.cluster.control import ControlChannel, ControlListener, Handler, control_key
from shtalk.server.cluster.handlers import cache_handlers, recheck_sessions
from shtalk.server.cluster.nodes import NodeWatch
from shtalk.server.cluster.presence import ClusterRelay, presence_handlers
from shtalk.server.cluster.redisconn import commands
from shtalk.server.config import ThrottleSection
from shtalk.server.config.cluster import ClusterSection
from shtalk.server.iserver import IStore
from shtalk.server.ishared import (
    NO_CONTROL,
    IAddressCounts,
    IAuthThrottle,
    ICaptchaDemands,
    IClusterControl,
    IFlagStore,
    IPresenceRelay,
)
from shtalk.server.net.addresscounts import RedisAddressCounts
from shtalk.server.ops.redislink import RedisLink


def node_name(settings: ClusterSection) -> str:
    """The configured name, or host name, pid and a random tag (unique per start)."""
    if settings.node_name:
        return settings.node_name
    host = socket.gethostname().replace("|", "-")
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass(frozen=True, repr=False)
class Links:
    """The Redis connection, the control channel and the presence relay of a process."""

    redis: Any
    control: ControlChannel
    relay: ClusterRelay


def links(
    settings: ClusterSection, storage_key: bytes, reactor: IReactorTime, name: str = ""
) -> Links:
    """``name``: this process's (computed once: `node_name` draws a new tag each call)."""
    redis = commands(settings.redis_url, timeout=settings.node_timeout)
    control = ControlChannel(
        redis, settings.prefix, name or node_name(settings), control_key(storage_key), reactor
    )
    relay = ClusterRelay(
        redis, control, settings.prefix, reactor, timeout=settings.heartbeat_interval
    )
    return Links(redis, control, relay)


def services(
    links: Links,
    settings: ClusterSection,
    reactor: Any,  # IReactorTime and IReactorTCP
    clock: IReactorTime,
    store: IStore,
    presence: Presence,
    users: Users,
    rooms: Rooms,
    audience: Audience,
    on_peer_died: Sequence[Callable[[str], object]] = (),
    handlers: Mapping[str, Handler] | None = None,
) -> tuple[ControlListener, NodeWatch]:
    """The control listener and the heartbeats (children of the server's service).

    ``on_peer_died``: called with a dead process's name once its presence is cleared
    (the bus reconciles, shared counts forget it).  ``handlers``: more control events
    (kind -> function of the payload) for other parts that publish their own."""
    table = {**presence_handlers(presence), **cache_handlers(users, rooms), **(handlers or {})}
    listener = ControlListener(
        links.control, table, settings.redis_url, reactor, reactor, settings,
        on_resubscribed=[lambda: recheck_sessions(presence, store, clock)],
    )
    watch = NodeWatch(
        links.redis, links.relay, presence, settings, reactor,
        on_online=lambda uid: audience.announce_presence(uid, True),
        on_offline=lambda uid: audience.announce_presence(uid, False),
        on_peer_died=on_peer_died,
    )
    return listener, watch


@dataclass(frozen=True, repr=False)
class Sharing:
    """What a process keeps in common with its peers, or, with the defaults, alone.

    `build` (shtalk.server.compose) takes one: the embedded server the defaults, a
    process of a cluster `cluster_sharing`'s.  ``services`` are started and stopped
    with the server (the Redis-backed parts' timers)."""

    links: Links | None = None
    throttle: IAuthThrottle | None = None  # None: the failures counted in this process
    demands: ICaptchaDemands | None = None
    counts: IAddressCounts | None = None
    flags: IFlagStore | None = None  # None: the flags in the data directory's file
    services: tuple[IService, ...] = ()

    @property
    def control(self) -> IClusterControl:
        return self.links.control if self.links is not None else NO_CONTROL

    @property
    def relay(self) -> IPresenceRelay | None:
        return self.links.relay if self.links is not None else None


class Timers(Service):
    """Starts and stops a part that keeps timers of its own (``start``/``stop``)."""

    def __init__(self, part: Any) -> None:
        self.part = part

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.part.start()

    def stopService(self) -> Deferred[None] | None:
        super().stopService()  # type: ignore[no-untyped-call]
        self.part.stop()
        return None


def cluster_sharing(
    settings: ClusterSection,
    storage_key: bytes,
    reactor: IReactorTime,
    clock: IReactorTime,
    throttle: ThrottleSection,
    max_per_address: int,
    flags: IFlagStore,
) -> Sharing:
    """A process of a cluster: the control channel and presence relay (`links`), and
    the failure throttle, CAPTCHA demands and connection counts in the cluster's Redis."""
    name = node_name(settings)
    link = RedisLink(settings.redis_url, settings.prefix, clock)
    demands = RedisCaptchaDemands(link, clock)
    counts = RedisAddressCounts(link, name, max_per_address, clock)
    return Sharing(
        links(settings, storage_key, reactor, name), RedisThrottle(link, clock, throttle),
        demands, counts, flags, (Timers(demands), Timers(counts)),
    )


#: The embedded server: nothing shared.
ALONE = Sharing()
