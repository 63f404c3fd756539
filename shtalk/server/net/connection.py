"""The server side of a connection: framing, limits, timers, state, dispatch.

The LineOnlyReceiver only frames and enforces limits; parsing and validation are
shtalk.wire's (sans-IO), the state is the table in `states`, the order requests run
in is `ordering`'s, which code runs a request is `dispatch`'s (the connection's own
``on_hello``/``on_ping``, else a handler object's: `login`, `chathandlers`,
`account`), and the work is the avatar's.  Refusals become wire errors through
`errors`.  Timers run on an injected clock so unit tests drive them.
"""

from __future__ import annotations

import secrets
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from shtalk import __version__
from shtalk.server.accounts.gates import RegisterAttempt
from shtalk.server.chat import pushes
from shtalk.server.chat.presence import Presence
from shtalk.server.eserver import SessionEnded
from shtalk.server.iserver import IChatMind, IChatUser
from shtalk.server.ishared import IAddressCounts
from shtalk.server.net.addresscounts import AddressCounts
from shtalk.server.net.admission import PendingHandshakes
from shtalk.server.net.audit import Audit
from shtalk.server.net.dispatch import Handler, dispatch_table
from shtalk.server.net.errors import to_wire
from shtalk.server.net.limits import RequestLimits
from shtalk.server.net.ordering import RequestOrder
from shtalk.server.net.states import ConnectionState, Input, State
from shtalk.server.ops.ratelimit import address_key
from shtalk.tcp import set_nodelay
from shtalk.wire import frames
from shtalk.wire.errors import ErrorCode, ProtocolError
from shtalk.wire.frames import Request
from shtalk.wire.schema import PROTOCOL_VERSION

log = Logger()


class _Dropped(Exception):
    """A request whose turn came after its connection began to close: never run."""


@implementer(IChatMind, IHandshakeListener)
class ShtalkServerProtocol(LineOnlyReceiver):
    delimiter = b"\n"
    factory: ShtalkServerFactory

    def __init__(self) -> None:
        self.machine = ConnectionState()
        self.avatar: IChatUser | None = None
        self.device_id = ""
        self.device_label = ""
        self.family = ""
        self.peer = ""
        self.peer_key = ""
        self._conn_token: str | None = None
        self._register_attempt: RegisterAttempt | None = None
        self._logout: Callable[[], None] | None = None
        self._deadline: IDelayedCall | None = None
        self._idle: IDelayedCall | None = None
        self._counted = False
        self._lost = False
        # Live pushes are held while the backlog is replayed (shtalk.server.net.backlog).
        self._holding: list[tuple[int, bytes]] | None = None
        self._order = RequestOrder()
        self._post_reply: Callable[[], Any] | None = None
        # Made at the first refusal: an empty deque is ~600 bytes, on every connection.
        self._limited_at: deque[float] | None = None
        # Over TLS, true until the handshake is done (the deadline then aborts: there
        # is no channel for an error line yet); the admission is shtalk.server.net.admission.
        self._handshaking = False
        self._store_paused = False  # not reading: the store's write queue is full
        # Set once the connection is closing or gone: requests not yet started are
        # dropped (never run, no reply), whatever queued them.
        self._closing = False

    # connection lifecycle ----------------------------------------------------
    def connectionMade(self) -> None:
        f = self.factory
        self.MAX_LENGTH = f.max_line_length
        # The client's address, also behind a proxy: with --proxy-protocol this protocol
        # is built only once the PROXY header named the client (shtalk.server.net.proxied).
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self.peer = getattr(peer, "host", str(peer))
        self.peer_key = address_key(self.peer)
        set_nodelay(self.transport)
        # The pre-authentication deadline is fixed, from accept: partial data (or a
        # handshake that never ends) never extends it.
        self._deadline = f.clock.callLater(f.pre_auth_timeout, self._timed_out, "log in")
        self._reset_idle()
        if isinstance(self.transport, TLSMemoryBIOProtocol):
            # Counted once past the handshake: before it, the admission bounds sockets,
            # and the refusal below needs the TLS channel to be read.
            self._handshaking = True
        else:
            self._admit()

    def handshakeCompleted(self) -> None:
        """IHandshakeListener: the TLS handshake is done."""
        self._handshaking = False
        self._admit()

    def _admit(self) -> None:
        """The per-address cap of our own (LimitConnectionsByPeer is broken on Twisted 26).

        A cluster's count answers later (Redis): the connection's requests wait for it."""
        admitted = self.factory.counts.admit(self.peer)
        if isinstance(admitted, Deferred):
            self._order.wait_for(admitted.addCallback(self._admitted))
            return
        self._admitted(admitted)

    def _admitted(self, admitted: bool) -> None:
        if admitted and self._lost:  # gone while the count was asked
            self.factory.counts.release(self.peer)
        self._counted = admitted and not self._lost
        if admitted or self._lost:
            return
        self._closing = True
        self._send_error(
            ErrorCode.TOO_MANY_CONNECTIONS,
            "too many connections from your address; close some and retry",
        )
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closing = True
        self._lost = True
        self._cancel_timers()
        if self._counted:
            self.factory.counts.release(self.peer)
            self._counted = False
        self._drop_avatar()

    def _cancel_timers(self) -> None:
        for call in (self._deadline, self._idle):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._idle = None

    def _timed_out(self, what: str) -> None:
        self._closing = True
        if self._handshaking:
            # No TLS channel to say why, and Twisted's loseConnection would wait for
            # the handshake forever once a line is queued for it.
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._send_error(
            ErrorCode.TIMEOUT, f"connection closed: no {what} in time; reconnect to go on"
        )
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _reset_idle(self) -> None:
        if self._idle is not None and self._idle.active():
            self._idle.reset(self.factory.idle_timeout)
        else:
            self._idle = self.factory.clock.callLater(
                self.factory.idle_timeout, self._timed_out, "request"
            )

    # framing -------------------------------------------------------------------
    def lineLengthExceeded(self, line: bytes) -> None:
        transport: Any = self.transport
        if transport is None or getattr(transport, "disconnecting", False):
            return
        self._closing = True
        self._send_error(
            ErrorCode.LINE_TOO_LONG,
            f"lines are limited to {self.MAX_LENGTH} bytes; connection closed",
        )
        # Stop reading (and buffering) the abusive peer, but let TLS flush the error
        # line: abortConnection at once would discard it (seen over real TLS).  Abort
        # only if the peer does not complete the close in time.
        transport.pauseProducing()
        transport.loseConnection()
        self._cancel_timers()
        self._deadline = self.factory.clock.callLater(2.0, transport.abortConnection)

    def lineReceived(self, line: bytes) -> None:
        if self._closing:
            return
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line.strip():
            return
        try:
            request = frames.parse_line(line)
        except ProtocolError as e:
            self.send_bytes(frames.error_from(e))
            return
        self._reset_idle()
        self.factory.requests += 1
        self._order.schedule(request, self._run)

    # dispatch ------------------------------------------------------------------
    def _run(self, request: Request) -> Deferred[None]:
        """Run one request; the returned Deferred always succeeds (errors were replied).

        A request whose turn comes once the connection is closing is dropped: it may
        have queued behind the request that got the connection closed.
        """
        if self._closing:
            return succeed(None)
        avatar = self.avatar
        if request.type == "ack" and avatar is not None:
            # Fast path: acks are most requests (not rate limited, not audited, no result).
            d: Deferred[Any] = avatar.ack(request.args["seqs"])
            d.addCallbacks(
                self._acked, self._failed, callbackArgs=(request.id,), errbackArgs=(request,)
            )
            return d
        refusal = self.machine.refusals[request.type]
        try:
            if refusal is not None:
                raise ProtocolError(*refusal)
            handler = self.factory.handlers[request.type]
            user = avatar.user if avatar is not None else None
            gate = self.factory.limits.check(request, user, self.peer, self.peer_key)
            if gate is None:
                d = maybeDeferred(handler, self, request)
            else:
                d = gate.addCallback(lambda _: self._unless_closing(handler, request))
        except ProtocolError as e:
            e.request_id = request.id
            self._audit(request, str(e.code))
            self._refused(e)
            self.send_bytes(frames.error_from(e))
            return succeed(None)
        d.addCallbacks(self._reply, self._failed, callbackArgs=(request,), errbackArgs=(request,))
        return d

    def _unless_closing(self, handler: Handler, request: Request) -> Any:
        """The handler, unless the connection began to close while the check was pending."""
        if self._closing:
            raise _Dropped()
        return handler(self, request)

    def _refused(self, e: ProtocolError) -> None:
        """Sustained abuse (many rate_limited replies within a minute) closes the connection."""
        if e.code is not ErrorCode.RATE_LIMITED:
            return
        if self._limited_at is None:
            self._limited_at = deque()
        if self.factory.limits.too_many(self._limited_at):
            log.warn("closing a connection that kept exceeding its rate limits",
                     event="ratelimit.disconnect", address=self.peer, count=len(self._limited_at))
            transport: Any = self.transport
            if transport is not None:
                self._post_reply = None
                # The error line goes out first; nothing queued behind it runs.
                self._closing = True
                self.factory.clock.callLater(0, transport.loseConnection)

    def _audit(self, request: Request, result: str) -> None:
        self.factory.audit.record(request, result, self.peer, self.peer_key, self.avatar)

    def _acked(self, _: object, request_id: Any) -> None:
        transport = self.transport
        if transport is not None:
            if type(request_id) is int:
                transport.write(b'{"id":%d,"ok":true}\n' % request_id)  # = frames.ok(id)
            else:
                transport.write(frames.ok(request_id))

    def _reply(self, fields: Mapping[str, Any] | None, request: Request) -> None:
        self._audit(request, "ok")
        if self.transport is None:
            return
        self.send_bytes(frames.ok(request.id, **(fields or {})))
        post, self._post_reply = self._post_reply, None
        if post is not None:
            post()

    def _failed(self, failure: Failure, request: Request) -> None:
        if isinstance(failure.value, _Dropped):
            return
        e = to_wire(failure.value)
        self._audit(request, str(e.code if e is not None else ErrorCode.INTERNAL_ERROR))
        if e is not None:
            self._refused(e)
            if "captcha" in e.extra:
                self.captcha_shown()
            self.send_bytes(frames.error(request.id, e.code, e.message, **e.extra))
            return
        # Never send a traceback to the peer; log it for the operator.
        log.failure("request {rtype} failed", failure, rtype=request.type)
        self.send_bytes(
            frames.error(request.id, ErrorCode.INTERNAL_ERROR, "the server failed; try again later")
        )

    def _send_error(self, code: ErrorCode, message: str) -> None:
        self.send_bytes(frames.error(None, code, message))

    # the connection's own requests -----------------------------------------------------
    def on_hello(self, request: Request) -> dict[str, Any]:
        version = request.args["version"]
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"this server speaks protocol version {PROTOCOL_VERSION}",
                supported=[PROTOCOL_VERSION],
            )
        self.machine.fire(Input.HELLO)
        f = self.factory
        return {
            "version": PROTOCOL_VERSION,
            "server": f"shtalk/{__version__}",
            "max_line_length": f.max_line_length,
            "max_envelope_bytes": f.max_envelope_bytes,
            "min_password_length": f.min_password_length,
        }

    def on_ping(self, request: Request) -> dict[str, Any]:
        return {}

    # what the handlers use ---------------------------------------------------------------
    @property
    def me(self) -> IChatUser:
        """The avatar (the state table lets session requests run only with one)."""
        assert self.avatar is not None
        return self.avatar

    @property
    def conn_token(self) -> str:
        """An opaque, unguessable name of this connection (CAPTCHAs are bound to it)."""
        if self._conn_token is None:
            self._conn_token = secrets.token_hex(16)
        return self._conn_token

    @property
    def register_attempt(self) -> RegisterAttempt:
        """This connection's registration attempt (shtalk.server.accounts.gates)."""
        if self._register_attempt is None:
            self._register_attempt = RegisterAttempt()
        return self._register_attempt

    def authenticating(self, device_id: str = "", label: str = "") -> None:
        """A login, resume or refresh begins; a password login names its device."""
        self.machine.fire(Input.AUTH_STARTED)
        self.device_id, self.device_label = device_id, label

    def auth_failed(self) -> None:
        self.machine.fire(Input.AUTH_FAILED)
        self.device_id = self.device_label = ""

    def authenticated(self, avatar: IChatUser, logout: Callable[[], None]) -> None:
        """The portal handed out an avatar: hold live pushes until the backlog is
        replayed, and the pre-authentication deadline is over."""
        if self.transport is None or not self.connected:
            logout()
            raise ProtocolError(ErrorCode.TIMEOUT, "connection closed during login")
        if self.machine.state is not State.AUTHENTICATING:
            logout()  # the session was revoked while the realm worked
            raise SessionEnded("this session ended during the login; log in again")
        self.avatar, self._logout = avatar, logout
        self.device_id = avatar.device_id
        self._holding = []
        self.machine.fire(Input.AUTH_OK)
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def bind_family(self, family: str) -> None:
        """This connection now belongs to that session (revocations of it reach it)."""
        self.me.family = family
        self.family = family
        self.factory.presence.bind_family(self, family)

    def after_reply(self, f: Callable[[], Any]) -> None:
        """Run ``f`` right after the reply line of the current request is written."""
        self._post_reply = f

    def release_held(self) -> list[tuple[int, bytes]]:
        held, self._holding = self._holding or [], None
        return held

    def logged_out(self) -> None:
        """Logged out by its own request."""
        self._drop_avatar()
        self.machine.fire(Input.LOGGED_OUT)

    def _drop_avatar(self) -> None:
        logout, self._logout = self._logout, None
        self.avatar = None
        if logout is not None:
            logout()

    def pause_until(self, resumed: Callable[[], Deferred[None]]) -> None:
        """Back-pressure: stop reading this peer until ``resumed()`` fires (TCP then slows
        it down); once per pause."""
        transport: Any = self.transport
        if self._store_paused or transport is None:
            return
        self._store_paused = True
        transport.pauseProducing()

        def resume(_: object) -> None:
            self._store_paused = False
            t: Any = self.transport
            if t is not None and self.connected and not getattr(t, "disconnecting", False):
                t.resumeProducing()

        resumed().addCallback(resume)

    def captcha_shown(self) -> None:
        """A person was just shown a CAPTCHA: solving it takes time, so an unauthenticated
        connection stays open at least as long as the challenge lives (the fixed
        pre-authentication deadline alone would close it under a person still typing,
        and the answer, bound to this connection, would be lost with it)."""
        deadline = self._deadline
        if deadline is None or not deadline.active():
            return  # logged in (no deadline), or closing
        if getattr(self.transport, "disconnecting", False):
            return
        wanted = self.factory.captcha_ttl + 5.0
        now = getattr(deadline, "seconds", self.factory.clock.seconds)()  # the timer's time
        if deadline.getTime() - now < wanted:
            deadline.reset(wanted)

    # IChatMind -----------------------------------------------------------------
    def send_bytes(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def deliver(self, seq: int, line: bytes) -> None:
        # Called once per recipient per message: kept to one branch and one write.
        if self._holding is None:
            transport = self.transport
            if transport is not None:
                transport.write(line)
        else:
            self._holding.append((seq, line))

    def session_revoked(self, reason: str = "logged out") -> None:
        """The session ended elsewhere: tell the peer why, then forget it."""
        if self.avatar is not None:
            self.send_bytes(pushes.logged_out(reason))
        self._drop_avatar()
        self.machine.fire(Input.LOGGED_OUT)


class ShtalkServerFactory(Factory):
    """What every connection shares: its handlers, limits, audit, and the counts."""

    protocol = ShtalkServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        clock: IReactorTime,
        handlers: Iterable[object],
        limits: RequestLimits,
        audit: Audit,
        presence: Presence,
        admission: PendingHandshakes | None = None,
        *,
        max_line_length: int = 1 << 20,
        pre_auth_timeout: float = 30.0,
        idle_timeout: float = 600.0,
        max_connections_per_address: int = 20,
        max_envelope_bytes: int = 65536,
        min_password_length: int = 12,
        captcha_ttl: float = 600.0,
        counts: IAddressCounts | None = None,
    ) -> None:
        self.clock = clock
        self.handlers = dispatch_table(ShtalkServerProtocol, handlers)
        self.limits = limits
        self.audit = audit
        self.presence = presence
        # Sockets not yet past the TLS handshake (shtalk.server.net.admission), for the
        # listener and the metrics.
        self.admission = admission
        self.max_line_length = max_line_length
        self.pre_auth_timeout = pre_auth_timeout
        self.idle_timeout = idle_timeout
        self.max_per_address = max_connections_per_address
        self.max_envelope_bytes = max_envelope_bytes
        self.min_password_length = min_password_length
        self.captcha_ttl = captcha_ttl
        #: Connections per address: this process's (the default), or a cluster's.
        self.counts: IAddressCounts = counts or AddressCounts(max_connections_per_address)
        self.requests = 0
