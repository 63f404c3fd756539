"""Wiring: config and data directory in, the chat service tree out.

Nothing here does I/O beyond reading what the data directory already made
sure of; the store opens, and the bcrypt pool starts, in startService.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import MultiService, Service
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from shtalk.server.accounts.security import AccountSecurity, make_account_security
from shtalk.server.chat.service import ChatService
from shtalk.server.config import ServerConfig, StartupError
from shtalk.server.cred.checkers import AccessTokenChecker, BcryptChecker, ChatRealm
from shtalk.server.cred.passwords import PasswordHasher
from shtalk.server.cred.tokens import TokenIssuer
from shtalk.server.datadir import DataDir
from shtalk.server.iserver import CorruptStore, IStore
from shtalk.server.net.admission import PendingHandshakes
from shtalk.server.net.connection import ShtalkServerFactory
from shtalk.server.ops.service import install_operations
from shtalk.server.store.sqlite import SQLiteStore, check_database_file
from shtalk.server.testclock import ENV as TEST_CLOCK_ENV
from shtalk.server.testclock import clock_from_environment

log = Logger()


class StoreService(Service):
    """Opens the store when the service tree starts and closes it last."""

    name = "store"

    def __init__(self, store: IStore, hasher: PasswordHasher) -> None:
        self.store = store
        self.hasher = hasher

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.hasher.start()
        d = self.store.open()
        d.addErrback(self._failed)

    def _failed(self, failure: Any) -> None:
        from twisted.internet import reactor

        log.failure("the database could not be opened", failure)
        reactor.stop()  # type: ignore[attr-defined]

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        self.hasher.stop()
        return self.store.close()


class ChatServerService(MultiService):
    """The whole server minus its listener; ``factory`` is what the listener serves."""

    factory: ShtalkServerFactory
    chat: ChatService
    store: IStore
    startup_notes: list[str]


def make_factory(
    chat: ChatService,
    store: IStore,
    hasher: PasswordHasher,
    issuer: TokenIssuer,
    security: AccountSecurity,
    clock: IReactorTime,
    **limits: Any,
) -> ShtalkServerFactory:
    """The portal (password and token checkers, the chat realm) and the protocol
    factory over it; ``limits`` are ShtalkServerFactory's keyword arguments."""
    portal = Portal(
        ChatRealm(chat),
        [
            BcryptChecker(store, hasher, security.second_factor),
            AccessTokenChecker(store, issuer, clock.seconds),
        ],
    )
    factory = ShtalkServerFactory(chat, portal, clock, **limits)
    factory.security = security
    return factory


def make_chat_service(
    config: ServerConfig, datadir: DataDir, clock: IReactorTime | None = None
) -> ChatServerService:
    if clock is None:
        from twisted.internet import reactor

        clock = clock_from_environment(reactor)
        if clock is not reactor:
            log.warn("INSECURE test hook: the server's clock is shifted by the seconds in "
                     "{path} ({env})", path=getattr(clock, "path", ""), env=TEST_CLOCK_ENV)
    assert clock is not None
    db_path = str(datadir.db_path)
    try:
        check_database_file(db_path)
    except CorruptStore as e:
        raise StartupError(str(e)) from None
    server, accounts, tokens, storage = (
        config.server,
        config.accounts,
        config.tokens,
        config.storage,
    )
    store = SQLiteStore(
        db_path, datadir.storage_key(), clock=clock, retention=float(storage.retention)
    )
    hasher = PasswordHasher(
        clock, cost=accounts.bcrypt_cost, nice=accounts.bcrypt_nice  # type: ignore[arg-type]
    )
    issuer = TokenIssuer(
        datadir.jwt_private_key_pem(),
        issuer=tokens.issuer,
        access_ttl=tokens.access_ttl,
        refresh_ttl=tokens.refresh_ttl,
    )
    chat = ChatService(
        store,
        hasher,
        issuer,
        clock,
        min_password_length=accounts.min_password_length,
        retention=float(storage.retention),
        max_envelope_bytes=storage.max_envelope_bytes,
    )
    # Account security (issue 6): email codes, CAPTCHA, TOTP, throttling.
    security = make_account_security(config, datadir, store, hasher, chat, clock)
    factory = make_factory(
        chat,
        store,
        hasher,
        issuer,
        security,
        clock,
        max_line_length=server.max_line_length,
        pre_auth_timeout=float(server.pre_auth_timeout),
        idle_timeout=float(server.idle_timeout),
        max_connections_per_address=server.max_connections_per_address,
    )
    factory.admission = PendingHandshakes.from_config(server, clock)
    top = ChatServerService()  # type: ignore[no-untyped-call]
    StoreService(store, hasher).setServiceParent(top)  # type: ignore[no-untyped-call]
    chat.setServiceParent(top)  # type: ignore[no-untyped-call]
    security.setServiceParent(top)  # type: ignore[no-untyped-call]
    top.startup_notes = [security.mailer.description]
    # Operations (issue 7): rate limits, sealed log, monitor, metrics, admin socket.
    install_operations(top, config, datadir, chat, factory, clock)
    top.factory = factory
    top.chat = chat
    top.store = store
    return top
