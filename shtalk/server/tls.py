"""TLS policy for the server listener and for clients that pin the server's certificate.

Why not Twisted's defaults: its cipher string ends in ``RSA+AESGCM:RSA+AES`` (no forward
secrecy) and its key-exchange groups are whatever OpenSSL enables.  shtalk follows
Mozilla's "intermediate" profile (SECURITY-CHECKLIST, TLS): TLS 1.2 minimum, TLS 1.2
suites limited to ECDHE with AEAD, groups X25519, P-256, P-384.  Everything goes through
``twisted.internet.ssl.CertificateOptions``; only the group list needs the OpenSSL
binding, because pyOpenSSL (26.x) has no public ``set_groups``.

A fresh install has no CA-signed certificate, so the server makes a self-signed one and
prints its SHA-256 fingerprint; clients pin that fingerprint on first use, like ssh's
``known_hosts`` (`client_options_pinned`).
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from zope.interface import implementer

from shtalk.server.config import StartupError

MOZILLA_INTERMEDIATE_TLS12 = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
"""TLS 1.2 suites allowed (TLS 1.3 suites are all AEAD + ephemeral and stay OpenSSL's)."""

GROUPS = "X25519:P-256:P-384"
"""Key-exchange groups, in preference order (OpenSSL ``SSL_CTX_set1_groups_list`` syntax)."""

MINIMUM_TLS = TLSVersion.TLSv1_2

SELF_SIGNED_VALIDITY = datetime.timedelta(days=3650)


class TLSFileError(StartupError):
    """A certificate or key file is missing, unreadable, corrupt or mismatched."""


def _ciphers() -> Any:
    return AcceptableCiphers.fromOpenSSLCipherString(  # type: ignore[no-untyped-call]
        MOZILLA_INTERMEDIATE_TLS12
    )


def _restrict_groups(ctx: SSL.Context) -> None:
    # Private binding: pyOpenSSL exposes only set_tmp_ecdh (one curve).  Must run before
    # the first Connection is made from ``ctx`` (pyOpenSSL freezes used contexts).
    from OpenSSL._util import lib

    if lib.SSL_CTX_set1_curves_list(ctx._context, GROUPS.encode("ascii")) != 1:  # type: ignore[attr-defined]
        raise RuntimeError(f"OpenSSL refused the TLS group list {GROUPS}")


def _policy_options(**kwargs: Any) -> CertificateOptions:
    options = CertificateOptions(raiseMinimumTo=MINIMUM_TLS, acceptableCiphers=_ciphers(), **kwargs)
    # getContext() caches the context, so every connection uses the restricted one.
    _restrict_groups(options.getContext())
    return options


def server_options(cert_pem: bytes, key_pem: bytes) -> CertificateOptions:
    """Server-side options (an ``IOpenSSLServerConnectionCreator``) for a PEM pair.

    ``cert_pem`` may hold a chain: the first certificate is the server's, the rest are
    sent as intermediates.  Raises ``ValueError`` if the data does not parse or the key
    does not match.
    """
    chain = x509.load_pem_x509_certificates(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise ValueError("the private key is neither ECDSA nor RSA")
    pub = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    leaf_pub = (
        chain[0]
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    if pub != leaf_pub:
        raise ValueError("the private key does not belong to the certificate")
    return _policy_options(
        privateKey=crypto.PKey.from_cryptography_key(key),  # type: ignore[arg-type]
        certificate=crypto.X509.from_cryptography(chain[0]),
        extraCertChain=[crypto.X509.from_cryptography(c) for c in chain[1:]],
    )


def load_server_options(cert_path: Path, key_path: Path, remedy: str) -> CertificateOptions:
    """`server_options` from files; problems become one-line `TLSFileError`s.

    ``remedy`` tells the operator what to do (it differs for the data dir's self-signed
    pair and for a certificate they supplied).
    """
    pems: list[bytes] = []
    for path in (cert_path, key_path):
        try:
            pems.append(path.read_bytes())
        except FileNotFoundError:
            raise TLSFileError(f"{path}: file not found; {remedy}") from None
        except OSError as e:
            raise TLSFileError(f"{path}: cannot read ({e.strerror}); {remedy}") from None
    cert_pem, key_pem = pems
    try:
        x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        raise TLSFileError(f"{cert_path}: not a PEM certificate (corrupt?); {remedy}") from None
    try:
        serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        raise TLSFileError(
            f"{key_path}: not an unencrypted PEM private key (corrupt?); {remedy}"
        ) from None
    try:
        return server_options(cert_pem, key_pem)
    except ValueError as e:
        raise TLSFileError(f"{key_path}: {e} ({cert_path}); {remedy}") from None


def cert_fingerprint(pem_bytes: bytes) -> str:
    """SHA-256 fingerprint of the (first) PEM certificate, as ``AB:CD:...``.

    Same format as ``openssl x509 -noout -fingerprint -sha256``.
    """
    cert = x509.load_pem_x509_certificate(pem_bytes)
    return _colon_hex(cert.fingerprint(hashes.SHA256()))


def _colon_hex(digest: bytes) -> str:
    return ":".join(f"{b:02X}" for b in digest)


def normalize_fingerprint(fingerprint: bytes | str) -> bytes:
    """32 raw bytes from a raw digest or hex text (colons, spaces, any case allowed)."""
    if isinstance(fingerprint, bytes) and len(fingerprint) == 32:
        return fingerprint
    text = fingerprint.decode("ascii") if isinstance(fingerprint, bytes) else fingerprint
    text = text.strip()
    if text.lower().startswith("sha256:"):
        text = text[len("sha256:") :]
    hexdigits = "".join(c for c in text if c not in ": ")
    raw = bytes.fromhex(hexdigits)
    if len(raw) != 32:
        raise ValueError(f"a SHA-256 fingerprint has 32 bytes, not {len(raw)}")
    return raw


def make_self_signed(names: Iterable[str]) -> tuple[bytes, bytes]:
    """A new ECDSA P-256 key and 10-year self-signed certificate: ``(key_pem, cert_pem)``.

    ``names`` become subjectAltNames (IP addresses as IP entries, the rest as DNS); the
    first is also the CN.  Wildcard listen addresses (0.0.0.0, ::) are skipped.
    """
    sans: list[x509.GeneralName] = []
    seen: set[str] = set()
    for name in names:
        if not name or name in seen or name in ("0.0.0.0", "::"):  # noqa: S104
            continue
        seen.add(name)
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    common_name = next(iter(seen), "localhost") if seen else "localhost"
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "shtalk self-signed"),
        ]
    )
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + SELF_SIGNED_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(key, hashes.SHA256())
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


@implementer(IOpenSSLClientConnectionCreator)
class PinnedClientOptions:
    """Client TLS that accepts exactly one server certificate, named by its SHA-256.

    The CA chain and hostname are not consulted: the pin is the trust decision (TOFU, as
    with ssh).  ``hostname`` is still sent as SNI.  TLS 1.2 minimum, same suites as the
    server.
    """

    def __init__(self, fingerprint_sha256: bytes | str, hostname: str) -> None:
        self.pin = normalize_fingerprint(fingerprint_sha256)
        self.hostname = hostname
        options = _policy_options()
        ctx = options.getContext()
        ctx.set_verify(SSL.VERIFY_PEER, self._verify)
        self._ctx = ctx

    def _verify(
        self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int, ok: int
    ) -> bool:
        if depth != 0:
            return True  # the chain does not matter; only the leaf is pinned
        der = cert.to_cryptography().fingerprint(hashes.SHA256())
        return hmac.compare_digest(der, self.pin)

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._ctx, None)
        connection.set_app_data(tlsProtocol)
        if self.hostname and not _is_ip(self.hostname):
            connection.set_tlsext_host_name(self.hostname.encode("idna"))
        return connection


def client_options_pinned(fingerprint_sha256: bytes | str, hostname: str) -> PinnedClientOptions:
    """An ``IOpenSSLClientConnectionCreator`` accepting only the pinned certificate."""
    return PinnedClientOptions(fingerprint_sha256, hostname)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
