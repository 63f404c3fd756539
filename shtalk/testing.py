"""Fakes and builders that several test modules share (kept out of shtalk/test)."""

from __future__ import annotations

import base64
import json
import os
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, gatherResults, succeed
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from shtalk.server import compose
from shtalk.server.accounts.mailer import Mailer
from shtalk.server.config import AccountsSection, ServerConfig, ServerSection, ThrottleSection
from shtalk.server.cred.passwords import PasswordHasher
from shtalk.server.cred.tokens import TokenIssuer
from shtalk.server.iserver import IStore
from shtalk.server.net.connection import ShtalkServerFactory, ShtalkServerProtocol
from shtalk.server.ops.ratelimit import RateLimiter
from shtalk.server.store.memory import MemoryStore
from shtalk.server.store.sqlite import READERS, SQLiteStore
from shtalk.sqlitefiles import SUFFIXES

GOOD_PASSWORD = "tangerine-quokka-43"  # noqa: S105 - a test fixture
T = TypeVar("T")


class WallClock(Clock):
    """A test clock whose time starts at the real time, so JWT ``iat`` is sane."""

    def __init__(self) -> None:
        super().__init__()
        import time

        self.rightNow = time.time()


class MemoryMailer(Mailer):
    """Keeps every mail (to, subject, body) in ``outbox`` instead of sending it."""

    def __init__(self, clock: Any) -> None:
        super().__init__(clock, "shtalk@test.invalid", retries=0)
        self.outbox: list[tuple[str, str, str]] = []
        self.description = "mail is kept in memory (tests)"

    def deliver_once(self, to: str, msg: Any) -> Any:
        from twisted.internet.defer import succeed

        self.outbox.append((to, str(msg["Subject"]), msg.get_content()))
        return succeed(None)

    def last_code(self, to: str | None = None) -> str:
        """The code in the newest mail (to ``to``, if given)."""
        import re

        for rcpt, _, body in reversed(self.outbox):
            if to is None or rcpt == to:
                m = re.search(r"^    (\S+)$", body, re.M)
                assert m is not None, body
                return m.group(1)
        raise AssertionError(f"no mail to {to}")


@dataclass
class ServerParts:
    """A server built by shtalk.server.compose for unit tests, and what they poke at."""

    server: compose.Server
    clock: WallClock
    mailer: MemoryMailer

    @property
    def store(self) -> Any:
        return self.server.store

    @property
    def factory(self) -> ShtalkServerFactory:
        return self.server.factory

    @property
    def security(self) -> Any:
        return self.server.security

    def limit(self, limiter: RateLimiter | None) -> None:
        """Rate limits from now on (None: none), as if the server had been built so."""
        self.server.factory.limits.limiter = limiter

    async def settle(self) -> None:
        """Let what the server already started in the store's threads finish, with its
        callbacks (the pushes and mails that follow a reply): a barrier through every
        reader thread, then the writer.  A store that answers at once needs none."""
        store = self.server.store
        if not isinstance(store, SQLiteStore):
            return
        barrier = threading.Barrier(READERS, timeout=30)
        await gatherResults([store.run_read(lambda _: barrier.wait()) for _ in range(READERS)])
        await store.run_write(lambda _: None)

    async def close(self) -> None:
        self.server.security.stopService()
        self.server.chat.stopService()
        self.server.hasher.stop()
        await self.server.store.close()


async def build_server(
    directory: str,
    *,
    store: IStore | str | None = None,
    max_per_address: int = 20,
    pre_auth: float = 30.0,
    idle: float = 600.0,
    accounts: AccountsSection | None = None,
    throttle: ThrottleSection | None = None,
    limiter: Any = None,
) -> ServerParts:
    """The server's objects as shtalk.server.compose connects them, over ``store`` (by
    default the in-memory store, which answers at once on the test clock; ``"sqlite"``:
    a real SQLite file in ``directory``, its work in real threads), opened here, with
    protocol timers on the test clock (bcrypt still runs in real threads).

    Account security is on, but by default without email verification and CAPTCHA
    (``accounts`` turns them on); mail goes to a `MemoryMailer` (``parts.mailer``).
    ``limiter``: a RateLimiter, or a function of the clock that makes one (None: no
    rate limits)."""
    os.makedirs(directory, exist_ok=True)
    clock = WallClock()
    if store is None:
        store = MemoryStore(clock)
    elif isinstance(store, str):
        assert store == "sqlite", store
        store = SQLiteStore(
            os.path.join(directory, "db.sqlite3"), os.urandom(32), reactor=reactor
        )
    await store.open()
    hasher = PasswordHasher(reactor, cost=4, threads=1)  # type: ignore[arg-type]
    hasher.start()
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    if accounts is None:
        accounts = AccountsSection(require_email_verification=False, require_captcha=False)
    config = ServerConfig(sections={
        "server": ServerSection(
            pre_auth_timeout=int(pre_auth), idle_timeout=int(idle),
            max_connections_per_address=max_per_address,
        ),
        "accounts": accounts,
        "throttle": throttle or ThrottleSection(),
    })
    if limiter is not None and not isinstance(limiter, RateLimiter):
        limiter = limiter(clock)
    mailer = MemoryMailer(clock)
    server = compose.build(
        config, store, hasher, TokenIssuer(pem), mailer, clock, os.urandom(32), limiter=limiter
    )
    return ServerParts(server, clock, mailer)


class _Transport(StringTransport):
    """A StringTransport that tells its Peer about each write."""

    def __init__(self, written: Callable[[], None], peer: IPv4Address) -> None:
        super().__init__(peerAddress=peer)
        self._written = written

    def write(self, data: bytes) -> None:
        super().write(data)
        self._written()


class Peer:
    """One client connection over a StringTransport; lines in, parsed JSON out.

    `reply` and `pushed` return Deferreds that fire when the awaited lines have been
    written (checked after each write, on the next reactor turn so the server's call
    chain completes first): tests wait for events, never poll."""

    timeout = 30.0  # generous: a reply that never comes fails the test, loudly

    def __init__(self, factory: ShtalkServerFactory, host: str = "192.0.2.1") -> None:
        self.transport: StringTransport = _Transport(
            self._written, IPv4Address("TCP", host, 40000)
        )
        self._seen: int = 0
        self.received: list[dict[str, Any]] = []
        self._next_id: int = 0
        self._waiters: list[tuple[Callable[[], Any], Deferred[Any]]] = []
        self._check_queued = False
        proto = factory.buildProtocol(self.transport.getPeer())
        assert isinstance(proto, ShtalkServerProtocol)
        self.proto: ShtalkServerProtocol = proto
        self.proto.makeConnection(self.transport)

    def send(self, obj: dict[str, Any] | bytes) -> None:
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode() + b"\n"
        self.proto.dataReceived(data)

    def request(self, rtype: str, **fields: Any) -> int:
        self._next_id += 1
        self.send({"id": self._next_id, "type": rtype, **fields})
        return self._next_id

    def lines(self) -> list[dict[str, Any]]:
        """Every line written since the last call (also kept in ``received``)."""
        data = self.transport.value()
        new, self._seen = data[self._seen :], len(data)
        parsed = [json.loads(raw) for raw in new.splitlines() if raw]
        self.received.extend(parsed)
        return parsed

    def pushes(self, ptype: str) -> list[dict[str, Any]]:
        """Every push of that type received so far."""
        self.lines()
        return [ln for ln in self.received if ln.get("type") == ptype and "id" not in ln]

    def find_reply(self, rid: Any) -> dict[str, Any] | None:
        self.lines()
        for ln in self.received:
            if "id" in ln and ln["id"] == rid:
                return ln
        return None

    # waiting for lines -------------------------------------------------------------
    def until(self, found: Callable[[], T | None], what: str) -> Deferred[T]:
        """Fires with ``found()`` once it is not None (``what`` names it on a timeout)."""
        value = found()
        if value is not None:
            return succeed(value)
        d: Deferred[T] = Deferred()
        self._waiters.append((found, d))

        def timed_out(failure: Failure) -> Failure:
            failure.trap(CancelledError)
            raise AssertionError(f"no {what} within {self.timeout} s")

        d.addTimeout(self.timeout, reactor)  # type: ignore[arg-type]
        return d.addErrback(timed_out)

    def reply(self, rid: Any) -> Deferred[dict[str, Any]]:
        return self.until(lambda: self.find_reply(rid), f"reply to {rid!r}")

    def pushed(self, ptype: str, count: int = 1) -> Deferred[list[dict[str, Any]]]:
        """Fires once ``count`` pushes of that type have come (with all of them)."""

        def enough() -> list[dict[str, Any]] | None:
            got = self.pushes(ptype)
            return got if len(got) >= count else None

        return self.until(enough, f"{count} {ptype!r} push(es)")

    def _written(self) -> None:
        if self._waiters and not self._check_queued:
            self._check_queued = True
            reactor.callLater(0, self._check)  # type: ignore[attr-defined]

    def _check(self) -> None:
        self._check_queued = False
        waiting, self._waiters = self._waiters, []
        for found, d in waiting:
            if d.called:
                continue
            value = found()
            if value is None:
                self._waiters.append((found, d))
            else:
                d.callback(value)

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting) or bool(
            getattr(self.transport, "disconnected", False)
        )


def rfc6238(
    secret_b32: str, at: float, digits: int = 6, step: int = 30, digest: str = "sha1"
) -> str:
    """RFC 6238 written from the RFC (HOTP of RFC 4226 over the time step)."""
    import hashlib
    import hmac
    import struct
    from base64 import b32decode

    key = b32decode(secret_b32 + "=" * (-len(secret_b32) % 8), casefold=True)
    counter = struct.pack(">Q", int(at // step))
    mac = hmac.new(key, counter, getattr(hashlib, digest)).digest()
    offset = mac[-1] & 0x0F
    value = struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF
    return str(value % 10**digits).zfill(digits)


def tempdir(case: Any) -> str:
    """A fresh directory under trial's ``_trial_temp`` (removed with it, never in /tmp)."""
    path: str = os.path.abspath(case.mktemp())
    os.makedirs(path)
    return path


# --- small helpers that unit test modules had each written for themselves --------------


def assert_private_files(case: Any, path: str) -> None:
    """Each of the SQLite database's files at ``path`` exists and is 0600 (both stores
    promise it, whatever the umask)."""
    for suffix in SUFFIXES:
        mode = stat.S_IMODE(os.stat(path + suffix).st_mode)
        case.assertEqual(mode, 0o600, suffix)


def b64(data: bytes) -> str:
    """Standard base64, as the wire carries binary fields (written here, not taken from
    the code under test)."""
    return base64.b64encode(data).decode("ascii")


def b64url(data: bytes) -> str:
    """Unpadded URL-safe base64, as in a JWT (RFC 7515)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


class Echo(Protocol):
    """Writes back what it receives: a server end for tests of the transport (TLS)."""

    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[union-attr]


@implementer(IHandshakeListener)
class TLSLineClient(Protocol):
    """Sends ``line`` once the TLS handshake completed and hangs up after a whole line
    came back; ``done`` fires with what came back (or fails: nothing came)."""

    def __init__(self, line: bytes = b"ping\n") -> None:
        self.line = line
        self.done: Deferred[bytes] = Deferred()
        self.received = b""

    def handshakeCompleted(self) -> None:
        self.transport.write(self.line)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        if self.received.endswith(b"\n"):
            self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        if self.received:
            self.done.callback(self.received)
        else:
            self.done.errback(reason)
