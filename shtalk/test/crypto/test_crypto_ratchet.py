"""Double Ratchet: order, limits, transactional failure, replay, FS and PCS."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from shtalk.crypto import CryptoError, DecryptError, MessageType, ReplayError, Session
from shtalk.crypto.errors import StateError, TooFarAhead
from shtalk.crypto.ratchet import ENC_HEADER_LEN, SEND_RESERVE, kdf_ck, message_keys
from shtalk.test.crypto.test_crypto_support import Pair


def _ratchets() -> tuple[Session, Session]:
    pair = Pair()
    # One round trip so that both sides have sending chains and plain MESSAGE type.
    pair.open_at_alice(pair.seal_from_bob(b"ack"))
    return pair.sa, pair.sb


def _flip(data: bytes, bit: int) -> bytes:
    out = bytearray(data)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


class RatchetBasics(SynchronousTestCase):
    def test_conversation_and_types(self) -> None:
        pair = Pair()
        kind, _, _ = pair.sa.encrypt(b"x")
        self.assertIs(kind, MessageType.PREKEY)  # no reply yet: still pre-key messages
        self.assertEqual(pair.open_at_alice(pair.seal_from_bob(b"hi alice")), b"hi alice")
        kind, _, _ = pair.sa.encrypt(b"x")
        self.assertIs(kind, MessageType.MESSAGE)
        for i in range(5):
            self.assertEqual(pair.open_at_bob(pair.seal_from_alice(b"a%d" % i)), b"a%d" % i)
            self.assertEqual(pair.open_at_alice(pair.seal_from_bob(b"b%d" % i)), b"b%d" % i)

    def test_responder_cannot_send_first(self) -> None:
        pair = Pair()
        fresh = Session.from_bytes(pair.sb.to_bytes())
        fresh.ratchet.sending = None
        self.assertRaises(StateError, fresh.encrypt, b"x")

    def test_out_of_order_within_and_across_chains(self) -> None:
        sa, sb = _ratchets()
        first = [sa.encrypt(b"m%d" % i) for i in range(5)]
        self.assertEqual(sb.decrypt(*first[4]), b"m4")
        reply = sb.encrypt(b"r")
        self.assertEqual(sa.decrypt(*reply), b"r")
        second = [sa.encrypt(b"n%d" % i) for i in range(3)]  # a new sending chain
        self.assertEqual(sb.decrypt(*second[2]), b"n2")
        for i in (0, 3, 1, 2):  # the previous chain's skipped keys still work
            self.assertEqual(sb.decrypt(*first[i]), b"m%d" % i)
        self.assertEqual(sb.decrypt(*second[0]), b"n0")
        self.assertEqual(sb.decrypt(*second[1]), b"n1")
        self.assertEqual(sb.ratchet.n_skipped, 0)

    def test_header_hides_ratchet_key_and_counters(self) -> None:
        sa, _ = _ratchets()
        _, header, _ = sa.encrypt(b"x")
        self.assertEqual(len(header), ENC_HEADER_LEN)
        self.assertNotIn(sa.ratchet.dhs_pub, header)
        _, header2, _ = sa.encrypt(b"x")
        self.assertNotEqual(header[:12], header2[:12])

    def test_serialisation_round_trip(self) -> None:
        sa, sb = _ratchets()
        msgs = [sa.encrypt(b"%d" % i) for i in range(4)]
        sb.decrypt(*msgs[3])
        blob = sb.to_bytes()
        again = Session.from_bytes(blob)
        self.assertEqual(again.to_bytes(), blob)
        self.assertEqual(again.decrypt(*msgs[1]), b"1")
        self.assertRaises(CryptoError, Session.from_bytes, blob[:-1])
        self.assertRaises(CryptoError, Session.from_bytes, blob + b"\x00")
        self.assertRaises(CryptoError, Session.from_bytes, b"\x09" + blob[1:])


class Limits(SynchronousTestCase):
    def test_jump_over_limit_refused_without_work(self) -> None:
        sa, sb = _ratchets()
        sb.ratchet.max_skip = 10
        msgs = [sa.encrypt(b"%d" % i) for i in range(13)]
        before = sb.to_bytes()
        self.assertRaises(TooFarAhead, sb.decrypt, *msgs[12])
        self.assertEqual(sb.to_bytes(), before)
        self.assertEqual(sb.decrypt(*msgs[10]), b"10")  # exactly the limit is fine
        self.assertEqual(sb.decrypt(*msgs[12]), b"12")

    def test_jump_in_new_chain_over_limit(self) -> None:
        sa, sb = _ratchets()
        sb.ratchet.max_skip = 5
        sb.decrypt(*sa.encrypt(b"x"))
        sa.decrypt(*sb.encrypt(b"y"))
        msgs = [sa.encrypt(b"%d" % i) for i in range(7)]
        before = sb.to_bytes()
        self.assertRaises(TooFarAhead, sb.decrypt, *msgs[6])
        self.assertEqual(sb.to_bytes(), before)

    def test_stored_keys_capped_oldest_first(self) -> None:
        sa, sb = _ratchets()
        sb.ratchet.max_skipped = 5
        msgs = [sa.encrypt(b"%d" % i) for i in range(10)]
        sb.decrypt(*msgs[9])  # skips 0..8: only 4..8 are kept
        self.assertEqual(sb.ratchet.n_skipped, 5)
        for i in range(4):
            self.assertRaises(ReplayError, sb.decrypt, *msgs[i])
        for i in range(4, 9):
            self.assertEqual(sb.decrypt(*msgs[i]), b"%d" % i)


class Transactional(SynchronousTestCase):
    def test_every_bit_flip_is_refused_and_changes_nothing(self) -> None:
        sa, sb = _ratchets()
        sa.decrypt(*sb.encrypt(b"z"))
        kind, header, ciphertext = sa.encrypt(b"a new chain message")
        before = sb.to_bytes()
        for bit in range(len(header) * 8):
            self.assertRaises(CryptoError, sb.decrypt, kind, _flip(header, bit), ciphertext)
        for bit in range(len(ciphertext) * 8):
            self.assertRaises(CryptoError, sb.decrypt, kind, header, _flip(ciphertext, bit))
        self.assertRaises(CryptoError, sb.decrypt, kind, header[:-1], ciphertext)
        self.assertRaises(CryptoError, sb.decrypt, kind, header, ciphertext[:15])
        self.assertEqual(sb.to_bytes(), before)
        self.assertEqual(sb.decrypt(kind, header, ciphertext), b"a new chain message")

    def test_wrong_associated_data(self) -> None:
        sa, sb = _ratchets()
        kind, header, ciphertext = sa.encrypt(b"x")
        before = sb.to_bytes()
        sb.ratchet.ad = sb.ratchet.ad[:-1] + bytes([sb.ratchet.ad[-1] ^ 1])  # always differs
        self.assertRaises(DecryptError, sb.decrypt, kind, header, ciphertext)
        sb = Session.from_bytes(before)
        self.assertEqual(sb.decrypt(kind, header, ciphertext), b"x")

    def test_replay_refused_and_state_unchanged(self) -> None:
        sa, sb = _ratchets()
        msg = sa.encrypt(b"once")
        self.assertEqual(sb.decrypt(*msg), b"once")
        before = sb.to_bytes()
        self.assertRaises(ReplayError, sb.decrypt, *msg)
        self.assertEqual(sb.to_bytes(), before)
        skipped = [sa.encrypt(b"%d" % i) for i in range(3)]
        sb.decrypt(*skipped[2])
        sb.decrypt(*skipped[0])
        self.assertRaises(ReplayError, sb.decrypt, *skipped[0])


class SecrecyProperties(SynchronousTestCase):
    def test_forward_secrecy(self) -> None:
        """Once decrypted, a message's key is gone: a later snapshot cannot decrypt it."""
        sa, sb = _ratchets()
        msgs = [sa.encrypt(b"secret %d" % i) for i in range(3)]
        sb.decrypt(*msgs[2])
        sb.decrypt(*msgs[0])
        snapshot = Session.from_bytes(sb.to_bytes())
        for msg in (msgs[0], msgs[2]):
            self.assertRaises(CryptoError, snapshot.decrypt, *msg)
        # ... while the not yet delivered skipped message still decrypts (its key is stored).
        self.assertEqual(snapshot.decrypt(*msgs[1]), b"secret 1")
        # Older chains: after a round trip the old receiving chain key is gone too.
        sa.decrypt(*sb.encrypt(b"r"))
        later = sa.encrypt(b"new chain")
        sb.decrypt(*later)
        snapshot = Session.from_bytes(sb.to_bytes())
        self.assertRaises(CryptoError, snapshot.decrypt, *msgs[2])

    def test_post_compromise_security(self) -> None:
        """An attacker with Alice's state is locked out after one DH round trip."""
        sa, sb = _ratchets()
        stolen = sa.to_bytes()

        def attacker_reads(kind: MessageType, header: bytes, ciphertext: bytes) -> bool:
            # Try as Alice's receiving side, and by running Alice's sending chain forward.
            clone = Session.from_bytes(stolen)
            try:
                clone.decrypt(kind, header, ciphertext)
                return True
            except CryptoError:
                pass
            ck = clone.ratchet.cks
            assert ck is not None
            for _ in range(20):
                ck, mk = kdf_ck(ck)
                if message_keys(mk)[2] == header[:12]:
                    return True
            return False

        leaked = sa.encrypt(b"before healing")
        self.assertTrue(attacker_reads(*leaked))  # the test can see a compromise
        sb.decrypt(*leaked)
        from_bob = sb.encrypt(b"bob 1")
        self.assertTrue(attacker_reads(*from_bob))  # still within reach: Alice's old DH key
        sa.decrypt(*from_bob)
        from_alice = sa.encrypt(b"alice 2")  # fresh DH key that the attacker lacks
        sb.decrypt(*from_alice)
        from_bob2 = sb.encrypt(b"bob 2")
        sa.decrypt(*from_bob2)
        self.assertFalse(attacker_reads(*from_alice))
        self.assertFalse(attacker_reads(*from_bob2))
        self.assertFalse(attacker_reads(*sa.encrypt(b"alice 3")))


class SavingAhead(SynchronousTestCase):
    """``reserve_sending``: a saved state may run ahead; a restore never reuses a key."""

    def test_restore_of_an_exact_state_reuses_a_key(self) -> None:
        """The hazard the reserve exists for (this is what a test of it must catch)."""
        sa, sb = _ratchets()
        snapshot = sa.to_bytes()  # no reserve: saved at the number about to be used
        sb.decrypt(*sa.encrypt(b"sent before the crash"))
        restored = Session.from_bytes(snapshot)
        self.assertRaises(ReplayError, sb.decrypt, *restored.encrypt(b"after the restart"))

    def test_restore_of_a_reserved_state_never_reuses_a_key(self) -> None:
        sa, sb = _ratchets()
        sa.ratchet.reserve_sending()
        snapshot, mark = sa.to_bytes(), sa.ratchet.send_mark()
        start = sa.ratchet.ns
        assert mark is not None
        self.assertEqual(mark[1], start + SEND_RESERVE)
        sent = 0
        while sa.ratchet.covered_by(mark):
            self.assertEqual(sb.decrypt(*sa.encrypt(b"%d" % sent)), b"%d" % sent)
            sent += 1
        self.assertEqual(sent, SEND_RESERVE)
        restored = Session.from_bytes(snapshot)
        self.assertEqual(restored.ratchet.ns, start + SEND_RESERVE)
        self.assertEqual(sb.decrypt(*restored.encrypt(b"after the restart")), b"after the restart")
        self.assertEqual(sb.ratchet.n_skipped, 0)  # every reserved number was used

    def test_the_peer_skips_the_unused_reserve(self) -> None:
        sa, sb = _ratchets()
        sa.ratchet.reserve_sending()
        snapshot = sa.to_bytes()
        sb.decrypt(*sa.encrypt(b"one"))
        restored = Session.from_bytes(snapshot)
        self.assertEqual(sb.decrypt(*restored.encrypt(b"two")), b"two")
        self.assertEqual(sb.ratchet.n_skipped, SEND_RESERVE - 1)
        # ... and the conversation goes on both ways (a DH step with pn past the gap).
        self.assertEqual(restored.decrypt(*sb.encrypt(b"reply")), b"reply")
        self.assertEqual(sb.decrypt(*restored.encrypt(b"three")), b"three")

    def test_the_saved_chain_key_cannot_derive_the_keys_in_use(self) -> None:
        sa, _ = _ratchets()
        sa.ratchet.reserve_sending()
        stolen = Session.from_bytes(sa.to_bytes())
        used = {sa.encrypt(b"x")[1][:12] for _ in range(SEND_RESERVE)}  # header nonces
        ck = stolen.ratchet.cks
        assert ck is not None
        for _ in range(3 * SEND_RESERVE):
            ck, mk = kdf_ck(ck)
            self.assertNotIn(message_keys(mk)[2], used)

    def test_covered_by(self) -> None:
        sa, sb = _ratchets()
        self.assertFalse(sa.ratchet.covered_by(None))
        self.assertFalse(sa.ratchet.covered_by(sa.ratchet.send_mark()))  # exact: not past
        sa.ratchet.reserve_sending(4)
        mark = sa.ratchet.send_mark()
        for _ in range(4):
            self.assertTrue(sa.ratchet.covered_by(mark))
            sb.decrypt(*sa.encrypt(b"x"))
        self.assertFalse(sa.ratchet.covered_by(mark))
        sa.ratchet.reserve_sending(4)
        mark = sa.ratchet.send_mark()
        sa.decrypt(*sb.encrypt(b"new chain"))  # a DH step: another sending chain
        self.assertFalse(sa.ratchet.covered_by(mark))
        self.assertEqual(sa.ratchet.send_mark(), (sa.ratchet.dhs_pub, sa.ratchet.ns))

    def test_reserve_is_refreshed_at_half_and_round_trips(self) -> None:
        sa, sb = _ratchets()
        sa.ratchet.reserve_sending()
        first = sa.ratchet.send_mark()
        assert first is not None
        for _ in range(SEND_RESERVE // 2):
            sb.decrypt(*sa.encrypt(b"x"))
            sa.ratchet.reserve_sending()
            self.assertEqual(sa.ratchet.send_mark(), first)  # at least half left
        sb.decrypt(*sa.encrypt(b"x"))
        sa.ratchet.reserve_sending()
        self.assertEqual(sa.ratchet.send_mark(), (first[0], sa.ratchet.ns + SEND_RESERVE))
        blob = sa.to_bytes()
        self.assertEqual(Session.from_bytes(blob).to_bytes(), blob)

    @settings(max_examples=150, deadline=None)
    @given(st.lists(st.sampled_from(["send", "save", "crash", "reply"]), max_size=80))
    def test_any_sequence_of_saves_and_crashes(self, ops: list[str]) -> None:
        """Alice sends only what a durable save covers (saving first otherwise), as the
        client does; crashes restore her last save, and Bob's replies since then come
        again (they were not acknowledged).  Bob must read every message exactly once."""
        sa, sb = _ratchets()
        saved, mark = sa.to_bytes(), sa.ratchet.send_mark()
        unacked: list[tuple[MessageType, bytes, bytes]] = []  # Bob -> Alice since the save
        count = 0

        def save() -> None:
            nonlocal saved, mark
            sa.ratchet.reserve_sending()
            saved, mark = sa.to_bytes(), sa.ratchet.send_mark()
            unacked.clear()

        for op in ops:
            if op == "send":
                if not sa.ratchet.covered_by(mark):
                    save()
                count += 1
                self.assertEqual(sb.decrypt(*sa.encrypt(b"m%d" % count)), b"m%d" % count)
            elif op == "save":
                save()
            elif op == "crash":
                sa = Session.from_bytes(saved)
                for msg in unacked:
                    sa.decrypt(*msg)
            else:
                msg = sb.encrypt(b"reply")
                unacked.append(msg)
                self.assertEqual(sa.decrypt(*msg), b"reply")
