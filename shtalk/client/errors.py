"""Every error the client raises, in one module of its own (as twisted.words keeps its
``ewords``): the terminal UI imports it before its first frame to describe errors, so
it loads nothing but the wire's error codes.

Server refusals carry the protocol's `ErrorCode` (a string enum: comparing with the
code's text works too); a code this client does not know stays a plain string.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from shtalk.wire.errors import ErrorCode, ProtocolError

CONNECTION_LOST = "connection_lost"
"""Not a server code: the link ended before the reply (`ConnectionLost`)."""
OTP_REJECTED = "otp_rejected"
"""Not a server code: ``invalid_credentials`` after the server asked for the TOTP code (so
the password was right): the code was wrong, expired or already used."""


class ServerError(Exception):
    """The server refused a request (``ok: false``); act on ``code``, show ``message``."""

    def __init__(self, code: ErrorCode | str, message: str,
                 reply: dict[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.reply: dict[str, Any] = reply if reply is not None else {}

    @property
    def detail(self) -> dict[str, Any]:
        """The reply's error object: what a refusal asks for (``captcha``,
        ``retry_after``) is there."""
        error = self.reply.get("error")
        return error if isinstance(error, dict) else {}

    @classmethod
    def refused_locally(cls, e: ProtocolError) -> ServerError:
        """A request this client would not send, refused as the server would have
        refused it (same code, same message)."""
        return cls(e.code, e.message, {"error": {"code": str(e.code), "message": e.message}})


class RequestTimeout(ServerError):
    """No reply arrived in time (code ``timeout``); the request may or may not have run."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.TIMEOUT, message)


class ConnectionLost(ServerError):
    """The connection ended before the reply (code ``connection_lost``)."""

    def __init__(self, message: str) -> None:
        super().__init__(CONNECTION_LOST, message)


class UntrustedServer(Exception):
    """First contact, and the person declined the server's fingerprint."""

    def __init__(self, fingerprint: str) -> None:
        super().__init__(f"the server's certificate {fingerprint} was not trusted")
        self.fingerprint = fingerprint


class CertificateChanged(Exception):
    """The server presented another certificate than the pinned one: refuse to talk.

    The message says how to re-trust on purpose, since the usual cause is a reinstalled
    server but the dangerous one is interception.
    """

    def __init__(self, host: str, port: int, expected: str, got: str,
                 known_hosts_path: str | None = None) -> None:
        where = f" in {known_hosts_path}" if known_hosts_path else " in the known-hosts file"
        super().__init__(
            f"the TLS certificate of {host}:{port} has CHANGED (pinned {expected}, server "
            f"presented {got}); refusing to connect. Someone may be intercepting the "
            f"connection. If the server's certificate was replaced on purpose, re-trust it "
            f"with `shtalk-urwid --forget-server {host}:{port}` or delete the {host}:{port} "
            f"line{where}, then connect again."
        )
        self.host = host
        self.port = port
        self.expected = expected
        self.got = got
        self.known_hosts_path = known_hosts_path


class CertificateInvalid(Exception):
    """With system trust: the certificate does not chain to a trusted CA or does not
    name the host."""

    def __init__(self, host: str, port: int, detail: str) -> None:
        super().__init__(f"the TLS certificate of {host}:{port} failed verification: {detail}")
        self.host = host
        self.port = port


class AuthenticationFailed(Exception):
    """The password step could not complete (the person cancelled, or gave up after
    repeated wrong passwords): the session stops rather than ask forever."""


class ClientError(Exception):
    """A refusal of the client itself; ``str()`` says what to do."""


class IdentityNotAccepted(ClientError):
    def __init__(self, user: str, devices: Iterable[str]) -> None:
        self.user = user
        self.devices = sorted(devices)
        super().__init__(
            f"{user}'s identity key changed on {', '.join(self.devices)}; compare safety "
            f"numbers, then accept the change (/trust {user}) before sending"
        )


class LocalStoreError(Exception):
    """Base of the local store's errors."""


class WrongPassphrase(LocalStoreError):
    """The passphrase does not unwrap the data key (the GCM tag did not verify)."""


class CorruptEntry(LocalStoreError):
    """A sealed value failed authentication: moved to another row, edited, or damaged."""


class StoreClosed(LocalStoreError):
    """The store was closed; open it again."""
