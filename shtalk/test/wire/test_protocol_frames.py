"""The sans-IO wire protocol: parsing, validation, encoding; no transport anywhere."""

from __future__ import annotations

import base64
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from shtalk.wire.errors import ErrorCode, ProtocolError
from shtalk.wire.frames import encode, error, ok, parse_line, push
from shtalk.wire.names import (
    NameError_,
    check_device_id,
    clean_label,
    normalise_room,
    normalise_username,
)
from shtalk.wire.schema import MAX_ENVELOPE_BYTES, REQUESTS


def line(obj: object) -> bytes:
    return json.dumps(obj).encode()


def send_line(**fields: object) -> bytes:
    """A ``send`` to room "g" with client id "c", but for what ``fields`` give."""
    return line({"id": 1, "type": "send", "to": {"room": "g"}, "client_id": "c", **fields})


class ParseTests(SynchronousTestCase):
    def code(self, raw: bytes) -> tuple[ErrorCode, object]:
        try:
            parse_line(raw)
        except ProtocolError as e:
            return e.code, e.request_id
        self.fail(f"{raw[:80]!r}... was accepted")

    def test_hello(self) -> None:
        r = parse_line(b'{"id": 1, "type": "hello", "version": 1}')
        self.assertEqual((r.id, r.type, dict(r.args)), (1, "hello", {"version": 1}))

    def test_bad_json(self) -> None:
        self.assertEqual(self.code(b"{not json"), (ErrorCode.BAD_JSON, None))
        self.assertEqual(self.code(b"\xff\xfe"), (ErrorCode.BAD_JSON, None))
        self.assertEqual(self.code(b'{"id":1,"type":"ping","x":NaN}')[0], ErrorCode.BAD_JSON)

    def test_not_an_object(self) -> None:
        for raw in (b"[1,2]", b"3", b'"hello"', b"null"):
            self.assertEqual(self.code(raw)[0], ErrorCode.NOT_AN_OBJECT)

    def test_id_rules(self) -> None:
        self.assertEqual(self.code(b'{"type":"ping"}')[0], ErrorCode.MISSING_FIELD)
        for bad in (b"true", b"-1", b"1.5", b'""', b"[1]", json.dumps("x" * 65).encode()):
            self.assertEqual(
                self.code(b'{"id":' + bad + b',"type":"ping"}')[0], ErrorCode.BAD_FIELD, bad
            )
        self.assertEqual(parse_line(b'{"id":"abc","type":"ping"}').id, "abc")

    def test_unknown_type_echoes_id(self) -> None:
        self.assertEqual(self.code(b'{"id":"q","type":"fly"}'), (ErrorCode.UNKNOWN_TYPE, "q"))
        self.assertEqual(self.code(b'{"id":"q","type":7}'), (ErrorCode.UNKNOWN_TYPE, "q"))
        self.assertEqual(self.code(b'{"id":"q"}'), (ErrorCode.MISSING_FIELD, "q"))

    def test_missing_and_bad_fields(self) -> None:
        self.assertEqual(
            self.code(line({"id": 2, "type": "register", "username": "al"})),
            (ErrorCode.MISSING_FIELD, 2),
        )
        self.assertEqual(
            self.code(line({"id": 2, "type": "hello", "version": "1"})), (ErrorCode.BAD_FIELD, 2)
        )
        self.assertEqual(
            self.code(line({"id": 2, "type": "hello", "version": True})), (ErrorCode.BAD_FIELD, 2)
        )
        self.assertEqual(
            self.code(line({"id": 2, "type": "hello", "version": 1, "extra": 1})),
            (ErrorCode.BAD_FIELD, 2),
        )

    def test_send_shapes(self) -> None:
        env = base64.b64encode(b"\x00" * 10).decode()
        r = parse_line(send_line(envelope=env))
        self.assertEqual(r.args["envelope"], b"\x00" * 10)
        for to in ({}, {"room": "a", "user": "b"}, {"planet": "x"}, "room"):
            self.assertEqual(self.code(send_line(to=to, envelope=env))[0], ErrorCode.BAD_FIELD)
        self.assertEqual(self.code(send_line(envelope="not base64!"))[0], ErrorCode.BAD_FIELD)
        big = base64.b64encode(b"\x00" * (MAX_ENVELOPE_BYTES + 1)).decode()
        self.assertEqual(self.code(send_line(envelope=big))[0], ErrorCode.ENVELOPE_TOO_LARGE)
        per_device = {"bob/phone": env, "bob/laptop": env}
        r = parse_line(send_line(to={"user": "bob"}, envelopes=per_device))
        self.assertEqual(set(r.args["envelopes"]), {"bob/phone", "bob/laptop"})
        self.assertEqual(
            self.code(send_line(to={"user": "bob"}, envelopes={"bob": env}))[0],
            ErrorCode.BAD_FIELD,
        )

    def test_ack_bounds(self) -> None:
        self.assertEqual(
            self.code(line({"id": 1, "type": "ack", "seqs": []}))[0], ErrorCode.BAD_FIELD
        )
        self.assertEqual(
            self.code(line({"id": 1, "type": "ack", "seqs": [0]}))[0], ErrorCode.BAD_FIELD
        )
        self.assertEqual(
            parse_line(line({"id": 1, "type": "ack", "seqs": [5, 6]})).args["seqs"], [5, 6]
        )

    def test_every_request_type_has_a_schema(self) -> None:
        for rtype in REQUESTS:
            try:
                parse_line(line({"id": 1, "type": rtype}))
            except ProtocolError as e:
                self.assertEqual(e.code, ErrorCode.MISSING_FIELD, rtype)

    @settings(max_examples=400, deadline=None)
    @given(st.binary(max_size=512))
    def test_arbitrary_bytes_never_raise_anything_else(self, raw: bytes) -> None:
        try:
            parse_line(raw)
        except ProtocolError as e:
            self.assertIsInstance(e.code, ErrorCode)

    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(), kids, max_size=4),
        max_leaves=12,
    )

    @settings(max_examples=400, deadline=None)
    @given(
        st.sampled_from(sorted(REQUESTS)),
        st.dictionaries(
            st.sampled_from(
                [
                    "id",
                    "version",
                    "username",
                    "password",
                    "email",
                    "device",
                    "room",
                    "user",
                    "to",
                    "envelope",
                    "envelopes",
                    "client_id",
                    "seqs",
                    "role",
                    "access_token",
                    "invite_only",
                    "expires_in",
                ]
            ),
            json_values,
        ),
    )
    def test_arbitrary_requests_are_accepted_or_refused_cleanly(
        self, rtype: str, fields: dict[str, object]
    ) -> None:
        raw = json.dumps({"type": rtype, **fields}).encode()
        try:
            r = parse_line(raw)
        except ProtocolError as e:
            self.assertIsInstance(e.code, ErrorCode)
            return
        self.assertEqual(r.type, rtype)


class EncodeTests(SynchronousTestCase):
    def test_round_trip(self) -> None:
        self.assertEqual(json.loads(ok(3, user="a")), {"id": 3, "ok": True, "user": "a"})
        self.assertEqual(
            json.loads(error(None, ErrorCode.BAD_JSON, "m")),
            {"id": None, "ok": False, "error": {"code": "bad_json", "message": "m"}},
        )
        self.assertEqual(json.loads(push("presence", user="b")), {"type": "presence", "user": "b"})

    def test_one_line_even_with_newlines_in_strings(self) -> None:
        data = encode({"a": "x\ny\u2028"})
        self.assertEqual(data.count(b"\n"), 1)
        self.assertTrue(data.endswith(b"\n"))

    @settings(max_examples=200, deadline=None)
    @given(st.dictionaries(st.text(), st.text() | st.integers(), max_size=5))
    def test_encoding_is_one_json_line(self, obj: dict[str, object]) -> None:
        data = encode(obj)
        self.assertEqual(data.count(b"\n"), 1)
        self.assertEqual(json.loads(data), obj)


class NameTests(SynchronousTestCase):
    def test_usernames(self) -> None:
        self.assertEqual(normalise_username("Alice"), ("Alice", "alice"))
        # NFKC: full-width letters collapse to ASCII, so no look-alike accounts.
        self.assertEqual(normalise_username("\uff21lice")[1], "alice")
        for bad in ("al", "a" * 33, "al ice", "al/ice", ".alice", "alice-", "\u0430lice", ""):
            self.assertRaises(NameError_, normalise_username, bad)

    def test_rooms(self) -> None:
        self.assertEqual(normalise_room("#General"), ("General", "general"))
        self.assertRaises(NameError_, normalise_room, "#")

    def test_devices_and_labels(self) -> None:
        self.assertEqual(check_device_id("laptop-1"), "laptop-1")
        self.assertRaises(NameError_, check_device_id, "lap top")
        self.assertEqual(clean_label("my\x1b[31mphone\n"), "my[31mphone")
