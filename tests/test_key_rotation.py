"""Key rotation through a real server: Bob's signed pre-keys, a room member's sender key.

Bob's device is moved forward in time by its E2EE manager's clock (the one the schedule
reads): nothing waits a week.  The schedule itself (timer, grace period, deletion from
the store's files) is unit-tested on a test clock in shtalk/test/client/test_client_rotation.py.
"""

from __future__ import annotations

import base64
import time

from shtalk.client.events import BadMessage
from shtalk.client.rotation import RotationPolicy
from shtalk.crypto import Envelope, PreKeyBundle, RoomSession, Session, StateError
from shtalk.wire.pushes import MessagePush, ServerPush
from shtalk.wire.requests import KeysFetch
from tests.clientkit import Person
from tests.harness import fresh_name
from tests.test_client_e2e import E2ETestCase

POLICY = RotationPolicy()


class Shifted:
    """A clock ``offset`` seconds ahead of the real one."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


class RotationSystemTestCase(E2ETestCase):
    timeout = 180

    async def fetch(self, who: Person, owner: Person) -> PreKeyBundle:
        """The base bundle the directory hands out for ``owner``'s device now."""
        assert who.client
        reply = await who.client.session.request(
            KeysFetch(user=owner.username, device=owner.device))
        return PreKeyBundle.from_bytes(base64.b64decode(reply["devices"][0]["bundle"]))


class PrekeyRotationTests(RotationSystemTestCase):
    async def test_rotation_grace_period_and_a_fresh_fetch(self) -> None:
        alice, bob, dave = await self.person(), await self.person(), await self.person()
        # Alice and Dave fetch Bob's bundle now and hold it (last-resort keys only: both
        # keys that rotate are the ones used).
        old = await self.fetch(alice, bob)
        self.assertEqual(await self.fetch(dave, bob), old)
        # Bob's device comes back a week and a day later: it rotates at login.
        clock = Shifted()
        clock.offset = POLICY.prekey_rotation + 86400
        await bob.close()
        client = await bob.open()
        client.e2ee.clock = clock
        await client.start()
        bob_e2ee = client.e2ee
        new = await self.fetch(dave, bob)
        self.assertEqual(new.identity, old.identity)
        self.assertNotEqual(new.signed_prekey.key_id, old.signed_prekey.key_id)
        self.assertNotEqual(new.signed_prekey.public, old.signed_prekey.public)
        self.assertNotEqual(new.kem_last_resort.key_id, old.kem_last_resort.key_id)
        self.assertEqual(new, bob_e2ee.ident.public_bundle().base())
        # Inside the grace period Alice starts a session from the bundle she held.
        self.start_session(alice, bob, old)
        assert alice.client
        await alice.client.send(f"user:{bob.username}", "made with your old bundle")
        got = await bob.wait_messages(1, timeout=30)
        self.assertEqual(got[0].body, "made with your old bundle")
        await client.send(f"user:{alice.username}", "and it works both ways")
        await alice.wait_messages(1, timeout=30)
        # The grace period ends: the old private keys go.
        clock.offset += POLICY.prekey_grace
        await bob_e2ee.maintain_keys()
        self.assertFalse(bob_e2ee.ident.has_previous)
        # A first message from the old bundle is refused, with a reason, and not shown.
        self.start_session(dave, bob, old)
        assert dave.client
        await dave.client.send(f"user:{bob.username}", "too late")
        bad = await bob.wait_for(
            lambda: [e for e in bob.events if isinstance(e, BadMessage)], 30, "the refusal"
        )
        self.assertEqual(bad[0].sender, dave.username)
        self.assertIn("no longer has", bad[0].reason)
        self.assertEqual([m.body for m in bob.received()], ["made with your old bundle"])
        # A fresh fetch gives the new keys, and a session from it works.
        self.assertEqual(await self.fetch(dave, bob), new)
        erin = await self.person()
        assert erin.client
        await erin.client.send(f"user:{bob.username}", "fetched today")
        got = await bob.wait_messages(2, timeout=30)
        self.assertEqual(got[-1].body, "fetched today")
        # What the refusal tells Bob to do mends Dave's stale session.
        await client.send(f"user:{dave.username}", "write to dave, as the refusal says")
        await dave.wait_messages(1, timeout=30)
        await dave.client.send(f"user:{bob.username}", "now it works")
        got = await bob.wait_messages(3, timeout=30)
        self.assertEqual(got[-1].body, "now it works")

    def start_session(self, who: Person, owner: Person, bundle: PreKeyBundle) -> None:
        """What ``who``'s client holds after fetching ``bundle`` earlier: a session in
        its first-message state (the client makes one from a fetch and keeps it)."""
        assert who.client
        e2ee = who.client.e2ee
        e2ee.directory.pin(owner.username, owner.device, bundle.identity)
        e2ee.sessions[(owner.username, owner.device)] = [Session.initiate(e2ee.ident, bundle)]


class RoomSenderKeyRotationTests(RotationSystemTestCase):
    async def test_a_copied_sender_key_stops_reading_after_the_bound(self) -> None:
        alice = await self.person(rotation=RotationPolicy(room_key_messages=3))
        bob, carol = await self.person(), await self.person()
        assert alice.client and bob.client and carol.client
        room = fresh_name("room")
        await alice.client.create_room(room)
        await bob.client.join_room(room)
        await carol.client.join_room(room)
        a_room, b_rooms = alice.client.e2ee.rooms[room], bob.client.e2ee.rooms
        c_rooms, a_key = carol.client.e2ee.rooms, (alice.username, alice.device)
        # Alice's last rotation is the one for Carol's join: Carol's first key from her.
        await carol.wait_for(
            lambda: room in c_rooms and c_rooms[room].chains.get(a_key), 30,
            "Alice's sender key at Carol",
        )
        epoch = max(c_rooms[room].chains[a_key])
        self.assertEqual(a_room.epoch, epoch)
        await bob.wait_for(
            lambda: epoch in b_rooms[room].chains.get(a_key, {}), 30, "Alice's key at Bob"
        )
        copies = {
            "Alice's device": RoomSession.from_bytes(a_room.to_bytes()),
            "Bob's device": RoomSession.from_bytes(b_rooms[room].to_bytes()),
        }
        pushes: list[MessagePush] = []
        real = bob.client.session.on_push

        def tap(push: ServerPush) -> None:
            if isinstance(push, MessagePush) and push.to.room is not None:
                pushes.append(push)
            real(push)

        bob.client.session.on_push = tap
        bodies = [f"m{i}" for i in range(1, 7)]
        for body in bodies:
            await alice.client.send(f"room:{room}", body)
        conv = f"room:{room}"
        for member in (bob, carol):  # every current member reads all of them
            got = await member.wait_messages(6, conv, timeout=30)
            self.assertEqual([m.body for m in got], bodies)
        self.assertEqual(alice.client.e2ee.rooms[room].epoch, epoch + 1)
        self.assertEqual(len(pushes), 6)
        for holder, copy in copies.items():
            reader = copy
            if holder == "Alice's device":  # her own state: anyone can make a reader
                reader = RoomSession(room, "eve", "x")
                reader.add_distribution(alice.username, alice.device,
                                        copy.distribution().to_bytes())
            read = [self.open(reader, alice, p) for p in pushes]
            self.assertEqual(read[:3], [True] * 3, holder)  # within the bound: readable
            self.assertEqual(read[3:], [False] * 3, holder)  # after it: not

    def open(self, reader: RoomSession, sender: Person, push: MessagePush) -> bool:
        env = Envelope.from_bytes(base64.b64decode(push.envelope))
        try:
            reader.decrypt(sender.username, sender.device, env.header, env.ciphertext)
        except StateError:
            return False
        return True
