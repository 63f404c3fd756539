"""ServerSession: one logical, authenticated link to a server that survives reconnects.

Why it exists: a chat client must keep working across network drops and server restarts
without the person typing the password again, and must never talk to a server it has not
decided to trust.  So the session owns, in one place:

* trust: the certificate pin (TOFU through `KnownHosts` and a confirm callback) or, for
  servers with a CA certificate, system trust plus host-name checking;
* authentication on every (re)connect, cheapest first (`shtalk.client.authflow`):
  ``resume`` with the access token, then ``refresh`` (which rotates the tokens; they go
  to ``on_tokens`` to be persisted), then ``ask_password()`` and ``login``;
* reconnecting with bounded exponential backoff and jitter (so a restarted server is not
  hit by every client at the same instant);
* `request`, which waits while reconnecting (up to its timeout) instead of failing.

Its state (`shtalk.client.sessionstate`) moves only by the transition table there.
Every push, ``backlog_done`` and ``logged_out`` included, goes to ``on_push`` as a typed
record of `shtalk.wire.pushes`, in arrival order; after ``logged_out`` the session
re-authenticates (refresh, then password).  Tokens and passwords are never logged and
never put into exception messages.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from shtalk.client import connection as _connection
from shtalk.client.authflow import Authenticator, Credentials, amend, call
from shtalk.client.connection import ClientConnection
from shtalk.client.errors import (
    OTP_REJECTED,
    AuthenticationFailed,
    CertificateChanged,
    CertificateInvalid,
    ConnectionLost,
    ServerError,
    UntrustedServer,
)
from shtalk.client.knownhosts import KnownHosts
from shtalk.client.sessionstate import Input, SessionState, State
from shtalk.client.waiting import WaitingRequests
from shtalk.wire import requests as rq
from shtalk.wire.errors import ErrorCode
from shtalk.wire.pushes import LoggedOutPush, ServerPush
from shtalk.wire.records import ClientRequest

__all__ = ["OTP_REJECTED", "AuthenticationFailed", "Credentials", "ServerSession", "State"]

log = Logger()

FATAL_CODES = frozenset({
    ErrorCode.UNSUPPORTED_VERSION, ErrorCode.INVALID_CREDENTIALS, ErrorCode.EMAIL_NOT_VERIFIED,
    ErrorCode.OTP_REQUIRED, ErrorCode.CAPTCHA_REQUIRED, ErrorCode.CAPTCHA_FAILED,
})  # fmt: skip
"""Server errors that no reconnect can fix: stop and tell the person."""
RETRYABLE = frozenset(c.NAME for c in (rq.Ping, rq.Devices, rq.RoomList, rq.RoomMembers,
                                       rq.KeysCount, rq.Ack, rq.Send))
"""Requests safe to send again after the link dropped before their reply: reads, the
cumulative ``ack``, and ``send`` (deduplicated by its ``client_id``)."""

Extra = Callable[[str, dict[str, Any]], Deferred[dict[str, Any]] | dict[str, Any]]


class ServerSession:
    """See the module docstring.  ``state`` is a `State` (a string enum)."""

    max_password_attempts = 3

    def __init__(
        self,
        reactor: Any,
        host: str,
        port: int,
        known_hosts: KnownHosts | None,
        confirm_fingerprint: Callable[[str], Deferred[bool] | bool],
        ask_password: Callable[[], Deferred[str] | str],
        credentials: Credentials,
        on_tokens: Callable[[Credentials], Deferred[None] | None],
        on_push: Callable[[ServerPush], None],
        on_state: Callable[[str, str], None] | None = None,
        backoff: tuple[float, float] = (0.5, 30.0),
        *,
        trust: str = "pin",
        trust_root: Any = None,
        connect_timeout: float = 10.0,
        request_timeout: float = 30.0,
        client_name: str = "shtalk-client/0.1",
        rng: random.Random | None = None,
        ask_extra: Extra | None = None,
    ) -> None:
        if trust not in ("pin", "system"):
            raise ValueError(f"trust must be 'pin' or 'system', not {trust!r}")
        if trust == "pin" and known_hosts is None:
            raise ValueError("trust='pin' needs a KnownHosts")
        self.reactor = reactor
        self.host = host
        self.port = port
        self.known_hosts = known_hosts
        self.confirm_fingerprint = confirm_fingerprint
        self.ask_password = ask_password
        # Account security: asked (error code, error object) for the fields a login
        # refusal asks for -- {"otp": ...} after otp_required, {"captcha": {...}} after
        # captcha_required / captcha_failed (the challenge is error["captcha"]).
        self.ask_extra = ask_extra
        self.credentials = credentials
        self.on_tokens = on_tokens
        self.on_push = on_push
        self.backoff = backoff
        self.trust = trust
        self.trust_root = trust_root
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.client_name = client_name
        self.rng = rng or random.Random()  # jitter, not a secret
        self._state = SessionState(on_state)
        self.server_hello: dict[str, Any] = {}
        # How a connection is made (module functions; tests put fakes here).
        self.fetch_fingerprint: Callable[..., Deferred[str]] = _connection.fetch_fingerprint
        self.connect_pinned: Callable[..., Deferred[ClientConnection]] = _connection.connect
        self.connect_system: Callable[..., Deferred[ClientConnection]] = (
            _connection.connect_system)

        self._auth = Authenticator(self)
        self._conn: ClientConnection | None = None  # hello done
        self._authed: ClientConnection | None = None  # ... and authenticated
        self._opening: Deferred[ClientConnection] | None = None
        self._open_waiters: list[Deferred[ClientConnection]] = []
        self._running = False  # keep (re)connecting and authenticating
        self._stopped = False
        self._task: Deferred[None] | None = None
        self._start_waiters: list[Deferred[None]] = []
        self._waiting = WaitingRequests(reactor)

    @property
    def state(self) -> State:
        return self._state.state

    @property
    def state_message(self) -> str:
        return self._state.message

    # -- public API -------------------------------------------------------------------

    def start(self) -> Deferred[None]:
        """Connect, say hello, authenticate; keep doing so after every loss.

        Fires once authenticated; fails on what reconnecting cannot fix
        (`CertificateChanged`, `UntrustedServer`, `CertificateInvalid`,
        `AuthenticationFailed`, ``unsupported_version``).
        """
        self._stopped = False
        self._running = True
        if self._is_authed():
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._start_waiters.append(d)
        self._ensure_task()
        return d

    def register(self, username: str, password: str, email: str,
                 **extra: Any) -> Deferred[dict[str, Any]]:
        """Create an account (on an unauthenticated connection, opened if needed).

        ``extra`` carries what the server asked for in a previous refusal (e.g.
        ``captcha={"id": ..., "answer": ...}``)."""
        try:
            request = amend(rq.Register(username=username, password=password, email=email),
                            extra)
        except ServerError as e:
            return fail(e)
        return self.request_unauthenticated(request)

    def request_unauthenticated(self, request: ClientRequest) -> Deferred[dict[str, Any]]:
        """A pre-authentication request (``verify_email``, ``captcha`` ...) on the
        unauthenticated connection, opened if needed."""
        self._stopped = False

        async def run() -> dict[str, Any]:
            conn = await self._ensure_connected()
            return await conn.request(request, timeout=self.request_timeout)

        return Deferred.fromCoroutine(run())

    def login(self, password: str, **extra: Any) -> Deferred[dict[str, Any]]:
        """Password login as ``credentials.username``/``device_id``; then stay connected.

        The reply (tokens included) is returned; the tokens also go to ``on_tokens``.
        ``extra`` carries what the server asked for (e.g. ``otp="123456"``, ``captcha``).
        """
        self._stopped = False

        async def run() -> dict[str, Any]:
            conn = await self._ensure_connected()
            reply = await self._auth.login_with_extras(conn, password, extra)
            self._running = True
            self._ensure_task()
            return reply

        return Deferred.fromCoroutine(run())

    def request(self, request: ClientRequest, *,
                timeout: float | None = None) -> Deferred[dict[str, Any]]:
        """A request on the authenticated connection; fires with the ``ok: true`` reply.

        While (re)connecting the request waits for the next authenticated connection, up
        to ``timeout`` (default ``request_timeout``) in all.  A request already sent when
        the link drops fails with `ConnectionLost` (it may or may not have run; ``send``
        is safe to repeat thanks to its ``client_id``), except the types in `RETRYABLE`,
        which are sent again on the next connection.  Refusals are `ServerError`.
        """
        limit = self.request_timeout if timeout is None else float(timeout)
        return self._submit(request, self.reactor.seconds() + limit, limit)

    def logout(self) -> Deferred[None]:
        """Revoke this session's tokens on the server, forget them locally, and stop."""

        async def run() -> None:
            conn = self._authed if self._is_authed() else None
            self._running = False  # our own logout must not trigger re-authentication
            error: Exception | None = None
            if conn is not None:
                try:
                    await conn.request(rq.Logout(), timeout=self.request_timeout)
                except ServerError as e:
                    error = e
            self.credentials.access_token = None
            self.credentials.refresh_token = None
            await self._auth.persist_tokens()
            await self.stop()
            if error is not None:
                raise error

        return Deferred.fromCoroutine(run())

    async def adopt_tokens(self, reply: dict[str, Any]) -> None:
        """Take new tokens from a reply (``password_change`` gives this device a new
        session) and persist them through ``on_tokens``."""
        await self._auth.take_tokens(reply)

    def stop(self) -> Deferred[None]:
        """Stop reconnecting, fail waiting requests, close; fires when closed."""
        self._running = False
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
        if self._opening is not None:
            self._opening.cancel()
        self._fail_waiting(ConnectionLost("the session was stopped"))
        self._fail_start(ConnectionLost("the session was stopped"))
        conn, self._conn, self._authed = self._conn, None, None
        self._state.feed(Input.STOP, "stopped")
        if conn is None:
            return succeed(None)
        conn.close()
        return conn.when_closed()

    def backoff_delay(self, attempt: int) -> float:
        """Seconds to wait before reconnect number ``attempt`` (0-based): exponential
        between the two ``backoff`` bounds, jittered down to half so clients spread out."""
        low, high = self.backoff
        ceiling = min(high, low * (2 ** min(attempt, 32)))
        return self.rng.uniform(ceiling / 2, ceiling)

    # -- connecting -------------------------------------------------------------------

    def _is_authed(self) -> bool:
        return self._authed is not None and not self._authed.closed

    def _ensure_task(self) -> None:
        if self._task is None:
            self._task = Deferred.fromCoroutine(self._run())
            self._task.addBoth(self._task_ended)

    def _task_ended(self, result: object) -> None:
        self._task = None
        if isinstance(result, Failure) and not isinstance(result.value, CancelledError):
            log.failure("the session loop failed", result)

    def _ensure_connected(self) -> Deferred[ClientConnection]:
        """The current hello'd connection, or a new one (one attempt shared by callers)."""
        if self._conn is not None and not self._conn.closed:
            return succeed(self._conn)

        def cancel(d: Deferred[ClientConnection]) -> None:
            if d in self._open_waiters:
                self._open_waiters.remove(d)
            if not self._open_waiters and self._opening is not None:
                self._opening.cancel()

        waiter: Deferred[ClientConnection] = Deferred(cancel)
        self._open_waiters.append(waiter)
        if self._opening is None:
            self._opening = Deferred.fromCoroutine(self._open())
            self._opening.addBoth(self._opened)
        return waiter

    def _opened(self, result: ClientConnection | Failure) -> None:
        self._opening = None
        waiters, self._open_waiters = self._open_waiters, []
        if isinstance(result, ClientConnection):
            if self._stopped:
                result.close()
                result = Failure(ConnectionLost("the session was stopped"))  # type: ignore[no-untyped-call]
            else:
                self._conn = result
        for w in waiters:
            if isinstance(result, Failure):
                w.errback(result)
            else:
                w.callback(result)

    async def _open(self) -> ClientConnection:
        """TCP + TLS (with the trust decision) + hello."""
        if self.trust == "system":
            conn = await self.connect_system(self.reactor, self.host, self.port,
                                             self.connect_timeout, self.trust_root)
        else:
            conn = await self._open_pinned()
        conn.push_handler = self._push_handler(conn)
        try:
            hello = await conn.request(rq.Hello(client=self.client_name),
                                       timeout=self.request_timeout)
        except BaseException:
            conn.close()
            raise
        self.server_hello = hello
        limit = hello.get("max_line_length")
        conn.max_line_length = limit if isinstance(limit, int) else None
        self._state.feed(Input.OPENED, f"connected to {self.host}:{self.port}")
        return conn

    async def _open_pinned(self) -> ClientConnection:
        assert self.known_hosts is not None
        pinned = self.known_hosts.lookup(self.host, self.port)
        if pinned is None:
            seen = await self.fetch_fingerprint(self.reactor, self.host, self.port,
                                                self.connect_timeout)
            trusted = await call(self.confirm_fingerprint, seen)
            if not trusted:
                raise UntrustedServer(seen)
            conn = await self.connect_pinned(self.reactor, self.host, self.port, seen,
                                             self.connect_timeout)
            self.known_hosts.remember(self.host, self.port, seen)
            return conn
        try:
            return await self.connect_pinned(self.reactor, self.host, self.port, pinned,
                                             self.connect_timeout)
        except CertificateChanged as e:
            raise CertificateChanged(self.host, self.port, e.expected, e.got,
                                     self.known_hosts.path) from None

    async def _run(self) -> None:
        """Connect, authenticate, wait for the loss, back off, again, while running."""
        attempt = 0
        while self._running:
            try:
                self._state.feed(Input.CONNECT, f"connecting to {self.host}:{self.port}")
                conn = await self._ensure_connected()
                if self._authed is not conn:
                    conn = await self._auth.authenticate(conn)
                attempt = 0
                await conn.when_closed()
                if self._conn is not None and not self._conn.closed:
                    continue  # re-authentication moved to a fresh connection already
                why = "the connection was lost"
            except CancelledError:
                return
            except Exception as e:
                if _is_fatal(e):
                    self._fatal(e)
                    return
                why = _describe(e)
                if self._conn is not None and self._conn is not self._authed:
                    self._conn.close()  # a half-authenticated link is not worth keeping
                    self._conn = None
            if not self._running:
                return
            self._authed = None
            delay = self.backoff_delay(attempt)
            attempt += 1
            self._state.feed(Input.LOST, f"{why}; reconnecting in {delay:.1f} s")
            await deferLater(self.reactor, delay, lambda: None)

    def _fatal(self, error: Exception) -> None:
        self._running = False
        conn, self._conn, self._authed = self._conn, None, None
        if conn is not None:
            conn.close()
        self._state.feed(Input.STOP, str(error))
        self._fail_start(error)
        self._fail_waiting(ConnectionLost(f"not connected: {error}"))

    # -- what the authentication flow reports ----------------------------------------

    def _authenticated(self, conn: ClientConnection, reply: dict[str, Any], how: str) -> None:
        self._conn = self._authed = conn
        self._state.feed(Input.AUTHENTICATED, f"{how} as {reply.get('user', '?')}"
                         f"/{reply.get('device', '?')}")
        waiters, self._start_waiters = self._start_waiters, []
        for w in waiters:
            w.callback(None)
        self._flush_waiting()

    def _refused(self, message: str) -> None:
        self._state.feed(Input.REFUSED, message)

    # -- pushes -----------------------------------------------------------------------

    def _push_handler(self, conn: ClientConnection) -> Callable[[ServerPush], None]:
        def handle(push: ServerPush) -> None:
            try:
                self.on_push(push)
            except Exception:
                log.failure("on_push failed for a {ptype} push", ptype=push.NAME)
            if isinstance(push, LoggedOutPush) and conn is self._authed and self._running:
                self._authed = None
                self.credentials.access_token = None  # the session is gone server-side
                self._state.feed(Input.LOGGED_OUT, f"logged out: {push.reason or ''}")
                Deferred.fromCoroutine(self._reauthenticate(conn))

        return handle

    async def _reauthenticate(self, conn: ClientConnection) -> None:
        try:
            await self._auth.authenticate(conn, allow_resume=False)
        except CancelledError:
            pass
        except Exception as e:
            if _is_fatal(e):
                self._fatal(e)
            else:
                conn.close()  # the loop reconnects and tries again

    # -- requests waiting for a connection --------------------------------------------

    def _submit(self, request: ClientRequest, deadline: float,
                limit: float) -> Deferred[dict[str, Any]]:
        rtype = request.NAME
        if self._is_authed():
            assert self._authed is not None
            remaining = max(0.001, deadline - self.reactor.seconds())
            sent = self._authed.request(request, timeout=remaining)
            if rtype not in RETRYABLE:
                return sent

            def again(f: Failure) -> Deferred[dict[str, Any]] | Failure:
                if (isinstance(f.value, ConnectionLost) and self._running
                        and self.reactor.seconds() < deadline):
                    return self._submit(request, deadline, limit)
                return f

            sent.addErrback(again)
            return sent
        if not self._running:
            return fail(ConnectionLost(f"the session is not running; {rtype!r} not sent"))
        return self._waiting.wait(request, deadline, limit)

    def _flush_waiting(self) -> None:
        for w in self._waiting.take():
            self._submit(w.request, w.deadline, w.limit).chainDeferred(w.done)

    def _fail_waiting(self, error: Exception) -> None:
        self._waiting.fail_all(error)

    def _fail_start(self, error: Exception) -> None:
        waiters, self._start_waiters = self._start_waiters, []
        for w in waiters:
            w.errback(error)


def _is_fatal(e: BaseException) -> bool:
    if isinstance(e, (CertificateChanged, UntrustedServer, CertificateInvalid,
                      AuthenticationFailed)):
        return True
    return isinstance(e, ServerError) and e.code in FATAL_CODES


def _describe(e: BaseException) -> str:
    if isinstance(e, ServerError):
        return f"server: {e.code}"
    return str(e) or type(e).__name__
