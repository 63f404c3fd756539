"""The contract of IStore: one suite of test methods run against every backend.

``StoreContract`` is a mixin: ``shtalk.test.server.test_store`` runs it on the SQLite store
(real files, real threads), ``shtalk.test.server.test_store_memory`` on the in-memory one.  A
behaviour a caller can see belongs here, so the two stores cannot drift apart; what
only one backend has (group commit, files, encryption at rest) is tested beside it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.internet.defer import Deferred, DeferredList, ensureDeferred, gatherResults
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from shtalk.server.eserver import Conflict, TokenReuse, TokenRevoked, TokenUnknown
from shtalk.server.iserver import ICodeStore, IStore
from shtalk.server.store.memory import MemoryStore
from shtalk.server.store.pg.store import PostgresStore
from shtalk.server.store.records import (
    CODE_NONE,
    CODE_OK,
    CODE_WRONG,
    AppendResult,
    NewMessage,
    OneTimeKey,
    TotpRecord,
    User,
)
from shtalk.server.store.sql.prekeys import MAX_ONE_TIME_KEYS
from shtalk.server.store.sqlite import SQLiteStore

NOW = 1_800_000_000.0
DAY = 24 * 3600.0

Store = SQLiteStore | MemoryStore | PostgresStore
S = TypeVar("S", bound=TestCase)

if TYPE_CHECKING:
    _Base = TestCase
else:
    _Base = object


def async_test(
    f: Callable[[S], Coroutine[Any, Any, None]],
) -> Callable[[S], Deferred[None]]:
    """Let a test be an ``async def`` (trial wants a Deferred)."""

    @functools.wraps(f)
    def run(self: S) -> Deferred[None]:
        return ensureDeferred(f(self))

    return run


def msg(
    mailboxes: tuple[str, ...],
    sender: User,
    device: str,
    client_id: str,
    envelope: bytes | None = b"env",
    envelopes: dict[tuple[int, str], bytes] | None = None,
    target: str = "room:lobby",
    ts: int = int(NOW * 1000),
    expires_at: float | None = None,
) -> NewMessage:
    return NewMessage(
        mailboxes=mailboxes,
        sender_id=sender.id,
        sender_device=device,
        client_id=client_id,
        ts=ts,
        expires_at=expires_at,
        target=target,
        envelope=envelope,
        envelopes=envelopes or {},
    )


class StoreHelpers(_Base):
    """What every store test needs; a backend's base class provides ``open_store``
    and sets ``self.clock`` (a Clock at NOW) in setUp."""

    clock: Clock

    async def open_store(self) -> Any:
        raise NotImplementedError

    async def failure_of(self, d: Deferred[Any], *errors: type[BaseException]) -> BaseException:
        try:
            await d
        except errors as e:
            return e
        self.fail(f"no {errors} raised")

    async def user(self, store: Store, name: str, *devices: str) -> User:
        user = await store.create_user(name, name.lower(), f"{name}@example.org", b"h", "active")
        for dev in devices:
            await store.upsert_device(user.id, dev, f"{name}'s {dev}")
        return user

    async def setup_room(self) -> tuple[Any, User, User, int]:
        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1", "a2")
        bob = await self.user(store, "Bob", "b1")
        room = await store.create_room("Lobby", "lobby", alice.id, False)
        await store.add_member(room.id, bob.id, "member")
        return store, alice, bob, room.id

    async def seqs(self, store: Store, user: User, device: str) -> list[int]:
        return [m.seq for m in await store.pending(user.id, device)]


class AccountContract(StoreHelpers):
    """Users, devices, refresh-token families."""

    @async_test
    async def test_users(self) -> None:
        store = await self.open_store()
        alice = await store.create_user("Alice", "alice", "a@example.org", b"hash", "active")
        self.assertEqual(
            (alice.name, alice.key, alice.pw_hash, alice.created), ("Alice", "alice", b"hash", NOW)
        )
        await self.failure_of(
            store.create_user("ALICE", "alice", "x@example.org", b"h", "active"), Conflict
        )
        bob = await store.create_user("Bob", "bob", "b@example.org", b"h2", "pending")
        self.assertEqual(await store.user_by_key("alice"), alice)
        self.assertEqual(await store.user_by_id(bob.id), bob)
        self.assertIsNone(await store.user_by_key("carol"))
        self.assertIsNone(await store.user_by_id(9999))
        self.assertEqual(
            await store.users_by_ids([bob.id, alice.id, 9999, bob.id]),
            {alice.id: alice, bob.id: bob},
        )
        self.assertEqual(await store.users_by_ids([]), {})

    @async_test
    async def test_refusal_does_not_undo_batch_neighbours(self) -> None:
        store = await self.open_store()
        results = await gatherResults(
            [
                store.create_user("A", "a", "", b"", "active").addCallback(lambda u: u.key),
                store.create_user("A", "a", "", b"", "active").addErrback(
                    lambda f: f.trap(Conflict)
                ),
                store.create_user("B", "b", "", b"", "active").addCallback(lambda u: u.key),
            ]
        )
        self.assertEqual(results, ["a", Conflict, "b"])
        self.assertEqual((await store.stats())["users"], 2)

    @async_test
    async def test_devices(self) -> None:
        store = await self.open_store()
        alice = await self.user(store, "Alice")
        dev = await store.upsert_device(alice.id, "laptop", "Laptop")
        self.clock.advance(10)
        again = await store.upsert_device(alice.id, "laptop", "Work laptop")
        self.assertEqual((again.label, again.created), ("Work laptop", dev.created))
        await store.upsert_device(alice.id, "phone", "Phone")
        self.assertEqual(
            [(d.device_id, d.label) for d in await store.devices(alice.id)],
            [("laptop", "Work laptop"), ("phone", "Phone")],
        )

    @async_test
    async def test_refresh_rotation_and_reuse(self) -> None:
        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1")
        await store.create_session("fam", alice.id, "a1", b"t1", NOW + DAY)
        s = await store.rotate_refresh(b"t1", b"t2", NOW + 2 * DAY, NOW)
        self.assertEqual(
            (s.family, s.user_id, s.device_id, s.expires, s.revoked),
            ("fam", alice.id, "a1", NOW + 2 * DAY, False),
        )
        self.assertEqual(await store.session("fam"), s)
        await store.rotate_refresh(b"t2", b"t3", NOW + 2 * DAY, NOW)
        # t1 comes back: reuse; the whole family goes, including the live t3.
        await self.failure_of(store.rotate_refresh(b"t1", b"t9", NOW + 2 * DAY, NOW), TokenReuse)
        session = await store.session("fam")
        assert session is not None
        self.assertTrue(session.revoked)
        await self.failure_of(store.rotate_refresh(b"t3", b"t4", NOW + 2 * DAY, NOW), TokenRevoked)
        await self.failure_of(
            store.rotate_refresh(b"nope", b"t5", NOW + 2 * DAY, NOW), TokenUnknown
        )
        stats = await store.stats()
        self.assertEqual(stats["refresh_tokens"], 3)  # only hashes, t1..t3

    @async_test
    async def test_expired_and_revoked_tokens(self) -> None:
        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1", "a2")
        await store.create_session("f1", alice.id, "a1", b"t1", NOW + 10)
        await self.failure_of(store.rotate_refresh(b"t1", b"t2", NOW + DAY, NOW + 11), TokenUnknown)
        # An expired token does not burn: it is not "used", just refused.
        s = await store.session("f1")
        assert s is not None
        self.assertFalse(s.revoked)
        await store.create_session("f2", alice.id, "a2", b"u1", NOW + DAY)
        await store.revoke_session("f2")
        await self.failure_of(store.rotate_refresh(b"u1", b"u2", NOW + DAY, NOW), TokenRevoked)
        await store.create_session("f3", alice.id, "a1", b"v1", NOW + DAY)
        await store.revoke_user_sessions(alice.id)
        s3 = await store.session("f3")
        assert s3 is not None
        self.assertTrue(s3.revoked)
        self.assertIsNone(await store.session("nope"))

    @async_test
    async def test_concurrent_rotation_exactly_one_wins(self) -> None:
        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1")
        await store.create_session("fam", alice.id, "a1", b"t1", NOW + DAY)
        outcomes = await gatherResults(
            [
                store.rotate_refresh(b"t1", new, NOW + DAY, NOW)
                .addCallback(lambda s: "won")
                .addErrback(lambda f: f.trap(TokenReuse) and "reuse")
                for new in (b"x", b"y")
            ]
        )
        self.assertEqual(sorted(outcomes), ["reuse", "won"])
        s = await store.session("fam")
        assert s is not None
        self.assertTrue(s.revoked)


class RoomContract(StoreHelpers):
    @async_test
    async def test_rooms_members_invites(self) -> None:
        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1")
        bob = await self.user(store, "Bob", "b1")
        carol = await self.user(store, "Carol")
        lobby = await store.create_room("Lobby", "lobby", alice.id, False)
        secret = await store.create_room("Secret", "secret", alice.id, True)
        self.assertEqual(
            (lobby.owner_id, lobby.invite_only, secret.invite_only), (alice.id, False, True)
        )
        await self.failure_of(store.create_room("LOBBY", "lobby", bob.id, False), Conflict)
        self.assertEqual(await store.room_by_key("secret"), secret)
        self.assertIsNone(await store.room_by_key("nope"))
        self.assertEqual(
            [(m.user_name, m.role) for m in await store.members(lobby.id)], [("Alice", "owner")]
        )

        self.assertEqual(await store.rooms_visible_to(bob.id), [(lobby, 1, False)])
        self.assertEqual(
            await store.rooms_visible_to(alice.id), [(lobby, 1, True), (secret, 1, True)]
        )
        await store.add_invite(secret.id, bob.id, alice.id)
        await store.add_invite(secret.id, bob.id, alice.id)  # idempotent
        self.assertTrue(await store.has_invite(secret.id, bob.id))
        self.assertFalse(await store.has_invite(secret.id, carol.id))
        self.assertEqual(
            await store.rooms_visible_to(bob.id), [(lobby, 1, False), (secret, 1, False)]
        )
        await store.add_member(secret.id, bob.id, "member")
        await store.add_member(lobby.id, bob.id, "member")
        self.assertEqual(
            await store.rooms_visible_to(bob.id), [(lobby, 2, True), (secret, 2, True)]
        )
        self.assertEqual(await store.rooms_visible_to(carol.id), [(lobby, 2, False)])
        self.assertEqual(await store.rooms_of(bob.id), [lobby, secret])
        await store.set_role(lobby.id, bob.id, "admin")
        self.assertEqual(
            [(m.user_id, m.role) for m in await store.members(lobby.id)],
            [(alice.id, "owner"), (bob.id, "admin")],
        )
        await store.remove_member(secret.id, bob.id)
        self.assertFalse(await store.has_invite(secret.id, bob.id))
        self.assertEqual(await store.rooms_of(bob.id), [lobby])
        self.assertEqual(await store.rooms_visible_to(bob.id), [(lobby, 2, True)])
        # One cursor per (device, mailbox): a1 reads u:alice, r:lobby, r:secret;
        # b1 reads u:bob, r:lobby.
        self.assertEqual((await store.stats())["cursors"], 5)


class MessageContract(StoreHelpers):
    @async_test
    async def test_room_message_one_row_until_all_devices_ack(self) -> None:
        store, alice, bob, rid = await self.setup_room()
        box = f"r:{rid}"
        result = await store.append(msg((box,), alice, "a1", "c1", envelope=b"hello"))
        self.assertFalse(result.duplicate)
        (seq,) = result.seqs
        (stored,) = result.messages
        self.assertEqual((stored.seq, stored.mailbox, stored.envelope), (seq, box, b"hello"))
        self.assertEqual((await store.stats())["messages"], 1)
        self.assertEqual(await self.seqs(store, alice, "a1"), [])  # not to the sender device
        self.assertEqual(await self.seqs(store, alice, "a2"), [seq])
        (got,) = await store.pending(bob.id, "b1")
        self.assertEqual(got, stored)
        await store.ack(bob.id, "b1", [seq])
        self.assertEqual(await self.seqs(store, bob, "b1"), [])
        self.assertEqual((await store.stats())["messages"], 1)  # a2 has not acked yet
        await store.ack(alice.id, "a2", [seq])
        self.assertEqual((await store.stats())["messages"], 0)

    @async_test
    async def test_acks_are_cumulative_per_mailbox(self) -> None:
        store, alice, bob, rid = await self.setup_room()
        box = f"r:{rid}"
        seqs = [(await store.append(msg((box,), alice, "a1", f"c{i}"))).seqs[0] for i in range(5)]
        dm = await store.append(msg((f"u:{bob.id}",), alice, "a1", "dm", target="user:bob"))
        self.assertEqual(await self.seqs(store, bob, "b1"), [*seqs, dm.seqs[0]])
        await store.ack(bob.id, "b1", [seqs[2]])
        self.assertEqual(await self.seqs(store, bob, "b1"), [*seqs[3:], dm.seqs[0]])
        await store.ack(bob.id, "b1", [seqs[1]])  # never moves back
        self.assertEqual(await self.seqs(store, bob, "b1"), [*seqs[3:], dm.seqs[0]])
        await store.ack(bob.id, "b1", [dm.seqs[0], 10**9, seqs[4]])
        self.assertEqual(await self.seqs(store, bob, "b1"), [])
        await store.ack(alice.id, "a2", [seqs[3]])
        self.assertEqual(await self.seqs(store, alice, "a2"), [seqs[4]])
        self.assertEqual((await store.stats())["messages"], 1)

    @async_test
    async def test_ack_of_foreign_mailbox_ignored(self) -> None:
        store, alice, _, _ = await self.setup_room()
        carol = await self.user(store, "Carol", "c1")
        private = await store.create_room("Private", "private", alice.id, True)
        secret = await store.append(msg((f"r:{private.id}",), alice, "a1", "s"))
        await store.ack(carol.id, "c1", [secret.seqs[0]])
        await store.ack(carol.id, "nodevice", [secret.seqs[0]])
        self.assertEqual(await self.seqs(store, alice, "a2"), [secret.seqs[0]])
        self.assertEqual((await store.stats())["messages"], 1)

    @async_test
    async def test_direct_message_inboxes_and_partners(self) -> None:
        store, alice, bob, _ = await self.setup_room()
        carol = await self.user(store, "Carol", "c1")
        boxes = (f"u:{bob.id}", f"u:{alice.id}")
        r = await store.append(msg(boxes, alice, "a1", "dm1", target="user:bob"))
        self.assertEqual(len(r.seqs), 2)
        self.assertEqual(await self.seqs(store, bob, "b1"), [r.seqs[0]])
        self.assertEqual(await self.seqs(store, alice, "a2"), [r.seqs[1]])  # her other device
        self.assertEqual(await self.seqs(store, alice, "a1"), [])
        self.assertEqual(await store.dm_partners(alice.id), [bob.id])
        self.assertEqual(await store.dm_partners(bob.id), [alice.id])
        self.assertEqual(await store.dm_partners(carol.id), [])
        # Carol has one device: her copy in her own inbox is for nobody, not kept.
        r2 = await store.append(
            msg((f"u:{alice.id}", f"u:{carol.id}"), carol, "c1", "dm2", target="user:alice")
        )
        self.assertEqual(len(r2.seqs), 2)
        self.assertEqual((await store.stats())["messages"], 3)
        self.assertEqual(await store.dm_partners(alice.id), [bob.id, carol.id])
        # Room messages record no partners.
        self.assertEqual((await store.stats())["dm_partners"], 4)

    @async_test
    async def test_device_specific_envelopes(self) -> None:
        store, alice, bob, rid = await self.setup_room()
        await store.upsert_device(bob.id, "b2", "Bob's tablet")
        envelopes = {(bob.id, "b1"): b"for b1", (alice.id, "a2"): b"for a2"}
        r = await store.append(
            msg((f"r:{rid}",), alice, "a1", "c1", envelope=None, envelopes=envelopes)
        )
        (got,) = await store.pending(bob.id, "b1")
        self.assertEqual(got.envelope_for(bob.id, "b1"), b"for b1")
        self.assertEqual(got.envelopes, envelopes)
        self.assertEqual(await self.seqs(store, bob, "b2"), [])  # no envelope for b2
        await store.ack(bob.id, "b1", r.seqs)
        await store.ack(alice.id, "a2", r.seqs)
        # b2 never had it, so it does not hold the message back.
        stats = await store.stats()
        self.assertEqual((stats["messages"], stats["message_devices"]), (0, 0))

    @async_test
    async def test_common_envelope_with_overrides(self) -> None:
        store, alice, bob, rid = await self.setup_room()
        r = await store.append(
            msg(
                (f"r:{rid}",),
                alice,
                "a1",
                "c1",
                envelope=b"all",
                envelopes={(bob.id, "b1"): b"bob"},
            )
        )
        (for_bob,) = await store.pending(bob.id, "b1")
        (for_a2,) = await store.pending(alice.id, "a2")
        self.assertEqual(for_bob.envelope_for(bob.id, "b1"), b"bob")
        self.assertEqual(for_a2.envelope_for(alice.id, "a2"), b"all")
        await store.ack(bob.id, "b1", r.seqs)
        self.assertEqual((await store.stats())["messages"], 1)

    @async_test
    async def test_late_joiner_and_new_device_see_no_history(self) -> None:
        store, alice, bob, rid = await self.setup_room()
        carol = await self.user(store, "Carol", "c1")
        old = await store.append(msg((f"r:{rid}",), alice, "a1", "old"))
        old_dm = await store.append(msg((f"u:{bob.id}",), alice, "a1", "old-dm", target="user:bob"))
        await store.add_member(rid, carol.id, "member")
        await store.upsert_device(bob.id, "b2", "new")
        self.assertEqual(await self.seqs(store, carol, "c1"), [])
        self.assertEqual(await self.seqs(store, bob, "b2"), [])
        new = await store.append(msg((f"r:{rid}",), alice, "a1", "new"))
        self.assertEqual(await self.seqs(store, carol, "c1"), list(new.seqs))
        self.assertEqual(await self.seqs(store, bob, "b2"), list(new.seqs))
        self.assertEqual(
            await self.seqs(store, bob, "b1"), [old.seqs[0], old_dm.seqs[0], new.seqs[0]]
        )
        # Re-adding an existing member does not move their cursors.
        await store.add_member(rid, bob.id, "member")
        self.assertEqual(
            await self.seqs(store, bob, "b1"), [old.seqs[0], old_dm.seqs[0], new.seqs[0]]
        )

    @async_test
    async def test_removed_member_cursors_dropped(self) -> None:
        store, alice, bob, rid = await self.setup_room()
        r = await store.append(msg((f"r:{rid}",), alice, "a1", "c1"))
        await store.ack(alice.id, "a2", r.seqs)
        self.assertEqual((await store.stats())["messages"], 1)  # bob holds it back
        before = (await store.stats())["cursors"]
        await store.remove_member(rid, bob.id)
        stats = await store.stats()
        self.assertEqual(stats["cursors"], before - 1)
        self.assertEqual(stats["messages"], 0)  # nobody else waits for it
        self.assertEqual(await self.seqs(store, bob, "b1"), [])
        await store.append(msg((f"r:{rid}",), alice, "a1", "c2"))
        self.assertEqual(await self.seqs(store, bob, "b1"), [])

    @async_test
    async def test_duplicates_even_after_deletion(self) -> None:
        store, alice, bob, _ = await self.setup_room()
        boxes = (f"u:{bob.id}", f"u:{alice.id}")
        first = await store.append(msg(boxes, alice, "a1", "same", target="user:bob"))
        again = await store.append(msg(boxes, alice, "a1", "same", target="user:bob"))
        self.assertEqual(again, AppendResult(first.seqs, duplicate=True))
        other_device = await store.append(msg(boxes, alice, "a2", "same", target="user:bob"))
        self.assertFalse(other_device.duplicate)
        await store.ack(bob.id, "b1", [first.seqs[0], other_device.seqs[0]])
        await store.ack(alice.id, "a2", [first.seqs[1]])
        await store.ack(alice.id, "a1", [other_device.seqs[1]])
        self.assertEqual((await store.stats())["messages"], 0)
        retry = await store.append(msg(boxes, alice, "a1", "same", target="user:bob"))
        self.assertEqual(retry, AppendResult(first.seqs, duplicate=True))
        # Forgotten after the retention time.
        await store.purge_expired(NOW + 31 * DAY)
        late = await store.append(msg(boxes, alice, "a1", "same", target="user:bob"))
        self.assertFalse(late.duplicate)

    @async_test
    async def test_duplicates_within_one_batch(self) -> None:
        store, alice, _, rid = await self.setup_room()
        a, b = await gatherResults(
            [store.append(msg((f"r:{rid}",), alice, "a1", "x")) for _ in range(2)]
        )
        self.assertEqual((a.duplicate, b.duplicate, a.seqs), (False, True, b.seqs))

    @async_test
    async def test_expiry_and_retention(self) -> None:
        store, alice, bob, rid = await self.setup_room()
        box = f"r:{rid}"
        short = await store.append(msg((box,), alice, "a1", "short", expires_at=NOW + 60))
        old = await store.append(msg((box,), alice, "a1", "old", ts=int((NOW - 29 * DAY) * 1000)))
        keep = await store.append(msg((box,), alice, "a1", "keep"))
        self.assertEqual(
            await self.seqs(store, bob, "b1"), [short.seqs[0], old.seqs[0], keep.seqs[0]]
        )
        self.clock.advance(61)
        self.assertEqual(await self.seqs(store, bob, "b1"), [old.seqs[0], keep.seqs[0]])
        self.assertEqual(await store.purge_expired(NOW + 61), 1)
        self.assertEqual(await store.purge_expired(NOW + 2 * DAY), 1)  # "old" is past 30 days
        self.assertEqual(await store.purge_expired(NOW + 2 * DAY), 0)
        self.assertEqual((await store.stats())["messages"], 1)

    @async_test
    async def test_pending_waits_for_uncommitted_acks(self) -> None:
        store, alice, bob, rid = await self.setup_room()
        r = await store.append(msg((f"r:{rid}",), alice, "a1", "c1"))
        store.append(msg((f"r:{rid}",), alice, "a1", "c2"))  # keeps the writer busy
        acked = store.ack(bob.id, "b1", r.seqs)  # buffered, not yet written
        pending = [m.seq for m in await store.pending(bob.id, "b1")]
        self.assertNotIn(r.seqs[0], pending)
        self.assertTrue(acked.called)


class DirectoryContract(StoreHelpers):
    """The interfaces, devices going, the prekey directory, presence, moderation."""

    @async_test
    async def test_provides_the_interfaces(self) -> None:
        store = await self.open_store()
        self.assertTrue(verifyObject(IStore, store))
        self.assertTrue(verifyObject(ICodeStore, store.codes))

    @async_test
    async def test_email_of(self) -> None:
        store = await self.open_store()
        alice = await store.create_user("Alice", "alice", "Alice@Example.org", b"h", "active")
        self.assertEqual(await store.email_of(alice.id), "Alice@Example.org")
        self.assertIsNone(await store.email_of(9999))

    @async_test
    async def test_failed_writes_change_nothing(self) -> None:
        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1")
        await store.create_session("fam", alice.id, "a1", b"t1", NOW + DAY)
        await store.create_session("other", alice.id, "a1", b"u1", NOW + DAY)
        await self.failure_of(store.create_session("fam", alice.id, "a1", b"t9", NOW), Conflict)
        await self.failure_of(store.create_session("f9", alice.id, "a1", b"t1", NOW), Conflict)
        # The new token exists already: refused, and t1 was not burnt by the attempt.
        await self.failure_of(store.rotate_refresh(b"t1", b"u1", NOW + DAY, NOW), Conflict)
        s = await store.rotate_refresh(b"t1", b"t2", NOW + DAY, NOW)
        self.assertEqual((s.family, s.revoked), ("fam", False))
        stats = await store.stats()
        self.assertEqual((stats["sessions"], stats["refresh_tokens"]), (2, 3))
        await store.create_room("Lobby", "lobby", alice.id, False)
        await self.failure_of(store.create_room("lobby", "lobby", alice.id, True), Conflict)
        self.assertEqual((await store.stats())["rooms"], 1)

    @async_test
    async def test_remove_device(self) -> None:
        store, alice, bob, rid = await self.setup_room()
        await store.create_session("f1", bob.id, "b1", b"t1", NOW + DAY)
        await store.publish_keys(bob.id, "b1", b"bundle", [OneTimeKey("ec", 1, b"k")])
        await store.append(msg((f"r:{rid}",), alice, "a1", "c1"))
        cursors = (await store.stats())["cursors"]
        self.assertTrue(await store.remove_device(bob.id, "b1"))
        self.assertFalse(await store.remove_device(bob.id, "b1"))
        self.assertEqual(await store.devices(bob.id), [])
        self.assertEqual(await store.pending(bob.id, "b1"), [])
        self.assertEqual((await store.stats())["cursors"], cursors - 2)  # u:bob, r:lobby
        self.assertEqual(await store.claim_keys(bob.id, None), [])
        self.assertIsNone(await store.device_bundle(bob.id, "b1"))
        session = await store.session("f1")
        assert session is not None
        self.assertTrue(session.revoked)
        # The same device id made anew starts with no history and no keys.
        await store.upsert_device(bob.id, "b1", "again")
        self.assertEqual(await store.pending(bob.id, "b1"), [])
        self.assertEqual(await store.key_counts(bob.id, "b1"), {"ec": 0, "pq": 0})

    @async_test
    async def test_one_time_keys_handed_out_once(self) -> None:
        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1", "a2")
        keys = [OneTimeKey("ec", i, b"ec%d" % i) for i in (3, 1, 2)] + [OneTimeKey("pq", 7, b"pq")]
        counts, changed = await store.publish_keys(alice.id, "a1", b"B1", keys)
        self.assertEqual((counts, changed), ({"ec": 3, "pq": 1}, True))
        self.assertEqual(await store.publish_keys(alice.id, "a1", b"B1", []),
                         ({"ec": 3, "pq": 1}, False))  # same bundle: unchanged
        await store.publish_keys(alice.id, "a2", b"B2", [OneTimeKey("ec", 1, b"other")])
        self.assertEqual(await store.device_bundle(alice.id, "a1"), b"B1")
        first = await store.claim_keys(alice.id, None)
        self.assertEqual(
            [(c.device_id, c.bundle, c.one_time) for c in first],
            [("a1", b"B1", (OneTimeKey("ec", 1, b"ec1"), OneTimeKey("pq", 7, b"pq"))),
             ("a2", b"B2", (OneTimeKey("ec", 1, b"other"),))],
        )
        (second,) = await store.claim_keys(alice.id, "a1")
        self.assertEqual(second.one_time, (OneTimeKey("ec", 2, b"ec2"),))
        self.assertEqual(await store.key_counts(alice.id, "a1"), {"ec": 1, "pq": 0})
        # A claimed id published again is not handed out again.
        counts, _ = await store.publish_keys(alice.id, "a1", None, [OneTimeKey("ec", 1, b"x")])
        self.assertEqual(counts, {"ec": 1, "pq": 0})
        (third,) = await store.claim_keys(alice.id, "a1")
        self.assertEqual(third.one_time, (OneTimeKey("ec", 3, b"ec3"),))
        (empty,) = await store.claim_keys(alice.id, "a1")
        self.assertEqual((empty.bundle, empty.one_time), (b"B1", ()))
        self.assertEqual(await store.claim_keys(alice.id, "nope"), [])
        # replace: the old keys (claimed or not) go, even without a new bundle.
        fresh = [OneTimeKey("ec", 1, b"new1")]
        self.assertEqual(await store.publish_keys(alice.id, "a1", None, fresh, replace=True),
                         ({"ec": 1, "pq": 0}, True))
        (after,) = await store.claim_keys(alice.id, "a1")
        self.assertEqual(after.one_time, (OneTimeKey("ec", 1, b"new1"),))

    @async_test
    async def test_one_time_keys_are_bounded(self) -> None:
        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1")
        many = [OneTimeKey("pq", i, b"k") for i in range(MAX_ONE_TIME_KEYS + 5)]
        counts, _ = await store.publish_keys(alice.id, "a1", b"B", many)
        self.assertEqual(counts, {"ec": 0, "pq": MAX_ONE_TIME_KEYS})

    @async_test
    async def test_presence_follows_who_wrote(self) -> None:
        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1")
        bob = await self.user(store, "Bob", "b1")
        carol = await self.user(store, "Carol", "c1")
        boxes = (f"u:{bob.id}", f"u:{alice.id}")
        await store.append(msg(boxes, alice, "a1", "dm", target="user:bob"))
        self.assertEqual(await store.presence_readers(alice.id), [bob.id])
        self.assertEqual(await store.presence_subjects(bob.id), [alice.id])
        self.assertEqual(await store.presence_readers(bob.id), [])
        self.assertTrue(await store.has_written(alice.id, bob.id))
        self.assertFalse(await store.has_written(bob.id, alice.id))
        await store.append(msg((f"u:{alice.id}", f"u:{bob.id}"), bob, "b1", "re",
                               target="user:alice"))
        await store.append(msg((f"u:{alice.id}",), carol, "c1", "hi", target="user:alice"))
        self.assertTrue(await store.has_written(bob.id, alice.id))
        self.assertEqual(sorted(await store.presence_subjects(alice.id)), [bob.id, carol.id])
        self.assertEqual(await store.dm_partners(alice.id), [bob.id, carol.id])

    @async_test
    async def test_status_and_deletion(self) -> None:
        store, alice, bob, rid = await self.setup_room()
        await store.create_session("fb", bob.id, "b1", b"t1", NOW + DAY)
        self.assertEqual(await store.member_since(rid, bob.id), NOW)
        self.assertIsNone(await store.member_since(rid, 9999))
        self.assertTrue(await store.set_status(bob.id, "suspended"))
        bob_now = await store.user_by_id(bob.id)
        assert bob_now is not None
        self.assertEqual(bob_now.status, "suspended")
        await self.failure_of(store.rotate_refresh(b"t1", b"t2", NOW + DAY, NOW), TokenRevoked)
        self.assertFalse(await store.set_status(9999, "active"))
        await store.append(msg((f"u:{bob.id}", f"u:{alice.id}"), alice, "a1", "dm",
                               target="user:bob"))
        await store.append(msg((f"r:{rid}",), alice, "a1", "room"))
        queued = await store.queued()
        self.assertTrue(await store.delete_account(bob.id, b"dummy"))
        gone = await store.user_by_key("bob")
        assert gone is not None
        self.assertEqual((gone.status, gone.pw_hash), ("deleted", b"dummy"))
        self.assertIsNone(await store.email_of(bob.id))
        self.assertEqual(await store.devices(bob.id), [])
        self.assertEqual([m.user_id for m in await store.members(rid)], [alice.id])
        self.assertEqual(await store.dm_partners(alice.id), [])
        self.assertEqual(await store.queued(), queued - 1)  # his inbox copy
        self.assertFalse(await store.set_status(bob.id, "active"))  # a tombstone stays
        await self.failure_of(store.create_user("BOB", "bob", "", b"", "active"), Conflict)
        self.assertFalse(await store.delete_account(9999, b"dummy"))


class CodeContract(StoreHelpers):
    """Emailed codes, TOTP steps, recovery codes, unverified accounts (store.codes)."""

    @async_test
    async def test_email_codes(self) -> None:
        store = await self.open_store()
        bob = await store.create_user("Bob", "bob", "b@example.org", b"h", "pending")
        codes = store.codes
        self.assertTrue(await codes.put_email_code(bob.id, "verify", b"c1", NOW + 600, NOW, 60))
        # Too soon for another mail; the first code lives on.
        self.assertFalse(await codes.put_email_code(bob.id, "verify", b"c2", NOW + 600, NOW, 60))
        self.assertEqual(await codes.check_email_code(bob.id, "verify", b"c2", NOW, 3), CODE_WRONG)
        self.assertEqual(await codes.check_email_code(bob.id, "other", b"c1", NOW, 3), CODE_NONE)
        self.assertEqual(await codes.check_email_code(bob.id, "verify", b"c1", NOW, 3), CODE_OK)
        bob_now = await store.user_by_id(bob.id)
        assert bob_now is not None
        self.assertEqual(bob_now.status, "active")
        # Used once; a wrong guess did not reset the resend interval.
        self.assertEqual(await codes.check_email_code(bob.id, "verify", b"c1", NOW, 3), CODE_NONE)
        self.assertFalse(await codes.put_email_code(bob.id, "verify", b"c3", NOW + 660, NOW + 59,
                                                    60))
        self.assertTrue(await codes.put_email_code(bob.id, "verify", b"c3", NOW + 660, NOW + 60,
                                                   60))
        for _ in range(3):
            self.assertEqual(await codes.check_email_code(bob.id, "verify", b"x", NOW, 3),
                             CODE_WRONG)
        # Out of attempts: even the right code is refused now.
        self.assertEqual(await codes.check_email_code(bob.id, "verify", b"c3", NOW, 3), CODE_NONE)
        self.assertTrue(await codes.put_email_code(bob.id, "reset", b"r1", NOW + 10, NOW, 60))
        self.assertEqual(await codes.check_email_code(bob.id, "reset", b"r1", NOW + 10, 3),
                         CODE_NONE)  # expired

    @async_test
    async def test_reset_and_password_revoke_sessions(self) -> None:
        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1", "a2")
        await store.create_session("f1", alice.id, "a1", b"t1", NOW + DAY)
        await store.create_session("f2", alice.id, "a2", b"t2", NOW + DAY)
        codes = store.codes
        await codes.put_email_code(alice.id, "reset", b"r", NOW + 600, NOW, 60)
        self.assertEqual(await codes.reset_with_code(alice.id, b"bad", NOW, 5, b"new"),
                         (CODE_WRONG, []))
        outcome, families = await codes.reset_with_code(alice.id, b"r", NOW, 5, b"new")
        self.assertEqual((outcome, sorted(families)), (CODE_OK, ["f1", "f2"]))
        user = await store.user_by_id(alice.id)
        assert user is not None
        self.assertEqual(user.pw_hash, b"new")
        await self.failure_of(store.rotate_refresh(b"t1", b"t3", NOW + DAY, NOW), TokenRevoked)
        await store.create_session("f3", alice.id, "a1", b"t3", NOW + DAY)
        self.assertEqual(await codes.set_password(alice.id, b"newer"), ["f3"])

    @async_test
    async def test_totp_steps_and_recovery_codes(self) -> None:
        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1")
        codes = store.codes
        self.assertIsNone(await codes.totp(alice.id))
        self.assertTrue(await codes.put_pending_totp(alice.id, b"sealed", NOW))
        self.assertEqual(await codes.totp(alice.id), TotpRecord(alice.id, b"sealed", False, 0))
        self.assertFalse(await codes.accept_step(alice.id, 5))  # not enabled yet
        self.assertTrue(await codes.enable_totp(alice.id, 10, [b"r1", b"r2"]))
        self.assertFalse(await codes.enable_totp(alice.id, 11, [b"r3"]))
        self.assertFalse(await codes.put_pending_totp(alice.id, b"other", NOW))
        self.assertFalse(await codes.accept_step(alice.id, 10))  # the enrolling code's step
        self.assertTrue(await codes.accept_step(alice.id, 11))
        self.assertFalse(await codes.accept_step(alice.id, 11))  # replayed
        self.assertFalse(await codes.accept_step(alice.id, 9))  # older
        self.assertEqual(await codes.totp(alice.id), TotpRecord(alice.id, b"sealed", True, 11))
        self.assertEqual(await codes.recovery_left(alice.id), 2)
        self.assertTrue(await codes.use_recovery(alice.id, b"r1"))
        self.assertFalse(await codes.use_recovery(alice.id, b"r1"))
        self.assertEqual(await codes.recovery_left(alice.id), 1)
        await codes.replace_recovery(alice.id, [b"n1", b"n2", b"n3"])
        self.assertFalse(await codes.use_recovery(alice.id, b"r2"))
        self.assertEqual(await codes.recovery_left(alice.id), 3)
        await codes.disable_totp(alice.id)
        self.assertIsNone(await codes.totp(alice.id))
        self.assertEqual(await codes.recovery_left(alice.id), 0)
        self.assertTrue(await codes.put_pending_totp(alice.id, b"again", NOW))

    @async_test
    async def test_unverified_accounts_purged(self) -> None:
        store = await self.open_store()
        old = await store.create_user("Old", "old", "o@example.org", b"h", "pending")
        await store.upsert_device(old.id, "o1", "phone")
        await store.create_session("fo", old.id, "o1", b"t", NOW + DAY)
        await store.codes.put_email_code(old.id, "verify", b"c", NOW + 600, NOW, 60)
        active = await self.user(store, "Active", "x1")
        self.clock.advance(100)
        young = await store.create_user("Young", "young", "y@example.org", b"h", "pending")
        self.assertEqual(await store.codes.purge_pending(NOW + 50), 1)
        self.assertIsNone(await store.user_by_key("old"))
        self.assertIsNotNone(await store.user_by_id(young.id))
        self.assertIsNotNone(await store.user_by_id(active.id))
        stats = await store.stats()
        self.assertEqual((stats["users"], stats["devices"], stats["sessions"]), (2, 1, 0))
        # The name is free again.
        await store.create_user("OLD", "old", "o2@example.org", b"h", "pending")


class ChainContract(StoreHelpers):
    """Every mailbox has one chain of changes (messages and membership changes): what a
    process on another node applies in order and fills gaps in."""

    def assertChain(self, seqs_prevs: list[tuple[int, int]], start: int = 0) -> None:
        """Each change names the one before it, in seq order."""
        prev = start
        for seq, prev_seq in sorted(seqs_prevs):
            self.assertEqual(prev_seq, prev, f"chain broken at seq {seq}")
            self.assertGreater(seq, prev)
            prev = seq

    @async_test
    async def test_messages_and_membership_changes_form_one_chain(self) -> None:
        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1")
        bob = await self.user(store, "Bob", "b1")
        room = await store.create_room("Lobby", "lobby", alice.id, False)
        box = f"r:{room.id}"
        self.assertEqual(await store.mailbox_heads([box]), {box: 0})
        joined = await store.add_member(room.id, bob.id, "member")
        self.assertEqual((joined.mailbox, joined.prev_seq), (box, 0))
        first = await store.append(msg((box,), alice, "a1", "c1"))
        self.assertEqual(first.messages[0].prev_seq, joined.seq)
        kicked = await store.remove_member(room.id, bob.id)
        self.assertEqual(kicked.prev_seq, first.seqs[0])
        self.assertGreater(kicked.seq, first.seqs[0])
        after = await store.append(msg((box,), alice, "a1", "c2"))
        # The kick is ordered before every message committed after it.
        self.assertEqual(after.messages[0].prev_seq, kicked.seq)
        self.assertGreater(after.seqs[0], kicked.seq)
        # A direct message is in chains of its own, one per inbox.
        dm = await store.append(
            msg((f"u:{bob.id}", f"u:{alice.id}"), alice, "a1", "d1", target="user:bob")
        )
        self.assertEqual([m.prev_seq for m in dm.messages], [0, 0])
        heads = await store.mailbox_heads([box, f"u:{bob.id}", f"u:{alice.id}", "u:999999"])
        self.assertEqual(
            heads,
            {box: after.seqs[0], f"u:{bob.id}": dm.seqs[0], f"u:{alice.id}": dm.seqs[1],
             "u:999999": 0},
        )
        # A duplicate is not a change: the head stays.
        again = await store.append(msg((box,), alice, "a1", "c2"))
        self.assertTrue(again.duplicate)
        self.assertEqual((await store.mailbox_heads([box]))[box], after.seqs[0])

    @async_test
    async def test_concurrent_appends_leave_no_gap_in_the_chain(self) -> None:
        store, alice, bob, rid = await self.setup_room()
        box = f"r:{rid}"
        (start,) = (await store.mailbox_heads([box])).values()
        results = await gatherResults([
            store.append(msg((box, f"u:{bob.id}"), alice, "a1", f"c{i}", target="room:lobby"))
            for i in range(60)
        ] + [store.remove_member(rid, bob.id), store.add_member(rid, bob.id, "member")])
        links = [(m.seq, m.prev_seq) for r in results[:60] for m in r.messages
                 if m.mailbox == box]
        links += [(link.seq, link.prev_seq) for link in results[60:]]
        self.assertEqual(len(links), 62)
        self.assertChain(links, start)
        self.assertEqual((await store.mailbox_heads([box]))[box], max(s for s, _ in links))

    @async_test
    async def test_messages_between_fills_a_gap(self) -> None:
        store, alice, bob, rid = await self.setup_room()
        box = f"r:{rid}"
        sent = [(await store.append(msg((box,), alice, "a1", f"c{i}", envelope=b"e%d" % i)))
                .messages[0] for i in range(5)]
        got = await store.messages_between(box, sent[0].seq, sent[3].seq)
        self.assertEqual(got, sent[1:4])
        self.assertEqual([m.prev_seq for m in got], [m.seq for m in sent[:3]])
        self.assertEqual(await store.messages_between(box, sent[4].seq, sent[4].seq + 100), [])
        self.assertEqual(await store.messages_between(f"u:{bob.id}", 0, sent[4].seq), [])
        # What a device has pending carries the chain too.
        self.assertEqual(await store.pending(bob.id, "b1"), sent)


class ConcurrencyContract(StoreHelpers):
    """Uses fired at once through the API: whatever runs them side by side (threads,
    processes, a database's concurrent transactions), a one-time thing is used once."""

    N = 1000

    async def all_of(self, ds: list[Deferred[Any]]) -> list[tuple[bool, Any]]:
        """Every outcome, failures included (none may be lost to the first error)."""
        return list(await DeferredList(ds, consumeErrors=True))

    def succeeded(self, outcomes: list[tuple[bool, Any]]) -> list[Any]:
        failures = [f for ok, f in outcomes if not ok]
        self.assertEqual(failures, [])
        return [value for _, value in outcomes]

    @async_test
    async def test_concurrent_claims_hand_out_each_key_at_most_once(self) -> None:
        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1")
        published = [OneTimeKey(kind, i, b"%s%d" % (kind.encode(), i))
                     for kind in ("ec", "pq") for i in range(MAX_ONE_TIME_KEYS)]
        await store.publish_keys(alice.id, "a1", b"B", published)
        outcomes = await self.all_of(
            [store.claim_keys(alice.id, "a1") for _ in range(self.N)]
        )
        handed = [k for (bundle,) in self.succeeded(outcomes) for k in bundle.one_time]
        # Every key once: none twice, and no claim got a key that was never there.
        self.assertEqual(len(handed), len(set(handed)))
        self.assertEqual(set(handed), set(published))
        self.assertEqual(await store.key_counts(alice.id, "a1"), {"ec": 0, "pq": 0})

    @async_test
    async def test_concurrent_uses_of_one_email_code_one_succeeds(self) -> None:
        store = await self.open_store()
        bob = await store.create_user("Bob", "bob", "b@example.org", b"h", "pending")
        await store.codes.put_email_code(bob.id, "verify", b"c1", NOW + 600, NOW, 60)
        outcomes = self.succeeded(await self.all_of(
            [store.codes.check_email_code(bob.id, "verify", b"c1", NOW, 5)
             for _ in range(self.N)]
        ))
        self.assertEqual(outcomes.count(CODE_OK), 1)
        self.assertEqual(outcomes.count(CODE_NONE), self.N - 1)

    @async_test
    async def test_concurrent_resets_with_one_code_one_succeeds(self) -> None:
        store = await self.open_store()
        alice = await self.user(store, "Alice", "a1")
        await store.create_session("f1", alice.id, "a1", b"t1", NOW + DAY)
        await store.codes.put_email_code(alice.id, "reset", b"r", NOW + 600, NOW, 60)
        outcomes = self.succeeded(await self.all_of(
            [store.codes.reset_with_code(alice.id, b"r", NOW, 5, b"pw%d" % i)
             for i in range(self.N)]
        ))
        won = [i for i, (outcome, _) in enumerate(outcomes) if outcome == CODE_OK]
        self.assertEqual(len(won), 1)
        self.assertEqual(outcomes[won[0]][1], ["f1"])
        user = await store.user_by_id(alice.id)
        assert user is not None
        self.assertEqual(user.pw_hash, b"pw%d" % won[0])  # the winner's password, no other

    @async_test
    async def test_concurrent_wrong_guesses_stop_at_max_attempts(self) -> None:
        store = await self.open_store()
        bob = await store.create_user("Bob", "bob", "b@example.org", b"h", "pending")
        await store.codes.put_email_code(bob.id, "verify", b"c1", NOW + 600, NOW, 60)
        outcomes = self.succeeded(await self.all_of(
            [store.codes.check_email_code(bob.id, "verify", b"g%d" % i, NOW, 5)
             for i in range(self.N)]
        ))
        self.assertEqual(outcomes.count(CODE_WRONG), 5)
        self.assertEqual(outcomes.count(CODE_NONE), self.N - 5)
        # Out of guesses: the right code no longer works either.
        self.assertEqual(await store.codes.check_email_code(bob.id, "verify", b"c1", NOW, 5),
                         CODE_NONE)

    @async_test
    async def test_concurrent_code_requests_send_one_mail(self) -> None:
        store = await self.open_store()
        bob = await store.create_user("Bob", "bob", "b@example.org", b"h", "pending")
        outcomes = self.succeeded(await self.all_of(
            [store.codes.put_email_code(bob.id, "verify", b"c%d" % i, NOW + 600, NOW, 60)
             for i in range(self.N)]
        ))
        self.assertEqual(outcomes.count(True), 1)
        # The code stored is the one whose request was granted.
        mailed = outcomes.index(True)
        self.assertEqual(
            await store.codes.check_email_code(bob.id, "verify", b"c%d" % mailed, NOW, 5),
            CODE_OK,
        )

    @async_test
    async def test_concurrent_upserts_of_one_device_make_one_device(self) -> None:
        store, alice, _, rid = await self.setup_room()
        outcomes = self.succeeded(await self.all_of(
            [store.upsert_device(alice.id, "new", f"label {i}") for i in range(self.N)]
        ))
        self.assertEqual({(d.device_id, d.created) for d in outcomes}, {("new", NOW)})
        (device,) = [d for d in await store.devices(alice.id) if d.device_id == "new"]
        self.assertIn(device.label, {f"label {i}" for i in range(self.N)})
        # Its cursors were made once: it reads its inbox and the room from now on.
        await store.append(msg((f"r:{rid}",), alice, "a1", "after"))
        await store.append(msg((f"u:{alice.id}",), alice, "a1", "dm", target="user:alice"))
        self.assertEqual(
            [m.client_id for m in await store.pending(alice.id, "new")], ["after", "dm"]
        )


class StoreContract(
    AccountContract,
    RoomContract,
    MessageContract,
    DirectoryContract,
    CodeContract,
    ConcurrencyContract,
    ChainContract,
):
    """Every behaviour an IStore promises (mix into a backend's TestCase)."""
