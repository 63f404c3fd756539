# mypy: disallow-untyped-calls=False
"""The outside audit's findings against the real ``twistd -n shtalk`` over TLS: the
monitor's exact stranger threshold, tokens, who sees whose presence, reports that
cannot be turned into a weapon."""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from shtalk.server.tokens import P256_ORDER, TokenIssuer
from tests.harness import (
    ServerProcess,
    b64,
    connect,
    expect_error,
    fresh_client_id,
    register_and_login,
)


class _Servers(unittest.TestCase):
    timeout = 90

    def server(self, config: dict[str, dict[str, object]]) -> ServerProcess:
        server = ServerProcess(config)
        self.addCleanup(server.cleanup)
        server.start()
        return server

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


class RedisPeekTests(unittest.TestCase):
    @inlineCallbacks
    def test_peek_takes_nothing(self) -> Any:
        """A refusal for the failure throttle asks the shared buckets how long they would
        make the request wait, without taking a token (the real Redis)."""
        from twisted.internet import reactor

        from shtalk.server.ratelimit import Limit
        from shtalk.server.redisbackend import RedisBuckets
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


def unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def jwt_parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    head, body, _ = token.split(".")
    return json.loads(unb64url(head)), json.loads(unb64url(body))


def server_flags(server: ServerProcess) -> list[dict[str, Any]]:
    from shtalk.admin import control

    flags: list[dict[str, Any]] = control.call(
        str(server.data_dir / "admin.sock"), {"cmd": "flags"})["flags"]
    return flags
