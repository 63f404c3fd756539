"""Helpers for the account-security system tests: a real SMTP server on loopback with
STARTTLS and AUTH (Twisted's ESMTP server), CAPTCHA answers, TOTP codes from oathtool
or an independent RFC 6238 implementation."""

from __future__ import annotations

import datetime
import ipaddress
import re
import shutil
import subprocess
import time
from email import message_from_bytes
from email.message import Message
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import defer
from twisted.internet.ssl import CertificateOptions
from twisted.mail import smtp
from twisted.mail._cred import LOGINCredentials, PLAINCredentials
from zope.interface import implementer

from shtalk.testing import rfc6238

SMTP_USER = b"shtalk-relay"
SMTP_PASSWORD = b"relay-secret-for-tests"


def make_cert(directory: Path) -> tuple[Path, Any]:
    """A self-signed ECDSA certificate for 127.0.0.1 and localhost; (PEM path, options)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test relay")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    pem = directory / "relay-ca.pem"
    pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    from OpenSSL import crypto

    options = CertificateOptions(
        privateKey=crypto.PKey.from_cryptography_key(key),
        certificate=crypto.X509.from_cryptography(cert),
    )
    return pem, options


class Mailbox:
    """What the relay received: (mail from, rcpt to, message, over TLS, authenticated)."""

    def __init__(self) -> None:
        self.mails: list[tuple[bytes, bytes, Message, bool, bool]] = []

    def to(self, address: str) -> list[Message]:
        return [m for _, rcpt, m, _, _ in self.mails if rcpt == address.encode()]


@implementer(smtp.IMessage)
class _Message:
    def __init__(self, box: Mailbox, proto: Any, origin: bytes, rcpt: bytes) -> None:
        self.box, self.proto, self.origin, self.rcpt = box, proto, origin, rcpt
        self.lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self.lines.append(line)

    def eomReceived(self) -> defer.Deferred[None]:
        msg = message_from_bytes(b"\n".join(self.lines))
        self.box.mails.append(
            (self.origin, self.rcpt, msg, bool(self.proto.startedTLS),
             bool(self.proto.authenticated)))
        return defer.succeed(None)

    def connectionLost(self) -> None:
        pass


@implementer(smtp.IMessageDelivery)
class _Delivery:
    def __init__(self, box: Mailbox) -> None:
        self.box = box
        self.proto: Any = None
        self.origin = b""

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> bytes:
        return b"Received: from shtalk (test relay)"

    def validateFrom(self, helo: Any, origin: Any) -> Any:
        self.origin = bytes(str(origin), "ascii")
        return origin

    def validateTo(self, user: Any) -> Any:
        rcpt = bytes(str(user.dest), "ascii")
        return lambda: _Message(self.box, self.proto, self.origin, rcpt)


@implementer(IRealm)
class _Realm:
    def __init__(self, box: Mailbox) -> None:
        self.box = box

    def requestAvatar(self, avatarId: Any, mind: Any, *interfaces: Any) -> Any:
        return smtp.IMessageDelivery, _Delivery(self.box), lambda: None


class _RelayESMTP(smtp.ESMTP):
    """Refuses MAIL before STARTTLS and AUTH, like a submission port should."""

    def do_MAIL(self, rest: bytes) -> None:
        if not self.startedTLS:
            self.sendCode(530, b"5.7.0 Must issue a STARTTLS command first")
            return
        if not self.authenticated:
            self.sendCode(530, b"5.7.0 Authentication required")
            return
        if self.delivery is not None:
            self.delivery.proto = self
        super().do_MAIL(rest)


class RelayFactory(smtp.SMTPFactory):
    protocol = _RelayESMTP

    def __init__(self, box: Mailbox, tls: Any) -> None:
        checker = InMemoryUsernamePasswordDatabaseDontUse()
        checker.addUser(SMTP_USER, SMTP_PASSWORD)
        super().__init__(Portal(_Realm(box), [checker]))
        self.tls = tls

    def buildProtocol(self, addr: Any) -> Any:
        p = super().buildProtocol(addr)
        p.ctx = self.tls
        p.challengers = {b"LOGIN": LOGINCredentials, b"PLAIN": PLAINCredentials}
        return p


def code_in(msg: Message) -> str:
    body = msg.get_payload(decode=True)
    assert isinstance(body, bytes)
    m = re.search(rb"^    (\S+)$", body, re.M)
    assert m is not None, body
    return m.group(1).decode()


# --- TOTP: oathtool, or our own RFC 6238 (checked against appendix B in unit tests) -----

def have_oathtool() -> bool:
    return shutil.which("oathtool") is not None


def totp_code(secret_b32: str, at: float | None = None) -> str:
    """The code at time ``at`` (default now): oathtool's when it is installed."""
    at = time.time() if at is None else at
    if not have_oathtool():
        return rfc6238(secret_b32, at)
    when = datetime.datetime.fromtimestamp(int(at), datetime.UTC).strftime(
        "%Y-%m-%d %H:%M:%S UTC")
    out = subprocess.run(["oathtool", "--totp", "-b", "-N", when, secret_b32],
                         capture_output=True, text=True, check=True, timeout=10)
    return out.stdout.strip()
