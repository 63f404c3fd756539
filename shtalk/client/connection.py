"""One TLS connection to a shtalk server: JSON lines, requests over Deferreds, pushes.

Why this layer is separate from the session: it knows nothing about accounts, tokens or
reconnecting, so it can be tested byte for byte over a ``StringTransport`` and reused by
tools that only need one connection.  Trust is decided by the caller, who passes either
the pinned fingerprint (`connect`) or asks for CA verification (`connect_system`).

Requests are the typed records of `shtalk.wire.requests`, written by `shtalk.wire.frames`;
replies are matched to them by the ``id`` this module generates, and ``ok: false``
becomes `ServerError` carrying the protocol's error code.  Lines without an ``id`` are
pushes: typed by `shtalk.wire.pushes` and handed to ``push_handler`` in arrival order (a
malformed one is logged and dropped; one of a type this client does not know is
ignored).  Nothing here logs request fields or reply bodies: they carry passwords and
tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any, cast

from cryptography.hazmat.primitives import hashes
from OpenSSL import SSL, crypto
from twisted.internet._sslverify import IOpenSSLTrustRoot
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import (
    IDelayedCall,
    IHandshakeListener,
    IOpenSSLClientConnectionCreator,
    IReactorTime,
)
from twisted.internet.protocol import Protocol
from twisted.internet.ssl import AcceptableCiphers, CertificateOptions, optionsForClientTLS
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from zope.interface import implementer

from shtalk import tlsutil as tls
from shtalk.client.errors import (
    CertificateChanged,
    CertificateInvalid,
    ConnectionLost,
    RequestTimeout,
    ServerError,
    UntrustedServer,
)
from shtalk.tcp import set_nodelay
from shtalk.wire.errors import ErrorCode, ProtocolError
from shtalk.wire.frames import read_server_line, reply_error, request_line
from shtalk.wire.pushes import ServerPush, parse_push
from shtalk.wire.records import ClientRequest

__all__ = [
    "CertificateChanged",
    "CertificateInvalid",
    "ClientConnection",
    "ConnectionLost",
    "RequestTimeout",
    "ServerError",
    "UntrustedServer",
    "connect",
    "connect_system",
    "fetch_fingerprint",
]

log = Logger()

_NO_REASON = cast(Failure, None)  # Twisted's connectionLost signature has a default

MAX_LINE = 1024 * 1024 + 64 * 1024
"""Longest line accepted from the server: its 1 MiB line limit plus slack for framing."""


def _fingerprint_of(cert: crypto.X509) -> str:
    return tls._colon_hex(cert.to_cryptography().fingerprint(hashes.SHA256()))


class _RecordingPinnedOptions(tls.PinnedClientOptions):
    """`tls.client_options_pinned` that also remembers the leaf it saw, so a refused
    handshake can be reported as `CertificateChanged` with both fingerprints."""

    seen: str | None = None

    def _verify(self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int,
                ok: int) -> bool:
        if depth == 0:
            self.seen = _fingerprint_of(cert)
        return super()._verify(conn, cert, errno, depth, ok)


@implementer(IOpenSSLClientConnectionCreator)
class _AnyCertificate:
    """Accepts any certificate and records the leaf's fingerprint: only to show it to a
    person who decides (`fetch_fingerprint`), never to talk over."""

    def __init__(self, hostname: str) -> None:
        self.hostname = hostname
        self.seen: str | None = None
        options = CertificateOptions(raiseMinimumTo=tls.MINIMUM_TLS,
                                     acceptableCiphers=tls._ciphers())
        self._ctx = options.getContext()
        self._ctx.set_verify(SSL.VERIFY_PEER, self._verify)

    def _verify(self, conn: SSL.Connection, cert: crypto.X509, errno: int, depth: int,
                ok: int) -> bool:
        if depth == 0:
            self.seen = _fingerprint_of(cert)
        return True

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._ctx, None)
        connection.set_app_data(tlsProtocol)
        if self.hostname and not tls._is_ip(self.hostname):
            connection.set_tlsext_host_name(self.hostname.encode("idna"))
        return connection


@implementer(IHandshakeListener)
class ClientConnection(LineOnlyReceiver):
    """One connection: `request` returns a Deferred of the reply; pushes go to
    ``push_handler``; `when_closed` fires when the link is gone."""

    delimiter = b"\n"
    MAX_LENGTH = MAX_LINE

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, Deferred[dict[str, Any]], IDelayedCall]] = {}
        self._closed_waiters: list[Deferred[None]] = []
        self._abort_call: IDelayedCall | None = None
        self.push_handler: Callable[[ServerPush], None] | None = None
        self.orphan_handler: Callable[[dict[str, Any]], None] | None = None
        self.max_line_length: int | None = None  # the server's, from the hello reply
        self.last_error: dict[str, Any] | None = None  # last id-less error from the server
        self.connected_ok = False
        self.closed = False
        self.close_reason: Failure | None = None
        self.handshake_done = False
        self._handshake_waiters: list[Deferred[None]] = []

    # -- life cycle -------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_ok = True
        set_nodelay(self.transport)

    def handshakeCompleted(self) -> None:
        if not self.handshake_done:
            self.handshake_done = True
            waiters, self._handshake_waiters = self._handshake_waiters, []
            for w in waiters:
                w.callback(None)

    def when_handshaken(self) -> Deferred[None]:
        """Fires once the TLS handshake (and so the certificate check) succeeded; fails
        with the reason if the connection ended first."""
        if self.handshake_done:
            return succeed(None)
        if self.closed:
            return fail(self.close_reason or ConnectionLost("closed before the handshake"))
        d: Deferred[None] = Deferred()
        self._handshake_waiters.append(d)
        return d

    def connectionLost(self, reason: Failure = _NO_REASON) -> None:
        self.closed = True
        self.close_reason = reason
        if self._abort_call is not None and self._abort_call.active():
            self._abort_call.cancel()
        pending, self._pending = self._pending, {}
        for rtype, d, timer in pending.values():
            if timer.active():
                timer.cancel()
            d.errback(ConnectionLost(f"the connection closed before the reply to {rtype!r}"))
        waiters, self._handshake_waiters = self._handshake_waiters, []
        for w in waiters:
            w.errback(reason)
        waiters, self._closed_waiters = self._closed_waiters, []
        for w in waiters:
            w.callback(None)

    def when_closed(self) -> Deferred[None]:
        """Fires (with None) once the connection is gone; at once if it already is."""
        d: Deferred[None] = Deferred()
        if self.closed:
            d.callback(None)
        else:
            self._closed_waiters.append(d)
        return d

    def close(self, grace: float = 2.0) -> None:
        """Close cleanly; abort if the peer has not let go within ``grace`` seconds."""
        if self.closed or self.transport is None:
            return
        transport = cast(Any, self.transport)
        transport.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.clock.callLater(grace, self._abort)

    def _abort(self) -> None:
        self._abort_call = None
        if not self.closed and self.transport is not None:
            cast(Any, self.transport).abortConnection()

    # -- requests ---------------------------------------------------------------------

    def request(self, request: ClientRequest, *,
                timeout: float = 30.0) -> Deferred[dict[str, Any]]:
        """Send ``request``; fires with the ``ok: true`` reply.

        Fails with `ServerError` (``ok: false``), `RequestTimeout` after ``timeout``
        seconds, or `ConnectionLost`.  Cancelling forgets the request (a late reply is
        dropped).
        """
        rtype = request.NAME
        if self.closed or self.transport is None:
            return fail(ConnectionLost(f"not connected; {rtype!r} was not sent"))
        rid = next(self._ids)
        line = request_line(rid, request)
        if self.max_line_length is not None and len(line) > self.max_line_length:
            return fail(ServerError(
                ErrorCode.LINE_TOO_LONG,
                f"the {rtype!r} request has {len(line)} bytes; the server takes at most "
                f"{self.max_line_length}"))

        def cancel(d: Deferred[dict[str, Any]]) -> None:
            entry = self._pending.pop(rid, None)
            if entry is not None and entry[2].active():
                entry[2].cancel()

        d: Deferred[dict[str, Any]] = Deferred(cancel)
        timer = self.clock.callLater(timeout, self._expire, rid, timeout)
        self._pending[rid] = (rtype, d, timer)
        self.sendLine(line)  # type: ignore[no-untyped-call]
        return d

    def _expire(self, rid: int, timeout: float) -> None:
        entry = self._pending.pop(rid, None)
        if entry is not None:
            entry[1].errback(RequestTimeout(f"no reply to {entry[0]!r} within {timeout:g} s"))

    # -- receiving --------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        obj = read_server_line(line)
        if obj is None:
            log.warn("ignoring a line from the server that is not a JSON object ({n} bytes)",
                     n=len(line))
            return
        if "id" not in obj:
            self._push(obj)
            return
        rid = obj["id"]
        if rid is None:
            self._orphan(obj)
            return
        entry = self._pending.pop(rid, None) if isinstance(rid, int) else None
        if entry is None:
            return  # a reply to a cancelled or timed-out request
        _rtype, d, timer = entry
        if timer.active():
            timer.cancel()
        if obj.get("ok") is True:
            d.callback(obj)
            return
        code, message = reply_error(obj)
        d.errback(ServerError(code, message, obj))

    def _push(self, obj: dict[str, Any]) -> None:
        try:
            push = parse_push(obj)
        except ProtocolError as e:
            # The message names the field, never its value.
            log.warn("ignoring a malformed {ptype} push: {why}",
                     ptype=str(obj.get("type"))[:40], why=e.message)
            return
        if push is not None and self.push_handler is not None:
            self.push_handler(push)

    def _orphan(self, obj: dict[str, Any]) -> None:
        """An error the server could not tie to a request (framing, timeout, limits)."""
        self.last_error = obj.get("error") if isinstance(obj.get("error"), dict) else None
        code = (self.last_error or {}).get("code", "?")
        log.info("the server reported {code} without a request id", code=code)
        if self.orphan_handler is not None:
            self.orphan_handler(obj)

    def lineLengthExceeded(self, line: bytes) -> None:
        log.warn("the server sent a line over {n} bytes; dropping the connection",
                 n=self.MAX_LENGTH)
        cast(Any, self.transport).abortConnection()


# -- connecting ----------------------------------------------------------------------


def _cancel_on_result(d: Deferred[Any], call: IDelayedCall) -> None:
    def cancel(result: object) -> object:
        if call.active():
            call.cancel()
        return result

    d.addBoth(cancel)


def _handshake(reactor: Any, conn: ClientConnection, timeout: float) -> Deferred[None]:
    """The handshake, aborted if it takes longer than ``timeout``."""

    def expire() -> None:
        if not conn.handshake_done and conn.transport is not None:
            cast(Any, conn.transport).abortConnection()

    d = conn.when_handshaken()
    _cancel_on_result(d, reactor.callLater(timeout, expire))
    return d


def _open(reactor: Any, host: str, port: int, creator: IOpenSSLClientConnectionCreator,
          timeout: float, on_handshake_failure: Callable[[Failure], Failure | Exception],
          ) -> Deferred[ClientConnection]:
    """TCP (``HostnameEndpoint``: names, IPv4 and IPv6) + TLS, firing after the handshake."""
    endpoint = wrapClientTLS(creator, HostnameEndpoint(reactor, host, port,
                                                       timeout=max(1, int(timeout))))
    conn = ClientConnection(reactor)
    connected: Deferred[Any] = connectProtocol(endpoint, conn)  # type: ignore[no-untyped-call]

    def translate(f: Failure) -> Failure:
        result = on_handshake_failure(f)
        return result if isinstance(result, Failure) else Failure(result)  # type: ignore[no-untyped-call]

    def tcp_up(_: object) -> Deferred[None]:
        return _handshake(reactor, conn, timeout).addErrback(translate)

    connected.addCallback(tcp_up)
    return connected.addCallback(lambda _: conn)


def _describe(f: Failure) -> str:
    value = f.value
    if isinstance(value, SSL.Error):
        return "TLS handshake failed"
    return str(value) or type(value).__name__


def connect(reactor: Any, host: str, port: int, fingerprint: str,
            timeout: float = 10.0) -> Deferred[ClientConnection]:
    """A connection accepting only the certificate with SHA-256 ``fingerprint``.

    Uses `shtalk.tlsutil.client_options_pinned` (TLS >= 1.2, Mozilla intermediate
    suites, SNI = ``host``).  Fires once the handshake completed; a different certificate
    fails with `CertificateChanged`, anything else with the underlying error.
    """
    try:
        creator = _RecordingPinnedOptions(fingerprint, host)
    except ValueError as e:
        return fail(e)
    expected = tls._colon_hex(creator.pin)

    def refused(f: Failure) -> Failure | Exception:
        if creator.seen is not None and creator.seen != expected:
            return CertificateChanged(host, port, expected, creator.seen)
        return f

    return _open(reactor, host, port, creator, timeout, refused)


def connect_system(reactor: Any, host: str, port: int, timeout: float = 10.0,
                   trust_root: IOpenSSLTrustRoot | None = None,
                   ) -> Deferred[ClientConnection]:
    """A connection verified the usual web way: a CA in ``trust_root`` (default: the
    platform's) and the host name checked by ``service_identity``.  Failure to verify is
    `CertificateInvalid`."""
    creator = optionsForClientTLS(
        host, trustRoot=trust_root,
        extraCertificateOptions={
            "raiseMinimumTo": tls.MINIMUM_TLS,
            "acceptableCiphers": AcceptableCiphers.fromOpenSSLCipherString(  # type: ignore[no-untyped-call]
                tls.MOZILLA_INTERMEDIATE_TLS12),
        },
    )

    def refused(f: Failure) -> Failure | Exception:
        if isinstance(f.value, SSL.Error) or type(f.value).__name__ == "VerificationError":
            return CertificateInvalid(host, port, _describe(f))
        return f

    return _open(reactor, host, port, creator, timeout, refused)


@implementer(IHandshakeListener)
class _FingerprintProbe(Protocol):
    def __init__(self, creator: _AnyCertificate) -> None:
        self.creator = creator
        self.result: Deferred[str] = Deferred()

    def handshakeCompleted(self) -> None:
        if not self.result.called and self.creator.seen is not None:
            self.result.callback(self.creator.seen)
        cast(Any, self.transport).loseConnection()

    def connectionLost(self, reason: Failure = _NO_REASON) -> None:
        if not self.result.called:
            self.result.errback(reason)


def fetch_fingerprint(reactor: Any, host: str, port: int,
                      timeout: float = 10.0) -> Deferred[str]:
    """The SHA-256 fingerprint (``AB:CD:...``) the server presents.

    A handshake WITHOUT verification and without sending anything: only to show the
    fingerprint to a person before pinning it (first contact); the conversation itself
    then runs over `connect` pinned to what they accepted, so a swap in between fails.
    """
    creator = _AnyCertificate(host)
    probe = _FingerprintProbe(creator)
    endpoint = wrapClientTLS(creator, HostnameEndpoint(reactor, host, port,
                                                       timeout=max(1, int(timeout))))
    connected: Deferred[Any] = connectProtocol(endpoint, probe)  # type: ignore[no-untyped-call]

    def tcp_up(_: object) -> Deferred[str]:
        def expire() -> None:
            if not probe.result.called and probe.transport is not None:
                cast(Any, probe.transport).abortConnection()

        _cancel_on_result(probe.result, reactor.callLater(timeout, expire))
        return probe.result

    return connected.addCallback(tcp_up)
