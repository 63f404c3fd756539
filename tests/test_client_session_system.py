# mypy: disallow-untyped-calls=False
"""ServerSession against the real server (``twistd shtalk`` in a subprocess, real TLS).

What only a real server shows: the TOFU pin really is the server's certificate; a server
that got a new certificate is refused; a killed and restarted server is rejoined by
itself with the access token; a broken access token falls back to refresh (and the
rotated tokens reach ``on_tokens``); a revoked session falls back to the password; a
removed device gets ``logged_out`` and logs in again; requests wait, then time out.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks, succeed
from twisted.trial import unittest

from shtalk.client.connection import CertificateChanged, CertificateInvalid, RequestTimeout
from shtalk.client.knownhosts import KnownHosts
from shtalk.client.session import Credentials, ServerSession
from shtalk.testing import tempdir
from tests.harness import (
    PASSWORD,
    ServerProcess,
    ServerTestCase,
    fresh_name,
    login_session,
    wait_until,
)


@dataclass
class Recorder:
    """Everything the session told its caller."""

    confirmed: list[str] = field(default_factory=list)
    asked: int = 0
    tokens: list[tuple[str | None, str | None]] = field(default_factory=list)
    pushes: list[dict[str, Any]] = field(default_factory=list)
    states: list[tuple[str, str]] = field(default_factory=list)

    def confirm(self, fp: str) -> Deferred[bool]:
        self.confirmed.append(fp)
        return succeed(True)

    def ask(self) -> Deferred[str]:
        self.asked += 1
        return succeed(PASSWORD)

    def on_tokens(self, c: Credentials) -> None:
        self.tokens.append((c.access_token, c.refresh_token))


class SessionMixin:
    known_hosts: KnownHosts

    def new_session(self, server: ServerProcess, creds: Credentials,
                    rec: Recorder | None = None) -> tuple[ServerSession, Recorder]:
        rec = rec or Recorder()
        s = ServerSession(reactor, "127.0.0.1", server.port, self.known_hosts, rec.confirm,
                          rec.ask, creds, rec.on_tokens, rec.pushes.append,
                          lambda st, m: rec.states.append((st, m)), backoff=(0.05, 0.5),
                          request_timeout=10)
        self.addCleanup(s.stop)  # type: ignore[attr-defined]
        return s, rec

    @inlineCallbacks
    def account(self, server: ServerProcess, device: str = "d1") -> Any:
        """A registered, logged-in session (register + login through the session)."""
        creds = Credentials(fresh_name(), device, "test device")
        s, rec = self.new_session(server, creds)
        yield s.register(creds.username, PASSWORD, f"{creds.username}@example.org")
        yield s.login(PASSWORD)
        return s, rec, creds


class SharedServerTests(SessionMixin, ServerTestCase):
    def setUp(self) -> None:
        super().setUp()
        self.known_hosts = KnownHosts(os.path.join(tempdir(self), "known_hosts"))

    @inlineCallbacks
    def test_tofu_first_connect_stores_fingerprint(self) -> Any:
        s, rec, creds = yield self.account(self.server)
        self.assertEqual(rec.confirmed, [self.server.fingerprint])
        self.assertEqual(self.known_hosts.lookup("127.0.0.1", self.server.port),
                         self.server.fingerprint)
        reply = yield s.request("room_list")
        self.assertTrue(reply["ok"])
        yield s.stop()
        # A second session: pinned, no question, resumes with the access token.
        s2, rec2 = self.new_session(self.server, creds)
        yield s2.start()
        self.assertEqual(rec2.confirmed, [])
        self.assertEqual(rec2.asked, 0)
        self.assertIn("resumed", s2.state_message)
        # start() fires with the resume reply; backlog_done follows it.
        yield wait_until(lambda: bool(rec2.pushes))
        self.assertEqual(rec2.pushes, [{"type": "backlog_done", "count": 0}])

    @inlineCallbacks
    def test_invalid_access_token_uses_refresh(self) -> Any:
        s, _rec, creds = yield self.account(self.server)
        yield s.stop()
        old_refresh = creds.refresh_token
        assert creds.access_token is not None
        creds.access_token = creds.access_token[:-6] + "AAAAAA"  # signature no longer valid
        s2, rec2 = self.new_session(self.server, creds)
        yield s2.start()
        self.assertIn("refreshed", s2.state_message)
        self.assertEqual(rec2.asked, 0)
        self.assertEqual(len(rec2.tokens), 1)
        _new_access, new_refresh = rec2.tokens[0]
        self.assertNotEqual(new_refresh, old_refresh)
        self.assertEqual(creds.refresh_token, new_refresh)
        yield s2.request("room_list")

    @inlineCallbacks
    def test_revoked_session_asks_password(self) -> Any:
        s, _rec, creds = yield self.account(self.server)
        dead = Credentials(creds.username, creds.device_id, "", creds.access_token,
                           creds.refresh_token)
        yield s.logout()  # revokes both tokens server-side
        s2, rec2 = self.new_session(self.server, dead)
        yield s2.start()
        self.assertEqual(rec2.asked, 1)
        self.assertIn("logged in", s2.state_message)
        self.assertNotEqual(dead.access_token, creds.access_token)
        yield s2.request("room_list")

    @inlineCallbacks
    def test_removed_device_gets_logged_out_and_logs_in_again(self) -> Any:
        s, rec, creds = yield self.account(self.server, device="d1")
        other = yield login_session(self.server, creds.username, "d2")
        self.addCleanup(other.client.disconnect)
        yield other.client.ok("device_remove", device="d1")
        yield wait_until(lambda: rec.asked == 1 and s.state == "authenticated")
        self.assertIn("logged_out", [p["type"] for p in rec.pushes])
        reply = yield s.request("devices")
        self.assertIn("d1", [d["id"] for d in reply["devices"]])


class RestartTests(SessionMixin, unittest.TestCase):
    timeout = 90

    def setUp(self) -> None:
        self.server = ServerProcess()
        self.server.start()
        self.addCleanup(self.server.cleanup)
        self.known_hosts = KnownHosts(os.path.join(tempdir(self), "known_hosts"))

    @inlineCallbacks
    def test_resume_after_server_restart(self) -> Any:
        s, rec, _creds = yield self.account(self.server)
        seen = len(rec.states)
        self.server.restart(kill=True)
        # on_state records every transition, so a reconnect faster than our polling
        # (the backoff here is 50 ms) is still seen.
        yield wait_until(
            lambda: any(st == "reconnecting" for st, _ in rec.states[seen:])
            and s.state == "authenticated",
            timeout=30,
        )
        reply = yield s.request("room_list", timeout=20)
        self.assertTrue(reply["ok"])
        self.assertEqual(s.state, "authenticated")
        self.assertIn("resumed", s.state_message)
        self.assertEqual(rec.asked, 0)
        self.assertIn("reconnecting", [st for st, _ in rec.states])

    @inlineCallbacks
    def test_new_certificate_refused(self) -> Any:
        s, _rec, creds = yield self.account(self.server)
        pinned = self.server.fingerprint
        yield s.stop()
        self.server.stop()
        (self.server.data_dir / "tls-cert.pem").unlink()
        (self.server.data_dir / "tls-key.pem").unlink()
        self.server.start()
        self.assertNotEqual(self.server.fingerprint, pinned)
        s2, rec2 = self.new_session(self.server, creds)
        err = yield self.assertFailure(s2.start(), CertificateChanged)
        self.assertEqual((err.expected, err.got), (pinned, self.server.fingerprint))
        self.assertIn(f"--forget-server 127.0.0.1:{self.server.port}", str(err))
        self.assertEqual(s2.state, "disconnected")
        self.assertEqual(rec2.confirmed, [])
        self.assertEqual(self.known_hosts.lookup("127.0.0.1", self.server.port), pinned)

    @inlineCallbacks
    def test_requests_wait_then_time_out_while_down(self) -> Any:
        s, _rec, _creds = yield self.account(self.server)
        self.server.kill()
        yield wait_until(lambda: s.state != "authenticated")
        yield self.assertFailure(s.request("room_list", timeout=1), RequestTimeout)
        pending = s.request("room_list", timeout=30)
        self.server.start()
        reply = yield pending
        self.assertTrue(reply["ok"])


def make_ca_and_leaf(directory: str) -> tuple[bytes, str, str]:
    """A throw-away CA and a "localhost" certificate it signed: (CA PEM, cert, key paths)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "shtalk test CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                       key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False),
                         critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "ca-leaf.pem"), os.path.join(directory,
                                                                                "ca-leaf.key")
    with open(cert_path, "wb") as f:
        f.write(leaf.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    os.chmod(key_path, 0o600)
    return ca.public_bytes(serialization.Encoding.PEM), cert_path, key_path


class SystemTrustTests(unittest.TestCase):
    """trust="system": a CA-signed certificate is accepted for the name it carries and
    refused for another name or without the CA."""

    timeout = 60

    def setUp(self) -> None:
        from twisted.internet.ssl import Certificate

        from shtalk.server.tls import make_self_signed

        directory = tempdir(self)
        ca_pem, cert_path, key_path = make_ca_and_leaf(directory)
        self.ca = Certificate.loadPEM(ca_pem)
        self.server = ServerProcess({"server": {"cert": cert_path, "key": key_path}})
        # The harness waits for the data dir's own certificate file; with an operator
        # certificate none is made, so give it one (unused by the server).
        self.server.data_dir.mkdir(mode=0o700, parents=True)
        unused_key, unused_cert = make_self_signed(["unused"])
        for name, pem in (("tls-cert.pem", unused_cert), ("tls-key.pem", unused_key)):
            path = self.server.data_dir / name
            path.write_bytes(pem)
            path.chmod(0o600)
        self.server.start()
        self.addCleanup(self.server.cleanup)

    def session(self, host: str, trust_root: Any) -> tuple[ServerSession, Recorder]:
        rec = Recorder()
        creds = Credentials(fresh_name(), "d1")
        s = ServerSession(reactor, host, self.server.port, None, rec.confirm, rec.ask, creds,
                          rec.on_tokens, rec.pushes.append, trust="system",
                          trust_root=trust_root, backoff=(0.05, 0.5))
        self.addCleanup(s.stop)
        return s, rec

    @inlineCallbacks
    def test_ca_signed_certificate_accepted(self) -> Any:
        s, rec = self.session("localhost", self.ca)
        reply = yield s.register(s.credentials.username, PASSWORD, "x@example.org")
        self.assertTrue(reply["ok"])
        yield s.login(PASSWORD)
        self.assertEqual(s.state, "authenticated")
        self.assertEqual(rec.confirmed, [])

    @inlineCallbacks
    def test_wrong_name_or_unknown_ca_refused(self) -> Any:
        s, _ = self.session("127.0.0.1", self.ca)  # the certificate names only localhost
        yield self.assertFailure(s.start(), CertificateInvalid)
        s2, _ = self.session("localhost", None)  # the platform's CAs never signed it
        yield self.assertFailure(s2.start(), CertificateInvalid)
