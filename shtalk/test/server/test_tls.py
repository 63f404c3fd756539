# mypy: disallow-untyped-calls=False
# (trial's TestCase and Twisted's endpoints are untyped; strict otherwise.)
"""Tests for shtalk.server.tls: real handshakes against the server policy and the pin.

Most tests run the handshake in memory (two pyOpenSSL connections on memory BIOs, the
server one built from our ``CertificateOptions``), so they are exact about which side
refused.  One test goes over loopback through Twisted's endpoints end to end.
"""

from __future__ import annotations

from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL
from twisted.internet import defer, endpoints, protocol
from twisted.trial import unittest

from shtalk.server import tls
from shtalk.testing import Echo, TLSLineClient

KEY_PEM, CERT_PEM = tls.make_self_signed(["localhost", "127.0.0.1"])
FINGERPRINT = tls.cert_fingerprint(CERT_PEM)


class HandshakeFailed(Exception):
    def __init__(self, side: str, error: Exception) -> None:
        super().__init__(f"{side}: {error}")
        self.side = side
        self.error = error


def pump(client: SSL.Connection, server: SSL.Connection) -> None:
    """Run a handshake between two memory-BIO connections; raise `HandshakeFailed`."""
    client.set_connect_state()
    server.set_accept_state()
    done = {"client": False, "server": False}
    for _ in range(50):
        for side, conn in (("client", client), ("server", server)):
            if not done[side]:
                try:
                    conn.do_handshake()
                    done[side] = True
                except SSL.WantReadError:
                    pass
                except SSL.Error as e:
                    raise HandshakeFailed(side, e) from None
        moved = False
        for src, dst in ((client, server), (server, client)):
            try:
                data = src.bio_read(65536)
            except SSL.WantReadError:
                continue
            dst.bio_write(data)
            moved = True
        if all(done.values()) and not moved:
            return
    raise AssertionError("handshake did not finish")


def _rsa_pair() -> tuple[bytes, bytes]:
    """An RSA certificate: only with one could a server pick plain-RSA key exchange."""
    import datetime

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return (
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                          serialization.NoEncryption()),
        cert.public_bytes(serialization.Encoding.PEM),
    )


RSA_KEY_PEM, RSA_CERT_PEM = _rsa_pair()


def server_conn(rsa: bool = False) -> SSL.Connection:
    if rsa:
        options = tls.server_options(RSA_CERT_PEM, RSA_KEY_PEM)
    else:
        options = tls.server_options(CERT_PEM, KEY_PEM)
    return SSL.Connection(options.getContext(), None)


def plain_client(min_version: int, max_version: int, ciphers: bytes | None = None,
                 groups: bytes | None = None) -> SSL.Connection:
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(min_version)
    ctx.set_max_proto_version(max_version)
    if ciphers is not None:
        ctx.set_cipher_list(ciphers)
    if groups is not None:
        from OpenSSL._util import lib

        assert lib.SSL_CTX_set1_curves_list(ctx._context, groups) == 1  # type: ignore[attr-defined]
    ctx.set_verify(SSL.VERIFY_NONE)
    return SSL.Connection(ctx, None)


class ServerPolicyTests(unittest.TestCase):
    def assertServerRefuses(
        self, client: SSL.Connection, server: SSL.Connection | None = None
    ) -> HandshakeFailed:
        """The server's side ends ``client``'s handshake (not the client giving up)."""
        with self.assertRaises(HandshakeFailed) as e:
            pump(client, server if server is not None else server_conn())
        failed: HandshakeFailed = e.exception
        self.assertEqual(failed.side, "server")
        return failed

    def test_tls13_works(self) -> None:
        client, server = plain_client(SSL.TLS1_3_VERSION, SSL.TLS1_3_VERSION), server_conn()
        pump(client, server)
        self.assertEqual(server.get_protocol_version_name(), "TLSv1.3")

    def test_tls13_preferred(self) -> None:
        client, server = plain_client(SSL.TLS1_2_VERSION, 0), server_conn()
        pump(client, server)
        self.assertEqual(client.get_protocol_version_name(), "TLSv1.3")

    def test_tls12_ecdhe_aead_works(self) -> None:
        for suite in ("ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384",
                      "ECDHE-ECDSA-CHACHA20-POLY1305"):
            client = plain_client(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION, suite.encode())
            server = server_conn()
            pump(client, server)
            self.assertEqual(server.get_protocol_version_name(), "TLSv1.2")
            self.assertEqual(server.get_cipher_name(), suite)

    def test_tls11_refused_by_server(self) -> None:
        # SECLEVEL=0 so that *this client* really offers TLS 1.1; the server must refuse.
        client = plain_client(SSL.TLS1_1_VERSION, SSL.TLS1_1_VERSION, b"ALL:@SECLEVEL=0")
        self.assertServerRefuses(client)

    def test_non_ecdhe_tls12_suite_refused(self) -> None:
        # With an RSA certificate, Twisted's default cipher list would accept this suite.
        for rsa in (False, True):
            client = plain_client(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION, b"AES128-GCM-SHA256")
            failed = self.assertServerRefuses(client, server_conn(rsa=rsa))
            self.assertIn("no shared cipher", str(failed))

    def test_rsa_certificate_ecdhe_works(self) -> None:
        client = plain_client(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION,
                              b"ECDHE-RSA-AES128-GCM-SHA256")
        server = server_conn(rsa=True)
        pump(client, server)
        self.assertEqual(server.get_cipher_name(), "ECDHE-RSA-AES128-GCM-SHA256")

    def test_cbc_suite_refused(self) -> None:
        client = plain_client(SSL.TLS1_2_VERSION, SSL.TLS1_2_VERSION, b"ECDHE-ECDSA-AES128-SHA")
        self.assertServerRefuses(client)

    def test_groups(self) -> None:
        for group in (b"X25519", b"P-256", b"P-384"):
            client = plain_client(SSL.TLS1_3_VERSION, SSL.TLS1_3_VERSION, groups=group)
            pump(client, server_conn())
        client = plain_client(SSL.TLS1_3_VERSION, SSL.TLS1_3_VERSION, groups=b"P-521")
        self.assertServerRefuses(client)

    def test_mismatched_key_rejected(self) -> None:
        other_key, _ = tls.make_self_signed(["localhost"])
        with self.assertRaises(ValueError):
            tls.server_options(CERT_PEM, other_key)


class PinnedClientTests(unittest.TestCase):
    def client(self, fingerprint: bytes | str) -> SSL.Connection:
        return tls.client_options_pinned(fingerprint, "localhost").clientConnectionForTLS(None)

    def test_right_fingerprint_accepted(self) -> None:
        client = self.client(FINGERPRINT)
        pump(client, server_conn())
        self.assertEqual(client.get_protocol_version_name(), "TLSv1.3")

    def test_fingerprint_forms(self) -> None:
        raw = x509.load_pem_x509_certificate(CERT_PEM).fingerprint(hashes.SHA256())
        for form in (raw, raw.hex(), FINGERPRINT.lower(), "SHA256:" + FINGERPRINT,
                     FINGERPRINT.encode()):
            pump(self.client(form), server_conn())

    def test_wrong_fingerprint_refused(self) -> None:
        _, other_cert = tls.make_self_signed(["localhost"])
        with self.assertRaises(HandshakeFailed) as e:
            pump(self.client(tls.cert_fingerprint(other_cert)), server_conn())
        self.assertEqual(e.exception.side, "client")

    def test_bad_fingerprint_value(self) -> None:
        with self.assertRaises(ValueError):
            tls.client_options_pinned("AB:CD", "localhost")

    def test_pinned_client_refuses_tls11(self) -> None:
        server_ctx = SSL.Context(SSL.TLS_METHOD)
        server_ctx.set_min_proto_version(SSL.TLS1_1_VERSION)
        server_ctx.set_max_proto_version(SSL.TLS1_1_VERSION)
        server_ctx.set_cipher_list(b"ALL:@SECLEVEL=0")
        from cryptography.hazmat.primitives.serialization import load_pem_private_key
        from OpenSSL import crypto

        server_ctx.use_certificate(crypto.X509.from_cryptography(
            x509.load_pem_x509_certificate(CERT_PEM)))
        server_ctx.use_privatekey(crypto.PKey.from_cryptography_key(
            load_pem_private_key(KEY_PEM, None)))  # type: ignore[arg-type]
        with self.assertRaises(HandshakeFailed):
            pump(self.client(FINGERPRINT), SSL.Connection(server_ctx, None))


class FingerprintTests(unittest.TestCase):
    def test_format_matches_openssl(self) -> None:
        raw = x509.load_pem_x509_certificate(CERT_PEM).fingerprint(hashes.SHA256())
        self.assertEqual(FINGERPRINT, ":".join(f"{b:02X}" for b in raw))
        self.assertEqual(len(FINGERPRINT), 32 * 3 - 1)

    def test_normalize(self) -> None:
        raw = bytes(range(32))
        self.assertEqual(tls.normalize_fingerprint(raw), raw)
        self.assertEqual(tls.normalize_fingerprint(raw.hex().upper()), raw)


class LoopbackTests(unittest.TestCase):
    """Our server options on a real SSL4ServerEndpoint; the pinned client over TCP."""

    @defer.inlineCallbacks
    def test_round_trip(self) -> Any:
        from twisted.internet import reactor

        server = endpoints.SSL4ServerEndpoint(  # type: ignore[no-untyped-call]
            reactor, 0, tls.server_options(CERT_PEM, KEY_PEM), interface="127.0.0.1"
        )
        port = yield server.listen(protocol.Factory.forProtocol(Echo))
        self.addCleanup(port.stopListening)
        address = port.getHost()

        def connect(fingerprint: str) -> defer.Deferred[bytes]:
            client = TLSLineClient()
            ep = endpoints.wrapClientTLS(
                tls.client_options_pinned(fingerprint, "localhost"),
                endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", address.port),
            )
            d: defer.Deferred[Any] = endpoints.connectProtocol(ep, client)
            return d.addCallback(lambda _: client.done)

        received = yield connect(FINGERPRINT)
        self.assertEqual(received, b"ping\n")
        _, other = tls.make_self_signed(["localhost"])
        yield self.assertFailure(connect(tls.cert_fingerprint(other)), SSL.Error)
