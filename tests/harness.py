# mypy: disallow-untyped-calls=False
# (Twisted's protocol and endpoint helpers are partly untyped; strict otherwise.)
"""A reusable harness for system tests and benchmarks: a real server, a real TLS client.

`ServerProcess` runs the real ``twistd -n shtalk`` from this checkout in a subprocess
(``python -c "from twisted.scripts.twistd import run; run()"`` with ``PYTHONPATH`` set to
the repository root, so this checkout's plugin is loaded) on a free loopback port with a
fresh data directory, and can stop (SIGTERM), kill (SIGKILL) and restart it on the same
data directory and port.  Starting is synchronous (``subprocess.Popen`` and a blocking
poll of the port), so it works in ``setUp``/``setUpClass`` of a trial ``TestCase``::

    server = ServerProcess(config={"server": {"idle_timeout": 5}})
    server.start()                      # blocks until the port accepts connections
    ...
    server.stop()                       # SIGTERM, wait; server.kill() is SIGKILL
    server.cleanup()                    # stop if running, remove the temporary directory

`JsonLineClient` is a Twisted ``LineOnlyReceiver`` speaking the JSON-lines protocol over
TLS that pins the server's self-signed certificate (``shtalk.server.tls``):

    client = yield connect(server)                      # Deferred[JsonLineClient]
    reply = yield client.request("hello", version=1)    # Deferred[reply dict], by id
    reply = yield client.ok("ping")                     # ... and fail unless ok is true
    error = yield client.fail("ping", code="bad_field") # ... and fail unless that code
    push = yield client.next_push("message", timeout=5) # pushes (lines without an id)
    client.send_line(b'{"id": 1, "type": "ping"}')       # raw bytes, newline added
    yield client.disconnect()                           # fires when the TCP link is gone

Replies whose id could not be read (``"id": null``: framing errors, ``timeout``,
``too_many_connections``) go to their own queue: ``next_orphan()``.

`ServerTestCase` is the trial glue: one server per test class (started by the first
test's ``setUp``), ``self.connect()`` / ``self.session()`` with automatic cleanup.

Run the system tests with the checkout importable: ``make system``, or
``PYTHONPATH=. .venv/bin/trial tests`` (``SHTALK_KEEP=1`` keeps the temporary data
directories and ``server.log`` for a post-mortem).

`register_and_login` does the usual hello/register/login and returns the client plus
the login reply and the backlog it was sent.  `fresh_name` makes unique usernames and
room names so one server can serve many tests.
"""

from __future__ import annotations

import atexit
import errno
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IReactorTCP, IReactorTime
from twisted.internet.task import deferLater
from twisted.protocols.basic import LineOnlyReceiver
from twisted.python.failure import Failure
from twisted.trial import unittest

from shtalk.server.tls import cert_fingerprint, client_options_pinned

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout whose server the tests run (the directory holding ``shtalk/``)."""

TWISTD = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]

DEFAULT_CONFIG: dict[str, dict[str, object]] = {
    "accounts": {
        "bcrypt_cost": 10,
        "require_email_verification": False,
        "require_captcha": False,
    }
}
"""Applied under every test config: the cheapest bcrypt the server accepts, and accounts
that are active at once (no email code, no CAPTCHA: the closed-deployment switches).
The account-security tests (tests/test_account_system.py) turn both back on."""

# Rate limiting is off under the system tests of other features, which
# register and send from one address far faster than people do; the operations
# tests (tests/test_operations_system.py) turn it on with their own limits.
DEFAULT_CONFIG["ratelimit"] = {"enabled": False}
# Likewise the abuse monitor: many registrations from 127.0.0.1 would flag the address
# and make every later login solve a CAPTCHA (its configured action).
DEFAULT_CONFIG["monitor"] = {"enabled": False}

PASSWORD = "tangerine-quokka-43"
"""A password the server's policy accepts (long, not common, no username inside)."""

def _reactor() -> Any:
    """The global reactor, imported late so importing the harness installs nothing."""
    from twisted.internet import reactor

    return reactor


class HarnessError(AssertionError):
    """A test-infrastructure failure: the server did not start, a reply never came ..."""


# ---------------------------------------------------------------------------------------
# Names


_counter = itertools.count(1)
_run_tag = secrets.token_hex(2)


def fresh_name(prefix: str = "u") -> str:
    """A name unique within this test run and across runs on one data dir (<= 32 chars).

    Valid both as a username and as a room name: ``[a-z0-9]`` after a letter prefix.
    """
    name = f"{prefix}{_run_tag}{next(_counter)}{secrets.token_hex(2)}"
    return name[:32]


# ---------------------------------------------------------------------------------------
# The server process


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    """The resident set of a process, in KiB (Linux: /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise HarnessError(f"no VmRSS for process {pid}")


def open_fds(pid: int) -> int:
    """How many file descriptors a process has open (Linux: /proc); 0 if it is gone."""
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def silent_socket(source: str, target: tuple[str, int]) -> socket.socket | None:
    """A TCP connection from ``source`` that will never send a byte (a flood's unit).

    Non-blocking: the kernel completes the TCP handshake on its own.  None if the
    source address cannot be bound or the connect fails at once.
    """
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.bind((source, 0))
        err = s.connect_ex(target)
    except OSError:
        s.close()
        return None
    if err not in (0, errno.EINPROGRESS):
        s.close()
        return None
    return s


def render_ini(sections: Mapping[str, Mapping[str, object]]) -> str:
    """INI text for ``{"section": {"key": value}}`` (values written with ``str``)."""
    out: list[str] = []
    for name, values in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{key} = {value}" for key, value in values.items())
        out.append("")
    return "\n".join(out)


def merge_config(
    *layers: Mapping[str, Mapping[str, object]] | None,
) -> dict[str, dict[str, object]]:
    merged: dict[str, dict[str, object]] = {}
    for layer in layers:
        for name, values in (layer or {}).items():
            merged.setdefault(name, {}).update(values)
    return merged


class ServerProcess:
    """The real ``twistd -n shtalk`` on ``host:port`` with its own data directory.

    ``config`` is merged over `DEFAULT_CONFIG` and written to ``shtalk.ini`` next to the
    data directory; ``extra_args`` are appended to the ``shtalk`` sub-command.  The
    server's stdout and stderr go to ``server.log`` in the same directory (read it with
    `log_text`); a file, not a pipe, so a chatty server can never block on a full pipe.
    """

    def __init__(
        self,
        config: Mapping[str, Mapping[str, object]] | None = None,
        *,
        extra_args: Iterable[str] = (),
        host: str = "127.0.0.1",
        startup_timeout: float = 30.0,
        base_dir: str | None = None,
        boot: str = "",
    ) -> None:
        self.config = merge_config(DEFAULT_CONFIG, config)
        # Python run before twistd in the server process (a benchmark's probe).
        self.boot = boot
        self.extra_args = list(extra_args)
        self.host = host
        self.startup_timeout = startup_timeout
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="shtalk-system-"))
        self.data_dir = self.base_dir / "data"
        self.config_path = self.base_dir / "shtalk.ini"
        self.log_path = self.base_dir / "server.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    # -- life cycle ------------------------------------------------------------------

    def command(self) -> list[str]:
        twistd = [*TWISTD[:-1], f"{self.boot}\n{TWISTD[-1]}"] if self.boot else TWISTD
        return [
            *twistd, "-n", "--pidfile=", "shtalk",
            "--interface", self.host,
            "--port", str(self.port),
            "--data-dir", str(self.data_dir),
            "--config", str(self.config_path),
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT)
        env.pop("XDG_DATA_HOME", None)
        return env

    def start(self) -> ServerProcess:
        """Start (first time: pick the port, write the config) and wait until it listens."""
        if self.running:
            raise HarnessError("the server is already running")
        if not self.port:
            self.port = free_port(self.host)
        self.config_path.write_text(render_ini(self.config), encoding="utf-8")
        with open(self.log_path, "ab") as log:
            log.write(f"--- start #{self.starts + 1}: {' '.join(self.command())}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                self.command(), cwd=self.base_dir, env=self.environment(),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        self.starts += 1
        self.wait_listening()
        return self

    def wait_listening(self) -> None:
        """Poll the port (blocking) until it accepts TCP connections, or fail loudly."""
        deadline = time.monotonic() + self.startup_timeout
        while True:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                raise HarnessError(
                    f"the server exited with status {code} before listening; its output:\n"
                    + self.log_text()
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
            except OSError:
                if time.monotonic() > deadline:
                    self.kill()
                    raise HarnessError(
                        f"the server did not listen on {self.host}:{self.port} within "
                        f"{self.startup_timeout} s; its output:\n" + self.log_text()
                    ) from None
                time.sleep(0.05)
                continue
            # The data directory (and its certificate) exists once the port listens.
            if self.cert_path.exists():
                return

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it will not go.  Returns the exit status."""
        process, self.process = self.process, None
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                return process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
                raise HarnessError(
                    f"the server ignored SIGTERM for {timeout} s; output:\n" + self.log_text()
                ) from None
        return process.returncode

    def kill(self) -> None:
        """SIGKILL, at once (no shutdown code runs), and reap it."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()

    def restart(self, *, kill: bool = False) -> ServerProcess:
        """Stop (or kill) and start again on the same data directory and port."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start()

    def cleanup(self) -> None:
        """Stop if running and delete the temporary directory (keep it: SHTALK_KEEP=1)."""
        try:
            self.stop()
        finally:
            if not os.environ.get("SHTALK_KEEP"):
                shutil.rmtree(self.base_dir, ignore_errors=True)

    # -- what tests need to know -----------------------------------------------------

    def log_text(self, tail: int = 20000) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return "(no server log)"
        return text[-tail:]

    @property
    def cert_path(self) -> Path:
        return self.data_dir / "tls-cert.pem"

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the server's self-signed certificate, ``AB:CD:...``."""
        return cert_fingerprint(self.cert_path.read_bytes())

    def jwt_private_key_pem(self) -> bytes:
        """The server's ES256 token-signing key, for tests that forge tokens."""
        return (self.data_dir / "jwt-signing-key.pem").read_bytes()

    def tls_client_options(self) -> Any:
        return client_options_pinned(self.fingerprint, "localhost")


# ---------------------------------------------------------------------------------------
# The client


class RequestFailed(AssertionError):
    """`JsonLineClient.ok` got ``ok: false`` (or `fail` got another code / ok)."""

    def __init__(self, request: Mapping[str, Any], reply: Mapping[str, Any], why: str) -> None:
        super().__init__(f"{why}\n  request: {_short(request)}\n  reply:   {_short(reply)}")
        self.request = request
        self.reply = reply
        self.why = why


def _short(obj: object, limit: int = 500) -> str:
    text = json.dumps(obj) if not isinstance(obj, str | bytes) else repr(obj)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} chars)"


@dataclass
class _Waiter:
    ptype: str | None
    deferred: Deferred[dict[str, Any]]
    timer: IDelayedCall | None = None


@dataclass
class ClientStats:
    lines_in: int = 0
    lines_out: int = 0
    replies: int = 0
    pushes: int = 0
    pushes_by_type: dict[str, int] = field(default_factory=dict)


class ConnectionClosed(Exception):
    """The connection went away while a request waited for its reply."""


class JsonLineClient(LineOnlyReceiver):
    """One connection speaking shtalk's JSON lines; replies matched by id.

    Pushes (lines with ``type`` and no ``id``) queue up until `next_push` takes them;
    replies with ``"id": null`` queue up until `next_orphan` takes them.  Unparseable
    lines from the server are a protocol violation and are kept in ``bad_lines``.
    """

    delimiter = b"\n"
    MAX_LENGTH = 64 * 1024 * 1024
    default_timeout = 10.0

    def __init__(self, clock: IReactorTime | None = None, name: str = "") -> None:
        self.clock: IReactorTime = clock or _reactor()
        self.name = name
        self._ids = itertools.count(1)
        self._pending: dict[object, tuple[dict[str, Any], Deferred[dict[str, Any]]]] = {}
        self.pushes: deque[dict[str, Any]] = deque()
        self.orphans: deque[dict[str, Any]] = deque()
        self._push_waiters: list[_Waiter] = []
        self._orphan_waiters: list[_Waiter] = []
        self.bad_lines: list[bytes] = []
        self.stats = ClientStats()
        self.connected_d: Deferred[None] = Deferred()
        self.closed: Deferred[None] = Deferred()  # fires (with None) on connectionLost
        self.close_reason: Failure | None = None
        self.is_closed = False

    def __repr__(self) -> str:
        return f"<JsonLineClient {self.name or id(self)}>"

    # -- connection ------------------------------------------------------------------

    def connectionMade(self) -> None:
        self.connected_d.callback(None)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.is_closed = True
        self.close_reason = reason
        pending, self._pending = self._pending, {}
        for request, d in pending.values():
            d.errback(ConnectionClosed(f"connection lost before the reply to {_short(request)}"
                                       f": {reason.getErrorMessage() if reason else '?'}"))
        for waiters in (self._push_waiters, self._orphan_waiters):
            for w in list(waiters):
                self._fail_waiter(waiters, w, ConnectionClosed(
                    f"connection lost while waiting for a {w.ptype or 'line'}; "
                    f"queued pushes: {[p.get('type') for p in self.pushes]}"))
        if not self.closed.called:
            self.closed.callback(None)

    def disconnect(self, timeout: float = 3.0) -> Deferred[None]:
        """Close cleanly (TLS close_notify); abort if that takes longer than ``timeout``.

        Fires once the connection is gone, so trial sees a clean reactor.
        """
        if self.is_closed:
            return defer.succeed(None)
        transport: Any = self.transport
        if transport is not None:
            transport.loseConnection()

            def abort() -> None:
                if not self.is_closed and self.transport is not None:
                    cast(Any, self.transport).abortConnection()

            timer = self.clock.callLater(timeout, abort)

            def cancel(result: Any) -> Any:
                if timer.active():
                    timer.cancel()
                return result

            self.closed.addBoth(cancel)
        d: Deferred[None] = Deferred()

        def fire(result: Any) -> Any:
            d.callback(None)
            return result

        self.closed.addBoth(fire)
        return d

    def abort(self) -> Deferred[None]:
        """Drop the connection without TLS shutdown (like a crashed client)."""
        if not self.is_closed and self.transport is not None:
            cast(Any, self.transport).abortConnection()
        return self.disconnect()

    def when_closed(self, timeout: float | None = None) -> Deferred[None]:
        """Fires with the close reason when the server (or we) closed the connection."""
        d: Deferred[None] = Deferred()
        if self.is_closed:
            d.callback(None)
            return d

        def fire(result: Any) -> Any:
            if not d.called:
                d.callback(None)
            return result

        self.closed.addBoth(fire)
        if timeout is not None:
            d.addTimeout(timeout, self.clock)
        return d

    # -- sending -----------------------------------------------------------------------

    def send_line(self, data: bytes) -> None:
        """Write raw bytes followed by the newline (no checking at all)."""
        self.stats.lines_out += 1
        cast(Any, self.transport).write(data + self.delimiter)

    def send_raw(self, data: bytes) -> None:
        """Write raw bytes as they are (no newline): partial lines, several lines ..."""
        cast(Any, self.transport).write(data)

    def call(self, obj: Mapping[str, Any], timeout: float | None = None
             ) -> Deferred[dict[str, Any]]:
        """Send ``obj`` (which carries its own ``id``) and fire with the reply to that id."""
        rid = obj["id"]
        key = _id_key(rid)
        if key in self._pending:
            raise HarnessError(f"request id {rid!r} is already waiting for a reply")
        d: Deferred[dict[str, Any]] = Deferred()
        request = dict(obj)
        self._pending[key] = (request, d)
        if self.is_closed:
            del self._pending[key]
            return defer.fail(ConnectionClosed(f"connection closed; cannot send {_short(obj)}"))
        self.send_line(json.dumps(obj, separators=(",", ":")).encode("utf-8"))
        t = self.default_timeout if timeout is None else timeout

        def timed_out(failure: Failure) -> Failure:
            self._pending.pop(key, None)
            if failure.check(defer.TimeoutError, defer.CancelledError):
                raise HarnessError(
                    f"no reply within {t} s to {_short(request)}; "
                    f"queued pushes: {[p.get('type') for p in self.pushes]}"
                )
            return failure

        d.addTimeout(t, self.clock)
        d.addErrback(timed_out)
        return d

    def next_id(self) -> int:
        return next(self._ids)

    def request(self, rtype: str, timeout: float | None = None, **fields: Any
                ) -> Deferred[dict[str, Any]]:
        """``{"id": <next>, "type": rtype, **fields}``; fires with the reply dict."""
        return self.call({"id": self.next_id(), "type": rtype, **fields}, timeout)

    def ok(self, rtype: str, timeout: float | None = None, **fields: Any
           ) -> Deferred[dict[str, Any]]:
        """Like `request`, but fails with `RequestFailed` unless the reply is ``ok: true``."""
        obj = {"id": self.next_id(), "type": rtype, **fields}

        def check(reply: dict[str, Any]) -> dict[str, Any]:
            if reply.get("ok") is not True:
                raise RequestFailed(obj, reply, f"{rtype} was refused")
            return reply

        return self.call(obj, timeout).addCallback(check)

    def fail(self, rtype: str, code: str, timeout: float | None = None, **fields: Any
             ) -> Deferred[dict[str, Any]]:
        """Like `request`, but fails unless refused with exactly ``code``; fires with the
        ``error`` object of the reply."""
        obj = {"id": self.next_id(), "type": rtype, **fields}
        return self.call(obj, timeout).addCallback(lambda r: expect_error(obj, r, code))

    # -- receiving ---------------------------------------------------------------------

    def lineReceived(self, line: bytes) -> None:
        self.stats.lines_in += 1
        try:
            obj = json.loads(line)
        except ValueError:
            self.bad_lines.append(line)
            return
        if not isinstance(obj, dict):
            self.bad_lines.append(line)
            return
        if "id" in obj:
            rid = obj["id"]
            if rid is None:
                self._queue(self.orphans, self._orphan_waiters, obj)
                return
            self.stats.replies += 1
            entry = self._pending.pop(_id_key(rid), None)
            if entry is None:
                self.bad_lines.append(line)  # a reply nobody asked for
                return
            entry[1].callback(obj)
            return
        self.stats.pushes += 1
        ptype = str(obj.get("type"))
        self.stats.pushes_by_type[ptype] = self.stats.pushes_by_type.get(ptype, 0) + 1
        self._queue(self.pushes, self._push_waiters, obj)

    def lineLengthExceeded(self, line: bytes) -> None:
        self.bad_lines.append(line[:200] + b"... (too long)")
        cast(Any, self.transport).loseConnection()

    def _queue(self, queue: deque[dict[str, Any]], waiters: list[_Waiter],
               obj: dict[str, Any]) -> None:
        for w in waiters:
            if w.ptype is None or w.ptype == obj.get("type"):
                waiters.remove(w)
                if w.timer is not None and w.timer.active():
                    w.timer.cancel()
                w.deferred.callback(obj)
                return
        queue.append(obj)

    def _fail_waiter(self, waiters: list[_Waiter], w: _Waiter, exc: Exception) -> None:
        if w in waiters:
            waiters.remove(w)
        if w.timer is not None and w.timer.active():
            w.timer.cancel()
        w.deferred.errback(exc)

    def _take(self, queue: deque[dict[str, Any]], waiters: list[_Waiter],
              ptype: str | None, timeout: float, what: str) -> Deferred[dict[str, Any]]:
        for obj in queue:
            if ptype is None or obj.get("type") == ptype:
                queue.remove(obj)
                return defer.succeed(obj)
        if self.is_closed:
            return defer.fail(ConnectionClosed(
                f"connection closed; no {ptype or what} queued "
                f"(queued: {[p.get('type') for p in queue]})"))
        w = _Waiter(ptype, Deferred())

        def expire() -> None:
            self._fail_waiter(waiters, w, HarnessError(
                f"{self!r}: no {ptype or what} within {timeout} s; queued: "
                f"{[_short(p, 200) for p in queue]}"))

        w.timer = self.clock.callLater(timeout, expire)
        waiters.append(w)
        return w.deferred

    def next_push(self, ptype: str | None = None, timeout: float = 5.0
                  ) -> Deferred[dict[str, Any]]:
        """The oldest queued push (of ``ptype``, if given), or the next one to arrive.

        Pushes of other types stay queued.  Fails with `HarnessError` after ``timeout``.
        """
        return self._take(self.pushes, self._push_waiters, ptype, timeout, "push")

    def next_orphan(self, timeout: float = 5.0) -> Deferred[dict[str, Any]]:
        """The next reply carrying ``"id": null`` (framing errors, timeout ...)."""
        return self._take(self.orphans, self._orphan_waiters, None, timeout, "id-less reply")

    def drain(self, ptype: str | None = None) -> list[dict[str, Any]]:
        """Take every queued push (of ``ptype``) now, oldest first."""
        taken = [p for p in self.pushes if ptype is None or p.get("type") == ptype]
        for p in taken:
            self.pushes.remove(p)
        return taken

    @inlineCallbacks
    def settle(self, wait: float = 0.3, ptype: str | None = None) -> Any:
        """Wait ``wait`` seconds, then `drain`: what arrived meanwhile (for "nothing more
        arrives" checks)."""
        yield deferLater(self.clock, wait, lambda: None)
        return self.drain(ptype)

    @inlineCallbacks
    def collect_backlog(self, timeout: float = 10.0) -> Any:
        """The ``message`` pushes before ``backlog_done``: ``(messages, backlog_done push)``.

        Only messages queued ahead of ``backlog_done`` are taken (later, live ones stay
        queued), as are non-message pushes (presence ...).
        """
        done: dict[str, Any] | None = None
        for p in self.pushes:
            if p.get("type") == "backlog_done":
                done = p
                break
        if done is None:
            # The waiter fires the moment backlog_done arrives: everything queued by
            # then arrived before it.
            done = yield self.next_push("backlog_done", timeout=timeout)
            before = list(self.pushes)
        else:
            items = list(self.pushes)
            before = items[: items.index(done)]
            self.pushes.remove(done)
        messages = [p for p in before if p.get("type") == "message"]
        for m in messages:
            self.pushes.remove(m)
        return messages, done

    # -- conversations ------------------------------------------------------------------

    def hello(self) -> Deferred[dict[str, Any]]:
        return self.ok("hello", version=1, client="shtalk-tests")

    def register(self, username: str, password: str = PASSWORD,
                 email: str | None = None) -> Deferred[dict[str, Any]]:
        return self.ok("register", username=username, password=password,
                       email=email or f"{username}@example.org")

    def login(self, username: str, device: str = "dev1", password: str = PASSWORD,
              label: str | None = None) -> Deferred[dict[str, Any]]:
        dev: dict[str, Any] = {"id": device}
        if label is not None:
            dev["label"] = label
        return self.ok("login", username=username, password=password, device=dev)

    def send_room(self, room: str, envelope: bytes, client_id: str | None = None,
                  **extra: Any) -> Deferred[dict[str, Any]]:
        return self.ok("send", to={"room": room}, envelope=b64(envelope),
                       client_id=client_id or fresh_client_id(), **extra)

    def send_user(self, user: str, envelope: bytes, client_id: str | None = None,
                  **extra: Any) -> Deferred[dict[str, Any]]:
        return self.ok("send", to={"user": user}, envelope=b64(envelope),
                       client_id=client_id or fresh_client_id(), **extra)


def _id_key(rid: object) -> object:
    # 1 and "1" are different ids; JSON keeps them apart, so must we.
    return (type(rid).__name__, rid)


def expect_error(request: Mapping[str, Any], reply: Mapping[str, Any], code: str
                 ) -> dict[str, Any]:
    """The reply's ``error`` object if it is a refusal with exactly ``code``."""
    if reply.get("ok") is not False:
        raise RequestFailed(request, reply, f"expected error {code!r}, got success")
    error = reply.get("error")
    if not isinstance(error, dict) or error.get("code") != code:
        raise RequestFailed(request, reply, f"expected error {code!r}")
    if not isinstance(error.get("message"), str) or not error["message"]:
        raise RequestFailed(request, reply, "an error must carry a human message")
    return error


def b64(data: bytes) -> str:
    import base64

    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    import base64

    return base64.b64decode(text, validate=True)


def b64url(data: bytes) -> str:
    """Unpadded URL-safe base64, as in a JWT (RFC 7515)."""
    import base64

    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64url(text: str) -> bytes:
    import base64

    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A JWT's header and claims, read without checking anything (to forge variants)."""
    head, body, _ = token.split(".")
    return json.loads(unb64url(head)), json.loads(unb64url(body))


def sleep(seconds: float) -> Deferred[None]:
    return deferLater(_reactor(), seconds, lambda: None)


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, step: float = 0.05,
               what: str = "condition not reached in time") -> Deferred[Any]:
    """Poll ``predicate`` on the real reactor until it returns something true (that is
    the result); an AssertionError saying ``what`` after ``timeout`` seconds.  For a
    real server over the network: a unit test advances a Clock instead."""

    async def poll() -> Any:
        waited = 0.0
        while True:
            value = predicate()
            if value:
                return value
            if waited > timeout:
                raise AssertionError(what)
            await sleep(step)
            waited += step

    return Deferred.fromCoroutine(poll())


def fresh_client_id() -> str:
    return "c-" + secrets.token_hex(8)


def connect(
    server: ServerProcess, *, name: str = "", clock: Any = None, timeout: float = 10.0,
    source: str | None = None,
) -> Deferred[JsonLineClient]:
    """A `JsonLineClient` connected over TLS pinned to ``server``'s certificate.

    Fires once TCP is connected (the TLS handshake completes with the first exchange).
    ``source``: the local address to connect from (another 127.x address is another
    client address to the server).
    """
    return connect_to(server.host, server.port, server.fingerprint, name=name, clock=clock,
                      timeout=timeout, source=source)


def connect_to(
    host: str, port: int, fingerprint: str, *, name: str = "", clock: Any = None,
    timeout: float = 10.0, source: str | None = None,
) -> Deferred[JsonLineClient]:
    r: IReactorTCP = clock or _reactor()
    endpoint = wrapClientTLS(
        client_options_pinned(fingerprint, "localhost"),
        TCP4ClientEndpoint(r, host, port, timeout=int(timeout),
                           bindAddress=(source, 0) if source else None),
    )
    client = JsonLineClient(clock=cast(IReactorTime, r), name=name)
    d: Deferred[Any] = connectProtocol(endpoint, client)
    return d.addCallback(lambda _: client)


@dataclass
class Session:
    """A logged-in connection and what login said."""

    client: JsonLineClient
    user: str
    device: str
    login: dict[str, Any]
    backlog: list[dict[str, Any]]
    backlog_done: dict[str, Any]


@inlineCallbacks
def register_and_login(
    server: ServerProcess, user: str | None = None, device: str = "dev1", *,
    register: bool = True, password: str = PASSWORD, source: str | None = None,
) -> Any:
    """hello, (register,) login; returns a `Session` with the backlog already read."""
    user = user or fresh_name()
    client = yield connect(server, name=f"{user}/{device}", source=source)
    try:
        yield client.hello()
        if register:
            yield client.register(user, password)
        reply = yield client.login(user, device, password)
        messages, done = yield client.collect_backlog()
    except RequestFailed as e:
        yield client.disconnect()
        if "internal_error" in str(e):  # the reason is only in the server's log
            raise RequestFailed(e.request, e.reply, f"{e.why}; the server's log ends:\n"
                                f"{server.log_text(tail=6000)}") from None
        raise
    except BaseException:
        yield client.disconnect()
        raise
    return Session(client, user, device, reply, messages, done)


@inlineCallbacks
def login_session(server: ServerProcess, user: str, device: str,
                  password: str = PASSWORD) -> Any:
    """`register_and_login` for an existing account."""
    session = yield register_and_login(server, user, device, register=False, password=password)
    return session


# ---------------------------------------------------------------------------------------
# trial glue


_live_servers: list[ServerProcess] = []


def _stop_live_servers() -> None:
    for server in list(_live_servers):
        server.cleanup()
    _live_servers.clear()


atexit.register(_stop_live_servers)


class ServerTestCase(unittest.TestCase):
    """A trial ``TestCase`` sharing one `ServerProcess` per class.

    trial has no ``setUpClass``, so the first test's ``setUp`` starts the class's server
    (synchronously) and the class's last test stops it; if only some tests run, an
    ``atexit`` hook stops it.  Set ``server_config`` (merged over `DEFAULT_CONFIG`) on a
    subclass for other limits.  Clients made with `connect`/`session` are disconnected
    after each test, so trial finds a clean reactor.  Use fresh names (`fresh_name`) in
    every test: the server and its accounts live as long as the class.
    """

    server_config: ClassVar[Mapping[str, Mapping[str, object]]] = {}
    server: ServerProcess
    timeout = 60
    _class_servers: ClassVar[dict[type, ServerProcess]] = {}
    _class_done: ClassVar[dict[type, int]] = {}

    def setUp(self) -> None:
        cls = type(self)
        server = self._class_servers.get(cls)
        if server is None or not server.running:
            if server is not None:
                server.cleanup()
            server = ServerProcess(cls.server_config)
            _live_servers.append(server)
            server.start()
            self._class_servers[cls] = server
        self.server = server
        self.addCleanup(self._maybe_last_test)

    def _maybe_last_test(self) -> None:
        cls = type(self)
        done = self._class_done.get(cls, 0) + 1
        self._class_done[cls] = done
        total = len([n for n in dir(cls) if n.startswith("test") and callable(getattr(cls, n))])
        if done >= total:
            server = self._class_servers.pop(cls, None)
            if server is not None:
                server.cleanup()
                if server in _live_servers:
                    _live_servers.remove(server)

    @inlineCallbacks
    def connect(self, name: str = "") -> Any:
        """A new client connected to the class's server; closed after the test."""
        client = yield connect(self.server, name=name)
        self.addCleanup(client.disconnect)
        return client

    @inlineCallbacks
    def connect_hello(self, name: str = "") -> Any:
        client = yield self.connect(name)
        yield client.hello()
        return client

    @inlineCallbacks
    def session(self, user: str | None = None, device: str = "dev1", *,
                register: bool = True) -> Any:
        """`register_and_login` with cleanup; returns a `Session`."""
        s = yield register_and_login(self.server, user, device, register=register)
        self.addCleanup(s.client.disconnect)
        return s

    @inlineCallbacks
    def room(self, owner: Session, *members: Session) -> Any:
        """A room of a fresh name that ``owner`` created and ``members`` joined, in that
        order; returns the name."""
        room = fresh_name("r")
        yield owner.client.ok("room_create", room=room)
        for s in members:
            yield s.client.ok("room_join", room=room)
        return room
