"""The server's line protocol over StringTransport; timers on a test clock.

The store and bcrypt are real (SQLite file, thread pool), so these tests await the
lines they expect (``Peer.reply``, ``Peer.pushed``: events, no polling); protocol
timers run on a Clock the tests advance.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from shtalk.testing import GOOD_PASSWORD, Peer, ServerParts, build_server


class ServerProtocolTests(TestCase):
    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        async def go() -> None:
            self.parts: ServerParts = await build_server(
                self.mktemp(), max_per_address=3, pre_auth=10, idle=60
            )

        return Deferred.fromCoroutine(go())

    def tearDown(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self.parts.close())

    async def reply(self, peer: Peer, rid: int) -> dict[str, Any]:
        return await peer.reply(rid)

    def peer(self, host: str | None = None) -> Peer:
        """A new connection; by default from an address of its own (the cap is 3)."""
        self._hosts = getattr(self, "_hosts", 0) + 1
        return Peer(self.parts.factory, host or f"192.0.2.{self._hosts}")

    async def hello(self, peer: Peer) -> None:
        r = await self.reply(peer, peer.request("hello", version=1))
        self.assertTrue(r["ok"], r)

    async def greeted(self, host: str | None = None) -> Peer:
        """A new connection past ``hello``."""
        peer = self.peer(host)
        await self.hello(peer)
        return peer

    async def account(self, name: str, device: str = "d1") -> Peer:
        peer = await self.greeted()
        r = await self.reply(
            peer,
            peer.request(
                "register", username=name, password=GOOD_PASSWORD, email=f"{name}@example.org"
            ),
        )
        if not r["ok"]:
            self.assertEqual(r["error"]["code"], "username_taken")
        r = await self.reply(
            peer,
            peer.request("login", username=name, password=GOOD_PASSWORD, device={"id": device}),
        )
        self.assertTrue(r["ok"], r)
        return peer

    async def test_connections_closing_after_the_store_log_no_failure(self) -> None:
        """At a stop the store closes before the connections are gone: the offline
        announcement it cannot make is skipped, not logged as a failure (trial fails a
        test on a logged failure)."""
        ann = await self.account("ann")
        await self.parts.server.store.close()
        ann.proto.connectionLost(None)
        await self.parts.server.store.open()

    # framing and state ---------------------------------------------------------
    async def test_hello_required_then_versions(self) -> None:
        p = self.peer()
        r = await self.reply(p, p.request("room_list"))
        self.assertEqual(r["error"]["code"], "hello_required")
        r = await self.reply(p, p.request("hello", version=2))
        self.assertEqual(r["error"]["code"], "unsupported_version")
        self.assertEqual(r["error"]["supported"], [1])
        await self.hello(p)
        r = await self.reply(p, p.request("room_list"))
        self.assertEqual(r["error"]["code"], "not_authenticated")

    async def test_bad_lines_keep_the_connection(self) -> None:
        p = await self.greeted()
        for raw, code in (
            (b"{oops\n", "bad_json"),
            (b"[]\n", "not_an_object"),
            (b'{"id":5,"type":"teleport"}\n', "unknown_type"),
            (b'{"id":6,"type":"register"}\n', "missing_field"),
            (b'{"id":7,"type":"hello","version":"x"}\n', "bad_field"),
        ):
            p.send(raw)
            lines = p.lines()
            self.assertEqual([ln["error"]["code"] for ln in lines], [code])
        r = await self.reply(p, p.request("ping"))
        self.assertTrue(r["ok"])
        self.assertFalse(p.closed)

    async def test_line_too_long_aborts(self) -> None:
        p = self.peer()
        self.parts.factory.max_line_length = 1024
        p.proto.MAX_LENGTH = 1024
        p.send(b"x" * 2000)
        self.assertEqual(p.lines()[-1]["error"]["code"], "line_too_long")
        self.assertTrue(p.transport.disconnecting)

    async def test_pre_auth_deadline_is_not_extended_by_partial_data(self) -> None:
        p = self.peer()
        clock = self.parts.clock
        for _ in range(9):
            clock.advance(1)
            p.send(b'{"id":1,')  # dribbling a line never completes it
        self.assertFalse(p.transport.disconnecting)
        clock.advance(1.5)
        self.assertEqual(p.lines()[-1]["error"]["code"], "timeout")
        self.assertTrue(p.transport.disconnecting)

    async def test_idle_timeout_reset_only_by_valid_lines(self) -> None:
        p = await self.account("idler")
        clock = self.parts.clock
        clock.advance(50)
        await self.reply(p, p.request("ping"))
        clock.advance(50)  # 100 s since login, 50 since the ping
        self.assertFalse(p.transport.disconnecting)
        p.send(b"junk\n")  # invalid lines do not count as activity
        clock.advance(11)
        self.assertTrue(p.transport.disconnecting)

    async def test_connection_cap_per_address(self) -> None:
        peers = [self.peer("198.51.100.7") for _ in range(3)]
        extra = self.peer("198.51.100.7")
        self.assertEqual(extra.lines()[-1]["error"]["code"], "too_many_connections")
        self.assertTrue(extra.transport.disconnecting)
        other = self.peer("198.51.100.8")
        self.assertFalse(other.transport.disconnecting)
        peers[0].proto.connectionLost(None)
        again = self.peer("198.51.100.7")
        self.assertFalse(again.transport.disconnecting)

    async def test_requests_behind_a_rate_limit_close_never_run(self) -> None:
        """A connection closed for exceeding its rate limits runs nothing it had queued."""
        from shtalk.server.config import RateLimitSection
        from shtalk.server.ops.ratelimit import RateLimiter

        clock = self.parts.clock
        section = RateLimitSection(send_account="1/600", send_address="off", disconnect_after=2)
        self.parts.limit(RateLimiter(section, clock))
        rita = await self.account("rita")
        r = await self.reply(rita, rita.request("room_create", room="#base"))
        self.assertTrue(r["ok"], r)
        # One chunk, as a flooding client sends it: the first send is taken and waits for
        # the store; the next three are refused and the third refusal closes the
        # connection; what follows must never run, neither now nor once the send is done.
        sends = [
            {"id": 10 + i, "type": "send", "to": {"room": "base"}, "envelope": "aGk=",
             "client_id": f"f{i}"}
            for i in range(4)
        ]
        after = [
            {"id": 14, "type": "ping"},
            {"id": 15, "type": "room_create", "room": "#after"},
            {"id": 16, "type": "room_list"},
            {"id": 17, "type": "logout"},
        ]
        rita.send(b"".join(json.dumps(obj).encode() + b"\n" for obj in sends + after))
        clock.advance(0)  # the close the third refusal asked for
        self.assertTrue(rita.transport.disconnecting)
        rita.proto.connectionLost(None)  # what the reactor does next
        sent = await self.reply(rita, 10)
        self.assertTrue(sent["ok"], sent)
        await self.parts.settle()
        codes = [rita.find_reply(i) for i in range(11, 14)]
        self.assertEqual([c and c["error"]["code"] for c in codes], ["rate_limited"] * 3)
        self.assertEqual([rita.find_reply(i) for i in range(14, 18)], [None] * 4)
        # Nothing ran: the room does not exist, and the session was not logged out.
        other = await self.account("otto")
        r = await self.reply(other, other.request("room_join", room="after"))
        self.assertEqual(r["error"]["code"], "no_such_room", r)
        self.assertEqual(self.flushLoggedErrors(), [])

    async def test_a_check_still_pending_at_the_close_runs_nothing(self) -> None:
        """A request waiting on a slow (shared) limiter when the link drops is dropped."""
        from shtalk.server.config import RateLimitSection
        from shtalk.server.ops.ratelimit import RateLimiter

        class SlowBuckets:
            """A shared backend (Redis) that has not answered yet."""

            def __init__(self) -> None:
                self.pending: list[Deferred[float]] = []

            def take(self, keys: Any, limits: Any) -> Deferred[float]:
                d: Deferred[float] = Deferred()
                self.pending.append(d)
                return d

        backend = SlowBuckets()
        sam = await self.account("sam")
        r = await self.reply(sam, sam.request("room_create", room="#slow"))
        self.assertTrue(r["ok"], r)
        limiter = RateLimiter(RateLimitSection(), self.parts.clock, backend)
        self.parts.limit(limiter)
        rid = sam.request("room_leave", room="slow")  # not limited: runs at once
        self.assertTrue((await self.reply(sam, rid))["ok"])
        rid = sam.request("room_join", room="slow")  # waits for the backend's answer
        self.assertEqual(len(backend.pending), 1)
        sam.proto.connectionLost(None)
        backend.pending[0].callback(0.0)  # allowed, but too late
        await self.parts.settle()
        self.assertIsNone(sam.find_reply(rid))
        self.parts.limit(None)
        other = await self.account("olga")
        r = await self.reply(other, other.request("room_members", room="slow"))
        self.assertNotIn("sam", json.dumps(r), r)
        self.assertEqual(self.flushLoggedErrors(), [])

    # accounts ----------------------------------------------------------------------
    async def test_register_rules(self) -> None:
        p = await self.greeted()
        cases = [
            ({"username": "x", "password": GOOD_PASSWORD}, "bad_username"),
            ({"username": "carla", "password": "short"}, "weak_password"),
            ({"username": "carla", "password": "password123456"}, "weak_password"),
            ({"username": "carla", "password": "y" * 40 + "\u00e9" * 20}, "password_too_long"),
            ({"username": "carla", "password": GOOD_PASSWORD, "email": "nope"}, "bad_email"),
        ]
        for fields, code in cases:
            fields.setdefault("email", "c@example.org")
            r = await self.reply(p, p.request("register", **fields))
            self.assertEqual(r["error"]["code"], code, fields)
        r = await self.reply(
            p, p.request("register", username="Carla", password=GOOD_PASSWORD, email="c@e.org")
        )
        self.assertTrue(r["ok"], r)
        r = await self.reply(
            p, p.request("register", username="CARLA", password=GOOD_PASSWORD, email="c@e.org")
        )
        self.assertEqual(r["error"]["code"], "username_taken")

    async def test_login_failures_look_the_same(self) -> None:
        await self.account("dora")
        p = await self.greeted()
        replies = []
        for user, pw in (("dora", "wrong-password-1"), ("nobody-here", GOOD_PASSWORD)):
            r = await self.reply(
                p, p.request("login", username=user, password=pw, device={"id": "x"})
            )
            replies.append(r["error"])
        self.assertEqual(replies[0], replies[1])
        self.assertEqual(replies[0]["code"], "invalid_credentials")
        r = await self.reply(
            p,
            p.request("login", username="dora", password="z" * 73, device={"id": "x"}),
        )
        self.assertEqual(r["error"]["code"], "invalid_credentials")

    async def test_resume_refresh_logout(self) -> None:
        p = await self.greeted()
        await self.reply(
            p, p.request("register", username="erin", password=GOOD_PASSWORD, email="e@e.org")
        )
        login = await self.reply(
            p, p.request("login", username="erin", password=GOOD_PASSWORD, device={"id": "t"})
        )
        self.assertTrue(login["ok"], login)
        q = await self.greeted()
        r = await self.reply(q, q.request("resume", access_token=login["access_token"]))
        self.assertEqual((r["ok"], r["user"], r["device"]), (True, "erin", "t"))
        # Refresh rotates; the old refresh token is then dead and its reuse kills the family.
        s = await self.greeted()
        r1 = await self.reply(s, s.request("refresh", refresh_token=login["refresh_token"]))
        self.assertTrue(r1["ok"], r1)
        t = await self.greeted()
        r2 = await self.reply(t, t.request("refresh", refresh_token=login["refresh_token"]))
        self.assertEqual(r2["error"]["code"], "token_revoked")
        u = await self.greeted()
        r3 = await self.reply(u, u.request("refresh", refresh_token=r1["refresh_token"]))
        self.assertFalse(r3["ok"], r3)
        # Logout revokes the access token at once.
        v = await self.greeted()
        fresh = await self.reply(
            v, v.request("login", username="erin", password=GOOD_PASSWORD, device={"id": "t"})
        )
        await self.reply(v, v.request("logout"))
        w = await self.greeted()
        r = await self.reply(w, w.request("resume", access_token=fresh["access_token"]))
        self.assertEqual(r["error"]["code"], "token_revoked")

    async def test_revocations_reach_every_connection_of_the_session(self) -> None:
        """A logout, and the reuse of a rotated refresh token, end the session on every
        connection bound to it (and on no other session's)."""
        p = await self.account("fay")
        login = p.find_reply(3)
        assert login is not None
        q = await self.greeted()
        r = await self.reply(q, q.request("resume", access_token=login["access_token"]))
        self.assertTrue(r["ok"], r)
        other = await self.account("fay", "d2")  # a session of its own
        r = await self.reply(p, p.request("logout"))
        self.assertTrue(r["ok"], r)
        self.assertEqual([x["reason"] for x in q.pushes("logged_out")],
                         ["this session was logged out on another connection"])
        self.assertEqual(p.pushes("logged_out"), [])  # it asked: a reply, not a push
        r = await self.reply(q, q.request("room_list"))
        self.assertEqual(r["error"]["code"], "not_authenticated")
        self.assertEqual(other.pushes("logged_out"), [])
        # The other session: refresh once, then the old token comes back (a thief).
        first = other.find_reply(3)
        assert first is not None
        s = await self.greeted()
        r = await self.reply(s, s.request("refresh", refresh_token=first["refresh_token"]))
        self.assertTrue(r["ok"], r)
        t = await self.greeted()
        r = await self.reply(t, t.request("refresh", refresh_token=first["refresh_token"]))
        self.assertEqual(r["error"]["code"], "token_revoked")
        for conn in (other, s):
            self.assertEqual([x["reason"] for x in conn.pushes("logged_out")],
                             ["this session was revoked: its refresh token was reused"])
        r = await self.reply(t, t.request("login", username="fay", password=GOOD_PASSWORD,
                                          device={"id": "d3"}))
        self.assertTrue(r["ok"], r)  # the connection that was refused may log in

    async def test_a_sender_is_not_read_while_the_store_is_overloaded(self) -> None:
        """Back-pressure: a send that finds the store's write queue full pauses reading
        that connection until the queue has gone into a transaction."""
        from shtalk.server.net.chathandlers import ChatHandlers
        from shtalk.wire.frames import Request

        class Queue:
            """The store's overload signal, as a test drives it."""

            def __init__(self) -> None:
                self.full = True
                self.drained: list[Deferred[None]] = []

            def overloaded(self) -> bool:
                return self.full

            def when_drained(self) -> Deferred[None]:
                d: Deferred[None] = Deferred()
                self.drained.append(d)
                return d

        queue = Queue()
        server = self.parts.server
        handlers = ChatHandlers(queue, server.security.gates, server.demands)  # type: ignore[arg-type]
        gus = await self.account("gus")
        transport = gus.transport
        send = Request(90, "send", {"to": {"user": "gus"}, "envelope": b"hi", "client_id": "bp"})
        d = handlers.on_send(gus.proto, send)
        self.assertEqual(transport.producerState, "paused")
        handlers.on_send(gus.proto, Request(91, "send", dict(send.args, client_id="bp2")))
        self.assertEqual(len(queue.drained), 1)  # paused once, not once per send
        self.assertTrue((await d)["seq"])
        self.assertEqual(transport.producerState, "paused")
        queue.full = False
        queue.drained[0].callback(None)
        self.assertEqual(transport.producerState, "producing")

    # routing ---------------------------------------------------------------------------
    async def test_room_message_reaches_members_once(self) -> None:
        alice = await self.account("alice")
        bob = await self.account("bob")
        carol = await self.account("carol")
        await self.reply(alice, alice.request("room_create", room="#general"))
        await self.reply(bob, bob.request("room_join", room="general"))
        r = await self.reply(
            alice,
            alice.request("send", to={"room": "general"}, envelope="aGk=", client_id="m1"),
        )
        self.assertTrue(r["ok"], r)
        r2 = await self.reply(
            alice,
            alice.request("send", to={"room": "general"}, envelope="aGk=", client_id="m1"),
        )
        self.assertEqual((r2["seq"], r2["duplicate"]), (r["seq"], True))
        await self.parts.settle()
        got = bob.pushes("message")
        self.assertEqual([(m["seq"], m["envelope"]) for m in got], [(r["seq"], "aGk=")])
        self.assertEqual(carol.pushes("message"), [])
        r = await self.reply(
            carol, carol.request("send", to={"room": "general"}, envelope="aGk=", client_id="c")
        )
        self.assertEqual(r["error"]["code"], "not_a_member")

    async def test_offline_queue_and_ack(self) -> None:
        alice = await self.account("amy")
        r = await self.reply(
            alice, alice.request("send", to={"user": "ben"}, envelope="aGk=", client_id="x")
        )
        self.assertEqual(r["error"]["code"], "no_such_user")
        ben = await self.account("ben")
        ben.proto.connectionLost(None)
        seqs = []
        for i in range(3):
            r = await self.reply(
                alice,
                alice.request("send", to={"user": "ben"}, envelope="aGk=", client_id=f"q{i}"),
            )
            seqs.append(r["seq"])
        ben2 = await self.greeted()
        await self.reply(
            ben2,
            ben2.request("login", username="ben", password=GOOD_PASSWORD, device={"id": "d1"}),
        )
        await ben2.pushed("presence")  # the last line: after the backlog
        self.assertEqual([m["seq"] for m in ben2.pushes("message")], seqs)
        # The backlog, then where ben's contacts are: amy (a DM partner) is online.
        self.assertEqual(ben2.received[-2:], [{"type": "backlog_done", "count": 3},
                                              {"type": "presence", "user": "amy",
                                               "status": "online"}])
        alice.proto.connectionLost(None)
        await self.reply(ben2, ben2.request("ack", seqs=seqs[:2]))
        ben2.proto.connectionLost(None)
        ben3 = await self.greeted()
        await self.reply(
            ben3,
            ben3.request("login", username="ben", password=GOOD_PASSWORD, device={"id": "d1"}),
        )
        await ben3.pushed("presence")
        self.assertEqual([m["seq"] for m in ben3.pushes("message")], seqs[2:])
        # amy left: the snapshot now says so (DM partners show offline too).
        self.assertEqual(ben3.received[-1], {"type": "presence", "user": "amy",
                                             "status": "offline"})

    async def test_device_envelopes_follow_logins_and_removals(self) -> None:
        """Per-device envelopes are checked against the recipient's current devices,
        also while the recipient is online (their device list is then cached)."""
        alice = await self.account("alicedv")
        bob1 = await self.account("bobdv", "d1")
        bob2 = await self.account("bobdv", "d2")
        env = base64.b64encode(b"x" * 32).decode()

        async def send(device: str) -> dict[str, Any]:
            return await self.reply(alice, alice.request(
                "send", to={"user": "bobdv"}, client_id=f"c-{device}-{id(object())}",
                envelopes={f"bobdv/{device}": env},
            ))  # fmt: skip

        self.assertTrue((await send("d2"))["ok"])
        r = await send("d3")
        self.assertEqual(r["error"]["code"], "no_such_device")
        await self.account("bobdv", "d3")  # a new device logs in while bob is online
        self.assertTrue((await send("d3"))["ok"])
        r = await self.reply(bob1, bob1.request("device_remove", device="d2"))
        self.assertTrue(r["ok"], r)
        self.assertEqual(bob2.pushes("logged_out")[0]["type"], "logged_out")
        r = await send("d2")
        self.assertEqual(r["error"]["code"], "no_such_device")


class PrekeyDirectoryTests(ServerProtocolTests):
    """Opaque bundles; each one-time key handed out exactly once, even when raced."""

    async def publish(self, peer: Peer, n: int) -> dict[str, Any]:
        keys = [
            {"kind": kind, "id": i, "key": base64.b64encode(f"{kind}{i}".encode()).decode()}
            for i in range(n)
            for kind in ("ec", "pq")
        ]
        return await self.reply(
            peer, peer.request("keys_publish", bundle="YnVuZGxl", one_time=keys)
        )

    async def test_publish_fetch_exactly_once(self) -> None:
        bob = await self.account("bobk")
        r = await self.publish(bob, 3)
        self.assertEqual(r["counts"], {"ec": 3, "pq": 3})
        alice = await self.account("alicek")
        carol = await self.account("carolk")
        # Two fetches in flight at once from two connections.
        ra = alice.request("keys_fetch", user="bobk")
        rc = carol.request("keys_fetch", user="bobk")
        a, c = await self.reply(alice, ra), await self.reply(carol, rc)
        got = [a["devices"][0]["one_time"]["ec"]["id"], c["devices"][0]["one_time"]["ec"]["id"]]
        self.assertEqual(sorted(got), [0, 1])
        self.assertEqual(a["devices"][0]["bundle"], "YnVuZGxl")
        r = await self.reply(bob, bob.request("keys_count"))
        self.assertEqual(r["counts"], {"ec": 1, "pq": 1})
        await self.reply(alice, alice.request("keys_fetch", user="bobk"))
        last = await self.reply(alice, alice.request("keys_fetch", user="bobk"))
        # Exhausted: the bundle (with its last-resort keys) still comes, no one-time keys.
        self.assertEqual(last["devices"][0]["one_time"], {})
        # A re-published id that was handed out is not stored again.
        await self.publish(bob, 1)
        r = await self.reply(bob, bob.request("keys_count"))
        self.assertEqual(r["counts"], {"ec": 0, "pq": 0})

    async def test_new_keys_are_announced_and_devices_removable(self) -> None:
        alice = await self.account("alicen")
        bob = await self.account("bobn")
        await self.reply(alice, alice.request("room_create", room="keys"))
        await self.reply(bob, bob.request("room_join", room="keys"))
        await self.publish(bob, 1)
        await self.parts.settle()
        self.assertIn(
            {"type": "device", "user": "bobn", "device": "d1", "event": "keys"},
            alice.pushes("device"),
        )
        # The same bundle again (a client publishes at every login): not news.
        seen = len(alice.pushes("device"))
        await self.publish(bob, 1)
        await self.parts.settle()
        self.assertEqual(len(alice.pushes("device")), seen)
        # A different bundle is announced.
        r = await self.reply(bob, bob.request("keys_publish", bundle="b3RoZXI=", one_time=[]))
        self.assertTrue(r["ok"], r)
        await self.parts.settle()
        self.assertEqual(len(alice.pushes("device")), seen + 1)
        r = await self.reply(bob, bob.request("device_remove", device="nope"))
        self.assertEqual(r["error"]["code"], "no_such_device")
        r = await self.reply(bob, bob.request("device_remove", device="d1"))
        self.assertTrue(r["ok"], r)
        self.assertEqual(bob.pushes("logged_out")[0]["type"], "logged_out")
        r = await self.reply(bob, bob.request("room_list"))
        self.assertEqual(r["error"]["code"], "not_authenticated")
        r = await self.reply(alice, alice.request("keys_fetch", user="bobn"))
        self.assertEqual(r["devices"], [])
