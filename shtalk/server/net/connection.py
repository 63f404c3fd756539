"""The server side of a connection: framing, limits, state, dispatch.

The LineOnlyReceiver only frames and enforces limits; parsing and validation
are shtalk.wire's (sans-IO), the work is the avatar's.  Connection states
are explicit: NEW (hello required) -> READY (may authenticate) -> AUTHENTICATING
-> AUTHENTICATED.  Timers run on an injected clock so unit tests drive them.
"""

from __future__ import annotations

import contextlib
import enum
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.cred import error as cred_error
from twisted.cred.credentials import ICredentials
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred, gatherResults, inlineCallbacks, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import LineOnlyReceiver
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from shtalk import __version__
from shtalk.server.accounts.security import AccountSecurity, account_key
from shtalk.server.chat.avatar import ChatUser
from shtalk.server.chat.naming import user_key
from shtalk.server.chat.service import ChatService
from shtalk.server.cred.checkers import (
    AccessTokenCredentials,
    AccountNotActive,
    IChatMind,
    IChatUser,
    OtpRequired,
    PasswordCredentials,
    TokenRefused,
)
from shtalk.server.iserver import TokenReuse, TokenRevoked, TokenUnknown
from shtalk.server.net.account import AccountHandlers
from shtalk.server.net.admission import PendingHandshakes
from shtalk.server.ops.ratelimit import REQUEST_ACTIONS, RateLimiter, address_key
from shtalk.wire import frames
from shtalk.wire.errors import ErrorCode, ProtocolError
from shtalk.wire.frames import Request
from shtalk.wire.names import clean_label
from shtalk.wire.schema import PRE_AUTH, PROTOCOL_VERSION

log = Logger()

PIPELINED = frozenset({"send", "ack", "ping"})
#: Requests that pass AccountSecurity.gate, i.e. wait while the failure throttle says so.
THROTTLED = frozenset({
    "register", "login", "verify_email", "password_reset_request", "password_reset",
    "password_change", "totp_confirm", "totp_disable", "totp_recovery_codes",
})
# Authentication events written to the operator's log (ASVS 16.3.1), success or not.
AUDITED = frozenset({
    "register", "login", "resume", "refresh", "logout", "verify_email", "resend_verification",
    "password_reset_request", "password_reset", "password_change", "totp_enroll",
    "totp_confirm", "totp_disable", "totp_recovery_codes", "device_remove",
})


class _Dropped(Exception):
    """A request whose turn came after its connection began to close: never run."""


def _after(d: Deferred[None]) -> Deferred[None]:
    """A Deferred that fires when ``d`` does, without taking its result."""
    out: Deferred[None] = Deferred()

    def fire(result: object) -> object:
        out.callback(None)
        return result

    d.addBoth(fire)
    return out


def _account_of(username: object) -> str | None:
    """The rate-limit account key of a username in a pre-login request (None: none)."""
    if not isinstance(username, str):
        return None
    try:
        return "n:" + user_key(username)[1]
    except ProtocolError:
        return "n:" + username[:64].lower()


class State(enum.Enum):
    NEW = "new"
    READY = "ready"
    AUTHENTICATING = "authenticating"
    AUTHENTICATED = "authenticated"


@implementer(IChatMind, IHandshakeListener)
class ShtalkServerProtocol(AccountHandlers, LineOnlyReceiver):
    delimiter = b"\n"
    factory: ShtalkServerFactory

    def __init__(self) -> None:
        self.state = State.NEW
        self.avatar: ChatUser | None = None
        self.device_id = ""
        self.device_label = ""
        self.family = ""
        self._logout: Callable[[], None] | None = None
        self._deadline: IDelayedCall | None = None
        self._idle: IDelayedCall | None = None
        self._peer = ""
        self._counted = False
        # Live pushes are held while the backlog is replayed, so a device sees
        # every message exactly once and in order.
        self._holding: list[tuple[int, bytes]] | None = None
        self._serial: Deferred[None] | None = None
        self._post_reply: Callable[[], Any] | None = None
        self._inflight: set[Deferred[None]] = set()
        self._peer_key = ""
        self._limited_at: deque[float] = deque()
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
        peer = self.transport.getPeer()  # type: ignore[union-attr]
        self._peer = getattr(peer, "host", str(peer))
        self._peer_key = address_key(self._peer)
        nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if nodelay is not None:
            # Not every transport is TCP (tests, UNIX sockets).
            with contextlib.suppress(Exception):
                nodelay(True)
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
        """The per-address cap of our own (LimitConnectionsByPeer is broken on Twisted 26)."""
        if self.factory.admit(self._peer):
            self._counted = True
            return
        self._closing = True
        self._send_error(
            None,
            ErrorCode.TOO_MANY_CONNECTIONS,
            "too many connections from your address; close some and retry",
        )
        self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closing = True
        for call in (self._deadline, self._idle):
            if call is not None and call.active():
                call.cancel()
        self._deadline = self._idle = None
        if self._counted:
            self.factory.release(self._peer)
            self._counted = False
        self._drop_avatar()

    def _drop_avatar(self) -> None:
        logout, self._logout = self._logout, None
        self.avatar = None
        peers = self.factory.sessions.get(self.family)
        if peers is not None:
            peers.discard(self)
            if not peers:
                del self.factory.sessions[self.family]
        if logout is not None:
            logout()

    def _timed_out(self, what: str) -> None:
        self._closing = True
        if self._handshaking:
            # No TLS channel to say why, and Twisted's loseConnection would wait for
            # the handshake forever once a line is queued for it.
            self.transport.abortConnection()  # type: ignore[union-attr]
            return
        self._send_error(
            None, ErrorCode.TIMEOUT, f"connection closed: no {what} in time; reconnect to go on"
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
            None,
            ErrorCode.LINE_TOO_LONG,
            f"lines are limited to {self.MAX_LENGTH} bytes; connection closed",
        )
        # Stop reading (and buffering) the abusive peer, but let TLS flush the error
        # line: abortConnection at once would discard it (seen over real TLS).  Abort
        # only if the peer does not complete the close in time.
        transport.pauseProducing()
        transport.loseConnection()
        for call in (self._deadline, self._idle):
            if call is not None and call.active():
                call.cancel()
        self._idle = None
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
        # Requests run in order, except that consecutive sends/acks/pings overlap
        # (they are ordered by the store); so "register" then "login" pasted
        # together behave as typed, and the message path stays pipelined.
        if request.type in PIPELINED:
            serial = self._serial
            gate = _after(serial) if serial is not None and not serial.called else None
        else:
            gate = self._all_done()
        if gate is None:
            done = self._run(request)
        else:
            done = gate.addCallback(lambda _: self._run(request))
        if request.type in PIPELINED:
            self._track(done)
        else:
            self._serial = done
            self._inflight.clear()
            done.addCallback(self._serial_finished, done)

    def _all_done(self) -> Deferred[None] | None:
        pending = [d for d in self._inflight if not d.called]
        if self._serial is not None and not self._serial.called:
            pending.append(self._serial)
        if not pending:
            return None
        return gatherResults([_after(d) for d in pending]).addCallback(lambda _: None)

    def _track(self, done: Deferred[None]) -> None:
        self._inflight.add(done)
        done.addCallback(self._untrack, done)

    def _untrack(self, _: object, done: Deferred[None]) -> None:
        self._inflight.discard(done)

    def _serial_finished(self, _: object, done: Deferred[None]) -> None:
        if self._serial is done:
            self._serial = None

    def _run(self, request: Request) -> Deferred[None]:
        """Run one request; the returned Deferred always succeeds (errors were replied).

        A request whose turn comes once the connection is closing is dropped: it may
        have queued behind the request that got the connection closed.
        """
        if self._closing:
            return succeed(None)
        avatar = self.avatar
        if request.type == "ack" and avatar is not None and self.state is State.AUTHENTICATED:
            # Fast path: acks are most requests (not rate limited, not audited, no result).
            d: Deferred[Any] = avatar.ack_store(request.args["seqs"])
            d.addCallbacks(
                self._acked, self._failed, callbackArgs=(request.id,), errbackArgs=(request,)
            )
            return d
        try:
            self._check_state(request)
            handler = getattr(self, "on_" + request.type)
            gate = self._rate_gate(request)
            if gate is None:
                d = maybeDeferred(handler, request)
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

    def _unless_closing(self, handler: Callable[[Request], Any], request: Request) -> Any:
        """The handler, unless the connection began to close while the check was pending."""
        if self._closing:
            raise _Dropped()
        return handler(request)

    def _rate_gate(self, request: Request) -> Deferred[None] | None:
        """Rate limiting (shtalk.server.ops.ratelimit): raises or returns a pending check."""
        limiter = self.factory.limiter
        if limiter is None:
            return None
        action = REQUEST_ACTIONS.get(request.type)
        if action is None:
            return None
        if self.avatar is not None:
            account: str | None = str(self.avatar.user.id)
        else:
            account = _account_of(request.args.get("username"))
        return limiter.check(action, account, self._peer_key, self._throttled_for(request))

    def _throttled_for(self, request: Request) -> float:
        """Seconds the failure throttle will make this request wait (0: none), asked
        before the buckets so one refusal names the later of the two waits."""
        sec = self.factory.security
        if sec is None or request.type not in THROTTLED:
            return 0.0
        if self.avatar is not None:
            account: str | None = self.avatar.user.key
        elif request.type == "register":
            account = None
        else:
            account = account_key(request.args["username"])
        return float(sec.throttle.check(account, self._peer).retry_after)

    def _refused(self, e: ProtocolError) -> None:
        """Sustained abuse (many rate_limited replies within a minute) closes the connection."""
        if e.code is not ErrorCode.RATE_LIMITED:
            return
        now = self.factory.clock.seconds()
        times = self._limited_at
        times.append(now)
        while times and times[0] < now - 60.0:
            times.popleft()
        limiter = self.factory.limiter
        if limiter is not None and len(times) > limiter.config.disconnect_after:
            log.warn("closing a connection that kept exceeding its rate limits",
                     event="ratelimit.disconnect", address=self._peer, count=len(times))
            transport: Any = self.transport
            if transport is not None:
                self._post_reply = None
                # The error line goes out first; nothing queued behind it runs.
                self._closing = True
                self.factory.clock.callLater(0, transport.loseConnection)

    def _check_state(self, request: Request) -> None:
        rtype = request.type
        if rtype == "ping":
            return
        if self.state is State.NEW and rtype != "hello":
            raise ProtocolError(ErrorCode.HELLO_REQUIRED, 'send {"type": "hello", "version": 1}')
        if rtype not in PRE_AUTH and self.state is not State.AUTHENTICATED:
            raise ProtocolError(ErrorCode.NOT_AUTHENTICATED, "log in first (login or resume)")
        if rtype in ("login", "resume", "refresh", "register") and self.state in (
            State.AUTHENTICATING,
            State.AUTHENTICATED,
        ):
            raise ProtocolError(
                ErrorCode.ALREADY_AUTHENTICATED, "this connection is logged in; logout first"
            )

    def _audit(self, request: Request, result: str) -> None:
        """Every authentication event goes to the (sealed) log; secrets never do."""
        rtype = request.type
        if rtype not in AUDITED:
            return
        fields: dict[str, Any] = {"address": self._peer, "rtype": rtype, "result": result}
        if self.avatar is not None:
            fields["user_id"] = self.avatar.user.id
            fields["device"] = self.avatar.device_id
        elif isinstance(request.args.get("username"), str):
            fields["username"] = request.args["username"]
        level = log.info if result == "ok" else log.warn
        level("auth {rtype}: {result}", event="auth." + rtype, **fields)
        ops = self.factory.chat.ops
        if rtype == "register" and result == "ok" and ops is not None:
            ops.monitor.registered(None, self._peer_key)

    def _acked(self, _: object, request_id: Any) -> None:
        transport = self.transport
        if transport is not None:
            if type(request_id) is int:
                transport.write(b'{"id":%d,"ok":true}\n' % request_id)  # = frames.ok(id)
            else:
                transport.write(frames.ok(request_id))

    def _reply(self, fields: dict[str, Any] | None, request: Request) -> None:
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
        e = failure.value
        self._audit(request, str(getattr(e, "code", ErrorCode.INTERNAL_ERROR)))
        if isinstance(e, ProtocolError):
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

    def _send_error(self, rid: Any, code: ErrorCode, message: str) -> None:
        self.send_bytes(frames.error(rid, code, message))

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
        """The session ended elsewhere (logout, device removed): tell, then forget it."""
        if self.avatar is not None:
            self.send_bytes(frames.push("logged_out", reason=reason))
        self._drop_avatar()
        self.state = State.READY

    # handlers: session ---------------------------------------------------------------
    def on_hello(self, request: Request) -> dict[str, Any]:
        version = request.args["version"]
        if version != PROTOCOL_VERSION:
            raise ProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"this server speaks protocol version {PROTOCOL_VERSION}",
                supported=[PROTOCOL_VERSION],
            )
        if self.state is State.NEW:
            self.state = State.READY
        return {
            "version": PROTOCOL_VERSION,
            "server": f"shtalk/{__version__}",
            "max_line_length": self.factory.max_line_length,
            "max_envelope_bytes": self.factory.chat.max_envelope_bytes,
            "min_password_length": self.factory.chat.min_password_length,
        }

    def on_ping(self, request: Request) -> dict[str, Any]:
        return {}

    def on_register(self, request: Request) -> Deferred[Any]:
        # CAPTCHA, then the account (pending until its email is verified): accountproto.py
        d: Deferred[Any] = self._register(request)
        return d

    def _login_failed(self, failure: Failure) -> Failure:
        self.state = State.READY
        self.device_id = self.device_label = ""
        return failure

    @inlineCallbacks
    def _portal_login(self, creds: ICredentials) -> Any:
        """portal.login, with cred's refusals turned into protocol errors."""
        try:
            _, avatar, logout = yield self.factory.portal.login(creds, self, IChatUser)
        except OtpRequired:
            raise ProtocolError(
                ErrorCode.OTP_REQUIRED,
                'this account has TOTP: send the login again with "otp" (a 6-digit code '
                "or a recovery code)",
            ) from None
        except AccountNotActive as e:
            if e.status == "pending":
                raise ProtocolError(
                    ErrorCode.EMAIL_NOT_VERIFIED,
                    "verify your email first: enter the mailed code (verify_email); "
                    "resend_verification mails a new one",
                ) from None
            raise ProtocolError(
                ErrorCode.INVALID_CREDENTIALS,
                f"this account is {e.status}; finish its set-up or ask the operator",
            ) from None
        except TokenRefused as e:
            raise ProtocolError(ErrorCode(e.code), e.message) from None
        except cred_error.UnauthorizedLogin:
            raise ProtocolError(
                ErrorCode.INVALID_CREDENTIALS, "invalid username or password"
            ) from None
        if self.transport is None or not self.connected:
            logout()
            raise ProtocolError(ErrorCode.TIMEOUT, "connection closed during login")
        self.avatar, self._logout = avatar, logout
        self.device_id = avatar.device_id
        # Hold live pushes until the backlog has been replayed.
        self._holding = []
        self.state = State.AUTHENTICATED
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None
        return avatar

    def _bind_family(self, family: str) -> None:
        assert self.avatar is not None
        self.avatar.family = family
        self.family = family
        self.factory.sessions.setdefault(family, set()).add(self)

    @inlineCallbacks
    def on_login(self, request: Request) -> Any:
        a = request.args
        key = self._login_gate(a)  # throttle and CAPTCHA (accountproto.py)
        self.state = State.AUTHENTICATING
        self.device_id = a["device"]["id"]
        self.device_label = clean_label(a["device"].get("label") or "")
        d = self._portal_login(PasswordCredentials(a["username"], a["password"], a.get("otp")))
        d.addErrback(self._login_refused, key)
        avatar: ChatUser = yield d.addErrback(self._login_failed)
        self._login_succeeded(key)
        family, access, refresh = yield self.factory.chat.start_session(
            avatar.user.id, avatar.device_id
        )
        self._bind_family(family)
        self._after_reply(self._replay_backlog)
        return {
            "user": avatar.user.name,
            "device": avatar.device_id,
            "access_token": access,
            "refresh_token": refresh,
            "expires_in": self.factory.chat.issuer.access_ttl,
        }

    @inlineCallbacks
    def on_resume(self, request: Request) -> Any:
        self.state = State.AUTHENTICATING
        d = self._portal_login(AccessTokenCredentials(request.args["access_token"]))
        avatar: ChatUser = yield d.addErrback(self._login_failed)
        assert avatar.family is not None
        self._bind_family(avatar.family)
        self._after_reply(self._replay_backlog)
        return {"user": avatar.user.name, "device": avatar.device_id}

    @inlineCallbacks
    def on_refresh(self, request: Request) -> Any:
        self.state = State.AUTHENTICATING
        try:
            _, access, refresh = yield self.factory.chat.refresh(request.args["refresh_token"])
        except TokenReuse as e:
            self.state = State.READY
            log.warn("refresh token reuse: session family revoked")
            # Whoever holds the family's live connections may be the thief: drop them.
            for proto in list(self.factory.sessions.pop(e.family, ())):
                proto.session_revoked("this session was revoked: its refresh token was reused")
            raise ProtocolError(
                ErrorCode.TOKEN_REVOKED,
                "that refresh token was already used; every session of this login "
                "was revoked. Log in with your password",
            ) from None
        except TokenRevoked:
            self.state = State.READY
            raise ProtocolError(
                ErrorCode.TOKEN_REVOKED, "this session was logged out; log in with your password"
            ) from None
        except TokenUnknown:
            self.state = State.READY
            raise ProtocolError(
                ErrorCode.INVALID_TOKEN, "unknown or expired refresh token; log in again"
            ) from None
        d = self._portal_login(AccessTokenCredentials(access))
        avatar: ChatUser = yield d.addErrback(self._login_failed)
        assert avatar.family is not None
        self._bind_family(avatar.family)
        self._after_reply(self._replay_backlog)
        return {
            "user": avatar.user.name,
            "device": avatar.device_id,
            "access_token": access,
            "refresh_token": refresh,
            "expires_in": self.factory.chat.issuer.access_ttl,
        }

    def _after_reply(self, f: Callable[[], Any]) -> None:
        """Run ``f`` right after the reply line of the current request is written."""
        self._post_reply = f

    @inlineCallbacks
    def _replay_backlog(self) -> Any:
        avatar = self.avatar
        if avatar is None:
            return
        try:
            messages = yield avatar.pending()
        except Exception:
            log.failure("loading the backlog failed")
            messages = []
        router = self.factory.chat.router
        sent: set[int] = set()
        for m in messages:
            env = m.envelope_for(avatar.user.id, avatar.device_id)
            if env is None:
                continue
            self.send_bytes(router.encode_message(m, env))
            sent.add(m.seq)
        held, self._holding = self._holding or [], None
        for seq, line in held:
            if seq not in sent:
                self.send_bytes(line)
        self.send_bytes(frames.push("backlog_done", count=len(sent)))
        try:  # then where one's contacts are, so the client shows it at once
            lines = yield self.factory.chat.presence_snapshot(avatar.user.id)
        except Exception as e:  # best effort (e.g. shutting down): the live pushes go on
            log.warn("presence after the backlog not sent ({error})", error=type(e).__name__)
            lines = []
        for line in lines:
            self.send_bytes(line)

    @inlineCallbacks
    def on_logout(self, request: Request) -> Any:
        assert self.avatar is not None
        family = self.family
        yield self.avatar.logout(family)
        # Every connection of this session family is logged out at once.
        for proto in list(self.factory.sessions.pop(family, ())):
            if proto is not self:
                proto.session_revoked("this session was logged out on another connection")
        self._drop_avatar()
        self.state = State.READY
        return {}

    # handlers: chat -------------------------------------------------------------------
    def _me(self) -> ChatUser:
        assert self.avatar is not None
        return self.avatar

    def on_devices(self, request: Request) -> Deferred[Any]:
        user = request.args.get("user")
        if user is not None:
            user_key(user)
        return self._me().devices(user)

    def on_room_create(self, request: Request) -> Deferred[Any]:
        a = request.args
        return self._me().create_room(a["room"], bool(a.get("invite_only", False)))

    def on_room_join(self, request: Request) -> Deferred[Any]:
        return self._me().join(request.args["room"])

    def on_room_leave(self, request: Request) -> Deferred[Any]:
        return self._me().leave(request.args["room"])

    def on_room_invite(self, request: Request) -> Deferred[Any]:
        return self._me().invite(request.args["room"], request.args["user"])

    def on_room_kick(self, request: Request) -> Deferred[Any]:
        return self._me().kick(request.args["room"], request.args["user"])

    def on_room_role(self, request: Request) -> Deferred[Any]:
        a = request.args
        return self._me().set_role(a["room"], a["user"], a["role"])

    def on_room_list(self, request: Request) -> Deferred[Any]:
        return self._me().list_rooms()

    def on_room_members(self, request: Request) -> Deferred[Any]:
        return self._me().members(request.args["room"])

    def on_send(self, request: Request) -> Deferred[Any]:
        a = request.args
        chat = self.factory.chat
        if chat.captcha_required_accounts or chat.captcha_required_addresses:
            # The monitoring flagged someone: a flagged sender proves to be a person
            # before the next message goes out (the CAPTCHA is in the error).
            sec = self.factory.security
            if sec is not None:
                sec.monitor_gate(self.conn_token, self._uid(), self._peer, a.get("captcha"))
        d = self._me().send(
            a["to"], a.get("envelope"), a.get("envelopes"), a["client_id"], a.get("expires_in")
        )
        self._push_back()
        return d

    def _push_back(self) -> None:
        """Back-pressure: while the store's write queue is full, stop reading this
        sender until the queue has gone into a transaction (TCP then slows it down)."""
        store: Any = self.factory.chat.store
        overloaded = getattr(store, "overloaded", None)
        transport: Any = self.transport
        if self._store_paused or overloaded is None or transport is None or not overloaded():
            return
        self._store_paused = True
        transport.pauseProducing()

        def resume(_: object) -> None:
            self._store_paused = False
            t: Any = self.transport
            if t is not None and self.connected and not getattr(t, "disconnecting", False):
                t.resumeProducing()

        store.when_drained().addCallback(resume)

    def on_device_remove(self, request: Request) -> Deferred[Any]:
        d: Deferred[Any] = self._me().remove_device(request.args["device"])
        return d

    def on_keys_publish(self, request: Request) -> Deferred[Any]:
        a = request.args
        d: Deferred[Any] = self._me().publish_keys(
            a.get("bundle"), a.get("one_time") or [], bool(a.get("replace", False))
        )
        return d

    def on_keys_count(self, request: Request) -> Deferred[Any]:
        d: Deferred[Any] = self._me().key_counts()
        return d

    def on_keys_fetch(self, request: Request) -> Deferred[Any]:
        a = request.args
        d: Deferred[Any] = self._me().fetch_keys(a["user"], a.get("device"))
        return d

    def on_report(self, request: Request) -> Deferred[Any]:
        a = request.args
        ops = self.factory.chat.ops
        if ops is None:
            raise ProtocolError(ErrorCode.FORBIDDEN, "reports are not taken by this server")
        d: Deferred[Any] = ops.moderation.report(
            self._me().user, ops.monitor, a["user"], a["reason"], a.get("envelope"),
            a.get("plaintext"), self._peer_key,
        )
        return d

    def on_ack(self, request: Request) -> Deferred[Any]:
        d: Deferred[Any] = self._me().ack(request.args["seqs"])
        return d


class ShtalkServerFactory(Factory):
    protocol = ShtalkServerProtocol  # type: ignore[assignment]

    def __init__(
        self,
        chat: ChatService,
        portal: Portal,
        clock: IReactorTime,
        max_line_length: int = 1 << 20,
        pre_auth_timeout: float = 30.0,
        idle_timeout: float = 600.0,
        max_connections_per_address: int = 20,
    ) -> None:
        self.chat = chat
        self.portal = portal
        self.clock = clock
        self.max_line_length = max_line_length
        self.pre_auth_timeout = pre_auth_timeout
        self.idle_timeout = idle_timeout
        self.max_per_address = max_connections_per_address
        self.per_address: dict[str, int] = {}
        self.sessions: dict[str, set[ShtalkServerProtocol]] = {}
        self.requests = 0
        # Operations (issue 7): set by make_chat_service; None means "not limited".
        self.limiter: RateLimiter | None = None
        # Account security (issue 6): set by make_chat_service; None: no checks at all.
        self.security: AccountSecurity | None = None
        # Sockets not yet past the TLS handshake (shtalk.server.net.admission); set by
        # make_chat_service, for the listener and the metrics.
        self.admission: PendingHandshakes | None = None

    def admit(self, host: str) -> bool:
        """Count a connection past the handshake; False: the address is at its cap."""
        n = self.per_address.get(host, 0)
        if n >= self.max_per_address:
            return False
        self.per_address[host] = n + 1
        return True

    def release(self, host: str) -> None:
        n = self.per_address.get(host, 0) - 1
        if n > 0:
            self.per_address[host] = n
        else:
            self.per_address.pop(host, None)
