# mypy: disallow-untyped-calls=False
"""The outside audit's findings against the real ``twistd -n shtalk`` over TLS: the
monitor's exact stranger threshold, tokens, who sees whose presence, reports that
cannot be turned into a weapon."""

from __future__ import annotations

import time
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from shtalk.server.cred.tokens import P256_ORDER, TokenIssuer
from tests import test_operations_system as operations_system
from tests.harness import (
    ServerProcess,
    b64,
    b64url,
    connect,
    expect_error,
    fresh_client_id,
    jwt_parts,
    register_and_login,
    unb64url,
)


class _Servers(operations_system._Servers):
    @inlineCallbacks
    def logged_in(self, server: ServerProcess, user: str | None = None,
                  device: str = "dev1", register: bool = True) -> Any:
        s = yield register_and_login(server, user, device, register=register)
        self.addCleanup(s.client.disconnect)
        return s


class StrangerThresholdTests(_Servers):
    @inlineCallbacks
    def test_new_account_messaging_strangers_meets_the_captcha_at_the_seventh_send(
        self,
    ) -> Any:
        """Defaults: more than 5 strangers in the window raise the flag (at the 6th), so
        the 7th message of a new account asks for a CAPTCHA, its first one counted."""
        server = self.server({"monitor": {"enabled": True, "registrations": 1000}})
        strangers = []
        for _ in range(7):
            s = yield self.logged_in(server)
            strangers.append(s.user)
        newbie = yield self.logged_in(server)
        for i, peer in enumerate(strangers[:6]):
            yield newbie.client.ok("send", to={"user": peer}, envelope=b64(b"hi %d" % i),
                                   client_id=fresh_client_id())
        reply = yield newbie.client.request("send", to={"user": strangers[6]},
                                            envelope=b64(b"hi 6"),
                                            client_id=fresh_client_id())
        error = expect_error({}, reply, "captcha_required")
        self.assertIn("art", error["captcha"])
        flags = server_flags(server)
        [flag] = [f for f in flags if f["label"] == newbie.user]
        self.assertEqual(flag["signal"], "new_account_strangers")
        self.assertIn("messaged 6 strangers", flag["reason"])


class TokenTests(_Servers):
    @inlineCallbacks
    def test_high_s_twin_and_a_token_naming_another_device_are_refused(self) -> Any:
        server = self.server({})
        s = yield self.logged_in(server)
        other = yield self.logged_in(server, s.user, "dev2", register=False)
        token = s.login["access_token"]
        head, _, sig = token.rpartition(".")
        raw = unb64url(sig)
        n = P256_ORDER
        twin = head + "." + b64url(raw[:32] + (n - int.from_bytes(raw[32:], "big")).to_bytes(
            32, "big"))
        c = yield connect(server)
        self.addCleanup(c.disconnect)
        yield c.hello()
        yield c.fail("resume", "invalid_token", access_token=twin)
        # Signed with the server's own key, live session, but dev names another device
        # of the same account: a token names exactly its session's device.
        _, claims = jwt_parts(token)
        issuer = TokenIssuer(server.jwt_private_key_pem(), issuer=str(claims["iss"]))
        forged = issuer.issue_access(int(str(claims["sub"])), other.device,
                                     str(claims["sid"]), time.time())
        yield c.fail("resume", "invalid_token", access_token=forged)
        r = yield c.ok("resume", access_token=token)
        self.assertEqual((r["user"], r["device"]), (s.user, s.device))


class PresenceTests(_Servers):
    @inlineCallbacks
    def online_marks(self, viewer: Any, user: str) -> Any:
        r = yield viewer.client.ok("devices", user=user)
        self.assertTrue(r["devices"], r)
        return [d.get("online") for d in r["devices"]]

    @inlineCallbacks
    def test_a_stranger_gets_no_presence(self) -> Any:
        server = self.server({})
        victim = yield self.logged_in(server)
        mate = yield self.logged_in(server)
        stranger = yield self.logged_in(server)
        room = "r" + victim.user
        yield victim.client.ok("room_create", room=room)
        yield mate.client.ok("room_join", room=room)
        # Device lists stay open to anyone who may write (E2EE needs them), unmarked.
        marks = yield self.online_marks(stranger, victim.user)
        self.assertEqual(marks, [None])
        marks = yield self.online_marks(mate, victim.user)
        self.assertEqual(marks, [True])
        # Writing to someone shows them nothing of theirs: only the written-to learns.
        yield stranger.client.ok("send", to={"user": victim.user}, envelope=b64(b"hello?"),
                                 client_id=fresh_client_id())
        yield victim.client.next_push("message")
        marks = yield self.online_marks(stranger, victim.user)
        self.assertEqual(marks, [None])
        marks = yield self.online_marks(victim, stranger.user)
        self.assertEqual(marks, [True])
        # The victim goes away and comes back: the room mate hears it, the stranger not.
        yield victim.client.disconnect()
        push = yield mate.client.next_push("presence")
        self.assertEqual((push["user"], push["status"]), (victim.user, "offline"))
        victim = yield self.logged_in(server, victim.user, register=False)
        push = yield mate.client.next_push("presence")
        self.assertEqual((push["user"], push["status"]), (victim.user, "online"))
        heard = yield stranger.client.settle(0.5, "presence")
        self.assertEqual(heard, [])
        # Once the victim writes back, the conversation is mutual.
        yield victim.client.ok("send", to={"user": stranger.user}, envelope=b64(b"who?"),
                               client_id=fresh_client_id())
        marks = yield self.online_marks(stranger, victim.user)
        self.assertEqual(marks, [True])


def signed(ident: Any, sender: Any, recipient: Any, text: bytes, at: float | None = None
           ) -> bytes:
    from shtalk.crypto.envelope import Envelope, MessageType

    return Envelope.seal(
        ident, type=MessageType.MESSAGE, sender_user=sender.user,
        sender_device=sender.device, recipient=recipient, header=b"h" * 68,
        ciphertext=text, timestamp=int((time.time() if at is None else at) * 1000),
    ).to_bytes()


class ReportTests(_Servers):
    @inlineCallbacks
    def sender_with_keys(self, server: ServerProcess) -> Any:
        from shtalk.crypto.identity import DeviceIdentity

        s = yield self.logged_in(server)
        ident = DeviceIdentity.generate(one_time_prekeys=0, kem_one_time_prekeys=0)
        yield s.client.ok("keys_publish", bundle=b64(ident.public_bundle().base().to_bytes()))
        return s, ident

    @inlineCallbacks
    def test_one_verified_report_flags_but_never_suspends(self) -> Any:
        """Defaults: a flag for the operator, the reported account untouched."""
        from shtalk.crypto.envelope import Recipient

        server = self.server({"monitor": {"enabled": True, "registrations": 1000}})
        alice = yield self.logged_in(server)
        mallory, ident = yield self.sender_with_keys(server)
        env = signed(ident, mallory, Recipient.user(alice.user), b"spam")
        yield mallory.client.ok("send", to={"user": alice.user}, envelope=b64(env),
                                client_id=fresh_client_id())
        r = yield alice.client.ok("report", user=mallory.user, reason="spam",
                                  envelope=b64(env))
        self.assertTrue(r["verified"])
        self.assertIsInstance(r["flag"], int)
        [flag] = server_flags(server)
        self.assertEqual((flag["signal"], flag["action"]), ("reports", "flag"))
        out = yield mallory.client.settle(0.5, "logged_out")
        self.assertEqual(out, [])
        yield mallory.client.ok("ping")
        again = yield self.logged_in(server, mallory.user, "dev2", register=False)
        self.assertEqual(again.login["user"], mallory.user)

    @inlineCallbacks
    def test_room_reports_need_the_room_and_membership_at_the_time(self) -> Any:
        from shtalk.crypto.envelope import Recipient

        server = self.server({})
        mallory, ident = yield self.sender_with_keys(server)
        member = yield self.logged_in(server)
        stranger = yield self.logged_in(server)
        room = "r" + mallory.user
        yield mallory.client.ok("room_create", room=room)
        yield member.client.ok("room_join", room=room)
        env = signed(ident, mallory, Recipient.room(room), b"room spam")
        yield mallory.client.ok("send", to={"room": room}, envelope=b64(env),
                                client_id=fresh_client_id())
        # Handed a forwarded copy, a stranger cannot report it ...
        reply = yield stranger.client.request("report", user=mallory.user, reason="x",
                                              envelope=b64(env))
        self.assertIn("not in that room", expect_error({}, reply, "bad_field")["message"])
        # ... nor after joining later, nor for a room that does not exist.
        yield stranger.client.ok("room_join", room=room)
        reply = yield stranger.client.request("report", user=mallory.user, reason="x",
                                              envelope=b64(env))
        self.assertIn("not in that room", expect_error({}, reply, "bad_field")["message"])
        ghost = signed(ident, mallory, Recipient.room("nowhere" + room), b"ghost")
        reply = yield member.client.request("report", user=mallory.user, reason="x",
                                            envelope=b64(ghost))
        self.assertIn("does not exist", expect_error({}, reply, "bad_field")["message"])
        r = yield member.client.ok("report", user=mallory.user, reason="spam",
                                   envelope=b64(env))
        self.assertTrue(r["verified"])

    @inlineCallbacks
    def test_one_reporter_with_many_throwaway_accounts_cannot_suspend(self) -> Any:
        """Even with the age rule off: throwaways from one address count once, while
        reporters from distinct addresses reach the quorum (3)."""
        from shtalk.crypto.envelope import Recipient

        server = self.server({"monitor": {"enabled": True, "registrations": 1000,
                                          "reporter_min_age": 0}})
        victim, ident = yield self.sender_with_keys(server)
        room = "r" + victim.user
        yield victim.client.ok("room_create", room=room)
        throwaways = []
        for _ in range(6):
            t = yield self.logged_in(server)
            yield t.client.ok("room_join", room=room)
            throwaways.append(t)
        env = signed(ident, victim, Recipient.room(room), b"an opinion")
        yield victim.client.ok("send", to={"room": room}, envelope=b64(env),
                               client_id=fresh_client_id())
        for t in throwaways:
            r = yield t.client.ok("report", user=victim.user, reason="spam",
                                  envelope=b64(env))
            self.assertTrue(r["verified"])
        [flag] = server_flags(server)
        self.assertEqual(flag["action"], "flag")
        self.assertIn("1 of 3 qualifying", flag["reason"])
        out = yield victim.client.settle(0.5, "logged_out")
        self.assertEqual(out, [])
        # Two more people, each at an address of their own, written to by the victim.
        for source in ("127.0.0.2", "127.0.0.3"):
            s = yield register_and_login(server, source=source)
            self.addCleanup(s.client.disconnect)
            dm = signed(ident, victim, Recipient.user(s.user), b"spam")
            yield victim.client.ok("send", to={"user": s.user}, envelope=b64(dm),
                                   client_id=fresh_client_id())
            yield s.client.ok("report", user=victim.user, reason="spam", envelope=b64(dm))
        push = yield victim.client.next_push("logged_out", timeout=5)
        self.assertIn("suspended", push["reason"])
        [flag] = server_flags(server)
        self.assertEqual(flag["action"], "suspend")


class RedisPeekTests(unittest.TestCase):
    @inlineCallbacks
    def test_peek_takes_nothing(self) -> Any:
        """A refusal for the failure throttle asks the shared buckets how long they would
        make the request wait, without taking a token (the real Redis)."""
        from twisted.internet import reactor

        from shtalk.server.ops.ratelimit import Limit
        from shtalk.server.ops.redisbackend import RedisBuckets
        from tests.harness import fresh_name
        from tests.test_operations_system import need_redis

        need_redis(self)
        buckets = RedisBuckets("redis://127.0.0.1:6379/0", f"shtalk-test:{fresh_name('pk')}:",
                               reactor)
        self.addCleanup(buckets.close)
        lim = [Limit(2, 2 / 60)]
        waits = []
        for peek in (True, False, True, True, False, True, False):
            w = yield buckets.take(["k"], lim, peek)
            waits.append(w > 0)
        self.assertEqual(waits, [False, False, False, False, False, True, True])


def server_flags(server: ServerProcess) -> list[dict[str, Any]]:
    from shtalk.admin import control

    flags: list[dict[str, Any]] = control.call(
        str(server.data_dir / "admin.sock"), {"cmd": "flags"})["flags"]
    return flags
