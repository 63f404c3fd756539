"""Odd text in every string field of every request type: lone surrogates, control
characters and non-BMP text always get a documented reply (never ``internal_error``,
never silence, never a dropped connection).

Two levels: the sans-IO parser under hypothesis (every string field, the ``id`` and the
name of an unknown field), and the real server objects (in-memory store, bcrypt) over a
StringTransport with the same kinds of text in every field of a valid request.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from shtalk.testing import GOOD_PASSWORD, Peer, ServerParts, build_server
from shtalk.wire.errors import ErrorCode, ProtocolError
from shtalk.wire.frames import error_from, ok, parse_line
from shtalk.wire.schema import PRE_AUTH, REQUESTS

DOCS = Path(__file__).resolve().parents[3] / "docs" / "PROTOCOL.md"


def documented_codes() -> set[str]:
    """The codes in the first column of docs/PROTOCOL.md's error table."""
    text = DOCS.read_text(encoding="utf-8")
    table = text[text.index("## Error codes"):]
    return {code for cell in re.findall(r"^\|([^|]+)\|", table, re.M)
            for code in re.findall(r"`([a-z_]+)`", cell)}


ENV = base64.b64encode(b"envelope").decode()
#: One valid request of every type (names refer to the accounts and room set up below).
SAMPLES: dict[str, dict[str, Any]] = {
    "hello": {"version": 1, "client": "shtalk-test/1"},
    "ping": {},
    "register": {"username": "newbie", "password": GOOD_PASSWORD, "email": "n@example.org"},
    "login": {"username": "alice", "password": GOOD_PASSWORD, "device": {"id": "d2",
                                                                         "label": "phone"}},
    "captcha": {},
    "verify_email": {"username": "alice", "code": "ABCD-EFGH"},
    "resend_verification": {"username": "alice"},
    "password_reset_request": {"username": "alice"},
    "password_reset": {"username": "alice", "code": "ABCD-EFGH",
                       "new_password": GOOD_PASSWORD + "x"},
    "password_change": {"password": GOOD_PASSWORD, "new_password": GOOD_PASSWORD + "y"},
    "totp_enroll": {},
    "totp_confirm": {"code": "123456"},
    "totp_disable": {"password": GOOD_PASSWORD, "code": "123456"},
    "totp_recovery_codes": {"password": GOOD_PASSWORD, "code": "123456"},
    "resume": {"access_token": "x" * 40},
    "refresh": {"refresh_token": "rt_" + "x" * 40},
    "logout": {},
    "devices": {"user": "bob"},
    "room_create": {"room": "fresh", "invite_only": False},
    "room_join": {"room": "general"},
    "room_leave": {"room": "general"},
    "room_invite": {"room": "general", "user": "bob"},
    "room_kick": {"room": "general", "user": "bob"},
    "room_role": {"room": "general", "user": "bob", "role": "admin"},
    "room_list": {},
    "room_members": {"room": "general"},
    "send": {"to": {"user": "bob"}, "envelope": ENV, "envelopes": {"bob/d1": ENV},
             "client_id": "c-1", "expires_in": 60},
    "ack": {"seqs": [1]},
    "device_remove": {"device": "gone"},
    "keys_publish": {"bundle": ENV, "one_time": [{"kind": "ec", "id": 1, "key": ENV}]},
    "keys_count": {},
    "report": {"user": "bob", "reason": "spam", "plaintext": "buy now"},
    "keys_fetch": {"user": "bob", "device": "d1"},
}


def string_paths(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every place in a sample that holds a string: the values, and the names of maps
    whose names the client chooses (``envelopes``)."""
    if isinstance(value, str):
        yield path
    elif isinstance(value, dict):
        for k, v in value.items():
            if path and path[-1] == "envelopes":
                yield (*path, ("key", k))
            yield from string_paths(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from string_paths(v, (*path, i))


def with_text(obj: dict[str, Any], path: tuple[Any, ...], text: str) -> dict[str, Any]:
    out: Any = json.loads(json.dumps(obj))
    node = out
    for step in path[:-1]:
        node = node[step]
    last = path[-1]
    if isinstance(last, tuple):  # a map key
        node[text] = node.pop(last[1])
    else:
        node[last] = text
    return dict(out)


CASES = [(rtype, path) for rtype, sample in sorted(SAMPLES.items())
         for path in string_paths(sample)]

LONE = st.characters(categories=["Cs"])
CONTROL = st.characters(categories=["Cc"])
ASTRAL = st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF, categories=["L", "So"])
ODD_TEXT = st.text(st.one_of(LONE, CONTROL, ASTRAL, st.characters()), max_size=12)


def texts_of(value: Any) -> Any:
    """``value`` with its binary fields (already decoded base64) left out."""
    if isinstance(value, dict):
        return {k: texts_of(v) for k, v in value.items()}
    if isinstance(value, list):
        return [texts_of(v) for v in value]
    return None if isinstance(value, bytes) else value


def has_lone_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(c) <= 0xDFFF for c in text)


class ParserTextTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.documented = documented_codes()

    def test_every_request_type_has_a_sample(self) -> None:
        self.assertEqual(set(SAMPLES), set(REQUESTS))
        for rtype, sample in SAMPLES.items():
            parse_line(json.dumps({"id": 1, "type": rtype, **sample}).encode())

    def check(self, obj: dict[str, Any], text: str, id_kept: bool) -> None:
        raw = json.dumps(obj).encode()  # ensure_ascii: lone surrogates become \\u escapes
        try:
            request = parse_line(raw)
        except ProtocolError as e:
            self.assertIn(str(e.code), self.documented)
            self.assertNotEqual(e.code, ErrorCode.INTERNAL_ERROR)
            reply = json.loads(error_from(e))  # encodable: the reply is always sent
            if has_lone_surrogate(text):
                self.assertEqual(e.code, ErrorCode.BAD_FIELD)
                self.assertEqual(reply["id"], obj["id"] if id_kept else None)
                self.assertNotIn(text, e.message)
            return
        self.assertFalse(has_lone_surrogate(text), "a lone surrogate got through")
        ok(request.id, echo=texts_of(request.args))  # whatever passed encodes as UTF-8

    @settings(max_examples=600, deadline=None)
    @given(st.sampled_from(CASES), ODD_TEXT, st.booleans())
    def test_odd_text_in_every_string_field(
        self, case: tuple[str, tuple[Any, ...]], text: str, append: bool
    ) -> None:
        rtype, path = case
        obj = {"id": 7, "type": rtype, **SAMPLES[rtype]}
        if append and not isinstance(path[-1], tuple):
            node: Any = obj
            for step in path:
                node = node[step]
            text = node + text
        self.check(with_text(obj, path, text), text, id_kept=True)

    @settings(max_examples=200, deadline=None)
    @given(st.sampled_from(sorted(SAMPLES)), ODD_TEXT)
    def test_odd_text_as_id_and_as_a_field_name(self, rtype: str, text: str) -> None:
        sample = SAMPLES[rtype]
        self.check({"id": text, "type": rtype, **sample}, text, id_kept=False)
        self.check({"id": "k", "type": rtype, **sample, text: 1}, text, id_kept=True)

    def test_lone_surrogates_where_the_audit_found_them(self) -> None:
        for raw, rid in (
            (b'{"id":"\\ud800","type":"ping"}', None),
            (b'{"id":3,"type":"ping","\\udfffx":1}', 3),
            (b'{"id":4,"type":"register","username":"a1b","password":"\\ud800aaaaaaaaaaaa",'
             b'"email":"a@b.org"}', 4),
            (b'{"id":5,"type":"hello","version":1,"client":"\\udc00"}', 5),
        ):
            with self.assertRaises(ProtocolError) as e:
                parse_line(raw)
            self.assertEqual((e.exception.code, e.exception.request_id),
                             (ErrorCode.BAD_FIELD, rid))
            json.loads(error_from(e.exception))
        # A surrogate *pair* is one non-BMP character: fine.
        r = parse_line(b'{"id":6,"type":"hello","version":1,"client":"\\ud83d\\ude00"}')
        self.assertEqual(r.args["client"], "\U0001f600")


#: What the server-level test puts in each field: in place of the value and after it.
TEXTS = ["\ud800", "\udfff", "\x00\x1b[2J\x07", "\U0001f600\U00010348"]


class ServerTextTests(TestCase):
    """Every text of TEXTS in every string field of every request type, to the real
    server objects: a reply with the request's id (or null for a broken id) and a
    documented code, and the connection still open."""

    timeout = 240

    def setUp(self) -> Deferred[None]:  # type: ignore[override]
        async def go() -> None:
            self.parts: ServerParts = await build_server(self.mktemp())

        return Deferred.fromCoroutine(go())

    def tearDown(self) -> Deferred[None]:  # type: ignore[override]
        return Deferred.fromCoroutine(self.parts.close())

    async def reply(self, peer: Peer, rid: object) -> dict[str, Any]:
        """The reply to ``rid``; what came before it is forgotten, so a later reply with
        the same id (null, for an id that is not valid text) is found, not this one."""
        line = await peer.reply(rid)
        peer.received.clear()
        return line

    async def session(self, name: str, host: str) -> Peer:
        peer = Peer(self.parts.factory, host)
        peer.send({"id": "h", "type": "hello", "version": 1})
        await self.reply(peer, "h")
        peer.send({"id": "r", "type": "register", "username": name,
                   "password": GOOD_PASSWORD, "email": f"{name}@example.org"})
        await self.reply(peer, "r")
        peer.send({"id": "l", "type": "login", "username": name, "password": GOOD_PASSWORD,
                   "device": {"id": "d1"}})
        self.assertTrue((await self.reply(peer, "l"))["ok"])
        return peer

    async def test_odd_text_everywhere(self) -> None:
        documented = documented_codes()
        alice = await self.session("alice", "198.51.100.1")
        await self.session("bob", "198.51.100.2")
        alice.send({"id": "c", "type": "room_create", "room": "general"})
        self.assertTrue((await self.reply(alice, "c"))["ok"])
        seen: set[str] = set()

        async def one(peer: Peer, obj: dict[str, Any]) -> None:
            peer.send(json.dumps(obj).encode() + b"\n")  # lone surrogates as \\u escapes
            rid = None if has_lone_surrogate(str(obj["id"])) else obj["id"]
            r = await self.reply(peer, rid)
            if not r["ok"]:
                code = r["error"]["code"]
                self.assertIn(code, documented, obj)
                self.assertNotEqual(code, "internal_error", obj)
                seen.add(code)
            self.assertFalse(peer.closed, obj)

        n = 0
        for rtype, path in CASES:
            if rtype == "logout":
                continue
            for text in TEXTS:
                for append in (False, True):
                    n += 1
                    obj = {"id": n, "type": rtype, **SAMPLES[rtype]}
                    if append:
                        if isinstance(path[-1], tuple):
                            continue
                        node: Any = obj
                        for step in path:
                            node = node[step]
                        obj = with_text(obj, path, node + text)
                    else:
                        obj = with_text(obj, path, text)
                    if rtype in PRE_AUTH and rtype not in ("hello", "ping"):
                        peer = Peer(self.parts.factory, f"203.0.113.{n % 250 + 1}")
                        peer.send({"id": "h", "type": "hello", "version": 1})
                        await self.reply(peer, "h")
                        await one(peer, obj)
                        peer.proto.connectionLost(None)
                    else:
                        await one(alice, obj)
        for text in TEXTS:
            n += 1
            await one(alice, {"id": n, "type": "ping", text: 1})
            await one(alice, {"id": text, "type": "ping"})
        self.assertIn("bad_field", seen)
