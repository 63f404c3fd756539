"""Double Ratchet: order, limits, transactional failure, replay, FS and PCS."""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from shtalk.crypto import CryptoError, DecryptError, MessageType, ReplayError, Session
from shtalk.crypto.errors import StateError, TooFarAhead
from shtalk.crypto.ratchet import ENC_HEADER_LEN, kdf_ck, message_keys

from .test_crypto_support import Pair


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
        fresh.ratchet.cks = None
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
        sb.ratchet.ad = sb.ratchet.ad[:-1] + b"\x00"
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
