"""KnownHosts and ClientConnection, byte for byte over a StringTransport and a fake clock.

Real TLS (pinning, a changed certificate, system trust) is exercised against a real
server in tests/test_client_session_system.py.
"""

from __future__ import annotations

import json
import os
import stat
from typing import Any, cast

from twisted.internet.defer import Deferred
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
    connect,
)
from shtalk.client.knownhosts import KnownHosts, canonical_fingerprint, fingerprints_equal
from shtalk.testing import tempdir
from shtalk.wire import requests as rq
from shtalk.wire.errors import ErrorCode
from shtalk.wire.pushes import BacklogDonePush, PresencePush, ServerPush

FP1 = ":".join(["AB"] * 32)
FP2 = ":".join(["01"] * 32)


class KnownHostsTests(unittest.TestCase):
    def setUp(self) -> None:
        self.dir = tempdir(self)
        self.path = os.path.join(self.dir, "sub", "known_hosts")
        self.kh = KnownHosts(self.path)

    def test_unknown_until_remembered(self) -> None:
        self.assertIsNone(self.kh.lookup("example.org", 6697))
        self.kh.remember("example.org", 6697, FP1.lower())
        self.assertEqual(self.kh.lookup("example.org", 6697), FP1)
        self.assertIsNone(self.kh.lookup("example.org", 6698))

    def test_file_private_and_one_line_per_server(self) -> None:
        self.kh.remember("example.org", 6697, FP1)
        self.kh.remember("Example.ORG", 6697, FP2)  # replaces: names are case-insensitive
        self.kh.remember("::1", 6697, FP1)
        self.assertEqual(stat.S_IMODE(os.stat(self.path).st_mode), 0o600)
        with open(self.path) as f:
            lines = f.read().splitlines()
        self.assertEqual(lines, [f"example.org:6697 {FP2}", f"[::1]:6697 {FP1}"])
        self.assertEqual(self.kh.lookup("::1", 6697), FP1)

    def test_forget(self) -> None:
        self.kh.remember("a.example", 1, FP1)
        self.kh.remember("b.example", 1, FP2)
        self.kh.forget("a.example", 1)
        self.assertIsNone(self.kh.lookup("a.example", 1))
        self.assertEqual(self.kh.lookup("b.example", 1), FP2)
        self.kh.forget("nobody", 1)  # no-op

    def test_comments_and_damaged_lines_kept(self) -> None:
        os.makedirs(os.path.dirname(self.path))
        with open(self.path, "w") as f:
            f.write("# my servers\nbroken line here\nx.example:1 nothex\n")
        self.assertIsNone(self.kh.lookup("x.example", 1))
        self.kh.remember("y.example", 2, FP1)
        with open(self.path) as f:
            text = f.read()
        self.assertIn("# my servers", text)
        self.assertIn("broken line here", text)

    def test_fingerprint_forms(self) -> None:
        spaced = FP1.replace(":", " ").lower()
        self.assertEqual(canonical_fingerprint("SHA256:" + spaced), FP1)
        self.assertTrue(fingerprints_equal(FP1, spaced))
        self.assertFalse(fingerprints_equal(FP1, FP2))
        self.assertRaises(ValueError, canonical_fingerprint, "AB:CD")


def lines_of(transport: StringTransport) -> list[dict[str, Any]]:
    out = [json.loads(line) for line in transport.value().splitlines() if line]
    transport.clear()
    return out


class ClientConnectionTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.conn = ClientConnection(self.clock)
        self.transport = StringTransport()
        self.conn.makeConnection(self.transport)
        self.pushes: list[ServerPush] = []
        self.conn.push_handler = self.pushes.append

    def feed(self, obj: dict[str, Any]) -> None:
        self.conn.dataReceived(json.dumps(obj).encode() + b"\n")

    def test_replies_matched_by_id_in_any_order(self) -> None:
        d1 = self.conn.request(rq.Ping())
        d2 = self.conn.request(rq.RoomList())
        sent = lines_of(self.transport)
        self.assertEqual([s["type"] for s in sent], ["ping", "room_list"])
        self.assertNotEqual(sent[0]["id"], sent[1]["id"])
        self.feed({"id": sent[1]["id"], "ok": True, "rooms": []})
        self.feed({"id": sent[0]["id"], "ok": True})
        self.assertEqual(self.successResultOf(d2)["rooms"], [])
        self.assertTrue(self.successResultOf(d1)["ok"])
        self.assertEqual(self.clock.getDelayedCalls(), [])  # timers cancelled

    def test_error_reply_is_server_error_with_code(self) -> None:
        d = self.conn.request(rq.RoomJoin(room="x"))
        rid = lines_of(self.transport)[0]["id"]
        self.feed({"id": rid, "ok": False, "error": {"code": "no_such_room", "message": "no"}})
        err = self.failureResultOf(d, ServerError).value
        self.assertEqual((err.code, err.message), ("no_such_room", "no"))
        self.assertEqual(err.reply["id"], rid)

    def test_timeout(self) -> None:
        d = self.conn.request(rq.Login(username="alice", password="hunter2-secret-pw",
                                       device=rq.DeviceInfo(id="d1")), timeout=5)
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        err = self.failureResultOf(d, RequestTimeout).value
        self.assertEqual(err.code, "timeout")
        self.assertNotIn("hunter2", str(err))
        self.feed({"id": 1, "ok": True})  # a late reply is dropped quietly

    def test_connection_lost_fails_pending(self) -> None:
        d = self.conn.request(rq.Ping())
        closed = self.conn.when_closed()
        self.assertNoResult(closed)
        self.conn.connectionLost(Failure(Exception("gone")))
        self.assertEqual(self.failureResultOf(d, ConnectionLost).value.code, "connection_lost")
        self.successResultOf(closed)
        self.successResultOf(self.conn.when_closed())
        self.failureResultOf(self.conn.request(rq.Ping()), ConnectionLost)

    def test_pushes_in_order_and_orphans_apart(self) -> None:
        orphans: list[dict[str, Any]] = []
        self.conn.orphan_handler = orphans.append
        self.feed({"type": "message", "seq": 1, "ts": 5, "from": {"user": "a", "device": "d"},
                   "to": {"user": "b"}, "client_id": "c1", "envelope": "AQID"})
        self.feed({"id": None, "ok": False, "error": {"code": "timeout", "message": "bye"}})
        self.conn.dataReceived(b"not json\n[1,2]\n")
        self.feed({"type": "backlog_done", "count": 1})
        self.assertEqual([p.NAME for p in self.pushes], ["message", "backlog_done"])
        self.assertEqual(len(orphans), 1)
        self.assertEqual(self.conn.last_error, {"code": "timeout", "message": "bye"})

    def test_pushes_are_typed_and_malformed_ones_dropped(self) -> None:
        logged: list[str] = []

        def observe(event: LogEvent) -> None:
            logged.append(formatEvent(event))

        observer = cast(Any, observe)
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.feed({"type": "presence", "user": "bob", "status": "online", "new": 1})
        self.feed({"type": "typing", "user": "bob"})  # a newer server's push: ignored
        self.feed({"type": "member", "room": "r", "user": "secret-looking" * 9,
                   "event": "joined"})
        self.feed({"type": "backlog_done", "count": 0})
        self.assertEqual(self.pushes, [PresencePush(user="bob", status="online"),
                                       BacklogDonePush(count=0)])
        self.assertTrue(any("malformed member push" in line and "'user'" in line
                            for line in logged), logged)
        self.assertFalse(any("secret-looking" in line for line in logged))

    def test_codes_are_the_wire_codes(self) -> None:
        d1, d2 = self.conn.request(rq.Ping()), self.conn.request(rq.Ping())
        first, second = (s["id"] for s in lines_of(self.transport))
        self.feed({"id": first, "ok": False, "error": {"code": "rate_limited", "message": "m",
                                                       "retry_after": 4}})
        self.feed({"id": second, "ok": False, "error": {"code": "from_the_future"}})
        err = self.failureResultOf(d1, ServerError).value
        self.assertIs(err.code, ErrorCode.RATE_LIMITED)
        self.assertEqual(err.detail["retry_after"], 4)
        self.assertEqual(self.failureResultOf(d2, ServerError).value.code, "from_the_future")

    def test_cancel_forgets_request(self) -> None:
        d = self.conn.request(rq.Ping())
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_line_too_long_refused_locally(self) -> None:
        self.conn.max_line_length = 100
        d = self.conn.request(rq.Send(to=rq.Target(user="b"), envelope=b"A" * 200,
                                      client_id="c1"))
        self.assertEqual(self.failureResultOf(d, ServerError).value.code, "line_too_long")
        self.assertEqual(self.transport.value(), b"")

    def test_oversized_server_line_aborts(self) -> None:
        self.conn.dataReceived(b"x" * (ClientConnection.MAX_LENGTH + 10))
        self.assertTrue(self.transport.disconnecting)

    def test_close_aborts_after_grace(self) -> None:
        aborted: list[bool] = []
        self.transport.abortConnection = lambda: aborted.append(True)  # type: ignore[method-assign]
        self.conn.close(grace=2)
        self.assertTrue(self.transport.disconnecting)
        self.clock.advance(2)
        self.assertEqual(aborted, [True])


class ConnectTests(unittest.TestCase):
    def test_connect_uses_injected_reactor(self) -> None:
        reactor = MemoryReactorClock()
        d: Deferred[ClientConnection] = connect(reactor, "127.0.0.1", 6697, FP1, timeout=3)
        self.assertEqual(len(reactor.tcpClients), 1)
        host, port, _factory, timeout, _bind = reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 6697, 3))
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d)

    def test_bad_pin_refused(self) -> None:
        self.failureResultOf(connect(MemoryReactorClock(), "h", 1, "nope"), ValueError)

    def test_certificate_changed_message_says_how_to_retrust(self) -> None:
        e = CertificateChanged("chat.example", 6697, FP1, FP2, "/home/a/known_hosts")
        text = str(e)
        self.assertIn("--forget-server chat.example:6697", text)
        self.assertIn("/home/a/known_hosts", text)
        self.assertIn(FP1, text)
        self.assertIn(FP2, text)
