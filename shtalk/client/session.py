"""ServerSession: one logical, authenticated link to a server that survives reconnects.

Why it exists: a chat client must keep working across network drops and server restarts
without the person typing the password again, and must never talk to a server it has not
decided to trust.  So the session owns, in one place:

* trust: the certificate pin (TOFU through `KnownHosts` and a confirm callback) or, for
  servers with a CA certificate, system trust plus host-name checking;
* authentication on every (re)connect, cheapest first: ``resume`` with the access token,
  then ``refresh`` (which rotates the tokens; they go to ``on_tokens`` to be persisted),
  then ``ask_password()`` and ``login``;
* reconnecting with bounded exponential backoff and jitter (so a restarted server is not
  hit by every client at the same instant);
* `request`, which waits while reconnecting (up to its timeout) instead of failing.

Every push, ``backlog_done`` and ``logged_out`` included, goes to ``on_push`` in arrival
order; after ``logged_out`` the session re-authenticates (refresh, then password).
Tokens and passwords are never logged and never put into exception messages.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from shtalk.client import connection as _connection
from shtalk.client.connection import (
    CertificateChanged,
    CertificateInvalid,
    ClientConnection,
    ConnectionLost,
    RequestTimeout,
    ServerError,
    UntrustedServer,
)
from shtalk.client.knownhosts import KnownHosts

log = Logger()

PROTOCOL_VERSION = 1
FATAL_CODES = frozenset({"unsupported_version", "invalid_credentials", "email_not_verified",
                         "otp_required", "captcha_required", "captcha_failed"})
"""Server errors that no reconnect can fix: stop and tell the person."""
OTP_REJECTED = "otp_rejected"
"""Not a server code: ``invalid_credentials`` after the server asked for the TOTP code (so
the password was right): the code was wrong, expired or already used."""
EXTRA_CODES = frozenset({"otp_required", "captcha_required", "captcha_failed", OTP_REJECTED})
"""Login refusals that ask for more (answered by ``ask_extra`` when one is given)."""
RETRYABLE = frozenset({"ping", "devices", "room_list", "room_members", "keys_count", "ack",
                       "send"})
"""Requests safe to send again after the link dropped before their reply: reads, the
cumulative ``ack``, and ``send`` (deduplicated by its ``client_id``)."""


@dataclass
class Credentials:
    """What the session needs to (re)authenticate; the caller persists it (``on_tokens``).

    Tokens are kept out of ``repr`` so a logged or printed Credentials leaks nothing.
    """

    username: str
    device_id: str
    device_label: str = ""
    access_token: str | None = field(default=None, repr=False)
    refresh_token: str | None = field(default=None, repr=False)


class AuthenticationFailed(Exception):
    """The password step could not complete (the person cancelled, or gave up after
    repeated wrong passwords): the session stops rather than ask forever."""


class ServerSession:
    """See the module docstring.  ``state`` is one of ``disconnected``, ``connecting``,
    ``connected`` (hello done, not authenticated), ``authenticated``, ``reconnecting``."""

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
        on_push: Callable[[dict[str, Any]], None],
        on_state: Callable[[str, str], None] | None = None,
        backoff: tuple[float, float] = (0.5, 30.0),
        *,
        trust: str = "pin",
        trust_root: Any = None,
        connect_timeout: float = 10.0,
        request_timeout: float = 30.0,
        client_name: str = "shtalk-client/0.1",
        rng: random.Random | None = None,
        ask_extra: Callable[[str, dict[str, Any]], Deferred[dict[str, Any]] | dict[str, Any]]
        | None = None,
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
        self.on_state = on_state
        self.backoff = backoff
        self.trust = trust
        self.trust_root = trust_root
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self.client_name = client_name
        self.rng = rng or random.Random()  # jitter, not a secret
        self.state = "disconnected"
        self.state_message = ""
        self.server_hello: dict[str, Any] = {}
        # Test seams: how a connection is made (module functions by default).
        self.fetch_fingerprint: Callable[..., Deferred[str]] = _connection.fetch_fingerprint
        self.connect_pinned: Callable[..., Deferred[ClientConnection]] = _connection.connect
        self.connect_system: Callable[..., Deferred[ClientConnection]] = (
            _connection.connect_system)

        self._conn: ClientConnection | None = None  # hello done
        self._authed: ClientConnection | None = None  # ... and authenticated
        self._opening: Deferred[ClientConnection] | None = None
        self._open_waiters: list[Deferred[ClientConnection]] = []
        self._running = False  # keep (re)connecting and authenticating
        self._stopped = False
        self._task: Deferred[None] | None = None
        self._start_waiters: list[Deferred[None]] = []
        # Requests waiting for an authenticated connection:
        # (type, fields, their Deferred, deadline, timeout given, expiry timer).
        self._waiting: list[tuple[str, dict[str, Any], Deferred[dict[str, Any]], float, float,
                                  IDelayedCall]] = []

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
        self._stopped = False

        async def run() -> dict[str, Any]:
            conn = await self._ensure_connected()
            return await conn.request("register", timeout=self.request_timeout,
                                      username=username, password=password, email=email,
                                      **extra)

        return Deferred.fromCoroutine(run())

    def request_unauthenticated(self, rtype: str, **fields: Any) -> Deferred[dict[str, Any]]:
        """A pre-authentication request (``verify_email``, ``captcha`` ...) on the
        unauthenticated connection, opened if needed."""
        self._stopped = False

        async def run() -> dict[str, Any]:
            conn = await self._ensure_connected()
            return await conn.request(rtype, timeout=self.request_timeout, **fields)

        return Deferred.fromCoroutine(run())

    def login(self, password: str, **extra: Any) -> Deferred[dict[str, Any]]:
        """Password login as ``credentials.username``/``device_id``; then stay connected.

        The reply (tokens included) is returned; the tokens also go to ``on_tokens``.
        ``extra`` carries what the server asked for (e.g. ``otp="123456"``, ``captcha``).
        """
        self._stopped = False

        async def run() -> dict[str, Any]:
            conn = await self._ensure_connected()
            reply = await self._login_with_extras(conn, password, extra)
            self._running = True
            self._ensure_task()
            return reply

        return Deferred.fromCoroutine(run())

    def request(self, rtype: str, **fields: Any) -> Deferred[dict[str, Any]]:
        """A request on the authenticated connection; fires with the ``ok: true`` reply.

        While (re)connecting the request waits for the next authenticated connection, up
        to ``timeout`` (default ``request_timeout``) in all.  A request already sent when
        the link drops fails with `ConnectionLost` (it may or may not have run; ``send``
        is safe to repeat thanks to its ``client_id``), except the types in `RETRYABLE`,
        which are sent again on the next connection.  Refusals are `ServerError`.
        A ``timeout=`` keyword (seconds) is taken out of ``fields``: no request type has
        a field of that name, and ``**fields: Any`` keeps callers' dict splats typed.
        """
        timeout = fields.pop("timeout", None)
        limit = self.request_timeout if timeout is None else float(timeout)
        return self._submit(rtype, fields, self.reactor.seconds() + limit, limit)

    def logout(self) -> Deferred[None]:
        """Revoke this session's tokens on the server, forget them locally, and stop."""

        async def run() -> None:
            conn = self._authed if self._is_authed() else None
            self._running = False  # our own logout must not trigger re-authentication
            error: Exception | None = None
            if conn is not None:
                try:
                    await conn.request("logout", timeout=self.request_timeout)
                except ServerError as e:
                    error = e
            self.credentials.access_token = None
            self.credentials.refresh_token = None
            await self._persist_tokens()
            await self.stop()
            if error is not None:
                raise error

        return Deferred.fromCoroutine(run())

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
        self._set_state("disconnected", "stopped")
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

    def _set_state(self, state: str, message: str) -> None:
        self.state, self.state_message = state, message
        if self.on_state is not None:
            try:
                self.on_state(state, message)
            except Exception:
                log.failure("on_state failed")

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
            hello = await conn.request("hello", timeout=self.request_timeout,
                                       version=PROTOCOL_VERSION, client=self.client_name)
        except BaseException:
            conn.close()
            raise
        self.server_hello = hello
        limit = hello.get("max_line_length")
        conn.max_line_length = limit if isinstance(limit, int) else None
        self._set_state("connected", f"connected to {self.host}:{self.port}")
        return conn

    async def _open_pinned(self) -> ClientConnection:
        assert self.known_hosts is not None
        pinned = self.known_hosts.lookup(self.host, self.port)
        if pinned is None:
            seen = await self.fetch_fingerprint(self.reactor, self.host, self.port,
                                                self.connect_timeout)
            trusted = await _call(self.confirm_fingerprint, seen)
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
                if self.state not in ("reconnecting", "authenticated"):
                    self._set_state("connecting", f"connecting to {self.host}:{self.port}")
                conn = await self._ensure_connected()
                if self._authed is not conn:
                    conn = await self._authenticate(conn)
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
            self._set_state("reconnecting", f"{why}; reconnecting in {delay:.1f} s")
            await deferLater(self.reactor, delay, lambda: None)

    def _fatal(self, error: Exception) -> None:
        self._running = False
        conn, self._conn, self._authed = self._conn, None, None
        if conn is not None:
            conn.close()
        self._set_state("disconnected", str(error))
        self._fail_start(error)
        self._fail_waiting(ConnectionLost(f"not connected: {error}"))

    # -- authenticating ---------------------------------------------------------------

    async def _authenticate(self, conn: ClientConnection, *,
                            allow_resume: bool = True) -> ClientConnection:
        """resume -> refresh -> password; returns the (possibly new) connection."""
        creds = self.credentials
        if allow_resume and creds.access_token:
            try:
                reply = await conn.request("resume", timeout=self.request_timeout,
                                           access_token=creds.access_token)
            except ServerError as e:
                if e.code == "token_revoked":
                    creds.access_token = creds.refresh_token = None
                    await self._persist_tokens()
                elif e.code in ("token_expired", "invalid_token"):
                    creds.access_token = None
                else:
                    raise
            else:
                self._authenticated(conn, reply, "resumed")
                return conn
        if creds.refresh_token:
            try:
                reply = await conn.request("refresh", timeout=self.request_timeout,
                                           refresh_token=creds.refresh_token)
            except ServerError as e:
                if e.code not in ("invalid_token", "token_revoked", "token_expired"):
                    raise
                creds.access_token = creds.refresh_token = None
                await self._persist_tokens()
            else:
                await self._take_tokens(reply)
                self._authenticated(conn, reply, "refreshed")
                return conn
        return await self._password_login(conn)

    async def _password_login(self, conn: ClientConnection) -> ClientConnection:
        for _ in range(self.max_password_attempts):
            try:
                password = str(await _call(self.ask_password))
            except CancelledError:
                raise
            except Exception as e:
                raise AuthenticationFailed(f"no password given ({type(e).__name__})") from None
            if conn.closed:  # e.g. the server's pre-auth timeout while the person typed
                conn = await self._ensure_connected()
            try:
                await self._login_with_extras(conn, password, {})
            except ServerError as e:
                if e.code != "invalid_credentials":
                    raise
                self._set_state("connected", "wrong username or password")
                continue
            return conn
        raise AuthenticationFailed(
            f"login as {self.credentials.username!r} failed {self.max_password_attempts} times")

    async def _login_request(self, conn: ClientConnection, password: str,
                             **extra: Any) -> dict[str, Any]:
        creds = self.credentials
        device = {"id": creds.device_id}
        if creds.device_label:
            device["label"] = creds.device_label
        reply = await conn.request("login", timeout=self.request_timeout,
                                   username=creds.username, password=password, device=device,
                                   **extra)
        await self._take_tokens(reply)
        self._authenticated(conn, reply, "logged in")
        return reply

    async def _login_with_extras(self, conn: ClientConnection, password: str,
                                 extra: dict[str, Any]) -> dict[str, Any]:
        """A login that answers the server's follow-up questions (TOTP code, CAPTCHA)
        through ``ask_extra``; without it those refusals go to the caller."""
        extra = dict(extra)
        for _ in range(self.max_password_attempts + 1):
            try:
                return await self._login_request(conn, password, **extra)
            except ServerError as e:
                code = e.code
                if code == "invalid_credentials" and "otp" in extra:
                    code = OTP_REJECTED
                if self.ask_extra is None or code not in EXTRA_CODES:
                    raise
                error = e.reply.get("error", {}) if isinstance(e.reply, dict) else {}
                try:
                    more = await _call(self.ask_extra, code, error)
                except CancelledError:
                    raise
                except Exception as x:  # the person closed the prompt, like ask_password
                    raise AuthenticationFailed(
                        f"{code}: not answered ({type(x).__name__})") from None
                extra.update(more or {})
                if conn.closed:
                    conn = await self._ensure_connected()
        raise AuthenticationFailed("login refused; the extra steps did not succeed")

    async def adopt_tokens(self, reply: dict[str, Any]) -> None:
        """Take new tokens from a reply (``password_change`` gives this device a new
        session) and persist them through ``on_tokens``."""
        await self._take_tokens(reply)

    async def _take_tokens(self, reply: dict[str, Any]) -> None:
        access, refresh = reply.get("access_token"), reply.get("refresh_token")
        if isinstance(access, str):
            self.credentials.access_token = access
        if isinstance(refresh, str):
            self.credentials.refresh_token = refresh
        await self._persist_tokens()

    async def _persist_tokens(self) -> None:
        try:
            await _call(self.on_tokens, self.credentials)
        except Exception:
            # The message names no token: on_tokens failures are the caller's storage.
            log.failure("on_tokens failed; the new tokens may not be saved")

    def _authenticated(self, conn: ClientConnection, reply: dict[str, Any], how: str) -> None:
        self._conn = self._authed = conn
        self._set_state("authenticated", f"{how} as {reply.get('user', '?')}"
                        f"/{reply.get('device', '?')}")
        waiters, self._start_waiters = self._start_waiters, []
        for w in waiters:
            w.callback(None)
        self._flush_waiting()

    # -- pushes -----------------------------------------------------------------------

    def _push_handler(self, conn: ClientConnection) -> Callable[[dict[str, Any]], None]:
        def handle(push: dict[str, Any]) -> None:
            try:
                self.on_push(push)
            except Exception:
                log.failure("on_push failed for a {ptype} push", ptype=push.get("type"))
            if push.get("type") == "logged_out" and conn is self._authed and self._running:
                self._authed = None
                self.credentials.access_token = None  # the session is gone server-side
                self._set_state("connected", f"logged out: {push.get('reason', '')}")
                Deferred.fromCoroutine(self._reauthenticate(conn))

        return handle

    async def _reauthenticate(self, conn: ClientConnection) -> None:
        try:
            await self._authenticate(conn, allow_resume=False)
        except CancelledError:
            pass
        except Exception as e:
            if _is_fatal(e):
                self._fatal(e)
            else:
                conn.close()  # the loop reconnects and tries again

    # -- requests waiting for a connection --------------------------------------------

    def _submit(self, rtype: str, fields: dict[str, Any], deadline: float,
                limit: float) -> Deferred[dict[str, Any]]:
        if self._is_authed():
            assert self._authed is not None
            remaining = max(0.001, deadline - self.reactor.seconds())
            sent = self._authed.request(rtype, timeout=remaining, **fields)
            if rtype not in RETRYABLE:
                return sent

            def again(f: Failure) -> Deferred[dict[str, Any]] | Failure:
                if (isinstance(f.value, ConnectionLost) and self._running
                        and self.reactor.seconds() < deadline):
                    return self._submit(rtype, fields, deadline, limit)
                return f

            sent.addErrback(again)
            return sent
        if not self._running:
            return fail(ConnectionLost(f"the session is not running; {rtype!r} not sent"))

        def cancel(d: Deferred[dict[str, Any]]) -> None:
            self._drop_waiting(d)

        d: Deferred[dict[str, Any]] = Deferred(cancel)
        timer = self.reactor.callLater(max(0.0, deadline - self.reactor.seconds()),
                                       self._waiting_expired, d, rtype, limit)
        self._waiting.append((rtype, fields, d, deadline, limit, timer))
        return d

    def _flush_waiting(self) -> None:
        waiting, self._waiting = self._waiting, []
        for rtype, fields, d, deadline, limit, timer in waiting:
            if timer.active():
                timer.cancel()
            self._submit(rtype, fields, deadline, limit).chainDeferred(d)

    def _drop_waiting(self, d: Deferred[dict[str, Any]]) -> None:
        for entry in self._waiting:
            if entry[2] is d:
                self._waiting.remove(entry)
                if entry[5].active():
                    entry[5].cancel()
                return

    def _waiting_expired(self, d: Deferred[dict[str, Any]], rtype: str, limit: float) -> None:
        self._drop_waiting(d)
        d.errback(RequestTimeout(
            f"no authenticated connection within {limit:g} s; {rtype!r} was not sent"))

    def _fail_waiting(self, error: Exception) -> None:
        waiting, self._waiting = self._waiting, []
        for _rtype, _fields, d, _deadline, _limit, timer in waiting:
            if timer.active():
                timer.cancel()
            d.errback(error)

    def _fail_start(self, error: Exception) -> None:
        waiters, self._start_waiters = self._start_waiters, []
        for w in waiters:
            w.errback(error)


def _call(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """``maybeDeferred`` for callbacks that may answer with a value or a Deferred."""
    return maybeDeferred(f, *args)


def _is_fatal(e: BaseException) -> bool:
    if isinstance(e, (CertificateChanged, UntrustedServer, CertificateInvalid,
                      AuthenticationFailed)):
        return True
    return isinstance(e, ServerError) and e.code in FATAL_CODES


def _describe(e: BaseException) -> str:
    if isinstance(e, ServerError):
        return f"server: {e.code}"
    return str(e) or type(e).__name__
