"""Two (and more) real headless clients talking end to end through a real server."""

from __future__ import annotations

import base64
import os
import shutil
from pathlib import Path

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from shtalk.client.e2ee import IdentityNotAccepted
from shtalk.client.events import BacklogDone, BadMessage, IdentityChanged, NewDevice
from shtalk.client.rotation import RotationPolicy
from tests.clientkit import Person
from tests.harness import ServerProcess, fresh_name, sleep


class E2ETestCase(TestCase):
    timeout = 120

    def setUp(self) -> None:
        self.server = ServerProcess()
        self.server.start()
        self.addCleanup(self.server.cleanup)
        self.people: list[Person] = []

    async def person(
        self,
        name: str | None = None,
        device: str = "laptop",
        register: bool = True,
        rotation: RotationPolicy | None = None,
    ) -> Person:
        home = self.mktemp()  # trial's temporary directory: nothing is left in /tmp
        os.makedirs(home)
        p = Person(self.server.port, name or fresh_name("p"), device, home=home)
        p.rotation = rotation
        self.people.append(p)
        self.addCleanup(lambda: Deferred.fromCoroutine(p.close()))
        if register:
            await p.register()
        else:
            await p.login()
        return p


class DirectMessageTests(E2ETestCase):
    async def test_both_ways(self) -> None:
        alice, bob = await self.person(), await self.person()
        assert alice.client and bob.client
        await alice.client.send(f"user:{bob.username}", "hello bob")
        got = await bob.wait_messages(1)
        self.assertEqual(
            (got[0].body, got[0].sender, got[0].conversation),
            ("hello bob", alice.username, f"user:{alice.username}"),
        )
        await bob.client.send(f"user:{alice.username}", "hello alice")
        got = await alice.wait_messages(1)
        self.assertEqual(got[0].body, "hello alice")
        for i in range(5):
            await alice.client.send(f"user:{bob.username}", f"more {i}")
        await bob.wait_messages(6)
        self.assertEqual([m.body for m in bob.received()][1:], [f"more {i}" for i in range(5)])
        history = await bob.client.history(f"user:{alice.username}")
        self.assertEqual([m.body for m in history][:2], ["hello bob", "hello alice"])

    async def test_offline_delivery_and_restarts(self) -> None:
        alice, bob = await self.person(), await self.person()
        assert alice.client and bob.client
        await alice.client.send(f"user:{bob.username}", "first")
        await bob.wait_messages(1)
        await bob.close()
        for i in range(3):
            await alice.client.send(f"user:{bob.username}", f"while away {i}")
        await bob.restart()
        got = await bob.wait_messages(4)
        self.assertEqual([m.body for m in got], ["first"] + [f"while away {i}" for i in range(3)])
        # Alice restarts in the middle of the conversation too.
        await alice.restart()
        assert alice.client and bob.client
        await alice.client.send(f"user:{bob.username}", "after restart")
        await bob.wait_messages(5)
        await bob.client.send(f"user:{alice.username}", "reply after restarts")
        got = await alice.wait_messages(1)
        self.assertEqual(got[-1].body, "reply after restarts")

    async def test_redelivery_after_a_stop_before_the_ack_is_quiet(self) -> None:
        """Stopped between the local commit and the ack: the server sends it again.

        The message key is spent, so the copy cannot be decrypted; it must be
        acknowledged without a "bad message" alarm and without a second copy.
        """
        alice, bob = await self.person(), await self.person()
        assert alice.client and bob.client
        await alice.client.send(f"user:{bob.username}", "first")
        await bob.wait_messages(1)
        bob.client.e2ee.ack = lambda seq: None  # the ack never leaves
        await alice.client.send(f"user:{bob.username}", "committed, not acked")
        await bob.wait_messages(2)
        await bob.restart()  # the backlog holds the message again
        assert bob.client
        await alice.client.send(f"user:{bob.username}", "after the restart")
        got = await bob.wait_messages(3)
        self.assertEqual(
            [m.body for m in got], ["first", "committed, not acked", "after the restart"]
        )
        self.assertEqual([e for e in bob.events if isinstance(e, BadMessage)], [])
        history = await bob.client.history(f"user:{alice.username}")
        self.assertEqual(
            sorted(m.body for m in history), ["after the restart", "committed, not acked", "first"]
        )
        backlogs = [e.count for e in bob.events if isinstance(e, BacklogDone)]
        self.assertEqual(backlogs[-1], 1)  # the unacknowledged one came back once
        # ... and was acknowledged this time: a further restart replays nothing.
        await bob.restart()
        await bob.wait_for(
            lambda: len([e for e in bob.events if isinstance(e, BacklogDone)]) > len(backlogs),
            what="the backlog",
        )
        self.assertEqual([e.count for e in bob.events if isinstance(e, BacklogDone)][-1], 0)
        self.assertEqual(len(bob.received()), 3)
        self.assertEqual([e for e in bob.events if isinstance(e, BadMessage)], [])

    async def test_out_of_order_delivery(self) -> None:
        alice, bob = await self.person(), await self.person()
        assert alice.client and bob.client
        await alice.client.send(f"user:{bob.username}", "m0")
        await bob.wait_messages(1)
        # Hold Bob's next pushes and hand them to his client reversed.
        held: list[dict[str, object]] = []
        real = bob.client.session.on_push
        bob.client.session.on_push = lambda push: (
            held.append(push) if push.get("type") == "message" else real(push)
        )
        for i in (1, 2, 3):
            await alice.client.send(f"user:{bob.username}", f"m{i}")
        await bob.wait_for(lambda: len(held) == 3, what="three held pushes")
        for push in reversed(held):
            real(push)
        got = await bob.wait_messages(4)
        self.assertEqual(sorted(m.body for m in got), ["m0", "m1", "m2", "m3"])

    async def test_multi_device(self) -> None:
        alice, bob = await self.person(), await self.person()
        bob2 = await self.person(bob.username, "phone", register=False)
        alice2 = await self.person(alice.username, "tablet", register=False)
        assert alice.client
        await alice.client.send(f"user:{bob.username}", "to both of bob's devices")
        await bob.wait_messages(1)
        await bob2.wait_messages(1)
        # Alice's other device sees what she sent, in the conversation with Bob.
        got = await alice2.wait_messages(1)
        self.assertEqual(
            (got[0].conversation, got[0].sender), (f"user:{bob.username}", alice.username)
        )

    async def test_identity_change_must_be_acknowledged(self) -> None:
        alice, bob = await self.person(), await self.person()
        assert alice.client
        await alice.client.send(f"user:{bob.username}", "before")
        await bob.wait_messages(1)
        # Bob loses his local store and logs in again on the same device id: new keys.
        await bob.close()
        shutil.rmtree(bob.home)
        os.makedirs(bob.home)
        await bob.login()
        assert bob.client
        await bob.client.send(f"user:{alice.username}", "new keys, same me")
        await alice.wait_for(
            lambda: any(isinstance(e, IdentityChanged) for e in alice.events), what="change"
        )
        with self.assertRaises(IdentityNotAccepted):
            await alice.client.send(f"user:{bob.username}", "blocked")
        number = alice.client.safety_number(bob.username, bob.device)
        self.assertEqual(len(number.replace(" ", "")), 60)
        await alice.client.accept_identity(bob.username)
        await alice.client.send(f"user:{bob.username}", "after accepting")
        got = await bob.wait_messages(2)  # "before" (old keys) and this one
        self.assertEqual(got[-1].body, "after accepting")
        # Someone who never talked to Bob starts a session from the directory: the
        # one-time keys of Bob's old identity must be gone from it.
        carol = await self.person()
        assert carol.client
        await carol.client.send(f"user:{bob.username}", "hello new bob")
        got = await bob.wait_messages(3)
        self.assertEqual(got[-1].body, "hello new bob")


class RoomTests(E2ETestCase):
    async def test_room_join_leave_kick(self) -> None:
        alice, bob, carol = await self.person(), await self.person(), await self.person()
        assert alice.client and bob.client and carol.client
        room = fresh_name("room")
        await alice.client.create_room(room)
        await bob.client.join_room(room)
        await carol.client.join_room(room)
        await sleep(0.5)
        await alice.client.send(f"room:{room}", "hello room")
        await bob.wait_messages(1, f"room:{room}")
        await carol.wait_messages(1, f"room:{room}")
        await bob.client.send(f"room:{room}", "bob here")
        await alice.wait_messages(1, f"room:{room}")
        await carol.wait_messages(2, f"room:{room}")
        # Capture what the server hands Bob from now on, to replay to Carol later.
        captured: list[dict[str, object]] = []
        real = bob.client.session.on_push

        def tap(push: dict[str, object]) -> None:
            if push.get("type") == "message":
                captured.append(push)
            real(push)

        bob.client.session.on_push = tap
        await alice.client.kick(room, carol.username)
        await sleep(0.5)
        await alice.client.send(f"room:{room}", "carol must not read this")
        await bob.wait_for(
            lambda: any(m.body == "carol must not read this" for m in bob.received()),
            what="the post-kick message",
        )
        assert carol.client
        before = len(carol.received())
        for push in captured:
            carol.client.e2ee._pending_room.clear()
            await carol.client.e2ee.receive(dict(push))
        await carol.client.e2ee.expire_held()
        self.assertEqual(len(carol.received()), before)
        self.assertNotIn("carol must not read this", [m.body for m in carol.received()])
        # Leave: Bob goes; Alice's next message is not for him.
        await bob.client.leave_room(room)
        await sleep(0.3)
        await alice.client.send(f"room:{room}", "after bob left")
        await sleep(0.5)
        self.assertNotIn("after bob left", [m.body for m in bob.received()])

    async def test_late_joiner_cannot_read_earlier(self) -> None:
        alice, bob = await self.person(), await self.person()
        assert alice.client and bob.client
        room = fresh_name("room")
        await alice.client.create_room(room)
        await alice.client.send(f"room:{room}", "before bob")
        await bob.client.join_room(room)
        await sleep(0.5)
        await alice.client.send(f"room:{room}", "after bob joined")
        got = await bob.wait_messages(1, f"room:{room}")
        self.assertEqual([m.body for m in got], ["after bob joined"])


class DisappearingTests(E2ETestCase):
    async def test_timer_deletes_on_both_sides(self) -> None:
        alice, bob = await self.person(), await self.person()
        assert alice.client and bob.client
        conv = f"user:{bob.username}"
        await alice.client.set_timer(conv, 2)
        await alice.client.send(conv, "this will vanish")
        got = await bob.wait_messages(1)
        self.assertIsNotNone(got[0].expires_at)
        self.assertEqual(len(await bob.client.history(f"user:{alice.username}")), 1)
        await sleep(2.5)
        self.assertEqual(await alice.client.history(conv), [])
        self.assertEqual(await bob.client.history(f"user:{alice.username}"), [])
        assert bob.store and alice.store
        await bob.store.purge_expired(10**10)
        self.assertEqual(await bob.store.search("vanish"), [])


class AtRestTests(E2ETestCase):
    async def test_server_files_hold_no_marker_and_no_private_key(self) -> None:
        from shtalk.crypto import primitives as P

        alice, bob, carol = await self.person(), await self.person(), await self.person()
        assert alice.client and bob.client and carol.client
        marker = "MARKER-" + fresh_name("m")
        room = fresh_name("room")
        await alice.client.create_room(room)
        await bob.client.join_room(room)
        await carol.client.join_room(room)
        await sleep(0.5)
        await carol.close()  # offline: her copies stay queued on the server
        for i in range(10):
            await alice.client.send(f"user:{bob.username}", f"{marker} dm {i}")
            await alice.client.send(f"room:{room}", f"{marker} room {i}")
        await bob.wait_messages(20)
        self.assertEqual(len(await bob.client.search(marker)), 20)
        secrets_ = []
        for p in (alice, bob):
            assert p.client
            ident = p.client.e2ee.ident
            secrets_ += [
                P.signing_private_bytes(ident.signing_key),
                P.x25519_private_bytes(ident.dh_key),
                ident.signed_prekey[1],
                ident.kem_last_resort[1],
            ]
        data_dir = self.server.data_dir
        paths = [os.path.join(data_dir, n) for n in os.listdir(data_dir)]
        paths += [str(self.server.log_path)]
        dumped = b"".join(Path(path).read_bytes() for path in paths if os.path.isfile(path))
        self.assertIn(b"shtalk", dumped)  # we did read the files
        self.assertNotIn(marker.encode(), dumped)
        for s in secrets_:
            self.assertNotIn(s, dumped)
        # The clients' own files are sealed too.
        for p in (alice, bob):
            local = b"".join(
                Path(p.db + suffix).read_bytes()
                for suffix in ("", "-wal", "-shm")
                if os.path.exists(p.db + suffix)
            )
            self.assertNotIn(marker.encode(), local)


class TrustAndTamperingTests(E2ETestCase):
    async def test_tampered_envelope_is_reported_never_shown(self) -> None:
        alice, bob = await self.person(), await self.person()
        assert alice.client and bob.client
        await alice.client.send(f"user:{bob.username}", "genuine")
        await bob.wait_messages(1)
        held: list[dict[str, object]] = []
        real = bob.client.session.on_push
        bob.client.session.on_push = lambda push: (
            held.append(push) if push.get("type") == "message" else real(push)
        )
        await alice.client.send(f"user:{bob.username}", "will be tampered with")
        await bob.wait_for(lambda: held, what="the held push")
        push = dict(held[0])
        raw = bytearray(base64.b64decode(str(push["envelope"])))
        raw[-10] ^= 0x01  # one bit of the signature
        push["envelope"] = base64.b64encode(bytes(raw)).decode()
        real(push)
        await bob.wait_for(
            lambda: any(isinstance(e, BadMessage) for e in bob.events), what="BadMessage"
        )
        self.assertEqual([m.body for m in bob.received()], ["genuine"])
        # The untouched original still decrypts: the failure changed no state.
        real(held[0])
        got = await bob.wait_messages(2)
        self.assertEqual(got[-1].body, "will be tampered with")

    async def test_new_device_is_shown_and_verification_marks(self) -> None:
        alice, bob = await self.person(), await self.person()
        assert alice.client and bob.client
        await alice.client.send(f"user:{bob.username}", "hi")
        await bob.wait_messages(1)
        bob2 = await self.person(bob.username, "phone", register=False)
        await sleep(0.3)
        await alice.client.send(f"user:{bob.username}", "hi again")
        await bob2.wait_messages(1)
        self.assertIn(NewDevice(bob.username, "phone"), alice.events)
        number_a = alice.client.safety_number(bob.username, "laptop")
        number_b = bob.client.safety_number(alice.username, "laptop")
        self.assertEqual(number_a, number_b)
        await alice.client.mark_verified(bob.username, "laptop")
        await bob.client.send(f"user:{alice.username}", "verified now")
        got = await alice.wait_messages(1)
        self.assertTrue(got[-1].verified)


class DeviceNoticeTests(E2ETestCase):
    async def test_device_notices_are_true(self) -> None:
        """A new device pins its account's existing devices silently; the account's other
        devices and its contacts hear of the new one at once, once; a contact who first
        meets someone with two devices hears of neither."""
        alice, bob = await self.person(), await self.person()
        assert alice.client and bob.client
        await alice.client.send(f"user:{bob.username}", "hi")
        await bob.wait_messages(1)
        bob2 = await self.person(bob.username, "phone", register=False)
        assert bob2.client
        news = NewDevice(bob.username, "phone")
        await bob.wait_for(lambda: news in bob.events, what="bob's notice of his phone")
        await alice.wait_for(lambda: news in alice.events, what="alice's notice of bob's phone")
        await alice.client.send(f"user:{bob.username}", "hi again")
        await bob2.wait_messages(1)
        await bob2.client.send(f"user:{alice.username}", "from the phone")
        await alice.wait_messages(1)
        self.assertEqual([e for e in alice.events if isinstance(e, NewDevice)], [news])
        self.assertEqual([e for e in bob.events if isinstance(e, NewDevice)], [news])
        self.assertEqual([e for e in bob2.events if isinstance(e, NewDevice)], [])
        carol = await self.person()
        assert carol.client
        await carol.client.send(f"user:{bob.username}", "hello both of you")
        await bob2.wait_messages(2)
        self.assertEqual([e for e in carol.events if isinstance(e, NewDevice)], [])
        # Met through a message from one device, then written to: the others are no news.
        dave = await self.person()
        assert dave.client
        await bob2.client.send(f"user:{dave.username}", "hi dave, from my phone")
        await dave.wait_messages(1)
        await dave.client.send(f"user:{bob.username}", "hello bob")
        await bob.wait_for(lambda: any(m.body == "hello bob" for m in bob.received()),
                           what="dave's message")
        self.assertEqual([e for e in dave.events if isinstance(e, NewDevice)], [])


class ServerQueueExpiryTests(E2ETestCase):
    async def test_expired_messages_never_reach_an_offline_device(self) -> None:
        alice, bob = await self.person(), await self.person()
        assert alice.client
        conv = f"user:{bob.username}"
        await alice.client.send(conv, "hello")
        await bob.wait_messages(1)
        await bob.close()
        await alice.client.set_timer(conv, 1)
        await alice.client.send(conv, "gone before bob is back")
        await sleep(2.0)
        await bob.restart()
        await sleep(1.0)
        self.assertEqual([m.body for m in bob.received()], ["hello"])
