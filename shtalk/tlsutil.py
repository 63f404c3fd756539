"""TLS helpers shared by the client and the server: the TLS policy (Mozilla
"intermediate": TLS 1.2 minimum, ECDHE + AEAD suites, groups X25519, P-256, P-384),
SHA-256 certificate fingerprints and the client side that pins one (`client_options_pinned`).

Kept apart from `shtalk.server.tls` (which re-exports all of it and adds the server's
certificate handling) so the client does not import the server's modules.  See that
module for why the policy differs from Twisted's defaults.
"""

from __future__ import annotations

import hmac
import ipaddress
from typing import Any

from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, TLSVersion
from zope.interface import implementer

MOZILLA_INTERMEDIATE_TLS12 = (
    "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)
"""TLS 1.2 suites allowed (TLS 1.3 suites are all AEAD + ephemeral and stay OpenSSL's)."""

GROUPS = "X25519:P-256:P-384"
"""Key-exchange groups, in preference order (OpenSSL ``SSL_CTX_set1_groups_list`` syntax)."""

MINIMUM_TLS = TLSVersion.TLSv1_2


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
