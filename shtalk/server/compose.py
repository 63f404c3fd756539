"""Wiring: the only place the server's objects are built and connected.

Every object takes its collaborators in its constructor; nothing is attached or
assigned after construction, so reading `build` top to bottom shows the whole server
(as magic-wormhole's ``_build_workers``).  `make_chat_service` adds what only a real
run has (the SQLite store, the bcrypt pool, keys from the data directory, the mailer,
the rate-limit backend, the operations service) and the service tree.

Nothing here does I/O beyond reading what the data directory already made sure of;
the store opens, and the bcrypt pool starts, in startService.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.application.service import IService
from twisted.cred.portal import Portal
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from shtalk.server.accounts import totp
from shtalk.server.accounts.captcha import CaptchaBook
from shtalk.server.accounts.gates import CaptchaDemands, Gates
from shtalk.server.accounts.mailcodes import MailedCodes
from shtalk.server.accounts.mailer import Mailer, make_mailer
from shtalk.server.accounts.newpassword import NewPassword
from shtalk.server.accounts.registration import Registration
from shtalk.server.accounts.security import AccountSecurity
from shtalk.server.accounts.shared import Shared
from shtalk.server.accounts.throttle import AuthThrottle
from shtalk.server.accounts.twofactor import TwoFactor
from shtalk.server.accounts.verification import EmailVerification
from shtalk.server.chat.audience import Audience
from shtalk.server.chat.avatar import ChatParts
from shtalk.server.chat.delivery import LocalBus
from shtalk.server.chat.fanout import FanOutCache
from shtalk.server.chat.presence import Presence
from shtalk.server.chat.rooms import Rooms
from shtalk.server.chat.service import ChatService
from shtalk.server.chat.users import Users
from shtalk.server.cluster import parts as cluster_parts
from shtalk.server.cluster.bus import RedisBus
from shtalk.server.cluster.parts import ALONE, Sharing
from shtalk.server.config import (
    MonitorSection,
    RateLimitSection,
    ServerConfig,
    SmtpSection,
    StartupError,
    StoreSection,
    ThrottleSection,
)
from shtalk.server.config.cluster import ClusterSection, cluster_ratelimit
from shtalk.server.cred.checkers import AccessTokenChecker, BcryptChecker
from shtalk.server.cred.passwords import PasswordHasher
from shtalk.server.cred.realm import ChatRealm
from shtalk.server.cred.sessions import Sessions
from shtalk.server.cred.tokens import TokenIssuer
from shtalk.server.datadir import DataDir
from shtalk.server.eserver import CorruptStore
from shtalk.server.iserver import IDeliveryBus, IStore
from shtalk.server.ishared import IAuthThrottle, ICaptchaDemands, IFlagStore
from shtalk.server.net.account import AccountHandlers
from shtalk.server.net.addresscounts import RedisAddressCounts
from shtalk.server.net.admission import PendingHandshakes
from shtalk.server.net.audit import Audit
from shtalk.server.net.backlog import Backlog
from shtalk.server.net.chathandlers import ChatHandlers
from shtalk.server.net.connection import ShtalkServerFactory
from shtalk.server.net.limits import RequestLimits
from shtalk.server.net.login import LoginHandlers
from shtalk.server.ops.actions import MonitorActions
from shtalk.server.ops.moderation import Moderation
from shtalk.server.ops.monitor import Monitor
from shtalk.server.ops.ratelimit import FallbackBuckets, MemoryBuckets, RateLimiter
from shtalk.server.ops.redisbackend import RedisBuckets
from shtalk.server.ops.service import Operations, OperationsService
from shtalk.server.services import ChatServerService, StoreService
from shtalk.server.store.sqlite import SQLiteStore, check_database_file
from shtalk.server.testclock import ENV as TEST_CLOCK_ENV
from shtalk.server.testclock import clock_from_environment

log = Logger()

CAPTCHA_ANSWERS_ENV = "SHTALK_TEST_CAPTCHA_ANSWERS"


@dataclass(frozen=True)
class Server:
    """Everything the server is made of, connected (the listener serves ``factory``)."""

    store: IStore
    hasher: PasswordHasher
    clock: IReactorTime
    users: Users
    rooms: Rooms
    presence: Presence
    chat: ChatService
    sessions: Sessions
    demands: ICaptchaDemands
    security: AccountSecurity
    factory: ShtalkServerFactory
    limiter: RateLimiter | None = None
    monitor: Monitor | None = None
    moderation: Moderation | None = None
    #: Started and stopped with the server: a cluster's bus, control listener, heartbeats.
    services: tuple[IService, ...] = ()


def build(
    config: ServerConfig,
    store: IStore,
    hasher: PasswordHasher,
    issuer: TokenIssuer,
    mailer: Mailer,
    clock: IReactorTime,
    storage_key: bytes,
    *,
    limiter: RateLimiter | None = None,
    flags: Path | None = None,
    admission: PendingHandshakes | None = None,
    captcha_answers: str | None = None,
    sharing: Sharing = ALONE,
    reactor: Any = None,
) -> Server:
    """The server's objects over a store that is not yet open.

    ``limiter`` None: requests are not rate limited.  ``flags`` (where the monitor keeps
    its flags) None: no monitoring, no moderation, no reports.  ``sharing``: what this
    process shares with the others of a cluster (``reactor``: their timers' clock)."""
    server, storage = config.server, config.storage
    fanout = FanOutCache()
    users = Users(store, sharing.control)
    rooms = Rooms(store, users, fanout, sharing.control)
    presence = Presence(fanout, sharing.relay)
    audience = Audience(store, presence, rooms, users)
    local = LocalBus(presence, rooms, users, fanout)
    bus: IDeliveryBus = local
    demands = sharing.demands or CaptchaDemands(clock)
    sessions = Sessions(store, issuer, clock)
    services: list[IService] = list(sharing.services)
    if sharing.links is not None:
        cluster = config.section(ClusterSection)
        redis_bus = RedisBus(
            local, store, rooms, reactor, reactor, cluster.redis_url, cluster.prefix,
            sharing.links.control.node, cluster.gap_wait, cluster.reconcile_interval,
        )
        bus = redis_bus
        counts = sharing.counts

        def peer_died(name: str) -> None:
            redis_bus.reconcile()
            if isinstance(counts, RedisAddressCounts):
                counts.forget_node(name)

        services += [redis_bus, *cluster_parts.services(
            sharing.links, cluster, reactor, clock, store, presence, users, rooms, audience,
            on_peer_died=[peer_died])]

    moderation: Moderation | None = None
    monitor: Monitor | None = None
    if flags is not None:
        if limiter is None:
            limiter = RateLimiter(config.section(RateLimitSection), clock)
        moderation = Moderation(store, hasher, users, presence, rooms, clock)
        watch = config.section(MonitorSection)
        actions = MonitorActions(demands, limiter, moderation, watch)
        monitor = Monitor(watch, clock, sharing.flags or flags, partners=store.dm_partners,
                          actions=actions.table(), load_now=sharing.flags is None)

    parts = ChatParts(
        store, users, rooms, presence, audience, bus, clock, storage.max_envelope_bytes, monitor
    )
    security = build_security(
        config, store, hasher, mailer, clock, storage_key, users, demands, captcha_answers,
        sharing.throttle,
    )
    portal = Portal(
        ChatRealm(parts),
        [
            BcryptChecker(store, hasher, security.two_factor.second_factor),
            AccessTokenChecker(store, issuer, clock.seconds),
        ],
    )
    limits = RequestLimits(limiter, security.gates, clock)
    handlers = [
        LoginHandlers(portal, sessions, presence, security.gates, Backlog(users, audience)),
        ChatHandlers(store, security.gates, demands, moderation, monitor),
        AccountHandlers(store, security, sessions, presence, limits),
    ]
    factory = ShtalkServerFactory(
        clock, handlers, limits, Audit(monitor), presence, admission,
        max_line_length=server.max_line_length,
        pre_auth_timeout=float(server.pre_auth_timeout),
        idle_timeout=float(server.idle_timeout),
        max_connections_per_address=server.max_connections_per_address,
        max_envelope_bytes=storage.max_envelope_bytes,
        min_password_length=config.accounts.min_password_length,
        captcha_ttl=float(config.accounts.captcha_ttl),
        counts=sharing.counts,
    )
    return Server(
        store, hasher, clock, users, rooms, presence, ChatService(store, clock), sessions,
        demands, security, factory, limiter, monitor, moderation, tuple(services),
    )


def build_security(
    config: ServerConfig,
    store: IStore,
    hasher: PasswordHasher,
    mailer: Mailer,
    clock: IReactorTime,
    storage_key: bytes,
    users: Users,
    demands: ICaptchaDemands,
    captcha_answers: str | None = None,
    throttle: IAuthThrottle | None = None,
) -> AccountSecurity:
    """Registration, email codes, CAPTCHA gates, TOTP and throttling, over one store."""
    accounts = config.accounts
    gates = Gates(
        CaptchaBook(clock, ttl=float(accounts.captcha_ttl)),
        throttle or AuthThrottle(clock, config.section(ThrottleSection)),
        demands, users, accounts, captcha_answers,
    )
    shared = Shared(store, store.codes, gates, users, hasher, clock, accounts)
    mailed = MailedCodes(shared, mailer)
    status = "pending" if accounts.require_email_verification else "active"
    return AccountSecurity(
        shared,
        Registration(store, hasher, accounts.min_password_length, status),
        EmailVerification(shared, mailed),
        NewPassword(shared, mailed),
        TwoFactor(shared, totp.SecretBox(storage_key)),
        mailer,
    )


def make_limiter(config: RateLimitSection, clock: IReactorTime) -> RateLimiter:
    """The limiter the config asks for (Redis wrapped in the memory fallback)."""
    if not config.enabled or config.backend == "memory":
        return RateLimiter(config, clock)
    redis = RedisBuckets(
        config.redis_url, config.redis_prefix, clock, timeout=config.redis_timeout
    )
    backend = FallbackBuckets(redis, MemoryBuckets(clock), clock, config.redis_retry)
    return RateLimiter(config, clock, backend)


def make_store(config: ServerConfig, datadir: DataDir, clock: IReactorTime) -> IStore:
    """SQLite in the data directory, or PostgreSQL when ``[store] url`` is set; either
    checked now, before the reactor runs, so a bad database is one line at start-up."""
    chosen, retention = config.section(StoreSection), float(config.storage.retention)
    try:
        if chosen.postgres:
            from shtalk.server.store.pg.store import PostgresStore, check_database

            check_database(chosen.url)
            return PostgresStore(chosen.url, datadir.storage_key(), clock=clock,
                                 retention=retention, readers=chosen.readers)
        check_database_file(str(datadir.db_path))
    except CorruptStore as e:
        raise StartupError(str(e)) from None
    return SQLiteStore(str(datadir.db_path), datadir.storage_key(), clock=clock,
                       retention=retention)


def make_flag_store(store: IStore, datadir: DataDir) -> IFlagStore:
    """The monitoring's flags in the cluster's database (every process sees them)."""
    from shtalk.server.store.pg.flags import PostgresFlagStore
    from shtalk.server.store.pg.store import PostgresStore

    if not isinstance(store, PostgresStore):
        raise StartupError("the processes of a cluster share one PostgreSQL database: "
                           "set [store] url = postgresql://...")
    return PostgresFlagStore(store, datadir.storage_key())


def make_chat_service(
    config: ServerConfig, datadir: DataDir, clock: IReactorTime | None = None
) -> ChatServerService:
    """``twistd shtalk``'s server: everything but the listener, as a service tree."""
    from twisted.internet import reactor

    if clock is None:
        clock = clock_from_environment(reactor)
        if clock is not reactor:
            log.warn("INSECURE test hook: the server's clock is shifted by the seconds in "
                     "{path} ({env})", path=getattr(clock, "path", ""), env=TEST_CLOCK_ENV)
    assert clock is not None
    accounts, tokens = config.accounts, config.tokens
    store = make_store(config, datadir, clock)
    hasher = PasswordHasher(
        clock, cost=accounts.bcrypt_cost, nice=accounts.bcrypt_nice  # type: ignore[arg-type]
    )
    issuer = TokenIssuer(
        datadir.jwt_private_key_pem(),
        issuer=tokens.issuer,
        access_ttl=tokens.access_ttl,
        refresh_ttl=tokens.refresh_ttl,
    )
    mailer = make_mailer(config.section(SmtpSection), datadir.outbox_dir, clock, reactor,
                         keep_for=float(accounts.email_code_ttl))
    answers = os.environ.get(CAPTCHA_ANSWERS_ENV) or None
    if answers:
        log.warn("INSECURE test hook: CAPTCHA answers are written to {path}", path=answers)
    cluster = config.section(ClusterSection)
    limiter = make_limiter(cluster_ratelimit(cluster, config.section(RateLimitSection)), clock)
    sharing = ALONE
    if cluster.enabled:
        sharing = cluster_parts.cluster_sharing(
            cluster, datadir.storage_key(), reactor, clock, config.section(ThrottleSection),
            config.server.max_connections_per_address, make_flag_store(store, datadir),
        )
    parts = build(
        config, store, hasher, issuer, mailer, clock, datadir.storage_key(),
        limiter=limiter, flags=datadir.path / "flags.json",
        admission=PendingHandshakes.from_config(config.server, clock), captcha_answers=answers,
        sharing=sharing, reactor=reactor,
    )
    assert parts.monitor is not None and parts.moderation is not None
    operations = Operations(
        parts.factory, parts.presence, parts.users, limiter, parts.monitor, parts.moderation,
        config,
    )
    top = ChatServerService(parts.factory, store, [mailer.description])
    for service in (
        StoreService(store, hasher),
        parts.chat,
        parts.security,
        OperationsService(operations, datadir, clock),
        *parts.services,
    ):
        service.setServiceParent(top)  # type: ignore[no-untyped-call]
    return top
