"""Sender Keys: epochs, removal, late join, duplicates, bounded jumps, transactional state."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from shtalk.crypto import (
    BadSignature,
    CryptoError,
    ReplayError,
    RoomSession,
    SenderKeyDistribution,
    StateError,
    TooFarAhead,
)
from shtalk.crypto.ratchet import SEND_RESERVE
from shtalk.crypto.senderkeys import MAX_JUMP

ROOM = "#ops"


class Room:
    """Members with their RoomSessions; distributions are handed over directly here
    (the client sends them over the pairwise sessions)."""

    def __init__(self, *names: str) -> None:
        self.members: dict[str, RoomSession] = {}
        for name in names:
            self.members[name] = RoomSession(ROOM, name, "d1")
        self.rekey()

    def rekey(self) -> None:
        """Membership changed: every member rotates and tells the current members."""
        dists = {name: s.rotate().to_bytes() for name, s in self.members.items()}
        for name, session in self.members.items():
            for sender, dist in dists.items():
                if sender != name:
                    session.add_distribution(sender, "d1", dist)

    def send(self, sender: str, plaintext: bytes) -> tuple[bytes, bytes]:
        return self.members[sender].encrypt(plaintext)

    def read(self, reader: str, sender: str, msg: tuple[bytes, bytes]) -> bytes:
        return self.members[reader].decrypt(sender, "d1", *msg)


class SenderKeyTests(SynchronousTestCase):
    def test_everyone_reads_everyone(self) -> None:
        room = Room("a", "b", "c")
        for sender in "abc":
            msg = room.send(sender, b"from " + sender.encode())
            for reader in "abc":
                if reader != sender:
                    self.assertEqual(room.read(reader, sender, msg), b"from " + sender.encode())

    def test_removed_member_cannot_read_later_messages(self) -> None:
        room = Room("a", "b", "c")
        before = room.send("a", b"before")
        self.assertEqual(room.read("c", "a", before), b"before")
        removed = room.members.pop("c")
        for session in room.members.values():
            session.remove_member("c")
        room.rekey()
        after = room.send("a", b"after")
        self.assertEqual(room.read("b", "a", after), b"after")
        self.assertRaises(StateError, removed.decrypt, "a", "d1", *after)
        # ... and the others no longer accept c's messages.
        from_c = removed.encrypt(b"still here?")
        self.assertRaises(StateError, room.read, "a", "c", from_c)

    def test_late_joiner_cannot_read_earlier_messages(self) -> None:
        room = Room("a", "b")
        earlier = room.send("a", b"earlier")
        room.members["d"] = RoomSession(ROOM, "d", "d1")
        room.rekey()
        self.assertRaises(StateError, room.read, "d", "a", earlier)
        later = room.send("a", b"later")
        self.assertEqual(room.read("d", "a", later), b"later")
        # Even a distribution of the old epoch handed over now starts after 'earlier'.
        old = RoomSession(ROOM, "a", "d1")
        old.rotate()
        first = old.encrypt(b"first")
        joiner = RoomSession(ROOM, "d", "d1")
        joiner.add_distribution("a", "d1", old.distribution().to_bytes())
        self.assertRaises(ReplayError, joiner.decrypt, "a", "d1", *first)

    def test_previous_epoch_still_readable_for_in_flight_messages(self) -> None:
        room = Room("a", "b")
        in_flight = room.send("a", b"sent before the rekey")
        room.rekey()
        self.assertEqual(room.read("b", "a", in_flight), b"sent before the rekey")

    def test_duplicates_refused(self) -> None:
        room = Room("a", "b")
        msgs = [room.send("a", b"%d" % i) for i in range(3)]
        self.assertEqual(room.read("b", "a", msgs[2]), b"2")
        self.assertEqual(room.read("b", "a", msgs[0]), b"0")
        before = room.members["b"].to_bytes()
        for i in (0, 2):
            self.assertRaises(ReplayError, room.read, "b", "a", msgs[i])
        self.assertEqual(room.members["b"].to_bytes(), before)
        self.assertEqual(room.read("b", "a", msgs[1]), b"1")

    def test_bounded_jump(self) -> None:
        room = Room("a", "b")
        sender = room.members["a"]
        assert sender.own is not None
        sender.own.index += MAX_JUMP + 1  # as if MAX_JUMP + 1 messages were lost
        # (the chain key does not matter: refused before the work)
        far = room.send("a", b"far")
        before = room.members["b"].to_bytes()
        self.assertRaises(TooFarAhead, room.read, "b", "a", far)
        self.assertEqual(room.members["b"].to_bytes(), before)

    def test_signature_and_tamper(self) -> None:
        room = Room("a", "b", "c")
        header, ciphertext = room.send("a", b"signed")
        before = room.members["b"].to_bytes()
        for pos in (0, len(ciphertext) - 70, len(ciphertext) - 1):
            bad = bytearray(ciphertext)
            bad[pos] ^= 1
            self.assertRaises(BadSignature, room.read, "b", "a", (header, bytes(bad)))
        bad_header = header[:-1] + bytes([header[-1] ^ 1])
        self.assertRaises(BadSignature, room.read, "b", "a", (bad_header, ciphertext))
        # c claims to be a: the signature is a's sender key, so it is refused.
        forged = room.send("c", b"i am a")
        self.assertRaises(
            BadSignature,
            room.read,
            "b",
            "a",
            (forged[0][:1] + header[1:5] + forged[0][5:], forged[1]),
        )
        self.assertEqual(room.members["b"].to_bytes(), before)
        self.assertRaises(CryptoError, room.read, "b", "a", (header[:3], ciphertext))
        self.assertRaises(CryptoError, room.read, "b", "a", (header, ciphertext[:20]))

    def test_distribution_rules(self) -> None:
        a, b = RoomSession(ROOM, "a", "d1"), RoomSession(ROOM, "b", "d1")
        self.assertRaises(StateError, a.encrypt, b"no key yet")
        dist = a.rotate()
        b.add_distribution("a", "d1", dist.to_bytes())
        b.add_distribution("a", "d1", dist.to_bytes())  # a resend is harmless
        b.decrypt("a", "d1", *a.encrypt(b"x"))
        b.add_distribution("a", "d1", dist.to_bytes())  # does not rewind the chain
        other = RoomSession(ROOM, "a", "d1").rotate()
        self.assertRaises(StateError, b.add_distribution, "a", "d1", other.to_bytes())
        elsewhere = RoomSession("#other", "a", "d1").rotate()
        self.assertRaises(StateError, b.add_distribution, "a", "d1", elsewhere.to_bytes())
        self.assertRaises(StateError, a.rotate, 0)
        self.assertRaises(CryptoError, SenderKeyDistribution.from_bytes, dist.to_bytes()[:-1])
        wrong_version = b"\x02" + dist.to_bytes()[1:]
        self.assertRaises(CryptoError, SenderKeyDistribution.from_bytes, wrong_version)
        for _ in range(3):
            b.add_distribution("a", "d1", a.rotate().to_bytes())
        self.assertEqual(len(b.chains[("a", "d1")]), 2)
        self.assertRaises(StateError, b.add_distribution, "a", "d1", dist.to_bytes())

    def test_serialisation(self) -> None:
        room = Room("a", "b")
        msgs = [room.send("a", b"%d" % i) for i in range(4)]
        room.read("b", "a", msgs[3])
        blob = room.members["b"].to_bytes()
        again = RoomSession.from_bytes(blob)
        self.assertEqual(again.to_bytes(), blob)
        self.assertEqual(again.decrypt("a", "d1", *msgs[1]), b"1")
        sender = RoomSession.from_bytes(room.members["a"].to_bytes())
        self.assertEqual(room.read("b", "a", sender.encrypt(b"more")), b"more")
        for cut in (0, 5, len(blob) - 1):
            self.assertRaises(CryptoError, RoomSession.from_bytes, blob[:cut])

    def test_epoch_start_is_kept_and_version_1_still_loads(self) -> None:
        a = RoomSession(ROOM, "a", "d1")
        a.rotate(now=1_700_000_000)
        a.encrypt(b"x")
        again = RoomSession.from_bytes(a.to_bytes())
        self.assertEqual((again.epoch_started, again.index), (1_700_000_000, 1))
        # Version 1 (before rotation by age): the same bytes without the u64 start.
        v1 = b"\x01" + a.to_bytes()[1:].replace((1_700_000_000).to_bytes(8, "big"), b"", 1)
        old = RoomSession.from_bytes(v1)
        self.assertEqual((old.epoch, old.index, old.epoch_started), (0, 1, 0))
        self.assertEqual(old.distribution(), a.distribution())

    def test_split_serialisation(self) -> None:
        """Own state and each chain apart (the client stores them as separate rows)."""
        room = Room("a", "b", "c")
        room.rekey()  # two epochs per sender
        msgs = [room.send("a", b"%d" % i) for i in range(5)]
        from_c = room.send("c", b"from c")
        room.read("b", "a", msgs[4])  # skips 0..3
        b = room.members["b"]
        ids = b.chain_ids()
        self.assertEqual(
            sorted(ids), [("a", "d1", 0), ("a", "d1", 1), ("c", "d1", 0), ("c", "d1", 1)]
        )
        own = b.own_to_bytes()
        chains = [b.chain_to_bytes(*i) for i in ids]
        again = RoomSession.from_parts(own, chains)
        # The same state: the whole-session encoding is byte-for-byte equal.
        self.assertEqual(again.to_bytes(), b.to_bytes())
        self.assertEqual(again.own_to_bytes(), own)
        self.assertEqual(RoomSession.from_bytes(own).chains, {})
        for i in ids:
            self.assertEqual(again.chain_to_bytes(*i), b.chain_to_bytes(*i))
        # ... and it decrypts exactly like the original, refusing the same replays.
        for msg in (msgs[1], msgs[3], from_c):
            self.assertEqual(
                again.decrypt("a" if msg is not from_c else "c", "d1", *msg),
                b.decrypt("a" if msg is not from_c else "c", "d1", *msg),
            )
        self.assertRaises(ReplayError, again.decrypt, "a", "d1", *msgs[4])
        self.assertRaises(ReplayError, b.decrypt, "a", "d1", *msgs[4])
        self.assertEqual(again.to_bytes(), b.to_bytes())
        # The restored sending state continues the chain the others hold.
        sender = RoomSession.from_parts(room.members["a"].own_to_bytes(), [])
        self.assertEqual(room.read("b", "a", sender.encrypt(b"more")), b"more")
        # A chain replaces the one with the same id; one of another room is refused.
        stale = b.chain_to_bytes("a", "d1", 1)
        self.assertEqual(b.decrypt("a", "d1", *sender.encrypt(b"newer")), b"newer")
        self.assertEqual(b.load_chain(stale), ("a", "d1", 1))
        other = RoomSession("#other", "b", "d1")
        self.assertRaises(StateError, other.load_chain, stale)
        self.assertEqual(RoomSession.header_epoch(msgs[0][0]), 1)
        for cut in (0, 5, len(stale) - 1):
            self.assertRaises(CryptoError, b.load_chain, stale[:cut])
        self.assertRaises(CryptoError, b.load_chain, stale + b"\x00")
        self.assertRaises(CryptoError, RoomSession.header_epoch, msgs[0][0][:-1])

    @settings(max_examples=30, deadline=None)
    @given(st.permutations(list(range(8))), st.lists(st.integers(0, 7), max_size=5))
    def test_any_order_exactly_once(self, order: list[int], dups: list[int]) -> None:
        room = Room("a", "b")
        msgs = [room.send("a", b"%d" % i) for i in range(8)]
        done: set[int] = set()
        for i in order + dups:
            if i in done:
                self.assertRaises(ReplayError, room.read, "b", "a", msgs[i])
            else:
                self.assertEqual(room.read("b", "a", msgs[i]), b"%d" % i)
                done.add(i)


class SavingAheadTests(SynchronousTestCase):
    """``reserve_sending`` on the own chain: a restore never reuses an index."""

    def test_restore_of_an_exact_state_reuses_an_index(self) -> None:
        room = Room("a", "b")
        saved = room.members["a"].own_to_bytes()
        room.read("b", "a", room.send("a", b"before the crash"))
        restored = RoomSession.from_bytes(saved)
        self.assertRaises(ReplayError, room.read, "b", "a", restored.encrypt(b"after"))

    def test_restore_of_a_reserved_state_skips_past_every_index_sent(self) -> None:
        room = Room("a", "b")
        a = room.members["a"]
        a.reserve_sending()
        saved, mark = a.own_to_bytes(), a.send_mark()
        sent = 0
        while a.covered_by(mark):
            self.assertEqual(room.read("b", "a", room.send("a", b"%d" % sent)), b"%d" % sent)
            sent += 1
        self.assertEqual(sent, SEND_RESERVE)
        restored = RoomSession.from_bytes(saved)
        self.assertEqual(restored.index, SEND_RESERVE)
        self.assertEqual(room.read("b", "a", restored.encrypt(b"after")), b"after")
        blob = restored.to_bytes()
        self.assertEqual(RoomSession.from_bytes(blob).to_bytes(), blob)

    def test_covered_by(self) -> None:
        room = Room("a", "b")
        a = room.members["a"]
        self.assertFalse(a.covered_by(None))
        self.assertFalse(a.covered_by(a.send_mark()))
        a.reserve_sending(3)
        mark = a.send_mark()
        for _ in range(3):
            self.assertTrue(a.covered_by(mark))
            room.send("a", b"x")
        self.assertFalse(a.covered_by(mark))
        a.reserve_sending()
        mark = a.send_mark()
        room.rekey()  # a new epoch: another chain, nothing of the old mark applies
        self.assertFalse(a.covered_by(mark))
