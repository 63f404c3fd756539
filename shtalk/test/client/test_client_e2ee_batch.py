"""The E2EE manager's receive path without a server: group commit, split room rows."""

from __future__ import annotations

import base64
import os
import time
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, fail, succeed
from twisted.trial.unittest import TestCase

from shtalk.client.connection import ServerError
from shtalk.client.e2ee import E2EE, ClientError
from shtalk.client.events import BadMessage, Event, MessageReceived
from shtalk.client.localstore import KdfParams, LocalStore
from shtalk.client.trust import ContactDevice
from shtalk.crypto import RoomSession, Session
from shtalk.test.crypto.test_crypto_support import fetched_bundle
from shtalk.wire.pushes import MessagePush
from shtalk.wire.records import ClientRequest

CHEAP = KdfParams(memory_kib=8, iterations=1, lanes=1)
ROOM = "ops"


def _home(case: TestCase) -> str:
    """A directory in the test's own temporary directory (nothing is left in /tmp)."""
    home: str = case.mktemp()
    os.makedirs(home)
    return home


class Device:
    """One E2EE manager on a real LocalStore; ``request`` records what it would send."""

    def __init__(self, home: str, user: str) -> None:
        self.path = os.path.join(home, f"{user}.sqlite3")
        self.user = user
        self.sent: list[dict[str, Any]] = []
        self.events: list[Event] = []
        self.acks: list[int] = []
        self.commits = 0
        self.store: LocalStore | None = None
        self.e2ee: E2EE | None = None

    async def open(self) -> E2EE:
        if os.path.exists(self.path):
            self.store = await LocalStore.open(self.path, "pass", reactor)
        else:
            self.store = await LocalStore.create(self.path, "pass", reactor, kdf=CHEAP)
        real = self.store.commit

        def counted(*args: Any, **kwargs: Any) -> Deferred[None]:
            self.commits += 1
            return real(*args, **kwargs)

        self.store.commit = counted  # type: ignore[method-assign]

        def request(req: ClientRequest) -> Deferred[dict[str, Any]]:
            self.sent.append(req.to_json())
            return succeed({"ok": True})

        self.e2ee = E2EE(self.store, request, self.events.append, self.user, "d1")
        self.e2ee.ack = self.acks.append
        await self.e2ee.load()
        return self.e2ee

    async def close(self) -> None:
        if self.store is not None:
            await self.store.close()

    def hold_commits(self) -> list[Deferred[None]]:
        """From now on each commit waits until the test fires its gate (in order)."""
        assert self.store is not None
        real, gates = self.store.commit, []

        def held(*args: Any, **kwargs: Any) -> Deferred[None]:
            gate: Deferred[None] = Deferred()
            gates.append(gate)
            gate.addCallback(lambda _: real(*args, **kwargs))
            return gate

        self.store.commit = held  # type: ignore[method-assign]
        return gates

    def received(self) -> list[str]:
        return [e.body for e in self.events if isinstance(e, MessageReceived)]


class ReceiveBatchTests(TestCase):
    async def room(self) -> tuple[Device, Device]:
        home = _home(self)
        alice, bob = Device(home, "alice"), Device(home, "bob")
        a, b = await alice.open(), await bob.open()
        self.addCleanup(lambda: Deferred.fromCoroutine(alice.close()))
        self.addCleanup(lambda: Deferred.fromCoroutine(bob.close()))
        # What the pairwise exchange would have set up: Bob pins Alice's identity and
        # holds her sender key.
        a.rooms[ROOM] = RoomSession(ROOM, "alice", "d1")
        dist = a.rooms[ROOM].rotate(now=int(time.time()))
        b.rooms[ROOM] = rs = RoomSession(ROOM, "bob", "d1")
        rs.rotate(now=int(time.time()))
        rs.add_distribution("alice", "d1", dist.to_bytes())
        contact = ContactDevice.first("alice", "d1", a.ident.identity_key)
        b.contacts[("alice", "d1")] = contact
        assert bob.store is not None
        await bob.store.commit(
            puts=[*b.room_puts(ROOM, rs), ("contact", contact.key, contact.to_bytes())]
        )
        return alice, bob

    async def pushes(self, alice: Device, n: int, first_seq: int = 1) -> list[dict[str, Any]]:
        assert alice.e2ee is not None
        out = []
        for i in range(n):
            await alice.e2ee.send_text(f"room:{ROOM}", f"m{first_seq + i}")
            fields = alice.sent.pop()
            out.append(
                {
                    "type": "message",
                    "seq": first_seq + i,
                    "ts": 1000 + i,
                    "from": {"user": "alice", "device": "d1"},
                    "to": {"room": ROOM},
                    "client_id": fields["client_id"],
                    "envelope": fields["envelope"],
                }
            )
        return out

    async def deliver(self, bob: Device, pushes: list[dict[str, Any]]) -> list[Any]:
        assert bob.e2ee is not None
        ds = [Deferred.fromCoroutine(bob.e2ee.receive(MessagePush.from_json(p))) for p in pushes]
        return list(await DeferredList(ds, consumeErrors=True))

    async def test_burst_is_one_commit_acked_in_order(self) -> None:
        alice, bob = await self.room()
        pushes = await self.pushes(alice, 10)
        # A tampered message in the middle: refused, the others still delivered.
        raw = bytearray(base64.b64decode(pushes[4]["envelope"]))
        raw[-70] ^= 1
        pushes[4]["envelope"] = base64.b64encode(bytes(raw)).decode()
        before = bob.commits
        results = await self.deliver(bob, pushes)
        self.assertTrue(all(ok for ok, _ in results))
        # The first push starts a batch at once; the nine queued behind it share one.
        self.assertEqual(bob.commits - before, 2)
        self.assertEqual(bob.acks, list(range(1, 11)))
        self.assertEqual(bob.received(), [f"m{i}" for i in range(1, 11) if i != 5])
        bad = [e for e in bob.events if isinstance(e, BadMessage)]
        self.assertEqual([e.seq for e in bad], [5])
        assert bob.store is not None
        history = await bob.store.history(f"room:{ROOM}")
        self.assertEqual([m.body for m in history], [f"m{i}" for i in range(1, 11) if i != 5])

    async def test_redelivered_room_messages_are_acked_quietly(self) -> None:
        """The server sends again what was not acked (we stopped before the ack)."""
        alice, bob = await self.room()
        pushes = await self.pushes(alice, 3)
        await self.deliver(bob, pushes)
        await self.deliver(bob, pushes)
        self.assertEqual(bob.acks, [1, 2, 3, 1, 2, 3])
        self.assertEqual(bob.received(), ["m1", "m2", "m3"])
        self.assertEqual([e for e in bob.events if isinstance(e, BadMessage)], [])
        # A forged copy of a spent message is still an alarm, not a quiet ack.
        raw = bytearray(base64.b64decode(pushes[0]["envelope"]))
        raw[-70] ^= 1
        await self.deliver(bob, [dict(pushes[0], envelope=base64.b64encode(bytes(raw)).decode())])
        self.assertEqual([e.seq for e in bob.events if isinstance(e, BadMessage)], [1])

    async def test_rows_per_chain_survive_a_restart(self) -> None:
        alice, bob = await self.room()
        pushes = await self.pushes(alice, 4)
        await self.deliver(bob, pushes[:1] + pushes[2:3])  # 2 stays skipped
        assert bob.store is not None
        rows = dict(await bob.store.items("roomchain"))
        self.assertEqual(sorted(rows), [f"{ROOM}/alice/d1/0"])
        self.assertEqual(sorted(dict(await bob.store.items("roomown"))), [ROOM])
        self.assertEqual(await bob.store.items("room"), [])
        await bob.close()
        bob.events.clear()
        b = await bob.open()
        self.assertEqual(
            b.rooms[ROOM].to_bytes(),
            RoomSession.from_parts(
                dict(await bob.store.items("roomown"))[ROOM], list(rows.values())
            ).to_bytes(),
        )
        # The skipped message still decrypts; a replay is refused after the restart too
        # (acknowledged as a redelivery, never shown again).
        acks = len(bob.acks)
        await self.deliver(bob, [pushes[1], pushes[3], pushes[0]])
        self.assertEqual(bob.received(), ["m2", "m4"])
        self.assertEqual(bob.acks[acks:], [2, 4, 1])
        self.assertEqual([e for e in bob.events if isinstance(e, BadMessage)], [])

    async def test_failed_commit_acks_nothing_and_reloads(self) -> None:
        alice, bob = await self.room()
        pushes = await self.pushes(alice, 3)
        assert bob.store is not None and bob.e2ee is not None
        real = bob.store.commit
        bob.store.commit = lambda *a, **k: fail(OSError("disk full"))  # type: ignore[method-assign]
        results = await self.deliver(bob, pushes)
        self.assertEqual([ok for ok, _ in results], [False, False, False])
        for _, failure in results:
            failure.trap(ClientError)
        # Shown as soon as they were verified and decrypted, but not acknowledged.
        self.assertEqual((bob.acks, bob.received()), ([], ["m1", "m2", "m3"]))
        first_ids = [e.id for e in bob.events if isinstance(e, MessageReceived)]
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 2)
        self.assertEqual(await bob.store.history(f"room:{ROOM}"), [])
        bob.store.commit = real  # type: ignore[method-assign]
        bob.events.clear()
        # Redelivered: the reloaded state has not consumed these message keys, and the
        # copies carry the same ids (the view keeps one line per id).
        await self.deliver(bob, pushes)
        self.assertEqual(bob.received(), ["m1", "m2", "m3"])
        self.assertEqual([e.id for e in bob.events if isinstance(e, MessageReceived)], first_ids)
        self.assertEqual(bob.acks, [1, 2, 3])
        self.assertEqual([m.body for m in await bob.store.history(f"room:{ROOM}")],
                         ["m1", "m2", "m3"])

    async def test_whole_room_row_is_migrated(self) -> None:
        alice, bob = await self.room()
        pushes = await self.pushes(alice, 2)
        assert bob.store is not None and bob.e2ee is not None
        rs = bob.e2ee.rooms[ROOM]
        # A store written by an earlier version: the whole RoomSession in one row.
        await bob.store.commit(
            puts=[
                ("room", ROOM, rs.to_bytes()),
                ("roomown", ROOM, None),
                ("roomchain", f"{ROOM}/alice/d1/0", None),
            ]
        )
        await bob.close()
        b = await bob.open()
        self.assertEqual(b.rooms[ROOM].to_bytes(), rs.to_bytes())
        self.assertEqual(await bob.store.items("room"), [])
        self.assertEqual(
            sorted(k for k, _ in await bob.store.items("roomchain")), [f"{ROOM}/alice/d1/0"]
        )
        await self.deliver(bob, pushes)
        self.assertEqual(bob.received(), ["m1", "m2"])

    async def test_left_room_deletes_every_row(self) -> None:
        _, bob = await self.room()
        assert bob.store is not None and bob.e2ee is not None
        await bob.e2ee.left_room(ROOM)
        for kind in ("room", "roomown", "roomchain"):
            self.assertEqual(await bob.store.items(kind), [])


class SentStateTests(TestCase):
    async def sender(self) -> tuple[Device, E2EE]:
        """Alice, alone in ROOM with a sending key: sends need no server."""
        home = _home(self)
        alice = Device(home, "alice")
        a = await alice.open()
        self.addCleanup(lambda: Deferred.fromCoroutine(alice.close()))
        a.rooms[ROOM] = RoomSession(ROOM, "alice", "d1")
        a.rooms[ROOM].rotate(now=int(time.time()))
        return alice, a

    async def test_a_covered_room_send_leaves_before_its_commit(self) -> None:
        alice, a = await self.sender()
        assert alice.store is not None
        await a.send_text(f"room:{ROOM}", "one")  # saved first: reserves the chain
        gates = alice.hold_commits()
        second = Deferred.fromCoroutine(a.send_text(f"room:{ROOM}", "two"))
        self.assertEqual((len(alice.sent), len(gates), second.called), (2, 1, False))
        gates[0].callback(None)
        await second
        # A crash now restores an own chain past both indexes.
        saved = dict(await alice.store.items("roomown"))[ROOM]
        self.assertGreater(RoomSession.from_bytes(saved).index, a.rooms[ROOM].index)

    async def test_sent_rides_along_with_the_next_commit(self) -> None:
        alice, a = await self.sender()
        assert alice.store is not None
        before = alice.commits
        first = await a.send_text(f"room:{ROOM}", "one")
        second = await a.send_text(f"room:{ROOM}", "two")
        # One commit per message: "sent" of the first went with the second's record.
        self.assertEqual(alice.commits - before, 2)
        states = {m.id: m.state for m in await alice.store.history(f"room:{ROOM}")}
        self.assertEqual(states, {first: "sent", second: "sending"})
        await a.flush_states()
        states = {m.id: m.state for m in await alice.store.history(f"room:{ROOM}")}
        self.assertEqual(states, {first: "sent", second: "sent"})
        await a.flush_states()  # nothing left: no commit
        self.assertEqual(alice.commits - before, 3)

    async def test_a_captcha_demand_is_answered_and_the_same_send_repeated(self) -> None:
        """The server's monitoring wants a CAPTCHA before this (flagged) account's next
        send: the answer goes with the very same envelope and client id."""
        alice, a = await self.sender()
        sends: list[dict[str, Any]] = []
        challenge = {"id": "cap_1", "art": "#", "hint": "type it"}

        def request(req: ClientRequest) -> Deferred[dict[str, Any]]:
            fields = req.to_json()
            del fields["type"]
            sends.append(fields)
            if "captcha" not in fields:
                return fail(ServerError("captcha_required", "solve it", {
                    "error": {"code": "captcha_required", "captcha": challenge}}))
            return succeed({"ok": True, "seq": 1})

        a.request = request  # type: ignore[assignment]
        asked: list[tuple[str, dict[str, Any]]] = []

        def ask_extra(code: str, error: dict[str, Any]) -> dict[str, Any]:
            asked.append((code, error))
            return {"captcha": {"id": error["captcha"]["id"], "answer": "ok"}}

        a.ask_extra = ask_extra
        msg_id = await a.send_text(f"room:{ROOM}", "are you human?")
        self.assertEqual([c for c, _ in asked], ["captcha_required"])
        self.assertEqual(len(sends), 2)
        first, again = sends
        self.assertEqual(again["captcha"], {"id": "cap_1", "answer": "ok"})
        self.assertEqual({k: v for k, v in again.items() if k != "captcha"}, first)
        await a.flush_states()
        assert alice.store is not None
        states = {m.id: m.state for m in await alice.store.history(f"room:{ROOM}")}
        self.assertEqual(states, {msg_id: "sent"})
        # Without anyone to answer, the refusal fails the send (shown as failed).
        a.ask_extra = None
        with self.assertRaises(ServerError):
            await a.send_text(f"room:{ROOM}", "no one answers")


class DistributeTests(TestCase):
    async def test_member_without_keys_is_skipped_not_fatal(self) -> None:
        home = _home(self)
        alice, bob = Device(home, "alice"), Device(home, "bob")
        a, b = await alice.open(), await bob.open()
        self.addCleanup(lambda: Deferred.fromCoroutine(alice.close()))
        self.addCleanup(lambda: Deferred.fromCoroutine(bob.close()))
        bundle = base64.b64encode(b.ident.public_bundle().base().to_bytes()).decode()

        def request(req: ClientRequest) -> Deferred[dict[str, Any]]:
            fields = req.to_json()
            rtype = fields["type"]
            alice.sent.append(fields)
            if rtype == "devices":
                return succeed({"devices": [{"id": "d1"}]})
            if rtype == "keys_fetch" and fields["user"] == "aaraw":
                return fail(ServerError("no_such_device", "aaraw has no such device"))
            if rtype == "keys_fetch":
                return succeed({"devices": [{"id": "d1", "bundle": bundle}]})
            return succeed({"ok": True})

        a.request = request
        # "aaraw" (never published keys) sorts before bob: bob still gets the key.
        await a.joined_room(ROOM, ["alice", "aaraw", "bob"])
        sends = [m for m in alice.sent if m["type"] == "send"]
        self.assertEqual([m["to"] for m in sends], [{"user": "bob"}])


class DirectSendTests(TestCase):
    """A DM leaves before its own commit once a durable saved state covers it."""

    async def pair(self) -> tuple[Device, Device, list[Deferred[None]]]:
        home = _home(self)
        alice, bob = Device(home, "alice"), Device(home, "bob")
        a, b = await alice.open(), await bob.open()
        self.addCleanup(lambda: Deferred.fromCoroutine(alice.close()))
        self.addCleanup(lambda: Deferred.fromCoroutine(bob.close()))
        a.devices_of.update(alice=["d1"], bob=["d1"])
        a.sessions[("bob", "d1")] = [Session.initiate(a.ident, fetched_bundle(b.ident))]
        gates = alice.hold_commits()  # a slow fsync
        return alice, bob, gates

    @staticmethod
    def push(fields: dict[str, Any], seq: int) -> MessagePush:
        return MessagePush.from_json({
            "type": "message", "seq": seq, "ts": seq, "to": {"user": "bob"},
            "from": {"user": "alice", "device": "d1"}, "client_id": fields["client_id"],
            "envelope": fields["envelopes"]["bob/d1"]})

    async def test_only_an_uncovered_send_waits_for_its_commit(self) -> None:
        alice, bob, gates = await self.pair()
        assert alice.e2ee is not None and bob.e2ee is not None and alice.store is not None
        first = Deferred.fromCoroutine(alice.e2ee.send_text("user:bob", "one"))
        self.assertEqual((alice.sent, len(gates)), ([], 1))  # a new session: saved first
        gates[0].callback(None)
        await first
        self.assertEqual(len(alice.sent), 1)
        second = Deferred.fromCoroutine(alice.e2ee.send_text("user:bob", "two"))
        self.assertEqual(len(alice.sent), 2)  # on its way while its commit waits
        self.assertFalse(second.called)  # ... and send_text returns once it is saved
        gates[1].callback(None)
        await second
        self.assertEqual([m.body for m in await alice.store.history("user:bob")],
                         ["one", "two"])
        for seq, fields in enumerate(alice.sent, 1):
            await bob.e2ee.receive(self.push(fields, seq))
        self.assertEqual((bob.received(), bob.acks), (["one", "two"], [1, 2]))

    async def test_a_crash_before_the_commit_reuses_no_key(self) -> None:
        alice, bob, gates = await self.pair()
        assert alice.e2ee is not None and bob.e2ee is not None
        first = Deferred.fromCoroutine(alice.e2ee.send_text("user:bob", "one"))
        gates[0].callback(None)
        await first
        Deferred.fromCoroutine(alice.e2ee.send_text("user:bob", "two"))
        self.assertEqual(len(alice.sent), 2)
        # Alice's process dies before "two" is saved; she starts again from the file.
        again = Device(os.path.dirname(alice.path), "alice")
        a2 = await again.open()
        self.addCleanup(lambda: Deferred.fromCoroutine(again.close()))
        a2.devices_of.update(alice=["d1"], bob=["d1"])
        await a2.send_text("user:bob", "three")
        sent = alice.sent + again.sent
        for seq, fields in enumerate(sent, 1):
            await bob.e2ee.receive(self.push(fields, seq))
        self.assertEqual(bob.received(), ["one", "two", "three"])
        self.assertEqual([e for e in bob.events if isinstance(e, BadMessage)], [])
        assert again.store is not None
        # What the crash costs: the unsaved copy of "two" in Alice's own history.
        self.assertEqual([m.body for m in await again.store.history("user:bob")],
                         ["one", "three"])
