"""The server core's tables and registries, without a store: the connection's state
table, the dispatch table, the refusal-to-code table, presence (live connections and
where revocations go), the room caches' one writer, and mailbox names."""

from __future__ import annotations

from typing import Any, cast

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from shtalk.server import eserver
from shtalk.server.chat.fanout import FanOutCache
from shtalk.server.chat.presence import Presence
from shtalk.server.chat.rooms import Rooms
from shtalk.server.chat.users import Users
from shtalk.server.iserver import IStore
from shtalk.server.net import errors
from shtalk.server.net.connection import ShtalkServerProtocol
from shtalk.server.net.dispatch import dispatch_table
from shtalk.server.net.states import (
    ACCEPTS,
    KINDS,
    TRANSITIONS,
    ConnectionState,
    Input,
    InvalidTransition,
    Kind,
    State,
)
from shtalk.server.store import mailbox
from shtalk.server.store.records import Room
from shtalk.wire.errors import ErrorCode, ProtocolError
from shtalk.wire.schema import PRE_AUTH, REQUESTS


class StateTableTests(SynchronousTestCase):
    def test_every_request_and_state_has_a_rule(self) -> None:
        self.assertEqual(set(KINDS), set(REQUESTS))
        for state in State:
            self.assertEqual(set(ACCEPTS[state]), set(Kind), state)
            self.assertIn(state, TRANSITIONS)

    def test_the_rules_as_documented(self) -> None:
        """hello first; sessions need a login; no second login on a logged-in connection."""
        m = ConnectionState()
        self.assertEqual(m.refusal("room_list"), ACCEPTS[State.NEW][Kind.SESSION])
        self.assertEqual(m.refusal("room_list")[0], ErrorCode.HELLO_REQUIRED)  # type: ignore[index]
        self.assertIsNone(m.refusal("ping"))
        self.assertIsNone(m.refusal("hello"))
        m.fire(Input.HELLO)
        self.assertEqual(m.refusal("send")[0], ErrorCode.NOT_AUTHENTICATED)  # type: ignore[index]
        self.assertIsNone(m.refusal("login"))
        m.fire(Input.AUTH_STARTED)
        self.assertEqual(m.refusal("login")[0], ErrorCode.ALREADY_AUTHENTICATED)  # type: ignore[index]
        m.fire(Input.AUTH_OK)
        self.assertIsNone(m.refusal("send"))
        self.assertEqual(m.refusal("register")[0], ErrorCode.ALREADY_AUTHENTICATED)  # type: ignore[index]
        self.assertIs(m.fire(Input.LOGGED_OUT), State.READY)

    def test_an_input_out_of_place_is_a_bug(self) -> None:
        m = ConnectionState()
        with self.assertRaises(InvalidTransition):
            m.fire(Input.AUTH_OK)
        self.assertIs(m.state, State.NEW)

    @given(st.lists(st.sampled_from(list(Input)), max_size=30))
    def test_any_run_keeps_the_invariants(self, inputs: list[Input]) -> None:
        m = ConnectionState()
        for event in inputs:
            before = m.state
            try:
                after = m.fire(event)
            except InvalidTransition:
                self.assertNotIn(event, TRANSITIONS[before])
                self.assertIs(m.state, before)
                continue
            # Only a hello leaves NEW; only a successful login reaches AUTHENTICATED.
            if before is State.NEW and after is not State.NEW:
                self.assertIs(event, Input.HELLO)
            if after is State.AUTHENTICATED and before is not State.AUTHENTICATED:
                self.assertIs(event, Input.AUTH_OK)
            for rtype, kind in KINDS.items():
                accepted = m.refusal(rtype) is None
                if kind is Kind.SESSION:
                    self.assertEqual(accepted, m.state is State.AUTHENTICATED, rtype)
                if m.state is State.NEW:
                    self.assertEqual(accepted, rtype in ("hello", "ping"), rtype)
                elif rtype in PRE_AUTH and kind is not Kind.LOGIN:
                    self.assertTrue(accepted, rtype)


class DispatchTests(SynchronousTestCase):
    def handlers(self) -> list[object]:
        from shtalk.server.net.account import AccountHandlers
        from shtalk.server.net.chathandlers import ChatHandlers
        from shtalk.server.net.login import LoginHandlers

        return [
            cls.__new__(cls)  # the methods are all the table looks at
            for cls in (LoginHandlers, ChatHandlers, AccountHandlers)
        ]

    def test_every_request_type_has_one_handler(self) -> None:
        table = dispatch_table(ShtalkServerProtocol, self.handlers())
        self.assertEqual(set(table), set(REQUESTS))
        # The connection's own requests come first (the first stage of the dispatch).
        self.assertIs(table["hello"], ShtalkServerProtocol.on_hello)
        self.assertIs(table["ping"], ShtalkServerProtocol.on_ping)

    def test_a_missing_or_second_handler_is_a_wiring_error(self) -> None:
        handlers = self.handlers()
        with self.assertRaises(ValueError):
            dispatch_table(ShtalkServerProtocol, handlers[1:])
        with self.assertRaises(ValueError):
            dispatch_table(ShtalkServerProtocol, [*handlers, handlers[1]])


class RefusalCodeTests(SynchronousTestCase):
    def test_every_refusal_has_its_wire_code(self) -> None:
        kinds = [
            v for v in vars(eserver).values()
            if isinstance(v, type) and issubclass(v, eserver.Refused) and v is not eserver.Refused
        ]
        self.assertGreater(len(kinds), 15)
        for kind in kinds:
            e = errors.to_wire(kind("why", retry_after=3))
            assert e is not None, kind
            self.assertEqual((e.code, e.message, e.extra), (errors.CODES[kind], "why",
                                                              {"retry_after": 3}))
        access = [eserver.AccessInvalid, eserver.AccessExpired, eserver.AccessRevoked]
        self.assertEqual(set(errors.ACCESS_CODES), set(access))

    def test_protocol_errors_pass_and_anything_else_is_not_a_refusal(self) -> None:
        p = ProtocolError(ErrorCode.BAD_FIELD, "x")
        self.assertIs(errors.to_wire(p), p)
        self.assertIsNone(errors.to_wire(KeyError("boom")))
        self.assertIsNone(errors.to_wire(eserver.Refused("a kind of its own")))


class Mind:
    """Records what a connection would be told."""

    def __init__(self) -> None:
        self.revoked: list[str] = []
        self.lines: list[bytes] = []
        self.presence: Presence | None = None

    def send_bytes(self, data: bytes) -> None:
        self.lines.append(data)

    def deliver(self, seq: int, line: bytes) -> None:
        self.lines.append(line)

    def session_revoked(self, reason: str) -> None:
        # As the connection does: drop its avatar, whose logout detaches it.
        self.revoked.append(reason)
        if self.presence is not None:
            self.presence.detach(self)  # type: ignore[arg-type]


class PresenceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fanout = FanOutCache()
        self.presence = Presence(self.fanout)

    def online(self, uid: int, device: str, family: str = "") -> Mind:
        mind = Mind()
        mind.presence = self.presence
        self.presence.attach(uid, device, mind)  # type: ignore[arg-type]
        if family:
            self.presence.bind_family(mind, family)  # type: ignore[arg-type]
        return mind

    def gone(self, mind: Mind) -> tuple[int, bool, bool]:
        departure = self.presence.detach(mind)  # type: ignore[arg-type]
        assert departure is not None
        uid, here, anywhere = departure
        return uid, here, self.successResultOf(anywhere)

    def test_first_device_online_is_told_once(self) -> None:
        mind = Mind()
        self.assertTrue(self.successResultOf(self.presence.attach(1, "d1", mind)))  # type: ignore[arg-type]
        self.assertFalse(self.successResultOf(self.presence.attach(1, "d2", Mind())))  # type: ignore[arg-type]
        self.assertFalse(self.successResultOf(self.presence.attach(1, "d1", Mind())))  # type: ignore[arg-type]

    def test_online_among_and_devices_online_anywhere(self) -> None:
        self.online(1, "d1")
        self.online(1, "d2")
        self.online(3, "e1")
        self.assertEqual(self.successResultOf(self.presence.online_among([1, 2, 3])), {1, 3})
        self.assertEqual(
            self.successResultOf(self.presence.devices_online_anywhere(1)), {"d1", "d2"}
        )

    def test_a_family_is_revoked_on_all_its_connections_but_one_kept(self) -> None:
        a = self.online(1, "d1", "F")
        b = self.online(1, "d1", "F")
        c = self.online(1, "d2", "G")
        self.presence.revoke_families(["F"], "logged out elsewhere", keep=a)
        self.assertEqual((a.revoked, b.revoked, c.revoked), ([], ["logged out elsewhere"], []))
        self.assertNotIn("F", self.presence.families)
        self.assertEqual([m for _, m in self.presence.minds_of(1)], [a, c])

    def test_rebinding_moves_a_connection_to_its_new_family(self) -> None:
        a = self.online(1, "d1", "F")
        self.presence.bind_family(a, "F2")  # type: ignore[arg-type]
        self.presence.revoke_families(["F"], "old session")
        self.assertEqual(a.revoked, [])
        self.presence.revoke_families(["F2"], "new session")
        self.assertEqual(a.revoked, ["new session"])

    def test_device_and_user_revocations(self) -> None:
        a, b, c = self.online(1, "d1"), self.online(1, "d2"), self.online(2, "e1")
        self.presence.revoke_device(1, "d2", "removed")
        self.assertEqual((a.revoked, b.revoked, c.revoked), ([], ["removed"], []))
        self.presence.revoke_user(1, "suspended")
        self.assertEqual(a.revoked, ["suspended"])
        self.assertFalse(self.presence.is_online(1))
        self.assertTrue(self.presence.is_online(2))

    def test_detach_says_when_the_user_is_gone_and_drops_cached_lists(self) -> None:
        a, b = self.online(1, "d1", "F"), self.online(1, "d2", "F")
        self.fanout.put("u:1", (a, b))
        self.assertEqual(self.gone(a), (1, False, False))
        self.assertEqual(self.fanout.entries, {})  # no list keeps a closed connection
        self.assertEqual(self.gone(b), (1, True, True))
        self.assertIsNone(self.presence.detach(b))  # type: ignore[arg-type]
        self.assertEqual(self.presence.families, {})


class RoomCacheTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.fanout = FanOutCache()
        self.rooms = Rooms(cast(IStore, None), Users(cast(IStore, None)), self.fanout)
        self.room = Room(7, "General", "general", 1, False, 0.0)

    def test_each_change_goes_through_one_method_and_is_counted(self) -> None:
        changes: list[tuple[str, Any]] = []
        for what, change in (
            ("created", lambda: self.rooms.created(self.room, 1)),
            ("joined", lambda: self.rooms.joined(self.room, 2)),
            ("role", lambda: self.rooms.role_set(self.room, 2, "admin")),
            ("left", lambda: self.rooms.left(self.room, 1)),
        ):
            before = self.fanout.version
            change()
            self.assertGreater(self.fanout.version, before, what)
            changes.append((what, dict(self.rooms.members[7])))
        self.assertEqual(changes, [
            ("created", {1: "owner"}), ("joined", {1: "owner", 2: "member"}),
            ("role", {1: "owner", 2: "admin"}), ("left", {2: "admin"}),
        ])
        self.assertEqual(self.rooms.of_user, {1: set(), 2: {7}})
        self.assertEqual(self.rooms.roommates(2), {2})
        self.assertTrue(self.rooms.shares_room(2, 2))
        self.rooms.account_deleted(2)
        self.assertEqual((dict(self.rooms.members[7]), self.rooms.of_user), ({}, {1: set()}))


class MailboxTests(SynchronousTestCase):
    """The names the store files messages under, as the bus reads them back."""

    @given(st.integers(min_value=1, max_value=2**63 - 1))
    def test_round_trip(self, ident: int) -> None:
        self.assertEqual(mailbox.inbox_owner(mailbox.user_mailbox(ident)), ident)
        self.assertEqual(mailbox.room_of(mailbox.room_mailbox(ident)), ident)
        self.assertIsNone(mailbox.inbox_owner(mailbox.room_mailbox(ident)))
        self.assertIsNone(mailbox.room_of(mailbox.user_mailbox(ident)))

    @given(st.text(max_size=12))
    def test_anything_else_is_neither(self, text: str) -> None:
        if text[2:].isdigit() and text[:2] in ("u:", "r:"):
            return  # a mailbox name after all
        self.assertIsNone(mailbox.inbox_owner(text))
        self.assertIsNone(mailbox.room_of(text))
