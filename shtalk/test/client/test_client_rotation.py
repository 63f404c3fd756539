"""Key rotation in the client, on a test clock: signed pre-keys (schedule, grace period,
deletion from the store's files) and room sender keys (message and time bounds).

The E2EE managers run on real LocalStores; ``Net`` stands in for the server's prekey
directory and router (tests/test_key_rotation.py does the same through a real server).
"""

from __future__ import annotations

import base64
import os
import sqlite3
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from shtalk.client import payload as pl
from shtalk.client.connection import ConnectionLost
from shtalk.client.e2ee import E2EE
from shtalk.client.events import BadMessage, Event, MessageReceived
from shtalk.client.localstore import KdfParams, LocalStore
from shtalk.client.rotation import DAY, MAX_SLEEP, RETRY, KeyTimer, RotationPolicy
from shtalk.clientui.config import ClientConfig, ConfigError
from shtalk.crypto import (
    DeviceIdentity,
    Envelope,
    PreKeyBundle,
    Recipient,
    RoomSession,
    Session,
    StateError,
    seal,
)
from shtalk.test.client.test_localstore import raw_bytes
from shtalk.testing import b64
from shtalk.wire.pushes import MessagePush
from shtalk.wire.records import ClientRequest

CHEAP = KdfParams(memory_kib=8, iterations=1, lanes=1)
T0 = 1_750_000_000.0
ROOM = "ops"
POLICY = RotationPolicy()


class Net:
    """The server's prekey directory and message router, in memory.

    ``bundles[(user, device)]`` is the published base bundle; pushes queue in ``queue``
    until :meth:`deliver` hands them, in order, to the recipients' ``receive``."""

    def __init__(self, clock: MemoryReactorClock) -> None:
        self.clock = clock
        self.managers: dict[tuple[str, str], E2EE] = {}
        self.bundles: dict[tuple[str, str], bytes] = {}
        self.published: list[tuple[str, bytes]] = []
        self.one_time: dict[tuple[str, str], dict[str, list[dict[str, Any]]]] = {}
        self.rooms: dict[str, set[str]] = {}
        self.queue: list[tuple[E2EE, dict[str, Any]]] = []
        self.room_pushes: list[dict[str, Any]] = []
        self.offline = False
        self.seq = 0

    def requester(self, user: str, device: str) -> Any:
        def request(req: ClientRequest) -> Deferred[dict[str, Any]]:
            if self.offline:
                return fail(ConnectionLost("offline"))
            fields = req.to_json()  # what the server would read
            rtype = fields.pop("type")
            return succeed(getattr(self, "on_" + rtype)((user, device), **fields))

        return request

    def counts(self, key: tuple[str, str]) -> dict[str, Any]:
        keys = self.one_time.setdefault(key, {"ec": [], "pq": []})
        return {"counts": {kind: len(v) for kind, v in keys.items()}}

    def on_keys_count(self, me: tuple[str, str]) -> dict[str, Any]:
        return self.counts(me)

    def on_keys_publish(
        self, me: tuple[str, str], bundle: str, one_time: list[dict[str, Any]], replace: bool
    ) -> dict[str, Any]:
        raw = base64.b64decode(bundle)
        if self.bundles.get(me) != raw:
            self.published.append((me[0], raw))
        self.bundles[me] = raw
        keys = self.one_time.setdefault(me, {"ec": [], "pq": []})
        for k in one_time:
            keys[k["kind"]].append({"id": k["id"], "key": k["key"]})
        return self.counts(me)

    def on_keys_fetch(self, me: tuple[str, str], **fields: Any) -> dict[str, Any]:
        key = (fields["user"], fields["device"])
        if key not in self.bundles:
            return {"devices": []}
        keys = self.one_time[key]
        one_time = {kind: v.pop(0) for kind, v in keys.items() if v}
        return {"devices": [{"device": key[1], "bundle": b64(self.bundles[key]),
                             "one_time": one_time}]}

    def on_devices(self, me: tuple[str, str], **fields: Any) -> dict[str, Any]:
        return {"devices": [{"id": d} for (u, d) in self.managers if u == fields["user"]]}

    def on_send(self, me: tuple[str, str], **fields: Any) -> dict[str, Any]:
        user, device = me
        self.seq += 1
        base = {"type": "message", "seq": self.seq, "ts": int(self.clock.seconds() * 1000),
                "from": {"user": user, "device": device}, "to": fields["to"],
                "client_id": fields["client_id"]}
        if "room" in fields["to"]:
            push = {**base, "envelope": fields["envelope"]}
            self.room_pushes.append(push)
            for (u, d), manager in self.managers.items():
                if u in self.rooms[fields["to"]["room"]] and (u, d) != (user, device):
                    self.queue.append((manager, dict(push)))
        else:
            for target, envelope in fields["envelopes"].items():
                u, _, d = target.partition("/")
                self.queue.append((self.managers[(u, d)], {**base, "envelope": envelope}))
        return {"seq": self.seq}

    async def deliver(self) -> None:
        while self.queue:
            manager, push = self.queue.pop(0)
            await manager.receive(MessagePush.from_json(push))


class Devices(TestCase):
    """E2EE managers on real stores, on one test clock and one Net."""

    def setUp(self) -> None:
        self.clock = MemoryReactorClock()
        self.clock.advance(T0)
        self.net = Net(self.clock)
        self.home = self.mktemp()
        os.makedirs(self.home)
        self.events: dict[str, list[Event]] = {}
        self.stores: dict[str, LocalStore] = {}

    async def manager(self, user: str, policy: RotationPolicy = POLICY) -> E2EE:
        path = os.path.join(self.home, f"{user}.sqlite3")
        if os.path.exists(path):
            store = await LocalStore.open(path, "pass", reactor)
        else:
            store = await LocalStore.create(path, "pass", reactor, kdf=CHEAP)
        self.addCleanup(store.close)
        self.stores[user] = store
        events = self.events.setdefault(user, [])
        e2ee = E2EE(store, self.net.requester(user, "d1"), events.append, user, "d1",
                    clock=self.clock.seconds, rotation=policy)
        e2ee.ack = lambda seq: None
        await e2ee.load()
        self.net.managers[(user, "d1")] = e2ee
        return e2ee

    def received(self, user: str) -> list[str]:
        return [e.body for e in self.events[user] if isinstance(e, MessageReceived)]

    def refused(self, user: str) -> list[BadMessage]:
        return [e for e in self.events[user] if isinstance(e, BadMessage)]

    def first_message(
        self, bundle: PreKeyBundle, body: str, sender: str = "alice"
    ) -> MessagePush:
        """What a client that fetched ``bundle`` (maybe long ago) sends to bob first."""
        ident = DeviceIdentity.generate(one_time_prekeys=0, kem_one_time_prekeys=0)
        session = Session.initiate(ident, bundle)
        data = pl.encode(pl.Text(f"c-{body}", "user:bob", body, None))
        env = seal(ident, session, data, sender_user=sender, sender_device="d1",
                   recipient=Recipient.user("bob", "d1"), timestamp=1)
        self.net.seq += 1
        return MessagePush.from_json({
            "type": "message", "seq": self.net.seq, "ts": 1, "to": {"user": "bob"},
            "from": {"user": sender, "device": "d1"}, "client_id": f"c{self.net.seq}",
            "envelope": b64(env.to_bytes())})

    def bundle(self, user: str = "bob") -> PreKeyBundle:
        """The base bundle the directory hands out now (no one-time keys: the
        last-resort ML-KEM key is used, so both rotated keys are exercised)."""
        return PreKeyBundle.from_bytes(self.net.bundles[(user, "d1")])

    def timer(self, e2ee: E2EE) -> KeyTimer:
        """The client's timer on the test clock, running."""
        timer = KeyTimer(self.clock, e2ee)
        timer.start()
        self.addCleanup(timer.stop)
        return timer

    async def advance(self, timer: KeyTimer, seconds: float) -> None:
        """Move the clock from one timer call to the next, letting each run finish."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            due = timer.call.getTime() if timer.call is not None else end
            self.clock.advance(min(end, due) - self.clock.seconds())
            if timer.running is not None:
                await timer.running


class PrekeyRotationTests(Devices):
    async def test_replaced_on_schedule_by_the_timer(self) -> None:
        bob = await self.manager("bob")
        await bob.publish_keys()
        first = self.bundle()
        timer = self.timer(bob)
        await self.advance(timer, POLICY.prekey_rotation - 60)
        self.assertEqual(self.bundle(), first)
        self.assertFalse(bob.ident.has_previous)
        await self.advance(timer, 60 + MAX_SLEEP)
        second = self.bundle()
        # Both keys are new, signed, published; the old pair is kept for in-flight use.
        self.assertNotEqual(second.signed_prekey.key_id, first.signed_prekey.key_id)
        self.assertNotEqual(second.signed_prekey.public, first.signed_prekey.public)
        self.assertNotEqual(second.kem_last_resort.key_id, first.kem_last_resort.key_id)
        self.assertNotEqual(second.kem_last_resort.public, first.kem_last_resort.public)
        self.assertEqual(second.identity, first.identity)
        self.assertEqual([u for u, _ in self.net.published], ["bob", "bob"])
        assert bob.ident.previous_signed_prekey and bob.ident.previous_kem_last_resort
        self.assertEqual(bob.ident.previous_signed_prekey[0], first.signed_prekey.key_id)
        self.assertEqual(bob.ident.previous_kem_last_resort[0], first.kem_last_resort.key_id)
        rotated_at = bob.ident.previous_retired
        self.assertEqual(rotated_at, T0 + POLICY.prekey_rotation)  # on time, not an hour late
        # The grace period, then the old pair is deleted; nothing is published for that.
        await self.advance(timer, rotated_at + POLICY.prekey_grace - self.clock.seconds() - 60)
        self.assertTrue(bob.ident.has_previous)
        await self.advance(timer, 60 + MAX_SLEEP)
        self.assertFalse(bob.ident.has_previous)
        self.assertEqual(len(self.net.published), 2)
        # ... and the saved identity agrees (a restart does not bring them back).
        raw = await self.stores["bob"].get("identity", "self")
        assert raw is not None
        saved = DeviceIdentity.from_bytes(raw)
        self.assertIsNone(saved.previous_signed_prekey)
        self.assertIsNone(saved.previous_kem_last_resort)
        self.assertEqual(saved.public_bundle().base(), second)
        # The next rotation comes one interval after the last one.
        await self.advance(timer, rotated_at + POLICY.prekey_rotation - self.clock.seconds() - 60)
        self.assertEqual(len(self.net.published), 2)
        await self.advance(timer, 60 + MAX_SLEEP)
        self.assertEqual(len(self.net.published), 3)

    async def test_initial_message_with_the_previous_keys(self) -> None:
        """Decrypts within the grace period; refused after it, changing nothing."""
        bob = await self.manager("bob")
        await bob.publish_keys()
        old = self.bundle()
        self.clock.advance(POLICY.prekey_rotation)
        await bob.maintain_keys()
        self.assertNotEqual(self.bundle(), old)
        await bob.receive(self.first_message(old, "in flight"))
        self.assertEqual(self.received("bob"), ["in flight"])
        self.clock.advance(POLICY.prekey_grace - 1)
        await bob.maintain_keys()
        await bob.receive(self.first_message(old, "just in time", sender="carol"))
        self.assertEqual(self.received("bob"), ["in flight", "just in time"])
        self.clock.advance(1)
        await bob.maintain_keys()
        self.assertFalse(bob.ident.has_previous)
        store = self.stores["bob"]
        kinds = ("identity", "contact", "session", "meta")
        before = [await store.items(k) for k in kinds]
        identity_before = bob.ident.to_bytes()
        await bob.receive(self.first_message(old, "too late", sender="dave"))
        self.assertEqual(self.received("bob"), ["in flight", "just in time"])
        (refusal,) = self.refused("bob")
        self.assertEqual((refusal.sender, refusal.device), ("dave", "d1"))
        self.assertIn("no longer has", refusal.reason)
        self.assertIn("write to dave", refusal.reason)
        self.assertEqual([await store.items(k) for k in kinds], before)
        self.assertEqual(bob.ident.to_bytes(), identity_before)
        self.assertNotIn(("dave", "d1"), bob.contacts)
        # Dave's client, with a fresh fetch, gets through.
        await bob.receive(self.first_message(self.bundle(), "fresh", sender="dave"))
        self.assertEqual(self.received("bob")[-1], "fresh")

    async def test_old_private_keys_are_gone_from_the_store_files(self) -> None:
        bob = await self.manager("bob")
        store = self.stores["bob"]
        rows: list[bytes] = []  # every sealed identity row written, in order
        real = store.commit

        async def grab() -> None:
            def op(conn: sqlite3.Connection) -> None:
                (value,) = conn.execute("SELECT value FROM kv WHERE kind = 'identity'").fetchone()
                if not rows or rows[-1] != bytes(value):
                    rows.append(bytes(value))

            await store._run(op)

        def commit(*args: Any, **kwargs: Any) -> Deferred[None]:
            return real(*args, **kwargs).addCallback(lambda _: Deferred.fromCoroutine(grab()))

        store.commit = commit  # type: ignore[method-assign]
        await grab()
        await bob.publish_keys()
        old_spk, old_kem = bob.ident.signed_prekey, bob.ident.kem_last_resort
        self.clock.advance(POLICY.prekey_rotation)
        await bob.maintain_keys()
        holding = list(rows)  # each of these holds the old pair (current, then previous)
        self.assertGreaterEqual(len(holding), 3)
        # Without a checkpoint the WAL still has page images of those rows: the hazard.
        self.assertTrue(any(b[-32:] in raw_bytes(store.path) for b in holding[:-1]))
        self.clock.advance(POLICY.prekey_grace)
        await bob.maintain_keys()
        self.assertGreater(len(rows), len(holding))
        data = raw_bytes(store.path)
        self.assertTrue(rows[-1][-32:] in data, "the current row is in the files")
        gone = "a sealed row that held the old private keys is still in the files"
        for blob in holding:
            self.assertFalse(blob[-32:] in data or blob[40:80] in data, gone)
        for secret in (old_spk[1], old_kem[1]):
            self.assertFalse(secret in data, "a private key in clear in the files")
            self.assertNotIn(secret, bob.ident.to_bytes())
        await store.close()
        data = raw_bytes(store.path)
        for blob in holding:
            self.assertFalse(blob[-32:] in data, gone)

    async def test_rotation_at_login_when_due(self) -> None:
        bob = await self.manager("bob")
        await bob.publish_keys()
        first = self.bundle()
        await self.stores["bob"].close()
        # A week (and a bit) later the client starts again: rotated before it publishes.
        self.clock.advance(POLICY.prekey_rotation + 10)
        bob = await self.manager("bob")
        await bob.publish_keys()
        self.assertNotEqual(self.bundle().signed_prekey, first.signed_prekey)
        self.assertNotEqual(self.bundle().kem_last_resort, first.kem_last_resort)
        self.assertEqual(bob.ident.previous_retired, int(self.clock.seconds()))
        # Not due: the same bundle again (the server pushes nothing for a re-publish).
        self.clock.advance(DAY)
        await bob.publish_keys()
        self.assertEqual(len(self.net.published), 2)

    async def test_an_unpublished_rotation_keeps_the_previous_keys(self) -> None:
        """Offline at the rotation: the grace period starts only once initiators can
        fetch the new keys, and the timer retries."""
        bob = await self.manager("bob")
        await bob.publish_keys()
        old = self.bundle()
        timer = self.timer(bob)
        self.net.offline = True
        await self.advance(timer, POLICY.prekey_rotation)
        self.assertTrue(bob.ident.has_previous)
        self.assertEqual(bob.ident.previous_retired, 0)
        assert timer.call is not None
        self.assertEqual(timer.call.getTime() - self.clock.seconds(), RETRY)
        await self.advance(timer, 2 * POLICY.prekey_grace)
        # Backed off: about hourly tries, not one a minute for six days.
        self.assertLess(timer.failures, 2 * POLICY.prekey_grace / MAX_SLEEP + 7)
        self.assertTrue(bob.ident.has_previous)  # never deleted while unpublished
        self.assertEqual(self.bundle(), old)
        self.net.offline = False
        await self.advance(timer, MAX_SLEEP)
        self.assertNotEqual(self.bundle(), old)
        # The grace period starts now, not at the rotation a week of retries ago.
        self.assertGreater(bob.ident.previous_retired, self.clock.seconds() - MAX_SLEEP)
        await bob.receive(self.first_message(old, "sent while bob was offline"))
        self.assertEqual(self.received("bob"), ["sent while bob was offline"])


class PolicyTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        p = RotationPolicy()
        p.check()
        self.assertEqual((p.prekey_rotation, p.prekey_grace), (7 * DAY, 3 * DAY))
        self.assertEqual((p.room_key_messages, p.room_key_age), (100, DAY))

    def test_refused_settings(self) -> None:
        for bad in (
            RotationPolicy(prekey_rotation=60),
            RotationPolicy(prekey_grace=7 * DAY),  # only one previous pair is kept
            RotationPolicy(prekey_grace=10),
            RotationPolicy(room_key_messages=0),
            RotationPolicy(room_key_age=1),
        ):
            self.assertRaises(ValueError, bad.check)

    def test_prekeys_due(self) -> None:
        ident = DeviceIdentity.generate(0, 0, now=int(T0))
        p = RotationPolicy()
        self.assertFalse(p.prekeys_due(ident, T0 + p.prekey_rotation - 1))
        self.assertTrue(p.prekeys_due(ident, T0 + p.prekey_rotation))
        self.assertTrue(p.prekeys_due(ident, T0 - p.prekey_rotation - 1))  # clock was wrong
        self.assertEqual(p.next_prekey_event(ident), T0 + p.prekey_rotation)
        ident.rotate_prekeys(int(T0) + 10)
        self.assertFalse(p.prekeys_due(ident, T0 + 100 * p.prekey_rotation))
        self.assertEqual(p.next_prekey_event(ident), 0.0)  # publish the new keys now
        ident.published(int(T0) + 20)
        self.assertEqual(p.next_prekey_event(ident), T0 + 20 + p.prekey_grace)
        old = DeviceIdentity.from_bytes(ident.to_bytes())
        old.prekeys_created = 0  # a state from before rotation existed
        old.expire_previous(T0 + 20 + p.prekey_grace, p.prekey_grace)
        self.assertTrue(p.prekeys_due(old, T0))


class EncryptionConfigTests(SynchronousTestCase):
    """The ``[encryption]`` section of the client configuration (conf/client.ini)."""

    def test_example_file_documents_the_defaults(self) -> None:
        path = Path(__file__).resolve().parents[3] / "conf" / "client.ini"
        text = path.read_text(encoding="utf-8")
        section = text.split("[encryption]\n", 1)[1].split("\n[", 1)[0]
        settings = [line[2:] for line in section.splitlines() if " = " in line]
        self.assertEqual(len(settings), 4)
        config = ClientConfig.from_string("[encryption]\n" + "\n".join(settings) + "\n")
        self.assertEqual(config.encryption.rotation, RotationPolicy())
        self.assertEqual(ClientConfig.from_string(text).encryption.rotation, RotationPolicy())

    def test_values(self) -> None:
        config = ClientConfig.from_string(
            "[encryption]\nprekey_rotation = 2w\nprekey_grace = 36h\n"
            "room_key_messages = 50\nroom_key_age = 3600\n"
        )
        self.assertEqual(
            config.encryption.rotation,
            RotationPolicy(prekey_rotation=14 * DAY, prekey_grace=1.5 * DAY,
                           room_key_messages=50, room_key_age=3600),
        )

    def test_errors_say_what_to_write(self) -> None:
        for text, says in (
            ("prekey_rotation = weekly", "a duration like"),
            ("prekey_grace = 8d", "shorter than prekey_rotation"),
            ("room_key_messages = 0", "between 1 and"),
            ("room_key_messages = lots", "a number of messages"),
            ("room_key_age = 5s", "room_key_age"),
            ("rotation = 7d", "unknown key"),
        ):
            with self.assertRaises(ConfigError) as caught:
                ClientConfig.from_string(f"[encryption]\n{text}\n")
            self.assertIn(says, str(caught.exception))
            self.assertIn("[encryption]", str(caught.exception))


class RoomKeyRotationTests(Devices):
    async def room(self, policy: RotationPolicy) -> tuple[E2EE, E2EE, E2EE]:
        alice = await self.manager("alice", policy)
        bob, carol = await self.manager("bob"), await self.manager("carol")
        for m in (alice, bob, carol):
            await m.publish_keys()
        self.net.rooms[ROOM] = members = {"alice", "bob", "carol"}
        for m in (alice, bob, carol):
            await m.joined_room(ROOM, members)
        await self.net.deliver()
        return alice, bob, carol

    def reader(self, stolen: bytes, holder: str) -> RoomSession:
        """What someone who copied ``holder``'s room state can decrypt Alice's messages
        with: her chain as the holder had it (or, from Alice's own state, her key)."""
        state = RoomSession.from_bytes(stolen)
        if holder == "alice":
            reader = RoomSession(ROOM, "eve", "x")
            reader.add_distribution("alice", "d1", state.distribution().to_bytes())
            return reader
        return state

    def read(self, reader: RoomSession, push: dict[str, Any]) -> str:
        env = Envelope.from_bytes(base64.b64decode(push["envelope"]))
        plain = reader.decrypt("alice", "d1", env.header, env.ciphertext)
        body = pl.decode(plain)
        assert isinstance(body, pl.Text)
        return body.body

    async def send(self, alice: E2EE, *bodies: str) -> list[dict[str, Any]]:
        start = len(self.net.room_pushes)
        for body in bodies:
            await alice.send_text(f"room:{ROOM}", body)
        await self.net.deliver()
        return self.net.room_pushes[start:]

    async def test_a_copied_sender_key_stops_reading_after_the_message_bound(self) -> None:
        alice, bob, _ = await self.room(RotationPolicy(room_key_messages=3))
        epoch = alice.rooms[ROOM].epoch
        copies = {
            "alice": alice.rooms[ROOM].to_bytes(),  # the sender's own device
            "bob": bob.rooms[ROOM].to_bytes(),  # a member's device
        }
        within = await self.send(alice, "m1", "m2", "m3")
        after = await self.send(alice, "m4", "m5", "m6")
        self.assertEqual(alice.rooms[ROOM].epoch, epoch + 1)  # type: ignore[operator]
        for holder, stolen in copies.items():
            reader = self.reader(stolen, holder)
            self.assertEqual([self.read(reader, p) for p in within], ["m1", "m2", "m3"])
            for push in after:
                self.assertRaises(StateError, self.read, reader, push)
        for member in ("bob", "carol"):
            self.assertEqual(self.received(member), ["m1", "m2", "m3", "m4", "m5", "m6"])
            self.assertEqual(self.refused(member), [])

    async def test_a_copied_sender_key_stops_reading_after_the_time_bound(self) -> None:
        policy = RotationPolicy(room_key_messages=1000, room_key_age=3600)
        alice, bob, _ = await self.room(policy)
        copies = {"alice": alice.rooms[ROOM].to_bytes(), "bob": bob.rooms[ROOM].to_bytes()}
        within = await self.send(alice, "early")
        self.clock.advance(3599)
        within += await self.send(alice, "still the same key")
        self.clock.advance(1)
        after = await self.send(alice, "an hour later", "and more")
        for holder, stolen in copies.items():
            reader = self.reader(stolen, holder)
            self.assertEqual([self.read(reader, p) for p in within],
                             ["early", "still the same key"])
            for push in after:
                self.assertRaises(StateError, self.read, reader, push)
        for member in ("bob", "carol"):
            self.assertEqual(self.received(member),
                             ["early", "still the same key", "an hour later", "and more"])

    async def test_the_new_sender_key_reaches_members_pairwise(self) -> None:
        alice, bob, carol = await self.room(RotationPolicy(room_key_messages=2))
        await self.send(alice, "a", "b")
        sent = len(self.net.queue)
        await alice.send_text(f"room:{ROOM}", "c")
        # One distribution per other member (pairwise, in order before the room message).
        kinds = [("room" in p["to"], p["to"].get("user")) for _, p in self.net.queue[sent:]]
        self.assertEqual(kinds, [(False, "bob"), (False, "carol"), (True, None), (True, None)])
        await self.net.deliver()
        for m in (bob, carol):
            self.assertEqual(sorted(m.rooms[ROOM].chains[("alice", "d1")]), [0, 1])
        saved = dict(await self.stores["alice"].items("roomown"))[ROOM]
        self.assertEqual(RoomSession.from_bytes(saved).epoch_started, int(self.clock.seconds()))
