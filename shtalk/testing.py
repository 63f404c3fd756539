"""Fakes and builders that several test modules share (kept out of shtalk/test)."""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from zope.interface import implementer

from shtalk.server.accounts.mailer import Mailer
from shtalk.server.accounts.security import AccountSecurity
from shtalk.server.chat.service import ChatService
from shtalk.server.compose import make_factory
from shtalk.server.config import AccountsSection, ThrottleSection
from shtalk.server.cred.passwords import PasswordHasher
from shtalk.server.cred.tokens import TokenIssuer
from shtalk.server.net.connection import ShtalkServerFactory, ShtalkServerProtocol
from shtalk.server.store.sqlite import SQLiteStore

GOOD_PASSWORD = "tangerine-quokka-43"  # noqa: S105 - a test fixture


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
    store: SQLiteStore
    hasher: PasswordHasher
    chat: ChatService
    factory: ShtalkServerFactory
    clock: WallClock
    security: AccountSecurity
    mailer: MemoryMailer

    async def close(self) -> None:
        self.security.stopService()
        self.chat.stopService()
        self.hasher.stop()
        await self.store.close()


async def build_server(
    directory: str,
    *,
    max_per_address: int = 20,
    pre_auth: float = 30.0,
    idle: float = 600.0,
    accounts: AccountsSection | None = None,
    throttle: ThrottleSection | None = None,
) -> ServerParts:
    """The real service objects over a real SQLite file, with protocol timers
    on a test clock (bcrypt and SQLite still run in real threads).

    Account security is on, but by default without email verification and CAPTCHA
    (``accounts`` turns them on); mail goes to a `MemoryMailer` (``parts.mailer``)."""
    os.makedirs(directory, exist_ok=True)
    clock = WallClock()
    store = SQLiteStore(os.path.join(directory, "db.sqlite3"), os.urandom(32), reactor=reactor)
    await store.open()
    hasher = PasswordHasher(reactor, cost=4, threads=1)  # type: ignore[arg-type]
    hasher.start()
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    issuer = TokenIssuer(pem)
    chat = ChatService(store, hasher, issuer, clock)
    if accounts is None:
        accounts = AccountsSection(require_email_verification=False, require_captcha=False)
    mailer = MemoryMailer(clock)
    security = AccountSecurity(
        store, hasher, mailer, clock, os.urandom(32), accounts, throttle or ThrottleSection()
    )
    security.attach_chat(chat)
    chat.new_account_status = "pending" if accounts.require_email_verification else "active"
    factory = make_factory(
        chat,
        store,
        hasher,
        issuer,
        security,
        clock,
        pre_auth_timeout=pre_auth,
        idle_timeout=idle,
        max_connections_per_address=max_per_address,
    )
    return ServerParts(store, hasher, chat, factory, clock, security, mailer)


class Peer:
    """One client connection over a StringTransport; lines in, parsed JSON out."""

    def __init__(self, factory: ShtalkServerFactory, host: str = "192.0.2.1") -> None:
        self.transport: StringTransport = StringTransport(
            peerAddress=IPv4Address("TCP", host, 40000)
        )
        proto = factory.buildProtocol(self.transport.getPeer())
        assert isinstance(proto, ShtalkServerProtocol)
        self.proto: ShtalkServerProtocol = proto
        self.proto.makeConnection(self.transport)
        self._seen: int = 0
        self.received: list[dict[str, Any]] = []
        self._next_id: int = 0

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

    def find_reply(self, rid: int) -> dict[str, Any] | None:
        self.lines()
        for ln in self.received:
            if "id" in ln and ln["id"] == rid:
                return ln
        return None

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


def spin(seconds: float = 0.0) -> Deferred[None]:
    """Let the real reactor run for ``seconds``: for tests that wait on real threads
    (bcrypt, SQLite); a test of timers uses a `Clock` instead."""
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)  # type: ignore[attr-defined]
    return d


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
