# mypy: disallow-untyped-calls=False
# (trial's TestCase is untyped; strict otherwise.)
"""System tests of the server core: the real ``twistd -n shtalk`` over real TLS.

Each class shares one server process (`tests.harness.ServerTestCase`); every test uses
fresh usernames and room names.  What is checked is what docs/PROTOCOL.md promises: the
exact reply fields and error codes, who receives which push, exactly once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import socket
import ssl
import time
from collections.abc import Mapping
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from shtalk.server.cred.tokens import low_s
from tests.harness import (
    PASSWORD,
    REPO_ROOT,
    JsonLineClient,
    ServerTestCase,
    Session,
    b64,
    b64url,
    expect_error,
    fresh_client_id,
    fresh_name,
    jwt_parts,
    sleep,
    unb64,
)


def messages_for(pushes: list[dict[str, Any]], client_id: str) -> list[dict[str, Any]]:
    return [p for p in pushes if p.get("type") == "message" and p.get("client_id") == client_id]


@inlineCallbacks
def next_member_push(s: Session, timeout: float = 5.0) -> Any:
    """The next ``member`` push, skipping the one about this user's own join (whether a
    joiner hears of its own join is not specified; both are allowed)."""
    while True:
        push = yield s.client.next_push("member", timeout=timeout)
        if (push.get("user"), push.get("event")) != (s.user, "joined"):
            return push


class RoomTests(ServerTestCase):
    """Accounts, rooms, membership pushes and fan-out."""

    @inlineCallbacks
    def test_three_users_room_lifecycle(self) -> Any:
        """create/join/leave/kick, with the member pushes each side sees."""
        alice = yield self.session()
        bob = yield self.session()
        carol = yield self.session()
        room = fresh_name("r")
        created = yield alice.client.ok("room_create", room=room)
        self.assertEqual(
            {k: created[k] for k in ("room", "invite_only", "role")},
            {"room": room, "invite_only": False, "role": "owner"},
        )

        joined = yield bob.client.ok("room_join", room=room)
        self.assertEqual(joined["room"], room)
        self.assertEqual(joined["invite_only"], False)
        self.assertEqual(
            sorted((m["user"], m["role"], m["online"]) for m in joined["members"]),
            sorted([(alice.user, "owner", True), (bob.user, "member", True)]),
        )
        push = yield next_member_push(alice)
        self.assertEqual(push, {"type": "member", "room": room, "user": bob.user,
                                "event": "joined"})

        yield carol.client.ok("room_join", room=room)
        for s in (alice, bob):
            push = yield next_member_push(s)
            self.assertEqual(push, {"type": "member", "room": room, "user": carol.user,
                                    "event": "joined"})

        members = yield carol.client.ok("room_members", room=room)
        self.assertEqual(sorted(m["user"] for m in members["members"]),
                         sorted([alice.user, bob.user, carol.user]))
        listed = yield carol.client.ok("room_list")
        mine = [r for r in listed["rooms"] if r["room"] == room]
        self.assertEqual(mine, [{"room": room, "invite_only": False, "members": 3,
                                 "joined": True}])

        # bob leaves: the others see "left"; bob no longer gets room messages.
        left = yield bob.client.ok("room_leave", room=room)
        self.assertEqual(left["room"], room)
        for s in (alice, carol):
            push = yield next_member_push(s)
            self.assertEqual(push, {"type": "member", "room": room, "user": bob.user,
                                    "event": "left"})

        # The owner kicks carol: alice and carol see "kicked" by alice.
        kicked = yield alice.client.ok("room_kick", room=room, user=carol.user)
        self.assertEqual((kicked["room"], kicked["user"]), (room, carol.user))
        for s in (alice, carol):
            push = yield next_member_push(s)
            self.assertEqual(push, {"type": "member", "room": room, "user": carol.user,
                                    "event": "kicked", "by": alice.user})
        # bob had left: he hears nothing of the kick.
        pushes = yield bob.client.settle(0.3, "member")
        self.assertEqual([p for p in pushes if p["user"] != bob.user], [])

        # Later room messages reach neither bob (left) nor carol (kicked).
        sent = yield alice.client.send_room(room, b"after the kick")
        self.assertEqual(sent["duplicate"], False)
        for s in (bob, carol):
            late = yield s.client.settle(0.5, "message")
            self.assertEqual(late, [], f"{s.user} got a room message after leaving")
        err = yield carol.client.fail("send", "not_a_member", to={"room": room},
                                      envelope=b64(b"x"), client_id=fresh_client_id())
        self.assertIn("message", err)

    @inlineCallbacks
    def test_kicked_user_gets_nothing_at_next_login(self) -> Any:
        """The kick also holds for an offline kicked user's queue."""
        alice = yield self.session()
        carol = yield self.session()
        room = yield self.room(alice, carol)
        yield carol.client.disconnect()
        yield alice.client.ok("room_kick", room=room, user=carol.user)
        yield alice.client.send_room(room, b"secret plans")
        again = yield self.session(carol.user, "dev1", register=False)
        self.assertEqual(again.backlog, [])
        self.assertEqual(again.backlog_done, {"type": "backlog_done", "count": 0})

    @inlineCallbacks
    def test_invite_only_room(self) -> Any:
        alice = yield self.session()
        bob = yield self.session()
        carol = yield self.session()
        room = fresh_name("r")
        created = yield alice.client.ok("room_create", room=room, invite_only=True)
        self.assertEqual(created["invite_only"], True)
        yield bob.client.fail("room_join", "invite_required", room=room)
        # Not listed to strangers.
        listed = yield carol.client.ok("room_list")
        self.assertNotIn(room, [r["room"] for r in listed["rooms"]])

        yield carol.client.fail("room_invite", "not_a_member", room=room, user=bob.user)
        invited = yield alice.client.ok("room_invite", room=room, user=bob.user)
        self.assertEqual((invited["room"], invited["user"]), (room, bob.user))
        push = yield bob.client.next_push("invited")
        self.assertEqual(push, {"type": "invited", "room": room, "by": alice.user})
        listed = yield bob.client.ok("room_list")
        self.assertIn(room, [r["room"] for r in listed["rooms"]])
        joined = yield bob.client.ok("room_join", room=room)
        self.assertEqual(joined["invite_only"], True)
        # A plain member of an invite-only room may not invite.
        yield bob.client.fail("room_invite", "forbidden", room=room, user=carol.user)
        yield carol.client.fail("room_join", "invite_required", room=room)

    @inlineCallbacks
    def test_roles_and_owner_succession(self) -> Any:
        """Owner makes bob admin; admins kick members but not admins; when the owner
        leaves, the first admin becomes owner."""
        alice = yield self.session()
        bob = yield self.session()
        carol = yield self.session()
        dave = yield self.session()
        room = yield self.room(alice, bob, carol, dave)
        r = yield alice.client.ok("room_role", room=room, user=bob.user, role="admin")
        self.assertEqual((r["room"], r["user"], r["role"]), (room, bob.user, "admin"))
        push = yield next_member_push(carol)
        while push["event"] == "joined":
            push = yield next_member_push(carol)
        self.assertEqual(push, {"type": "member", "room": room, "user": bob.user,
                                "event": "role", "role": "admin"})
        yield bob.client.ok("room_kick", room=room, user=dave.user)
        yield alice.client.ok("room_role", room=room, user=carol.user, role="admin")
        yield bob.client.fail("room_kick", "forbidden", room=room, user=carol.user)
        yield bob.client.fail("room_kick", "forbidden", room=room, user=alice.user)
        yield alice.client.ok("room_role", room=room, user=carol.user, role="member")
        yield alice.client.ok("room_leave", room=room)
        members = yield carol.client.ok("room_members", room=room)
        roles = {m["user"]: m["role"] for m in members["members"]}
        self.assertEqual(roles, {bob.user: "owner", carol.user: "member"})

    @inlineCallbacks
    def test_room_fan_out_exactly_once(self) -> Any:
        """Every other member device gets the message once, with the same envelope."""
        alice = yield self.session()
        alice2 = yield self.session(alice.user, "second", register=False)
        bob = yield self.session()
        bob2 = yield self.session(bob.user, "phone", register=False)
        carol = yield self.session()
        room = yield self.room(alice, bob, carol)
        envelope = secrets.token_bytes(300)
        cid = fresh_client_id()
        sent = yield alice.client.send_room(room, envelope, cid)
        self.assertIsInstance(sent["seq"], int)
        self.assertIsInstance(sent["ts"], int)
        self.assertEqual(sent["duplicate"], False)
        expected = {
            "type": "message", "seq": sent["seq"], "ts": sent["ts"],
            "from": {"user": alice.user, "device": "dev1"}, "to": {"room": room},
            "client_id": cid, "envelope": b64(envelope),
        }
        for s in (alice2, bob, bob2, carol):
            got = yield s.client.next_push("message")
            self.assertEqual(got, expected, f"{s.user}/{s.device}")
        for s in (alice, alice2, bob, bob2, carol):
            extra = yield s.client.settle(0.3 if s is alice else 0, "message")
            self.assertEqual(extra, [], f"{s.user}/{s.device} got it twice (or its own)")

    @inlineCallbacks
    def test_send_order_preserved(self) -> Any:
        """Pipelined sends from one connection are delivered in the order sent."""
        alice = yield self.session()
        bob = yield self.session()
        room = yield self.room(alice, bob)
        ids = [f"o-{i}" for i in range(30)]
        from twisted.internet.defer import gatherResults

        replies = yield gatherResults([
            alice.client.send_room(room, f"m{i}".encode(), cid) for i, cid in enumerate(ids)
        ])
        seqs = [r["seq"] for r in replies]
        got = []
        for _ in ids:
            m = yield bob.client.next_push("message")
            got.append(m["client_id"])
        self.assertEqual(
            (seqs == sorted(seqs), got == ids), (True, True),
            "PROTOCOL.md: 'Sends from one connection are stored and delivered in the order "
            f"they were sent'.\nseqs in send order: {seqs}\n"
            f"delivered order (by send index): {[ids.index(c) for c in got]}")


class MessagingTests(ServerTestCase):
    """Direct messages, devices, the offline queue, ack, duplicates, expiry."""

    @inlineCallbacks
    def test_direct_message(self) -> Any:
        alice = yield self.session()
        bob = yield self.session()
        cid = fresh_client_id()
        sent = yield alice.client.send_user(bob.user, b"hi bob", cid)
        got = yield bob.client.next_push("message")
        self.assertEqual(got, {
            "type": "message", "seq": sent["seq"], "ts": sent["ts"],
            "from": {"user": alice.user, "device": "dev1"}, "to": {"user": bob.user},
            "client_id": cid, "envelope": b64(b"hi bob"),
        })
        extra = yield alice.client.settle(0.3, "message")
        self.assertEqual(extra, [], "the sender's own device got its message back")
        devices = yield alice.client.ok("devices", user=bob.user)
        self.assertEqual(devices["user"], bob.user)
        # Bob's devices, without his presence: he has not written to alice.
        self.assertEqual([d["id"] for d in devices["devices"]], ["dev1"])
        self.assertNotIn("online", devices["devices"][0])

    @inlineCallbacks
    def test_multi_device(self) -> Any:
        """Both of bob's devices get a DM; alice's other device gets a copy."""
        alice = yield self.session()
        alice2 = yield self.session(alice.user, "tablet", register=False)
        bob = yield self.session()
        bob2 = yield self.session(bob.user, "phone", register=False)
        cid = fresh_client_id()
        yield alice.client.send_user(bob.user, b"to both", cid)
        for s in (bob, bob2, alice2):
            got = yield s.client.next_push("message")
            self.assertEqual(got["client_id"], cid, f"{s.user}/{s.device}")
            self.assertEqual(unb64(got["envelope"]), b"to both")
            self.assertEqual(got["from"], {"user": alice.user, "device": "dev1"})
            self.assertEqual(got["to"], {"user": bob.user}, "a copy names its recipient")
        for s in (alice, alice2, bob, bob2):
            extra = yield s.client.settle(0.3 if s is alice else 0, "message")
            self.assertEqual(extra, [], f"{s.user}/{s.device} got it twice (or its own)")

        # Per-device envelopes: each device gets its own.
        cid = fresh_client_id()
        yield alice.client.ok("send", to={"user": bob.user}, client_id=cid, envelopes={
            f"{bob.user}/dev1": b64(b"for dev1"), f"{bob.user}/phone": b64(b"for phone"),
            f"{alice.user}/tablet": b64(b"for my tablet"),
        })
        for s, want in ((bob, b"for dev1"), (bob2, b"for phone"), (alice2, b"for my tablet")):
            got = yield s.client.next_push("message")
            self.assertEqual((got["client_id"], unb64(got["envelope"])), (cid, want))

    @inlineCallbacks
    def test_offline_queue_in_order_then_backlog_done(self) -> Any:
        bob = yield self.session()
        yield bob.client.disconnect()
        alice = yield self.session()
        ids = [fresh_client_id() for _ in range(5)]
        seqs = []
        for i, cid in enumerate(ids):
            r = yield alice.client.send_user(bob.user, f"queued {i}".encode(), cid)
            seqs.append(r["seq"])
        back = yield self.session(bob.user, "dev1", register=False)
        self.assertEqual([m["client_id"] for m in back.backlog], ids)
        self.assertEqual([m["seq"] for m in back.backlog], seqs)
        self.assertEqual([unb64(m["envelope"]) for m in back.backlog],
                         [f"queued {i}".encode() for i in range(5)])
        self.assertEqual(back.backlog_done, {"type": "backlog_done", "count": 5})
        # A live message after the backlog arrives once, after backlog_done.
        cid = fresh_client_id()
        yield alice.client.send_user(bob.user, b"live", cid)
        got = yield back.client.next_push("message")
        self.assertEqual(got["client_id"], cid)

    @inlineCallbacks
    def test_ack_deletes_and_unacked_are_redelivered(self) -> Any:
        bob = yield self.session()
        yield bob.client.disconnect()
        alice = yield self.session()
        ids = [fresh_client_id() for _ in range(3)]
        for cid in ids:
            yield alice.client.send_user(bob.user, b"m", cid)

        first = yield self.session(bob.user, "dev1", register=False)
        self.assertEqual([m["client_id"] for m in first.backlog], ids)
        # Nothing acked: everything comes again.
        yield first.client.disconnect()
        second = yield self.session(bob.user, "dev1", register=False)
        self.assertEqual([m["client_id"] for m in second.backlog], ids)
        # Ack the first two only.
        yield second.client.ok("ack", seqs=[m["seq"] for m in second.backlog[:2]])
        yield second.client.disconnect()
        third = yield self.session(bob.user, "dev1", register=False)
        self.assertEqual([m["client_id"] for m in third.backlog], ids[2:])
        self.assertEqual(third.backlog_done["count"], 1)
        yield third.client.ok("ack", seqs=[third.backlog[0]["seq"]])
        yield third.client.disconnect()
        fourth = yield self.session(bob.user, "dev1", register=False)
        self.assertEqual(fourth.backlog, [])
        self.assertEqual(fourth.backlog_done, {"type": "backlog_done", "count": 0})

    @inlineCallbacks
    def test_room_ack_is_cumulative_and_per_device(self) -> Any:
        alice = yield self.session()
        bob = yield self.session()
        room = yield self.room(alice, bob)
        yield self.session(bob.user, "phone", register=False)  # registers the device
        yield bob.client.disconnect()
        self.flushLoggedErrors()
        ids = [fresh_client_id() for _ in range(3)]
        for cid in ids:
            yield alice.client.send_room(room, b"r", cid)
        # Wait until the phone session (closed at cleanup) is gone too: log it out now.
        back = yield self.session(bob.user, "dev1", register=False)
        self.assertEqual([m["client_id"] for m in back.backlog], ids)
        yield back.client.ok("ack", seqs=[back.backlog[1]["seq"]])  # acks 1 and 2
        yield back.client.disconnect()
        again = yield self.session(bob.user, "dev1", register=False)
        self.assertEqual([m["client_id"] for m in again.backlog], ids[2:])

    @inlineCallbacks
    def test_duplicate_client_id_delivered_once(self) -> Any:
        alice = yield self.session()
        bob = yield self.session()
        carol = yield self.session()
        yield carol.client.disconnect()
        cid = fresh_client_id()
        first = yield alice.client.send_user(bob.user, b"once", cid)
        second = yield alice.client.send_user(bob.user, b"once", cid)
        self.assertEqual(first["duplicate"], False)
        self.assertEqual(second["duplicate"], True)
        self.assertEqual(second["seq"], first["seq"])
        got = yield bob.client.settle(0.5, "message")
        self.assertEqual(len(messages_for(got, cid)), 1, got)
        # Offline recipient: stored once too.
        cid = fresh_client_id()
        a = yield alice.client.send_user(carol.user, b"once", cid)
        b = yield alice.client.send_user(carol.user, b"once", cid)
        self.assertEqual((b["seq"], b["duplicate"]), (a["seq"], True))
        back = yield self.session(carol.user, "dev1", register=False)
        self.assertEqual(len(messages_for(back.backlog, cid)), 1, back.backlog)
        self.assertEqual(back.backlog_done["count"], 1)

    @inlineCallbacks
    def test_expired_message_not_delivered(self) -> Any:
        bob = yield self.session()
        yield bob.client.disconnect()
        alice = yield self.session()
        gone = fresh_client_id()
        kept = fresh_client_id()
        r = yield alice.client.send_user(bob.user, b"fleeting", gone, expires_in=1)
        self.assertEqual(r["duplicate"], False)
        yield alice.client.send_user(bob.user, b"lasting", kept, expires_in=3600)
        yield sleep(2.2)
        back = yield self.session(bob.user, "dev1", register=False)
        self.assertEqual([m["client_id"] for m in back.backlog], [kept])
        m = back.backlog[0]
        self.assertIsInstance(m.get("expires_at"), int)
        self.assertLess(abs(m["expires_at"] - (time.time() + 3600)), 30, m)

    @inlineCallbacks
    def test_presence_to_room_co_members(self) -> Any:
        alice = yield self.session()
        carol = yield self.session()
        yield self.room(alice, carol)
        yield carol.client.disconnect()
        push = yield alice.client.next_push("presence")
        self.assertEqual(push, {"type": "presence", "user": carol.user, "status": "offline"})
        carol2 = yield self.session(carol.user, "dev1", register=False)
        push = yield alice.client.next_push("presence")
        self.assertEqual(push, {"type": "presence", "user": carol.user, "status": "online"})
        # A second device of an online user is not a presence change.
        yield self.session(carol.user, "other", register=False)
        more = yield alice.client.settle(0.3, "presence")
        self.assertEqual(more, [])
        del carol2


class SessionTests(ServerTestCase):
    """resume, refresh rotation and reuse, logout."""

    @inlineCallbacks
    def test_login_reply_and_resume(self) -> Any:
        s = yield self.session()
        login = s.login
        self.assertEqual((login["user"], login["device"]), (s.user, "dev1"))
        self.assertTrue(login["access_token"].startswith("eyJ"))
        self.assertTrue(login["refresh_token"].startswith("rt_"))
        self.assertEqual(login["expires_in"], 900)
        c = yield self.connect_hello()
        resumed = yield c.ok("resume", access_token=login["access_token"])
        self.assertEqual((resumed["user"], resumed["device"]), (s.user, "dev1"))
        done = yield c.next_push("backlog_done")
        self.assertEqual(done["count"], 0)
        yield c.ok("room_list")

    @inlineCallbacks
    def test_refresh_rotates_and_reuse_revokes(self) -> Any:
        s = yield self.session()
        rt1 = s.login["refresh_token"]
        c1 = yield self.connect_hello()
        r = yield c1.ok("refresh", refresh_token=rt1)
        self.assertEqual((r["user"], r["device"]), (s.user, "dev1"))
        self.assertEqual(r["expires_in"], 900)
        rt2, at2 = r["refresh_token"], r["access_token"]
        self.assertNotEqual(rt2, rt1)
        self.assertNotEqual(at2, s.login["access_token"])
        yield c1.next_push("backlog_done")
        yield c1.ok("room_list")  # authenticated

        # The old refresh token is now dead: presenting it is theft.
        c2 = yield self.connect_hello()
        yield c2.fail("refresh", "token_revoked", refresh_token=rt1)
        # ... and that revoked the whole session: the new tokens are dead too.
        c4 = yield self.connect_hello()
        yield c4.fail("resume", "token_revoked", access_token=at2)
        c5 = yield self.connect_hello()
        yield c5.fail("resume", "token_revoked", access_token=s.login["access_token"])
        c3 = yield self.connect_hello()
        reply = yield c3.request("refresh", refresh_token=rt2)
        self.assertIs(reply["ok"], False, "the rotated-to refresh token still works")

    @inlineCallbacks
    def test_refresh_token_of_revoked_session_is_token_revoked(self) -> Any:
        """PROTOCOL.md: token_revoked = "the session was logged out or its refresh token
        reused"; invalid_token is for "unknown or expired" refresh tokens."""
        s = yield self.session()
        c1 = yield self.connect_hello()
        r = yield c1.ok("refresh", refresh_token=s.login["refresh_token"])
        c2 = yield self.connect_hello()
        yield c2.fail("refresh", "token_revoked", refresh_token=s.login["refresh_token"])
        c3 = yield self.connect_hello()
        yield c3.fail("refresh", "token_revoked", refresh_token=r["refresh_token"])
        # After logout too.
        t = yield self.session()
        yield t.client.ok("logout")
        c4 = yield self.connect_hello()
        yield c4.fail("refresh", "token_revoked", refresh_token=t.login["refresh_token"])

    @inlineCallbacks
    def test_logout_revokes(self) -> Any:
        s = yield self.session()
        other = yield self.connect_hello()
        yield other.ok("resume", access_token=s.login["access_token"])
        yield s.client.ok("logout")
        yield s.client.fail("room_list", "not_authenticated")
        # Every connection of the session is logged out.
        yield other.fail("room_list", "not_authenticated")
        c = yield self.connect_hello()
        yield c.fail("resume", "token_revoked", access_token=s.login["access_token"])
        c2 = yield self.connect_hello()
        reply = yield c2.request("refresh", refresh_token=s.login["refresh_token"])
        self.assertIs(reply["ok"], False, "a logged-out session's refresh token still works")
        # Logging in again on the logged-out connection works.
        again = yield s.client.login(s.user, "dev1")
        self.assertEqual(again["user"], s.user)


class TokenAttackTests(ServerTestCase):
    """Forged access tokens against the real server.  Each forgery changes one thing
    in an otherwise valid token, and a control re-signed with the real key passes, so
    a refusal is for the reason under test."""

    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]  # trial waits for a Deferred
        super().setUp()
        self.s: Session = yield self.session()
        self.header, self.claims = jwt_parts(self.s.login["access_token"])
        key = serialization.load_pem_private_key(self.server.jwt_private_key_pem(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        self.key = key
        self.public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, claims: Mapping[str, Any], header: Mapping[str, Any] | None = None) -> str:
        h = dict(self.header if header is None else header)
        h.pop("alg", None)
        # Low-S, as the server issues them (the high-S twin is refused on its own).
        return low_s(jwt.encode(dict(claims), self.key, algorithm="ES256", headers=h))

    def fresh_claims(self, **changes: Any) -> dict[str, Any]:
        now = int(time.time())
        claims = dict(self.claims, iat=now, exp=now + 600, jti=secrets.token_urlsafe(12))
        claims.update(changes)
        return claims

    @inlineCallbacks
    def resume(self, token: str, code: str | None) -> Any:
        c = yield self.connect_hello()
        if code is None:
            r = yield c.ok("resume", access_token=token)
            self.assertEqual(r["user"], self.s.user)
        else:
            yield c.fail("resume", code, access_token=token)
        yield c.ok("ping")

    def test_header_is_es256(self) -> None:
        self.assertEqual(self.header["alg"], "ES256")
        for claim in ("exp", "aud", "iss", "sub", "iat", "jti"):
            self.assertIn(claim, self.claims)

    def test_control_resigned_token_accepted(self) -> Any:
        return self.resume(self.sign(self.fresh_claims()), None)

    def test_alg_none(self) -> Any:
        header = dict(self.header, alg="none")
        token = ".".join([b64url(json.dumps(header).encode()),
                          b64url(json.dumps(self.fresh_claims()).encode()), ""])
        return self.resume(token, "invalid_token")

    def test_hs256_with_public_key_as_secret(self) -> Any:
        header = dict(self.header, alg="HS256")
        signing_input = ".".join([b64url(json.dumps(header).encode()),
                                  b64url(json.dumps(self.fresh_claims()).encode())])
        mac = hmac.new(self.public_pem, signing_input.encode("ascii"), hashlib.sha256)
        return self.resume(signing_input + "." + b64url(mac.digest()), "invalid_token")

    def test_no_exp(self) -> Any:
        claims = self.fresh_claims()
        del claims["exp"]
        return self.resume(self.sign(claims), "invalid_token")

    def test_wrong_audience(self) -> Any:
        return self.resume(self.sign(self.fresh_claims(aud="shtalk-refresh")), "invalid_token")

    def test_expired(self) -> Any:
        now = int(time.time())
        return self.resume(self.sign(self.fresh_claims(iat=now - 1000, exp=now - 100)),
                           "token_expired")

    def test_signed_by_another_key(self) -> Any:
        other = ec.generate_private_key(ec.SECP256R1())
        token = jwt.encode(self.fresh_claims(), other, algorithm="ES256",
                           headers={k: v for k, v in self.header.items() if k != "alg"})
        return self.resume(token, "invalid_token")

    def test_tampered_payload(self) -> Any:
        h, _, sig = self.s.login["access_token"].split(".")
        claims = dict(self.claims, sub="1" if self.claims["sub"] != "1" else "2")
        token = ".".join([h, b64url(json.dumps(claims).encode()), sig])
        return self.resume(token, "invalid_token")


# ---------------------------------------------------------------------------------------
# Every documented error code


COVERED: dict[str, str] = {
    "bad_json": "test_framing_errors",
    "not_an_object": "test_framing_errors",
    "unknown_type": "test_framing_errors",
    "missing_field": "test_framing_errors",
    "bad_field": "test_framing_errors",
    "line_too_long": "test_line_too_long_aborts",
    "hello_required": "test_session_state_errors",
    "unsupported_version": "test_session_state_errors",
    "not_authenticated": "test_session_state_errors",
    "already_authenticated": "test_session_state_errors",
    "bad_username": "test_account_errors",
    "username_taken": "test_account_errors",
    "weak_password": "test_account_errors",
    "password_too_long": "test_account_errors",
    "bad_email": "test_account_errors",
    "invalid_credentials": "test_account_errors",
    "invalid_token": "test_token_errors",
    "token_expired": "test_token_errors",
    "token_revoked": "test_token_errors",
    "no_such_user": "test_routing_errors",
    "no_such_room": "test_routing_errors",
    "no_such_device": "test_routing_errors",
    "room_exists": "test_routing_errors",
    "not_a_member": "test_routing_errors",
    "already_member": "test_routing_errors",
    "invite_required": "test_routing_errors",
    "forbidden": "test_routing_errors",
    "envelope_too_large": "test_routing_errors",
    "too_many_connections": "ConnectionCapTests.test_too_many_connections",
    "timeout": "TimeoutTests.test_pre_auth_timeout_not_extended_by_partial_data",
}
NOT_PROVOKED = {
    "rate_limited": "provoked in test_operations_system.RateLimitTests",
    "internal_error": "a server failure",
}
# Account security: provoked by tests/test_account_system.py against the real
# server (and shtalk/test/server/test_account_security.py over the protocol objects).
PROVOKED_ELSEWHERE = {
    "email_not_verified": "test_account_system.EmailTests",
    "invalid_code": "test_account_system.EmailTests",
    "captcha_required": "test_account_system.CaptchaTests",
    "captcha_failed": "test_account_system.CaptchaTests",
    "otp_required": "test_account_system.TotpTests",
    "totp_enabled": "test_account_security.TotpTests",
    "totp_not_enabled": "test_account_security.TotpTests",
}


def documented_error_codes() -> list[str]:
    text = (REPO_ROOT / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    table = text.split("## Error codes", 1)[1].split("\n## ", 1)[0]
    codes: list[str] = []
    for line in table.splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            codes.extend(re.findall(r"`([a-z_]+)`", first_cell))
    return codes


ENVELOPE_LIMIT = 1024


class ErrorCodeTests(ServerTestCase):
    """Each code in docs/PROTOCOL.md's table, provoked by a bad line; afterwards the
    connection still answers ``ping`` (except after line_too_long, which aborts)."""

    server_config = {
        "server": {"max_line_length": 4096},
        "storage": {"max_envelope_bytes": ENVELOPE_LIMIT},
    }

    def test_table_is_covered(self) -> None:
        documented = documented_error_codes()
        self.assertGreater(len(documented), 25, "could not read the error table")
        missing = set(documented) - set(COVERED) - set(NOT_PROVOKED) - set(PROVOKED_ELSEWHERE)
        self.assertEqual(missing, set(), "documented codes no test provokes")
        self.assertEqual(set(COVERED) - set(documented), set(), "codes not documented")
        for where in COVERED.values():
            cls_name, _, method = where.rpartition(".")
            cls = globals()[cls_name] if cls_name else type(self)
            self.assertTrue(hasattr(cls, method), where)

    @inlineCallbacks
    def bad(self, c: JsonLineClient, obj: Mapping[str, Any], code: str) -> Any:
        """Send ``obj``; the reply must be ``code`` and the connection must live on."""
        reply = yield c.call(obj)
        error = expect_error(obj, reply, code)
        yield c.ok("ping")
        return error

    @inlineCallbacks
    def bad_line(self, c: JsonLineClient, line: bytes, code: str) -> Any:
        """A line whose id cannot be read: the reply carries ``"id": null``."""
        c.send_line(line)
        reply = yield c.next_orphan()
        error = expect_error({"line": line.decode("utf-8", "replace")}, reply, code)
        self.assertIsNone(reply["id"])
        yield c.ok("ping")
        return error

    @inlineCallbacks
    def test_framing_errors(self) -> Any:
        c = yield self.connect_hello()
        yield self.bad_line(c, b'{"id": 1, "type": "ping"', "bad_json")
        yield self.bad_line(c, b"\xff\xfe not utf-8", "bad_json")
        yield self.bad_line(c, b'{"id": 1, "type": "ping", "x": NaN}', "bad_json")
        yield self.bad_line(c, b"[1, 2, 3]", "not_an_object")
        yield self.bad_line(c, b'"just a string"', "not_an_object")
        yield self.bad_line(c, b'{"type": "ping"}', "missing_field")  # no id
        yield self.bad_line(c, b'{"id": true, "type": "ping"}', "bad_field")
        yield self.bad_line(c, b'{"id": -1, "type": "ping"}', "bad_field")
        yield self.bad(c, {"id": "x1", "type": "frobnicate"}, "unknown_type")
        yield self.bad(c, {"id": "x2", "type": 7}, "unknown_type")
        err = yield self.bad(c, {"id": "x3", "type": "hello"}, "missing_field")
        self.assertIn("version", err["message"])
        yield self.bad(c, {"id": "x4"}, "missing_field")
        yield self.bad(c, {"id": "x5", "type": "hello", "version": "1"}, "bad_field")
        yield self.bad(c, {"id": "x6", "type": "ping", "extra": 1}, "bad_field")
        yield self.bad(c, {"id": "x7", "type": "hello", "version": True}, "bad_field")
        # Blank lines are ignored, CRLF is accepted.
        c.send_line(b"")
        c.send_raw(b'{"id":"crlf","type":"ping"}\r\n')
        reply = yield c.call({"id": "after", "type": "ping"})
        self.assertEqual(reply, {"id": "after", "ok": True})

    @inlineCallbacks
    def test_line_too_long_aborts(self) -> Any:
        c = yield self.connect_hello()
        c.send_line(b'{"id": 1, "type": "ping", "pad": "' + b"x" * 5000 + b'"}')
        reply = yield c.next_orphan()
        expect_error({"line": "5000 bytes"}, reply, "line_too_long")
        yield c.when_closed(timeout=5)

    @inlineCallbacks
    def test_line_too_long_without_newline_aborts(self) -> Any:
        c = yield self.connect_hello()
        c.send_raw(b"y" * 6000)
        reply = yield c.next_orphan()
        expect_error({"line": "6000 bytes, no newline"}, reply, "line_too_long")
        yield c.when_closed(timeout=5)

    @inlineCallbacks
    def test_line_at_limit_accepted(self) -> Any:
        c = yield self.connect_hello()
        head = b'{"id":"big","type":"ping","pad":"'
        # 'pad' is unknown to ping, so the reply is bad_field, but not line_too_long.
        line = head + b"x" * (4096 - len(head) - 2) + b'"}'
        self.assertEqual(len(line), 4096)
        c.send_line(line)
        yield c.ok("ping")
        self.assertFalse(c.is_closed)

    @inlineCallbacks
    def test_session_state_errors(self) -> Any:
        c = yield self.connect()
        yield c.ok("ping")  # allowed before hello
        yield self.bad(c, {"id": 1, "type": "room_list"}, "hello_required")
        yield self.bad(c, {"id": 2, "type": "login", "username": "nobody", "password": "x" * 12,
                           "device": {"id": "d"}}, "hello_required")
        err = yield self.bad(c, {"id": 3, "type": "hello", "version": 2}, "unsupported_version")
        self.assertEqual(err.get("supported"), [1])
        yield self.bad(c, {"id": 4, "type": "room_list"}, "hello_required")
        yield c.hello()
        yield self.bad(c, {"id": 5, "type": "room_list"}, "not_authenticated")
        yield self.bad(c, {"id": 6, "type": "send", "to": {"user": "x"},
                           "envelope": "AA==", "client_id": "c"}, "not_authenticated")
        yield self.bad(c, {"id": 7, "type": "logout"}, "not_authenticated")
        user = fresh_name()
        yield c.register(user)
        yield c.login(user)
        attempts: list[tuple[str, dict[str, Any]]] = [
            ("login", {"username": user, "password": PASSWORD, "device": {"id": "d2"}}),
            ("register", {"username": fresh_name(), "password": PASSWORD,
                          "email": "a@example.org"}),
            ("resume", {"access_token": "x" * 20}),
            ("refresh", {"refresh_token": "rt_" + "x" * 20}),
        ]
        for i, (rtype, fields) in enumerate(attempts):
            yield self.bad(c, {"id": 10 + i, "type": rtype, **fields}, "already_authenticated")

    @inlineCallbacks
    def test_account_errors(self) -> Any:
        c = yield self.connect_hello()
        user = fresh_name()

        def reg(i: int, username: str, password: str = PASSWORD,
                email: str = "x@example.org") -> dict[str, Any]:
            return {"id": i, "type": "register", "username": username, "password": password,
                    "email": email}

        for i, name in enumerate(["ab", "has space", ".dot", "dash-", "x" * 33, "a/b"]):
            yield self.bad(c, reg(100 + i, name), "bad_username")
        yield self.bad(c, reg(1, user, "short"), "weak_password")
        yield self.bad(c, reg(2, user, "password1234"), "weak_password")
        yield self.bad(c, reg(3, user, "aaaaaaaaaaaaaaaa"), "weak_password")
        yield self.bad(c, reg(4, user, "x" * 40 + "é" * 17), "password_too_long")  # 74 bytes
        yield self.bad(c, reg(5, user, "x" * 73), "password_too_long")
        yield self.bad(c, reg(6, user, email="not-an-email"), "bad_email")
        yield self.bad(c, reg(7, user, email="a b@example.org"), "bad_email")
        yield c.register(user)
        yield self.bad(c, reg(8, user), "username_taken")
        yield self.bad(c, reg(9, user.upper()), "username_taken")
        login: dict[str, Any] = {"type": "login", "device": {"id": "d"}}
        yield self.bad(c, {"id": 10, **login, "username": user, "password": PASSWORD + "x"},
                       "invalid_credentials")
        yield self.bad(c, {"id": 11, **login, "username": fresh_name(), "password": PASSWORD},
                       "invalid_credentials")
        yield self.bad(c, {"id": 12, **login, "username": "no way!", "password": PASSWORD},
                       "invalid_credentials")
        # A failed login leaves the connection able to log in.
        r = yield c.login(user.upper())
        self.assertEqual(r["user"], user)

    @inlineCallbacks
    def test_token_errors(self) -> Any:
        s = yield self.session()
        c = yield self.connect_hello()
        yield self.bad(c, {"id": 1, "type": "resume", "access_token": "not.a.token-at-all"},
                       "invalid_token")
        yield self.bad(c, {"id": 2, "type": "refresh",
                           "refresh_token": "rt_" + secrets.token_urlsafe(32)}, "invalid_token")
        # An access token is not a refresh token, nor the other way round.
        yield self.bad(c, {"id": 3, "type": "refresh",
                           "refresh_token": s.login["access_token"]}, "invalid_token")
        yield self.bad(c, {"id": 4, "type": "resume",
                           "access_token": s.login["refresh_token"]}, "invalid_token")
        _, claims = jwt_parts(s.login["access_token"])
        header, _ = jwt_parts(s.login["access_token"])
        key = serialization.load_pem_private_key(self.server.jwt_private_key_pem(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        now = int(time.time())
        expired = low_s(jwt.encode(dict(claims, iat=now - 100, exp=now - 10), key,
                                   algorithm="ES256",
                                   headers={k: v for k, v in header.items() if k != "alg"}))
        yield self.bad(c, {"id": 5, "type": "resume", "access_token": expired}, "token_expired")
        yield s.client.ok("logout")
        yield self.bad(c, {"id": 6, "type": "resume", "access_token": s.login["access_token"]},
                       "token_revoked")

    @inlineCallbacks
    def test_routing_errors(self) -> Any:
        alice = yield self.session()
        bob = yield self.session()
        a, b = alice.client, bob.client
        room = fresh_name("r")
        ghost = fresh_name("ghost")
        env = b64(b"e")

        def send(i: int, to: dict[str, str], **fields: Any) -> dict[str, Any]:
            base: dict[str, Any] = {"id": i, "type": "send", "to": to,
                                    "client_id": fresh_client_id()}
            if "envelopes" not in fields:
                base["envelope"] = env
            return {**base, **fields}

        yield self.bad(a, send(1, {"user": ghost}), "no_such_user")
        yield self.bad(a, {"id": 2, "type": "devices", "user": ghost}, "no_such_user")
        yield self.bad(a, {"id": 3, "type": "room_join", "room": room}, "no_such_room")
        yield self.bad(a, send(4, {"room": room}), "no_such_room")
        yield a.ok("room_create", room=room)
        yield self.bad(a, {"id": 5, "type": "room_invite", "room": room, "user": ghost},
                       "no_such_user")
        yield self.bad(a, {"id": 6, "type": "room_create", "room": room}, "room_exists")
        yield self.bad(b, {"id": 7, "type": "room_create", "room": "#" + room.upper()},
                       "room_exists")
        yield self.bad(b, {"id": 8, "type": "room_members", "room": room}, "not_a_member")
        yield self.bad(b, send(9, {"room": room}), "not_a_member")
        yield self.bad(b, {"id": 10, "type": "room_leave", "room": room}, "not_a_member")
        yield self.bad(a, {"id": 11, "type": "room_kick", "room": room, "user": bob.user},
                       "not_a_member")
        yield self.bad(a, {"id": 12, "type": "room_join", "room": room}, "already_member")
        yield b.ok("room_join", room=room)
        yield self.bad(b, {"id": 13, "type": "room_join", "room": room}, "already_member")
        yield self.bad(b, {"id": 14, "type": "room_kick", "room": room, "user": alice.user},
                       "forbidden")
        yield self.bad(b, {"id": 15, "type": "room_role", "room": room, "user": bob.user,
                           "role": "admin"}, "forbidden")
        yield self.bad(a, send(16, {"user": bob.user},
                               envelopes={f"{bob.user}/nosuchdevice": env}), "no_such_device")
        yield self.bad(a, send(17, {"user": bob.user},
                               envelopes={f"{ghost}/dev1": env}), "no_such_user")
        big = b64(b"z" * (ENVELOPE_LIMIT + 1))
        yield self.bad(a, send(18, {"user": bob.user}, envelope=big), "envelope_too_large")
        yield self.bad(a, send(19, {"user": bob.user}, envelopes={f"{bob.user}/dev1": big}),
                       "envelope_too_large")
        ok = yield a.ok("send", **{k: v for k, v in send(0, {"user": bob.user},
                                   envelope=b64(b"z" * ENVELOPE_LIMIT)).items()
                                   if k not in ("id", "type")})
        self.assertEqual(ok["duplicate"], False)
        locked = fresh_name("r")
        yield a.ok("room_create", room=locked, invite_only=True)
        yield self.bad(b, {"id": 20, "type": "room_join", "room": locked}, "invite_required")
        # Field-shape errors on authenticated requests.
        yield self.bad(a, send(21, {"user": bob.user, "room": room}), "bad_field")
        yield self.bad(a, send(22, {"user": bob.user}, envelope="not base64!"), "bad_field")
        yield self.bad(a, send(23, {"user": bob.user}, expires_in=0), "bad_field")
        yield self.bad(a, send(24, {"user": bob.user}, client_id="bad id"), "bad_field")
        yield self.bad(a, {"id": 25, "type": "ack", "seqs": []}, "bad_field")
        yield self.bad(a, {"id": 26, "type": "ack", "seqs": list(range(1, 1026))},
                       "bad_field")
        yield self.bad(a, {"id": 27, "type": "room_create", "room": "bad room"}, "bad_field")
        yield self.bad(a, {"id": 28, "type": "room_role", "room": room, "user": bob.user,
                           "role": "owner"}, "bad_field")
        yield self.bad(a, {"id": 29, "type": "send", "to": {"user": bob.user},
                           "client_id": "c"}, "missing_field")


class ConnectionCapTests(ServerTestCase):
    server_config = {"server": {"max_connections_per_address": 2}}

    @inlineCallbacks
    def test_too_many_connections(self) -> Any:
        c1 = yield self.connect_hello()
        c2 = yield self.connect_hello()
        c3 = yield self.connect()
        reply = yield c3.next_orphan()
        expect_error({"connection": 3}, reply, "too_many_connections")
        yield c3.when_closed(timeout=5)
        yield c1.ok("ping")
        # A freed slot can be used again.
        yield c2.disconnect()
        yield sleep(0.2)
        c4 = yield self.connect_hello()
        yield c4.ok("ping")


class TimeoutTests(ServerTestCase):
    server_config = {"server": {"pre_auth_timeout": 2, "idle_timeout": 3}}

    @inlineCallbacks
    def test_pre_auth_timeout_not_extended_by_partial_data(self) -> Any:
        c = yield self.connect()
        started = time.monotonic()
        yield c.hello()
        yield c.ok("ping")  # a complete request does not extend it either
        for _ in range(8):  # drip a partial line for up to 4 s
            if c.is_closed or c.orphans:
                break
            c.send_raw(b" ")
            yield sleep(0.5)
        reply = yield c.next_orphan(timeout=5)
        expect_error({"partial": "line"}, reply, "timeout")
        yield c.when_closed(timeout=5)
        elapsed = time.monotonic() - started
        self.assertLess(elapsed, 3.5, "partial data extended the pre-auth deadline")
        self.assertGreater(elapsed, 1.5)

    @inlineCallbacks
    def test_login_cancels_pre_auth_timeout_idle_closes(self) -> Any:
        s = yield self.session()
        started = time.monotonic()
        for _ in range(5):  # 2.5 s of pings: past pre_auth, each resets idle
            yield sleep(0.5)
            yield s.client.ok("ping")
        self.assertFalse(s.client.is_closed)
        reply = yield s.client.next_orphan(timeout=6)
        expect_error({"idle": "connection"}, reply, "timeout")
        yield s.client.when_closed(timeout=5)
        self.assertGreater(time.monotonic() - started, 2.5 + 2.5)


# ---------------------------------------------------------------------------------------
# TLS policy, checked with the standard library's ssl module as an independent client


class TLSPolicyTests(ServerTestCase):
    """TLS 1.2+ with ECDHE+AEAD only.  (TCP_NODELAY is not observable from outside.)"""

    def handshake(self, ctx: ssl.SSLContext) -> tuple[str | None, str | None]:
        address = (self.server.host, self.server.port)
        with socket.create_connection(address, timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            version, cipher = tls.version(), tls.cipher()
            tls.sendall(b'{"id":1,"type":"ping"}\n')
            self.assertEqual(json.loads(tls.recv(4096)), {"id": 1, "ok": True})
            return version, cipher[0] if cipher else None

    def context(
        self, *, minimum: ssl.TLSVersion | None = None, maximum: ssl.TLSVersion | None = None,
        ciphers: str = "ALL:@SECLEVEL=0",  # let the client offer what the server must refuse
    ) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the pin is checked below, by fingerprint
        ctx.set_ciphers(ciphers)
        if minimum is not None:
            ctx.minimum_version = minimum
        if maximum is not None:
            ctx.maximum_version = maximum
        return ctx

    def refused(self, ctx: ssl.SSLContext) -> ssl.SSLError:
        try:
            self.handshake(ctx)
        except ssl.SSLError as e:
            return e
        self.fail("the handshake succeeded")

    def test_tls13_accepted(self) -> None:
        version, _ = self.handshake(self.context(minimum=ssl.TLSVersion.TLSv1_3))
        self.assertEqual(version, "TLSv1.3")

    def test_tls12_ecdhe_accepted(self) -> None:
        ctx = self.context(maximum=ssl.TLSVersion.TLSv1_2,
                           ciphers="ECDHE-ECDSA-AES128-GCM-SHA256")
        version, cipher = self.handshake(ctx)
        self.assertEqual((version, cipher), ("TLSv1.2", "ECDHE-ECDSA-AES128-GCM-SHA256"))

    def test_pinned_certificate(self) -> None:
        address = (self.server.host, self.server.port)
        with socket.create_connection(address, timeout=5) as raw, \
                self.context().wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        digest = hashlib.sha256(der).hexdigest().upper()
        self.assertEqual(":".join(digest[i:i + 2] for i in range(0, 64, 2)),
                         self.server.fingerprint)

    def test_tls11_refused(self) -> None:
        tls11 = ssl.TLSVersion.TLSv1_1
        err = self.refused(self.context(minimum=tls11, maximum=tls11))
        # The server's alert, not the client failing to offer TLS 1.1 at all.
        self.assertIn("PROTOCOL_VERSION", str(err).upper(), err)

    def test_non_ecdhe_suite_refused(self) -> None:
        self.assertSuitesRefused("AES128-GCM-SHA256:@SECLEVEL=0")

    def test_non_aead_ecdhe_suite_refused(self) -> None:
        self.assertSuitesRefused("ECDHE-ECDSA-AES128-SHA256:ECDHE-ECDSA-AES128-SHA:@SECLEVEL=0")

    def assertSuitesRefused(self, ciphers: str) -> None:
        """A TLS 1.2 client offering only ``ciphers`` gets the server's handshake alert."""
        err = self.refused(self.context(maximum=ssl.TLSVersion.TLSv1_2, ciphers=ciphers))
        self.assertIn("HANDSHAKE_FAILURE", str(err).upper(), err)


class DocumentationTests(unittest.TestCase):
    def test_error_table_parses(self) -> None:
        codes = documented_error_codes()
        self.assertIn("bad_json", codes)
        self.assertIn("no_such_device", codes)  # the row naming three codes
        self.assertEqual(len(codes), len(set(codes)))
