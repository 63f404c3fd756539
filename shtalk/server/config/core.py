"""The sections of the chat server itself: listening, accounts, mail, throttling,
tokens and storage."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from shtalk.server.config.base import FieldError, Section, register_section, setting


@register_section("server")
@dataclass(frozen=True)
class ServerSection(Section):
    """Where and how the server listens, and the per-connection limits."""

    interface: str = setting("127.0.0.1", "address to listen on; 0.0.0.0 or :: for all")
    port: int = setting(6697, "TLS port to listen on (0 picks a free one)", min=0, max=65535)
    listen: str = setting(
        "",
        "Twisted server endpoint string overriding interface/port, e.g. tcp:6697 behind a "
        "TLS-terminating proxy; empty uses shtalk's own TLS on interface:port",
    )
    data_dir: str = setting("", "data directory; empty means $XDG_DATA_HOME/shtalk")
    cert: str = setting(
        "", "TLS certificate chain (PEM); empty uses the data dir's self-signed one"
    )
    key: str = setting("", "TLS private key (PEM) for cert; set both or neither")
    max_connections_per_address: int = setting(
        20, "simultaneous connections allowed from one IP address past the TLS handshake",
        min=1,
    )
    handshake_timeout: int = setting(
        10, "seconds from accept for the TLS handshake; a socket not past it is aborted",
        min=1, max=300,
    )
    max_pending_handshakes: int = setting(
        1000, "sockets not yet past the TLS handshake, all addresses; the oldest goes first",
        min=1,
    )
    max_pending_handshakes_per_address: int = setting(
        20, "sockets not yet past the TLS handshake per client address (IPv6: per /64); "
        "the oldest goes first", min=1,
    )
    reuse_port: bool = setting(
        False, "SO_REUSEPORT on interface:port, so several processes on this host share it "
        "(the kernel spreads connections over them)",
    )
    proxy_protocol: bool = setting(
        False, "every connection starts with a PROXY protocol header (v2 or v1) before TLS, "
        "as HAProxy's send-proxy-v2 writes it; the client's address is taken from it",
    )
    trusted_proxies: str = setting(
        "127.0.0.1, ::1", "addresses or networks (comma-separated) whose PROXY headers are "
        "believed; a connection from anywhere else is closed when proxy_protocol is on",
    )
    pre_auth_timeout: int = setting(30, "seconds a connection may stay unauthenticated", min=1)
    idle_timeout: int = setting(600, "seconds of silence before a connection is closed", min=1)
    max_line_length: int = setting(
        1048576, "longest protocol line in bytes; longer lines close the connection", min=1024
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            networks(self.trusted_proxies)
        except ValueError as e:
            raise FieldError("trusted_proxies", str(e)) from None


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def networks(text: str) -> tuple[Network, ...]:
    """``"127.0.0.1, 10.0.0.0/8"`` as networks (an address alone is a /32 or /128)."""
    found: list[Network] = []
    for item in text.split(","):
        if not item.strip():
            continue
        try:
            found.append(ipaddress.ip_network(item.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{item.strip()!r} is not an IP address or network") from None
    if not found:
        raise ValueError("name at least one address or network (e.g. 127.0.0.1)")
    return tuple(found)


@register_section("accounts")
@dataclass(frozen=True)
class AccountsSection(Section):
    """Password hashing and policy (SECURITY-CHECKLIST PW-1, PW-2)."""

    bcrypt_cost: int = setting(12, "bcrypt work factor (log2 rounds)", min=10, max=16)
    bcrypt_nice: int = setting(
        10, "CPU niceness of the bcrypt threads (Linux): logins yield to the chat", min=0, max=19
    )
    min_password_length: int = setting(
        12, "shortest password accepted, in characters", min=8, max=64
    )
    require_email_verification: bool = setting(
        True,
        "new accounts stay pending until the emailed code is entered; false only for "
        "closed deployments and tests",
    )
    require_captcha: bool = setting(
        True, "registration and password-reset requests need a solved CAPTCHA; false only "
        "for closed deployments and tests",
    )
    email_code_ttl: int = setting(
        600, "seconds an emailed verification or reset code stays valid", min=1, max=3600
    )
    email_code_attempts: int = setting(
        5, "wrong entries that kill an emailed code (a new one must be sent)", min=1, max=20
    )
    resend_interval: int = setting(
        60, "seconds between two mails of one account (verification, reset)", min=1
    )
    pending_purge_after: int = setting(
        172800, "seconds after which an account never verified is deleted", min=60
    )
    captcha_ttl: int = setting(120, "seconds a CAPTCHA challenge can be answered", min=5)
    captcha_words: bool = setting(
        True, "offer the accessible CAPTCHA (a short question in words) to those who ask"
    )
    totp_issuer: str = setting("shtalk", "issuer name shown in authenticator apps")


@register_section("smtp")
@dataclass(frozen=True)
class SmtpSection(Section):
    """Outgoing mail (verification and reset codes)."""

    host: str = setting("", "SMTP relay host; empty writes each mail to the data dir's outbox")
    port: int = setting(587, "SMTP relay port (submission)", min=1, max=65535)
    sender: str = setting("shtalk@localhost", "envelope and From address of the mails")
    username: str = setting("", "SMTP AUTH user name; empty sends without AUTH")
    password: str = setting("", "SMTP AUTH password (keep this file private)", secret=True)
    require_starttls: bool = setting(
        True, "refuse to send unless the relay offers STARTTLS; false only for a loopback relay"
    )
    ca_file: str = setting("", "PEM CA certificates to verify the relay; empty: system trust")
    timeout: int = setting(30, "seconds one delivery attempt may take", min=1)
    retries: int = setting(5, "delivery attempts after the first failed one", min=0, max=20)
    retry_delay: int = setting(
        10, "seconds before the first retry; doubles each time (at most an hour)", min=1
    )


@register_section("throttle")
@dataclass(frozen=True)
class ThrottleSection(Section):
    """Failed logins and code entries: growing delays, then a CAPTCHA (ASVS 6.1.1, 6.3.1)."""

    free_failures: int = setting(
        5, "failures per account (or address) in an hour before delays start", min=0
    )
    address_free_failures: int = setting(
        20, "failures per client address in an hour before delays start", min=0
    )
    base_delay: int = setting(2, "first delay in seconds; doubles with each failure", min=1)
    max_delay: int = setting(60, "longest delay in seconds", min=1, max=3600)
    captcha_after: int = setting(
        10, "failures per account in an hour after which each attempt needs a CAPTCHA", min=1
    )
    address_captcha_after: int = setting(
        30, "failures per client address in an hour after which a CAPTCHA is needed", min=1
    )
    max_failures_per_hour: int = setting(
        100, "failed attempts per account let through in any hour (NIST 800-63B)", min=1,
        max=100,
    )


@register_section("tokens")
@dataclass(frozen=True)
class TokensSection(Section):
    """Session tokens: short-lived access JWTs, rotating refresh tokens."""

    issuer: str = setting("shtalk", "JWT 'iss' claim set and required")
    access_ttl: int = setting(900, "access token lifetime in seconds", min=60, max=86400)
    refresh_ttl: int = setting(2592000, "refresh token lifetime in seconds", min=3600)


@register_section("storage")
@dataclass(frozen=True)
class StorageSection(Section):
    """Queued ciphertext envelopes."""

    retention: int = setting(2592000, "seconds an undelivered envelope is kept", min=60)
    max_envelope_bytes: int = setting(65536, "largest envelope accepted, in bytes", min=1024)
