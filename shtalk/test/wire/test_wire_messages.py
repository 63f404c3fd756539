"""The typed wire: one record per request and per push, and the tables both sides read.

What is pinned here: a record's ``from_json`` refuses exactly what the server's
``parse_line`` refuses, with the same code and message (one set of validators); a record
written by the client is the line the server reads back; pushes as the server writes
them (and as docs/PROTOCOL.md shows them) come back to the same bytes.
"""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from shtalk.test.wire.test_protocol_text import SAMPLES
from shtalk.wire import frames
from shtalk.wire import pushes as ps
from shtalk.wire import requests as rq
from shtalk.wire.errors import ErrorCode, ProtocolError
from shtalk.wire.limits import PROTOCOL_VERSION
from shtalk.wire.schema import PRE_AUTH, REQUESTS

DOCS = Path(__file__).resolve().parents[3] / "docs" / "PROTOCOL.md"
B64 = base64.b64encode(b"envelope").decode()


def refusal(f: Any, *args: Any) -> tuple[ErrorCode, str] | None:
    try:
        f(*args)
    except ProtocolError as e:
        return e.code, e.message
    return None


class RequestRecordTests(SynchronousTestCase):
    def test_one_record_per_documented_request(self) -> None:
        self.assertEqual(set(rq.REQUEST_MAP), set(SAMPLES))
        self.assertEqual(set(REQUESTS), set(rq.REQUEST_MAP))
        self.assertLessEqual(PRE_AUTH, set(rq.REQUEST_MAP))
        for name, cls in rq.REQUEST_MAP.items():
            self.assertEqual(cls.NAME, name)

    def test_every_sample_round_trips_to_the_same_line(self) -> None:
        for name, sample in SAMPLES.items():
            obj = {"type": name, **sample}
            record = rq.REQUEST_MAP[name].from_json(obj)
            self.assertEqual(record.to_json(), obj, name)
            line = frames.request_line(7, record)
            read = frames.parse_line(line)
            self.assertEqual((read.id, read.type), (7, name))
            plain = frames.parse_line(json.dumps({"id": 7, **obj}).encode())
            self.assertEqual(read.args, plain.args)
            self.assertEqual(read.typed(), record, name)

    def test_typed_fields(self) -> None:
        send = rq.Send.from_json(SAMPLES["send"])
        self.assertEqual(send.to, rq.Target(user="bob"))
        self.assertEqual(send.envelope, b"envelope")
        self.assertEqual(send.envelopes, {"bob/d1": b"envelope"})
        login = rq.Login.from_json(SAMPLES["login"])
        self.assertEqual(login.device, rq.DeviceInfo(id="d2", label="phone"))
        self.assertEqual(rq.Ack.from_json({"seqs": [3, 4]}).seqs, (3, 4))
        keys = rq.KeysPublish.from_json(SAMPLES["keys_publish"])
        self.assertEqual(keys.one_time, (rq.OneTimeKey(kind="ec", id=1, key=b"envelope"),))
        self.assertEqual(rq.Hello().to_json(), {"type": "hello", "version": PROTOCOL_VERSION})

    def test_what_the_client_writes(self) -> None:
        """One compact line, UTF-8 as is, the id first: what the server has always read."""
        line = frames.request_line(3, rq.RoomJoin(room="caf\u00e9"))
        self.assertEqual(line, '{"id":3,"type":"room_join","room":"caf\u00e9"}'.encode())
        self.assertNotIn(b"\n", line)

    def test_amended_checks_like_the_server(self) -> None:
        send = rq.Send(to=rq.Target(room="ops"), envelope=b"x", client_id="c1")
        more = send.amended({"captcha": {"id": "cap_1", "answer": "ok"}})
        self.assertEqual(more.captcha, rq.CaptchaAnswer(id="cap_1", answer="ok"))
        self.assertEqual(more.envelope, b"x")
        self.assertEqual(refusal(send.amended, {"nope": 1}),
                         (ErrorCode.BAD_FIELD, "'send' has no field 'nope'"))
        self.assertEqual(refusal(send.amended, {"captcha": {"id": "c"}}),
                         (ErrorCode.MISSING_FIELD, "field 'captcha.answer' is required"))
        line = json.dumps({"id": 1, **send.to_json(), "captcha": {"id": "c"}}).encode()
        self.assertEqual(refusal(frames.parse_line, line),
                         (ErrorCode.MISSING_FIELD, "field 'captcha.answer' is required"))

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8)
        | st.just(B64) | st.just({"user": "bob"}) | st.just({"id": "d1"}),
        lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids,
                                                                 max_size=3),
        max_leaves=8,
    )

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(sorted(REQUESTS)), st.data())
    def test_from_json_refuses_what_parse_line_refuses(self, name: str, data: Any) -> None:
        """One set of validators: the same object gets the same refusal (code and
        message) from the server's parser and from the record, or both accept it and
        agree on every value."""
        keys = [*REQUESTS[name], "bogus"]
        obj = data.draw(st.dictionaries(st.sampled_from(keys), self.json_values, max_size=5))
        if data.draw(st.booleans()):
            obj = {**SAMPLES[name], **obj}
        line = json.dumps({"id": 1, "type": name, **obj}).encode()
        cls = rq.REQUEST_MAP[name]
        self.assertEqual(refusal(cls.from_json, obj), refusal(frames.parse_line, line))
        if refusal(cls.from_json, obj) is None:
            self.assertEqual(frames.parse_line(line).typed(), cls.from_json(obj))


#: One push of every type, as the server writes them.
PUSHES: dict[str, dict[str, Any]] = {
    "message": {"seq": 42, "ts": 1764091234567, "from": {"user": "alice", "device": "laptop"},
                "to": {"room": "general"}, "client_id": "m-0001", "envelope": B64,
                "expires_at": 1764094834},
    "backlog_done": {"count": 3},
    "presence": {"user": "bob", "status": "online"},
    "member": {"room": "general", "user": "carol", "event": "kicked", "by": "alice"},
    "invited": {"room": "ops", "by": "alice"},
    "device": {"user": "bob", "device": "tablet", "event": "keys"},
    "logged_out": {"reason": "this device was removed from the account"},
}


def documented_pushes() -> list[str]:
    """Every push line shown in docs/PROTOCOL.md's "Pushes" section."""
    text = DOCS.read_text(encoding="utf-8")
    section = text[text.index("## Pushes"):text.index("## Rate limits")]
    return re.findall(r"^\{\"type\".*\}$", section, re.M)


class PushRecordTests(SynchronousTestCase):
    def test_one_record_per_push(self) -> None:
        self.assertEqual(set(ps.PUSH_MAP), set(PUSHES))

    def test_server_lines_come_back_byte_for_byte(self) -> None:
        for name, fields in PUSHES.items():
            line = frames.push(name, **fields)
            push = ps.parse_push(json.loads(line))
            assert push is not None
            self.assertEqual(push.NAME, name)
            self.assertEqual(frames.encode(push.to_json()), line, name)

    def test_documented_pushes_parse_and_come_back_the_same(self) -> None:
        lines = documented_pushes()
        self.assertEqual({json.loads(x)["type"] for x in lines}, set(ps.PUSH_MAP))
        for line in lines:
            push = ps.parse_push(json.loads(line))
            assert push is not None
            self.assertEqual(frames.encode(push.to_json()), line.encode() + b"\n")

    def test_typed_fields(self) -> None:
        push = ps.parse_push({"type": "message", **PUSHES["message"]})
        assert isinstance(push, ps.MessagePush)
        self.assertEqual(push.sender, ps.Sender(user="alice", device="laptop"))
        self.assertEqual(push.to, ps.Target(room="general"))
        self.assertEqual((push.seq, push.expires_at), (42, 1764094834))

    def test_lenient_where_a_newer_server_may_add(self) -> None:
        self.assertIsNone(ps.parse_push({"type": "typing", "user": "bob"}))
        self.assertIsNone(ps.parse_push({"type": ["message"]}))
        push = ps.parse_push({"type": "presence", "user": "bob", "status": "away", "at": 1})
        self.assertEqual(push, ps.PresencePush(user="bob", status="away"))

    def test_strict_about_the_fields_a_push_has(self) -> None:
        bad = {"type": "message", **PUSHES["message"], "seq": "42"}
        self.assertEqual(refusal(ps.parse_push, bad),
                         (ErrorCode.BAD_FIELD, "field 'seq' must be an integer"))
        missing = {k: v for k, v in PUSHES["message"].items() if k != "from"}
        self.assertEqual(refusal(ps.parse_push, {"type": "message", **missing}),
                         (ErrorCode.MISSING_FIELD, "field 'from' is required"))

    @settings(max_examples=300, deadline=None)
    @given(st.sampled_from(sorted(PUSHES)),
           st.dictionaries(st.sampled_from(["seq", "ts", "from", "to", "user", "room",
                                            "event", "count", "envelope", "by", "reason"]),
                           RequestRecordTests.json_values, max_size=4))
    def test_any_push_is_a_record_or_a_clean_refusal(self, name: str,
                                                     fields: dict[str, Any]) -> None:
        try:
            push = ps.parse_push({"type": name, **PUSHES[name], **fields})
        except ProtocolError as e:
            self.assertIsInstance(e.code, ErrorCode)
            return
        assert push is not None
        self.assertEqual(ps.parse_push(json.loads(frames.encode(push.to_json()))), push)


class ReplyTests(SynchronousTestCase):
    def test_reply_errors(self) -> None:
        self.assertEqual(frames.reply_error({"error": {"code": "no_such_room", "message": "m"}}),
                         (ErrorCode.NO_SUCH_ROOM, "m"))
        code, _ = frames.reply_error({"error": {"code": "from_the_future", "message": ""}})
        self.assertEqual((code, type(code)), ("from_the_future", str))
        self.assertEqual(frames.reply_error({"ok": False}),
                         (ErrorCode.INTERNAL_ERROR, "malformed error reply"))

    def test_server_lines(self) -> None:
        self.assertEqual(frames.read_server_line(b'{"id":1,"ok":true}'), {"id": 1, "ok": True})
        self.assertIsNone(frames.read_server_line(b"[1]"))
        self.assertIsNone(frames.read_server_line(b"\xff"))
