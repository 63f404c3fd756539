"""ServerSession against a scripted server: ClientConnections over StringTransports, a
MemoryReactorClock for backoff and timeouts, no network and no TLS."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from typing import Any, cast

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from shtalk.client.connection import (
    CertificateChanged,
    ClientConnection,
    ConnectionLost,
    RequestTimeout,
    ServerError,
    UntrustedServer,
)
from shtalk.client.knownhosts import KnownHosts
from shtalk.client.session import AuthenticationFailed, Credentials, ServerSession
from shtalk.testing import tempdir
from shtalk.wire import requests as rq
from shtalk.wire.pushes import MessagePush, ServerPush

FP = ":".join(["AB"] * 32)
FP_OTHER = ":".join(["CD"] * 32)
ACCESS = "eyJ.access-token-secret-1"
REFRESH = "rt_refresh-token-secret-1"
PASSWORD = "tangerine-quokka-43"

Handler = Callable[[dict[str, Any]], dict[str, Any] | None]


class ScriptedServer:
    """Answers requests written by ClientConnections (on the next reactor turn).

    ``handlers[type]`` returns the reply fields (``ok`` is added unless an ``error`` is
    given) or None for no reply.  ``after[type]`` lists pushes sent after that reply.
    """

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        self.conns: list[tuple[ClientConnection, StringTransport]] = []
        self.requests: list[dict[str, Any]] = []
        self.handlers: dict[str, Handler] = {
            "hello": lambda r: {"version": 1, "max_line_length": 1048576},
            "resume": lambda r: {"user": "alice", "device": "d1"},
            "ping": lambda r: {},
            "room_list": lambda r: {"rooms": []},
        }
        self.after: dict[str, list[dict[str, Any]]] = {}
        self.fail_connect: list[Exception] = []

    def connect(self, reactor: Any, host: str, port: int, fp: str,
                timeout: float) -> Deferred[ClientConnection]:
        if self.fail_connect:
            return fail(self.fail_connect.pop(0))
        conn = ClientConnection(self.clock)
        server = self

        class T(StringTransport):
            def write(self, data: bytes) -> None:
                for line in data.splitlines():
                    server.clock.callLater(0, server.handle, conn, json.loads(line))

            def writeSequence(self, seq: Any) -> None:
                self.write(b"".join(seq))

            def loseConnection(self) -> None:
                if not self.disconnecting:
                    super().loseConnection()
                    server.clock.callLater(0, conn.connectionLost,
                                           Failure(ConnectionResetError("closed")))

        transport = T()
        conn.makeConnection(transport)
        self.conns.append((conn, transport))
        return succeed(conn)

    def handle(self, conn: ClientConnection, req: dict[str, Any]) -> None:
        if conn.closed:
            return
        self.requests.append(req)
        handler = self.handlers.get(req["type"])
        if handler is None:
            return
        fields = handler(req)
        if fields is None:
            return
        if "error" in fields:
            reply = {"id": req["id"], "ok": False, "error": fields["error"]}
        else:
            reply = {"id": req["id"], "ok": True, **fields}
        conn.dataReceived(json.dumps(reply).encode() + b"\n")
        for push in self.after.get(req["type"], []):
            conn.dataReceived(json.dumps(push).encode() + b"\n")

    def push(self, obj: dict[str, Any], index: int = -1) -> None:
        self.conns[index][0].dataReceived(json.dumps(obj).encode() + b"\n")

    def drop(self, index: int = -1) -> None:
        self.conns[index][0].connectionLost(Failure(ConnectionResetError("reset")))

    def types(self) -> list[str]:
        return [r["type"] for r in self.requests]


def message(seq: int) -> dict[str, Any]:
    """A ``message`` push as the server writes it."""
    return {"type": "message", "seq": seq, "ts": 1000 + seq,
            "from": {"user": "bob", "device": "d1"}, "to": {"user": "alice"},
            "client_id": f"c{seq}", "envelope": "AQID"}


def error(code: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": f"{code} happened"}}


def tokens(n: int) -> dict[str, Any]:
    return {"user": "alice", "device": "d1", "access_token": f"eyJ.new-access-{n}",
            "refresh_token": f"rt_new-refresh-{n}", "expires_in": 900}


class SessionTestCase(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.server = ScriptedServer(self.clock)
        self.kh = KnownHosts(os.path.join(tempdir(self), "known_hosts"))
        self.kh.remember("chat.example", 6697, FP)
        self.pushes: list[ServerPush] = []
        self.states: list[tuple[str, str]] = []
        self.saved: list[tuple[str | None, str | None]] = []
        self.asked = 0
        self.confirmed: list[str] = []
        self.creds = Credentials("alice", "d1", "laptop", ACCESS, REFRESH)
        self.log: list[str] = []

        def observe(event: LogEvent) -> None:
            self.log.append(formatEvent(event) + repr(event.get("log_failure", "")))

        observer = cast(Any, observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)

    def make(self, confirm: bool = True, **kw: Any) -> ServerSession:
        def ask() -> Deferred[str]:
            self.asked += 1
            return succeed(PASSWORD)

        def confirm_fp(fp: str) -> bool:
            self.confirmed.append(fp)
            return confirm

        s = ServerSession(
            self.clock, "chat.example", 6697, self.kh, confirm_fp, ask, self.creds,
            lambda c: self.saved.append((c.access_token, c.refresh_token)),
            self.pushes.append, lambda st, m: self.states.append((st, m)),
            backoff=(1.0, 8.0), rng=random.Random(1), **kw)
        s.connect_pinned = self.server.connect
        s.fetch_fingerprint = lambda r, h, p, t: succeed(FP)
        self.addCleanup(self._stop, s)
        return s

    def _stop(self, s: ServerSession) -> None:
        s.stop()
        self.pump()

    def pump(self, seconds: float = 0.0) -> None:
        self.clock.advance(seconds)
        for _ in range(20):
            self.clock.advance(0)

    def started(self, s: ServerSession) -> Deferred[None]:
        """``s.start()`` with the scripted server's answers pumped through."""
        d = s.start()
        self.pump()
        return d

    def assert_no_secrets(self, *texts: str) -> None:
        for text in [*texts, *self.log]:
            for secret in (ACCESS, REFRESH, PASSWORD, "new-access", "new-refresh"):
                self.assertNotIn(secret, text)


class TrustTests(SessionTestCase):
    def test_first_contact_confirmed_then_pinned(self) -> None:
        self.kh.forget("chat.example", 6697)
        s = self.make()
        d = self.started(s)
        self.successResultOf(d)
        self.assertEqual(self.confirmed, [FP])
        self.assertEqual(self.kh.lookup("chat.example", 6697), FP)

    def test_first_contact_declined(self) -> None:
        self.kh.forget("chat.example", 6697)
        s = self.make(confirm=False)
        d = self.started(s)
        self.assertEqual(self.failureResultOf(d, UntrustedServer).value.fingerprint, FP)
        self.assertIsNone(self.kh.lookup("chat.example", 6697))
        self.assertEqual(self.server.conns, [])

    def test_certificate_changed_stops_for_good(self) -> None:
        s = self.make()
        self.server.fail_connect.append(CertificateChanged("chat.example", 6697, FP, FP_OTHER))
        d = self.started(s)
        err = self.failureResultOf(d, CertificateChanged).value
        self.assertEqual((err.expected, err.got), (FP, FP_OTHER))
        self.assertIn(self.kh.path, str(err))
        self.assertIn("--forget-server chat.example:6697", str(err))
        self.assertEqual(s.state, "disconnected")
        self.assertIn("--forget-server", s.state_message)
        self.assertEqual(self.clock.getDelayedCalls(), [])  # no reconnect scheduled
        self.assertEqual(self.kh.lookup("chat.example", 6697), FP)
        self.failureResultOf(s.request(rq.Ping()), ConnectionLost)

    def test_system_trust_skips_known_hosts(self) -> None:
        used: list[Any] = []
        s = ServerSession(self.clock, "chat.example", 6697, None, lambda fp: True,
                          lambda: PASSWORD, self.creds, lambda c: None, self.pushes.append,
                          trust="system", trust_root="ROOT")

        def system(reactor: Any, host: str, port: int, timeout: float,
                   root: Any) -> Deferred[ClientConnection]:
            used.append(root)
            return self.server.connect(reactor, host, port, "", timeout)

        s.connect_system = system
        self.addCleanup(self._stop, s)
        d = self.started(s)
        self.successResultOf(d)
        self.assertEqual(used, ["ROOT"])
        self.assertRaises(ValueError, ServerSession, self.clock, "h", 1, None, lambda f: True,
                          lambda: "", self.creds, lambda c: None, lambda p: None)


class AuthTests(SessionTestCase):
    def test_resume_and_backlog_pushes_in_order(self) -> None:
        self.server.after["resume"] = [message(1), message(2),
                                       {"type": "backlog_done", "count": 2}]
        s = self.make()
        d = self.started(s)
        self.successResultOf(d)
        self.assertEqual(self.server.types(), ["hello", "resume"])
        self.assertEqual([p.seq if isinstance(p, MessagePush) else p.NAME for p in self.pushes],
                         [1, 2, "backlog_done"])
        self.assertEqual(s.state, "authenticated")
        self.assertEqual(self.asked, 0)
        self.assertEqual(self.saved, [])

    def test_expired_access_token_refreshes(self) -> None:
        self.server.handlers["resume"] = lambda r: error("token_expired")
        self.server.handlers["refresh"] = lambda r: tokens(1)
        s = self.make()
        d = self.started(s)
        self.successResultOf(d)
        self.assertEqual(self.server.types(), ["hello", "resume", "refresh"])
        self.assertEqual(self.server.requests[2]["refresh_token"], REFRESH)
        self.assertEqual(self.saved, [("eyJ.new-access-1", "rt_new-refresh-1")])
        self.assertEqual(self.creds.refresh_token, "rt_new-refresh-1")
        self.assert_no_secrets(repr(self.creds), *[m for _, m in self.states])

    def test_revoked_asks_password(self) -> None:
        self.server.handlers["resume"] = lambda r: error("token_revoked")
        self.server.handlers["login"] = lambda r: tokens(2)
        s = self.make()
        d = self.started(s)
        self.successResultOf(d)
        self.assertEqual(self.server.types(), ["hello", "resume", "login"])  # no refresh
        login = self.server.requests[2]
        self.assertEqual((login["username"], login["password"]), ("alice", PASSWORD))
        self.assertEqual(login["device"], {"id": "d1", "label": "laptop"})
        self.assertEqual(self.asked, 1)
        self.assertEqual(self.saved[-1], ("eyJ.new-access-2", "rt_new-refresh-2"))
        self.assert_no_secrets(*[m for _, m in self.states])

    def test_dead_refresh_token_asks_password(self) -> None:
        self.server.handlers["resume"] = lambda r: error("invalid_token")
        self.server.handlers["refresh"] = lambda r: error("token_revoked")
        self.server.handlers["login"] = lambda r: tokens(3)
        s = self.make()
        self.pump()
        d = self.started(s)
        self.successResultOf(d)
        self.assertEqual(self.server.types(), ["hello", "resume", "refresh", "login"])

    def test_wrong_password_gives_up(self) -> None:
        self.creds.access_token = self.creds.refresh_token = None
        self.server.handlers["login"] = lambda r: error("invalid_credentials")
        s = self.make()
        d = self.started(s)
        self.failureResultOf(d, AuthenticationFailed)
        self.assertEqual(self.asked, 3)
        self.assertEqual(s.state, "disconnected")
        self.assert_no_secrets(s.state_message)

    def test_cancelled_password_prompt_stops(self) -> None:
        self.creds.access_token = self.creds.refresh_token = None
        s = self.make()
        s.ask_password = lambda: fail(RuntimeError("the person closed the prompt"))  # type: ignore[assignment]
        d = self.started(s)
        self.failureResultOf(d, AuthenticationFailed)

    def test_second_factor_asked_in_the_reconnect_loop(self) -> None:
        """A password login that meets otp_required asks ``ask_extra`` and retries with
        the answer; closing that prompt stops like closing the password prompt."""
        self.creds.access_token = self.creds.refresh_token = None
        self.server.handlers["login"] = lambda r: (
            tokens(4) if r.get("otp") == "123456" else error("otp_required"))
        asked: list[str] = []

        def ask_extra(code: str, err: dict[str, Any]) -> dict[str, Any]:
            asked.append(code)
            return {"otp": "123456"}

        s = self.make(ask_extra=ask_extra)
        d = self.started(s)
        self.successResultOf(d)
        self.assertEqual(asked, ["otp_required"])
        self.assertEqual([r.get("otp") for r in self.server.requests
                          if r["type"] == "login"], [None, "123456"])
        self.assert_no_secrets(*[m for _, m in self.states])

    def test_wrong_second_factor_is_asked_again_not_the_password(self) -> None:
        """After otp_required the password is known to be right: invalid_credentials then
        means the code (wrong, expired or reused), and the code is asked for again."""
        self.creds.access_token = self.creds.refresh_token = None
        codes = iter(["111111", "123456"])
        self.server.handlers["login"] = lambda r: (
            tokens(4) if r.get("otp") == "123456" else
            error("invalid_credentials") if r.get("otp") else error("otp_required"))
        asked: list[str] = []

        def ask_extra(code: str, err: dict[str, Any]) -> dict[str, Any]:
            asked.append(code)
            return {"otp": next(codes)}

        passwords: list[int] = []
        s = self.make(ask_extra=ask_extra)
        s.ask_password = lambda: passwords.append(1) or "pw"  # type: ignore[assignment,func-returns-value]
        d = self.started(s)
        self.successResultOf(d)
        self.assertEqual(asked, ["otp_required", "otp_rejected"])
        self.assertEqual(len(passwords), 1)

    def test_closed_second_factor_prompt_stops(self) -> None:
        self.creds.access_token = self.creds.refresh_token = None
        self.server.handlers["login"] = lambda r: error("otp_required")
        s = self.make(ask_extra=lambda code, err: fail(RuntimeError("closed")))
        d = self.started(s)
        self.failureResultOf(d, AuthenticationFailed)
        self.assertEqual(self.server.types().count("login"), 1)

    def test_logged_out_push_reauthenticates(self) -> None:
        self.server.handlers["refresh"] = lambda r: error("token_revoked")
        self.server.handlers["login"] = lambda r: tokens(4)
        s = self.make()
        self.successResultOf(self.started(s))
        self.server.push({"type": "logged_out", "reason": "device removed"})
        self.assertEqual(self.pushes[-1].NAME, "logged_out")
        self.pump()
        self.assertEqual(self.server.types(), ["hello", "resume", "refresh", "login"])
        self.assertEqual(len(self.server.conns), 1)  # on the same connection
        self.assertEqual(s.state, "authenticated")

    def test_explicit_register_and_login(self) -> None:
        self.creds.access_token = self.creds.refresh_token = None
        self.server.handlers["register"] = lambda r: {"user": r["username"], "status": "active"}
        self.server.handlers["login"] = lambda r: tokens(5)
        s = self.make()
        d = s.register("alice", PASSWORD, "a@example.org")
        self.pump()
        self.assertEqual(self.successResultOf(d)["status"], "active")
        d2 = s.login(PASSWORD)
        self.pump()
        self.assertEqual(self.successResultOf(d2)["access_token"], "eyJ.new-access-5")
        self.assertEqual(self.server.types(), ["hello", "register", "login"])
        self.assertEqual(s.state, "authenticated")
        self.server.drop()
        self.pump(10)
        self.assertEqual(self.server.types()[-2:], ["hello", "resume"])
        self.assertEqual(self.server.requests[-1]["access_token"], "eyJ.new-access-5")

    def test_logout_forgets_tokens(self) -> None:
        self.server.handlers["logout"] = lambda r: {}
        s = self.make()
        self.successResultOf(self.started(s))
        d = s.logout()
        self.pump()
        self.successResultOf(d)
        self.assertEqual(self.saved[-1], (None, None))
        self.assertEqual(s.state, "disconnected")
        self.assertEqual(self.clock.getDelayedCalls(), [])


class ReconnectTests(SessionTestCase):
    def test_backoff_bounds(self) -> None:
        s = self.make()
        for attempt in range(12):
            ceiling = min(8.0, 1.0 * 2 ** attempt)
            for _ in range(20):
                delay = s.backoff_delay(attempt)
                self.assertTrue(ceiling / 2 <= delay <= ceiling, (attempt, delay))

    def test_reconnects_with_backoff_and_resumes(self) -> None:
        s = self.make()
        d = self.started(s)
        self.successResultOf(d)
        self.server.fail_connect = [ConnectionRefusedError("refused")] * 2
        self.server.drop()
        self.assertEqual(s.state, "reconnecting")
        waiting = s.request(rq.RoomList(), timeout=60)
        delays = []
        for _ in range(3):
            calls = [c for c in self.clock.getDelayedCalls() if c.getTime() > self.clock.seconds()]
            delay = min(c.getTime() for c in calls) - self.clock.seconds()
            delays.append(delay)
            self.pump(delay)
        self.assertTrue(0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0
                        and 2.0 <= delays[2] <= 4.0, delays)
        self.assertEqual(self.successResultOf(waiting)["rooms"], [])
        self.assertEqual(self.server.types(), ["hello", "resume", "hello", "resume",
                                               "room_list"])
        self.assertEqual(s.state, "authenticated")
        self.assertEqual(self.asked, 0)

    def test_waiting_request_times_out(self) -> None:
        s = self.make()
        self.successResultOf(self.started(s))
        self.server.fail_connect = [ConnectionRefusedError("refused")] * 100
        self.server.drop()
        d = s.request(rq.RoomList(), timeout=5)
        self.pump(4.9)
        self.assertNoResult(d)
        self.pump(0.2)
        err = self.failureResultOf(d, RequestTimeout).value
        self.assertEqual(err.code, "timeout")

    def test_request_timeout_on_live_connection(self) -> None:
        s = self.make()
        self.successResultOf(self.started(s))
        self.server.handlers["devices"] = lambda r: None  # never answers
        d = s.request(rq.Devices(), timeout=3)
        self.pump(3.1)
        self.failureResultOf(d, RequestTimeout)

    def test_server_error_is_server_error(self) -> None:
        s = self.make()
        self.successResultOf(self.started(s))
        self.server.handlers["room_join"] = lambda r: error("no_such_room")
        d = s.request(rq.RoomJoin(room="nope"))
        self.pump()
        self.assertEqual(self.failureResultOf(d, ServerError).value.code, "no_such_room")

    def test_retryable_request_resent_others_fail(self) -> None:
        s = self.make()
        self.successResultOf(self.started(s))
        self.server.handlers["room_list"] = lambda r: None
        self.server.handlers["room_create"] = lambda r: None
        listing = s.request(rq.RoomList(), timeout=60)
        creating = s.request(rq.RoomCreate(room="x"), timeout=60)
        self.pump()
        self.server.handlers["room_list"] = lambda r: {"rooms": [1]}
        self.server.drop()
        self.failureResultOf(creating, ConnectionLost)
        self.pump(2)
        self.assertEqual(self.successResultOf(listing)["rooms"], [1])

    def test_stop_fails_waiting_and_stops_timers(self) -> None:
        s = self.make()
        self.successResultOf(self.started(s))
        self.server.fail_connect = [ConnectionRefusedError("refused")] * 100
        self.server.drop()
        d = s.request(rq.Ping(), timeout=30)
        self.successResultOf(s.stop())
        self.failureResultOf(d, ConnectionLost)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.failureResultOf(s.request(rq.Ping()), ConnectionLost)
