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
import ipaddress
from collections.abc import Iterable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from OpenSSL import crypto
from twisted.internet.ssl import CertificateOptions

from shtalk.server.config import StartupError

# The policy and the client's pin live in shtalk.tlsutil (the client imports that, not
# the server); re-exported here for the server and existing callers.
from shtalk.tlsutil import GROUPS as GROUPS
from shtalk.tlsutil import MINIMUM_TLS as MINIMUM_TLS
from shtalk.tlsutil import MOZILLA_INTERMEDIATE_TLS12 as MOZILLA_INTERMEDIATE_TLS12
from shtalk.tlsutil import PinnedClientOptions as PinnedClientOptions
from shtalk.tlsutil import _ciphers as _ciphers
from shtalk.tlsutil import _colon_hex as _colon_hex
from shtalk.tlsutil import _is_ip as _is_ip
from shtalk.tlsutil import _policy_options as _policy_options
from shtalk.tlsutil import _restrict_groups as _restrict_groups
from shtalk.tlsutil import client_options_pinned as client_options_pinned
from shtalk.tlsutil import normalize_fingerprint as normalize_fingerprint

SELF_SIGNED_VALIDITY = datetime.timedelta(days=3650)


class TLSFileError(StartupError):
    """A certificate or key file is missing, unreadable, corrupt or mismatched."""


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
